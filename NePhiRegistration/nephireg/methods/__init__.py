"""Registration methods. Each is one function

    run(pair: PreparedPair, options: Mapping[str, Any], reporter: Reporter) -> DisplacementField

from a prepared pair to a displacement field on the pair's working space (see :mod:`nephireg.fields`).
``options`` are the preset's defaults with the user's overrides (common keys: ``iterations``,
``regularization``, ``grid_spacing_mm``, ``model``); each method validates its own in a ``Settings``
dataclass. Modules are imported on demand: importing this package is cheap.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable, Dict, Mapping, Optional

from nephireg.protocol import METHODS

_MODULES = {"adam": "nephireg.methods.adam", "nephi": "nephireg.methods.nephi", "nephi-io": "nephireg.methods.nephi"}
_FUNCTIONS = {"adam": "run", "nephi": "run_predict", "nephi-io": "run_instance_optimisation"}
assert set(_MODULES) == set(METHODS)

MethodFunction = Callable[..., Any]


def get_method(name: str) -> MethodFunction:
    """The ``run`` function of method ``name`` (one of :data:`nephireg.protocol.METHODS`)."""
    return getattr(method_module(name), _FUNCTIONS[name])


def method_module(name: str) -> ModuleType:
    """The module of method ``name``: its ``run`` function, ``Settings``, ``OPTION_RULES`` and
    ``coarsest_pooling(settings, grid)``."""
    if name not in _MODULES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(_MODULES[name])


def method_availability(name: str) -> Mapping[str, Any]:
    """``{"available": bool, "reason": str}``: whether ``name`` can run here (e.g. a model is needed)."""
    module = importlib.import_module(_MODULES[name])
    check = getattr(module, "availability", None)
    return check() if check else {"available": True, "reason": ""}


def model_record(name: str, settings: Any, preset: str) -> Optional[Dict[str, Any]]:
    """Provenance of the trained model a run of method ``name`` with its resolved ``settings`` on ``preset`` uses
    (``{name, file, sha256, card, anatomy, modality, preset}``), or None when it uses none."""
    record = getattr(method_module(name), "model_record", None)
    return record(name, settings, preset) if record else None
