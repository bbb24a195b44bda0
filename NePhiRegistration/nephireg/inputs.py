"""What to register (:class:`Request`) and its read, checked, normalised images (:class:`Inputs`); no torch.

Reading, deriving lung masks and dilating masks need only SimpleITK and numpy, so :func:`prefetch_inputs` can do
them in a thread while the caller imports torch (about 2 s on a 2-core CPU, measured to overlap: SimpleITK's
filters release the interpreter lock).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from nephireg import io
from nephireg.errors import InputError
from nephireg.initial import read_initial_transform
from nephireg.preprocess import dilate, normalise_intensities
from nephireg.presets import Preset, get_preset
from nephireg.progress import Reporter


@dataclass
class Request:
    """What to register and how. Paths are files SimpleITK reads (or DICOM folders)."""

    fixed: str
    moving: str
    out: str
    method: str = "adam"
    preset: str = "generic"
    fixed_mask: Optional[str] = None
    moving_mask: Optional[str] = None
    device: str = "auto"
    prealign: str = "preset"
    options: Dict[str, Any] = field(default_factory=dict)  # method options (iterations, regularization, ...)
    seed: int = 0
    overwrite: bool = False
    write_warped: bool = True
    write_overview: bool = True
    initial_transform: Optional[str] = None  # ITK linear transform file, fixed -> moving (LPS), before the method


@dataclass
class Inputs:
    """The read, checked and normalised images of a pair (original intensities kept for the warped output)."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_norm: sitk.Image
    moving_norm: sitk.Image
    fixed_mask: Optional[sitk.Image]
    moving_mask: Optional[sitk.Image]
    masks_derived: bool
    fixed_region: Optional[sitk.Image]  # the mask dilated by the preset's margin: where similarity counts
    moving_region: Optional[sitk.Image]
    initial: Optional[np.ndarray] = None  # 4x4 fixed -> moving (LPS mm) of request.initial_transform


StageCallback = Callable[[str, str], None]
"""(stage name, human message), as :meth:`nephireg.progress.Reporter.stage` takes them."""


def read_inputs(request: Request, preset: Preset, reporter: Reporter) -> Inputs:
    """Read and check both images (and masks), derive lung masks if the preset says so, normalise intensities.

    Raises :class:`nephireg.errors.InputError` naming the file for any bad input.
    """
    return _read(request, preset, reporter.stage)


def _read(request: Request, preset: Preset, stage: StageCallback) -> Inputs:
    stage("read", "Reading and checking the images")
    fixed = io.read_image(request.fixed, "fixed")
    moving = io.read_image(request.moving, "moving")
    fixed_mask = io.read_mask(request.fixed_mask, fixed, "fixed mask") if request.fixed_mask else None
    moving_mask = io.read_mask(request.moving_mask, moving, "moving mask") if request.moving_mask else None
    initial = read_initial_transform(request.initial_transform) if request.initial_transform else None
    derived = False
    if preset.derive_lung_masks and fixed_mask is None and moving_mask is None:
        from nephireg.lungmask import lung_mask

        stage("masks", "Deriving lung masks")
        fixed_mask, moving_mask, derived = _derive(lung_mask, fixed, request.fixed), _derive(
            lung_mask, moving, request.moving), True
    stage("preprocess", f"Normalising intensities ({preset.name})")
    regions = [None if m is None else dilate(m, preset.mask_dilation_mm) for m in (fixed_mask, moving_mask)]
    return Inputs(fixed, moving, normalise_intensities(fixed, preset, fixed_mask),
                  normalise_intensities(moving, preset, moving_mask), fixed_mask, moving_mask, derived, *regions,
                  initial=initial)


def _derive(make_mask, image: sitk.Image, path: str) -> sitk.Image:
    try:
        return make_mask(image)
    except InputError as exc:
        raise InputError(f"{exc.problem} (lung-ct preset; give masks or use another preset)", path) from None


class PrefetchedInputs:
    """:func:`read_inputs` running in a thread; :meth:`result` waits for it and gives its outcome.

    The stage events are recorded in the thread and replayed by :meth:`result`, so a reporter sees them in the
    usual order after the run's start event; the time spent waiting is reported as the ``read`` stage (so a
    manifest's ``timings_s`` then counts the mask derivation under ``read``).
    """

    def __init__(self, request: Request, preset: Preset) -> None:
        self.request = request
        self.preset = preset
        self._stages: List[Tuple[str, str]] = []
        self._outcome: Optional[Inputs] = None
        self._error: Optional[BaseException] = None
        # Not a daemon: if a run in this process (a library call of cli.main) fails before taking the result, the
        # interpreter waits for the thread instead of finalising while it is inside SimpleITK. The command line
        # (cli.console_main) ends with os._exit, which does not wait: the thread only reads, so nothing is lost.
        self._thread = threading.Thread(target=self._run, name="nephireg-read")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome = _read(self.request, self.preset, lambda name, message: self._stages.append((name, message)))
        except BaseException as exc:  # handed to the caller's thread by result()
            self._error = exc

    def result(self, reporter: Reporter) -> Inputs:
        reporter.stage("read", "Reading and checking the images")
        while self._thread.is_alive():  # short waits, so a cancellation is seen within 0.1 s
            reporter.check_cancel()
            self._thread.join(0.1)
        for name, message in self._stages[1:]:
            reporter.stage(name, message)
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome


def prefetch_inputs(request: Request) -> Optional[PrefetchedInputs]:
    """Start reading ``request``'s inputs in the background; None when its preset is unknown (the run reports it)."""
    try:
        preset = get_preset(request.preset)
    except ValueError:
        return None
    return PrefetchedInputs(request, preset)
