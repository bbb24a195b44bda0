"""Registration methods. Each is one function

    run(pair: PreparedPair, options: Mapping[str, Any], reporter: Reporter) -> DisplacementField

from a prepared pair to a displacement field on the pair's working space (see :mod:`nephireg.fields`).
``options`` are the preset's defaults with the user's overrides (common keys: ``iterations``,
``regularization``, ``grid_spacing_mm``, ``model``); each method validates its own in a ``Settings``
dataclass. Modules are imported on demand: importing this package is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Mapping, Optional

from nephireg.protocol import METHODS

_MODULES = {"adam": "nephireg.methods.adam", "nephi": "nephireg.methods.nephi", "nephi-io": "nephireg.methods.nephi"}
_FUNCTIONS = {"adam": "run", "nephi": "run_predict", "nephi-io": "run_instance_optimisation"}
assert set(_MODULES) == set(METHODS)

MethodFunction = Callable[..., Any]


def get_method(name: str) -> MethodFunction:
    """The ``run`` function of method ``name`` (one of :data:`nephireg.protocol.METHODS`)."""
    if name not in _MODULES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module = importlib.import_module(_MODULES[name])
    return getattr(module, _FUNCTIONS[name])


def method_availability(name: str) -> Mapping[str, Any]:
    """``{"available": bool, "reason": str}``: whether ``name`` can run here (e.g. a model is needed)."""
    module = importlib.import_module(_MODULES[name])
    check = getattr(module, "availability", None)
    return check() if check else {"available": True, "reason": ""}


def resolved_settings(name: str, options: Mapping[str, Any], seed: int) -> Dict[str, Any]:
    """The values method ``name`` runs with: its ``Settings`` resolved from ``options`` and the run's ``seed``."""
    return importlib.import_module(_MODULES[name]).resolved_settings(name, options, seed)


def model_record(name: str, options: Mapping[str, Any], preset: str) -> Optional[Dict[str, Any]]:
    """Provenance of the trained model a run of method ``name`` on ``preset`` uses (``{name, file, sha256, card,
    anatomy, modality, preset}``), or None when it uses none."""
    record = getattr(importlib.import_module(_MODULES[name]), "model_record", None)
    return record(name, options, preset) if record else None
