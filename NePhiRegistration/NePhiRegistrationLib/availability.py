"""Which methods can run here, and why not. Standard library only; nothing is imported that loads torch.

NePhi predict needs a trained model (from the model store, ``nephireg.modelstore``, or a file the user picks);
NePhi + IO and continuous Adam need no model. Every method needs torch in the engine's interpreter, which is
checked with ``importlib.util.find_spec`` (finds the package without importing it).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from nephireg import protocol


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""


def torchFound() -> bool:
    """True when ``import torch`` would find a package in this interpreter (Slicer's Python = PythonSlicer's)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def listModels() -> List[dict]:
    """The model store's models ([] when the store module is absent or fails: the panel must still open)."""
    try:
        from nephireg import modelstore
    except ImportError:
        return []
    try:
        return list(modelstore.list_models())
    except Exception:  # a broken cache must not blank the panel
        return []


def defaultModelPath() -> Optional[str]:
    try:
        from nephireg import modelstore
    except ImportError:
        return None
    try:
        return modelstore.default_model_path()
    except Exception:
        return None


def modelCacheDir() -> Optional[str]:
    """The user folder where downloaded models are cached (None when the model store is absent)."""
    try:
        from nephireg import modelstore
    except ImportError:
        return None
    return modelstore.cache_dir()


def methodAvailability(modelPath: str = "") -> Dict[str, Availability]:
    """For each protocol method: can it run with this model choice (``""`` = the store's default)?"""
    result = {method: Availability(True) for method in protocol.METHODS}
    if modelPath:
        if not os.path.isfile(modelPath):
            result["nephi"] = Availability(False, f"the model file {modelPath} does not exist")
    elif defaultModelPath() is None:
        result["nephi"] = _defaultModelState()
    return result


def _defaultModelState() -> Availability:
    """NePhi predict without an installed default model: runnable if the store can download it."""
    try:
        from nephireg import modelstore  # noqa: F401
    except ImportError:
        return Availability(False, "this build has no model store (nephireg.modelstore is missing)")
    default = next((m for m in listModels() if m.get("default")), None)
    if default is not None and default.get("url"):
        return Availability(True, f"the default model {default['name']} is downloaded on first use")
    return Availability(False, "no trained NePhi model is installed (pick a model file in Expert settings)")
