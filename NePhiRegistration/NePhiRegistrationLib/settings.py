"""Registration options as one plain dataclass that builds the engine's command line.

Standard library only. The panel's parameter node (``parameters.py``) and the scripting API
(``NePhiRegistrationLogic().register(..., **expert)``) both end here, so there is one translation from user
choices to ``nephireg register`` arguments, and it goes through :func:`nephireg.protocol.register_arguments`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from nephireg import protocol

# 0 / 0.0 / "" in the panel mean "the preset's default" (a spin box cannot hold None).
PRESET_DEFAULT = 0


@dataclass
class RegistrationSettings:
    """What the user chose. Units: ``regularization`` is the method's smoothness weight (unitless),
    ``gridSpacingMm`` the working-grid spacing in mm."""

    method: str = "adam"
    preset: str = "generic"
    iterations: int = PRESET_DEFAULT  # 0 = preset default
    regularization: float = 0.0  # 0 = preset default
    gridSpacingMm: float = 0.0  # 0 = preset default
    affinePrealignment: bool = True  # False -> --prealign none
    device: str = "auto"
    modelPath: str = ""  # "" = the default model of the model store
    writeWarped: bool = True
    writeOverview: bool = False  # the engine's overview.png: the panel never shows it, so it is not drawn
    keepTemporaryFiles: bool = False
    keepEngineLoaded: bool = True  # the module's engine server between runs (Linux; engineserver.py)
    seed: Optional[int] = None
    methodOptions: Dict[str, Any] = field(default_factory=dict)  # any method option (``--option KEY=JSON``)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad option (before any file is written or process started)."""
        for name, value, choices in (
            ("method", self.method, protocol.METHODS),
            ("preset", self.preset, protocol.PRESETS),
            ("device", self.device, protocol.DEVICES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        if self.iterations < 0 or self.regularization < 0 or self.gridSpacingMm < 0:
            raise ValueError("iterations, regularization and gridSpacingMm must be >= 0 (0 = preset default)")

    @classmethod
    def fromOptions(cls, method: str = "adam", preset: str = "generic", **expert: Any) -> RegistrationSettings:
        """Settings from the scripting API's keyword arguments; unknown keywords are an error that lists the
        known ones (a typo must not be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"method", "preset"}
        unknown = sorted(set(expert) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(method=method, preset=preset, **expert)

    def asDict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def engineArguments(self, fixed: str, moving: str, out: str, fixedMask: Optional[str] = None,
                        movingMask: Optional[str] = None, device: Optional[str] = None,
                        initialTransform: Optional[str] = None) -> List[str]:
        """Arguments after ``python -m nephireg`` (``device`` overrides ``self.device``, for the CPU retry;
        ``initialTransform``: the moving volume's linear parent written as an ITK file, or None)."""
        args = protocol.register_arguments(
            fixed=fixed,
            moving=moving,
            out=out,
            method=self.method,
            preset=self.preset,
            fixed_mask=fixedMask,
            moving_mask=movingMask,
            device=device or self.device,
            iterations=self.iterations or None,
            regularization=self.regularization or None,
            grid_spacing_mm=self.gridSpacingMm or None,
            prealign="preset" if self.affinePrealignment else "none",
            model=(self.modelPath or None) if self.method != "adam" else None,
            seed=self.seed,
            overwrite=True,
            progress_jsonl=True,
            write_warped=self.writeWarped,
            initial_transform=initialTransform,
            write_overview=self.writeOverview,
        )
        for key, value in sorted(self.methodOptions.items()):
            args += ["--option", f"{key}={json.dumps(value)}"]
        return args


def settingsFromMapping(values: Mapping[str, Any]) -> RegistrationSettings:
    """Settings from any mapping with (a superset of) the dataclass's field names (a parameter node's values)."""
    names = {f.name for f in dataclasses.fields(RegistrationSettings)}
    return RegistrationSettings(**{k: v for k, v in values.items() if k in names})
