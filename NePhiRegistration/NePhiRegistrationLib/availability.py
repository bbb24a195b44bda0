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
from NePhiRegistrationLib.i18n import _


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
            result["nephi"] = Availability(False, _("the model file {path} does not exist").format(path=modelPath))
    elif defaultModelPath() is None:
        result["nephi"] = _defaultModelState()
    return result


def _defaultModelState() -> Availability:
    """NePhi predict without an installed default model: runnable if the store can download it."""
    try:
        from nephireg import modelstore  # noqa: F401
    except ImportError:
        return Availability(False, _("this build has no model store (nephireg.modelstore is missing)"))
    default = next((m for m in listModels() if m.get("default")), None)
    if default is not None and default.get("url"):
        return Availability(True, _("the default model {name} is downloaded on first use").format(
            name=default["name"]))
    return Availability(False, _("no trained NePhi model is installed (pick a model file in Expert settings)"))


def intendedUse(modelPath: str = "", preset: Optional[str] = None) -> Optional[dict]:
    """``{"anatomy", "modality", "preset"}`` the model is meant for, or None when unknown
    (``nephireg.modelstore.intended_use``). ``""`` = the default model of ``preset``, as the engine picks it."""
    try:
        from nephireg import modelstore
    except ImportError:
        return None
    try:
        return modelstore.intended_use(modelPath or modelstore.default_model_name(preset))
    except Exception:  # an unreadable registry or model file: unknown, the run itself reports the problem
        return None


def modelPresetMismatch(method: str, preset: str, modelPath: str = "", use: Optional[dict] = None) -> str:
    """Why the model a NePhi run would use is not meant for ``preset`` ("" = it is, the method uses no model, or
    its intended use is unknown). ``use``: the model's intended use if already known (else :func:`intendedUse`).
    ``nephi`` uses the default model when none is chosen; ``nephi-io`` uses one only when chosen."""
    if method not in ("nephi", "nephi-io") or (method == "nephi-io" and not modelPath):
        return ""
    use = use if use is not None else intendedUse(modelPath, preset)
    if not use or not use.get("preset") or use["preset"] == preset:
        return ""
    what = " ".join(str(use.get(key) or "") for key in ("anatomy", "modality")).strip() or use["preset"]
    return _("the model is meant for {what} (preset {intended}), not the chosen preset {preset}; expect a worse "
             "result").format(what=what, intended=protocol.PRESET_LABELS.get(use["preset"], use["preset"]),
                              preset=protocol.PRESET_LABELS.get(preset, preset))


def clearModelCache(folder: str) -> List[str]:
    """Delete the model files (``*.pt``) and partial downloads (``.*.part``) directly in ``folder`` - nothing else,
    wherever ``NEPHIREG_CACHE_DIR`` points. Returns the deleted paths."""
    deleted = []
    if not folder or not os.path.isdir(folder):
        return deleted
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path) and isModelCacheFile(name):
            os.remove(path)
            deleted.append(path)
    return deleted


PARTIAL_DOWNLOAD_SUFFIX = ".part"  # nephireg.modelstore.fetch downloads into ".<name>.<random>.part"


def isModelCacheFile(name: str) -> bool:
    """A model file or a partial download, as ``nephireg.modelstore`` names them."""
    from nephireg.modelstore import MODEL_SUFFIX

    return name.endswith(MODEL_SUFFIX) or (name.startswith(".") and name.endswith(PARTIAL_DOWNLOAD_SUFFIX))
