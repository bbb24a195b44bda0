"""How to start the engine: which interpreter, which command, which environment. Standard library only.

Inside Slicer the interpreter is ``PythonSlicer`` (Slicer's own Python, where the PyTorch extension installs
torch); outside Slicer (tests, scripts) any Python with torch. The module folder that holds the ``nephireg``
package is not on PythonSlicer's import path, so it is put on the child's ``PYTHONPATH`` explicitly - on the
child's environment only, never on ``os.environ``.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import List, Mapping, Optional, Sequence

from nephireg.engine_link import SERVER_ENV

ENGINE_MODULE = "nephireg"
# NePhiRegistration/ (this file is NePhiRegistration/NePhiRegistrationLib/engine.py): the folder holding nephireg/.
MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def findPythonSlicer(executable: Optional[str] = None) -> Optional[str]:
    """Path of PythonSlicer: on PATH inside Slicer, else beside ``executable`` (Slicer's sys.executable lives
    in the same bin folder). None when not found (outside Slicer)."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    folder = os.path.dirname(executable or sys.executable)
    for name in ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def engineCommand(python: str, arguments: Sequence[str]) -> List[str]:
    """``[python, -m, nephireg, *arguments]``."""
    return [python, "-m", ENGINE_MODULE, *arguments]


def childEnvironment(base: Mapping[str, str], device: str = "auto", moduleDir: str = MODULE_DIR,
                     server: Optional[str] = None) -> dict:
    """The engine process's environment: ``base`` (Slicer's startup environment, or os.environ) plus
    the module folder first on PYTHONPATH, unbuffered UTF-8 output (progress lines arrive as written, any
    path prints), the engine server at socket ``server`` (:mod:`NePhiRegistrationLib.engineserver`) or none, and no
    visible GPU when ``device == "cpu"`` (so a CPU run cannot touch a busy GPU)."""
    env = {str(k): str(v) for k, v in base.items()}
    paths = [moduleDir] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != moduleDir]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUTF8"] = "1"
    # Only the module's own server (engineserver: started with the runs' environment, its cancel grace the one
    # runner.EngineProcess waits for), never one the user started at the default socket.
    env[SERVER_ENV] = server or "off"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env
