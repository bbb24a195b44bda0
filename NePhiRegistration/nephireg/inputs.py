"""What to register (:class:`Request`) and its read, checked, normalised images (:class:`Inputs`); no torch.

Reading, deriving lung masks and dilating masks need only SimpleITK and numpy, so :func:`prefetch_inputs` can do
them (and the pre-alignment, the resampling onto the working grid and the checks before registration) while the
caller imports torch: in a forked child process where it can, else in a thread (:class:`PrefetchedInputs`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from nephireg import io
from nephireg.background import on_both
from nephireg.errors import InputError
from nephireg.forked import ForkedWork, Send, can_fork
from nephireg.initial import read_initial_transform
from nephireg.preprocess import WorkingImages, dilate, normalise_with_window, working_images
from nephireg.presets import Preset, get_preset
from nephireg.progress import Reporter, WarningsHeld
from nephireg.quality import BeforeRegistration


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
    masks_derived: bool  # at least one mask derived (lung-ct); per image: mask_sources
    fixed_region: Optional[sitk.Image]  # the mask dilated by the preset's margin: where similarity counts
    moving_region: Optional[sitk.Image]
    mask_sources: Tuple[str, str] = ("none", "none")  # fixed, moving: each "given", "derived" or "none"
    # Masks of one definition for the pre-alignment, when they differ from fixed_mask / moving_mask (see
    # _alignment_masks); None: those two.
    alignment_masks: Optional[Tuple[Optional[sitk.Image], Optional[sitk.Image]]] = None
    initial: Optional[np.ndarray] = None  # 4x4 fixed -> moving (LPS mm) of request.initial_transform
    # (low, high): the intensity window moving_norm was made with (nephireg.preprocess.in_window maps the moving
    # image's intensities, e.g. of the warped output, as moving_norm's); None: not known (then resample moving_norm)
    moving_window: Optional[Tuple[float, float]] = None

    def prealignment_masks(self) -> Tuple[Optional[sitk.Image], Optional[sitk.Image]]:
        """(fixed, moving) masks the pre-alignment uses (their centroids, for ``center``)."""
        return self.alignment_masks or (self.fixed_mask, self.moving_mask)

    def describe_masks(self) -> str:
        """The manifest's ``parameters.masks``: "given", "derived (lung)", "none", or per image when they differ."""
        words = {"given": "given", "derived": "derived (lung)", "none": "none"}
        fixed, moving = self.mask_sources
        if fixed == moving:
            return words[fixed]
        return f"fixed {words[fixed]}, moving {words[moving]}"


StageCallback = Callable[[str, str], None]
"""(stage name, human message), as :meth:`nephireg.progress.Reporter.stage` takes them."""

WarnCallback = Callable[[str, str], None]
"""(code, message), as :meth:`nephireg.progress.Reporter.warn` takes them."""

LUNG_MASK_NOT_DERIVED = "lung-mask-not-derived"
"""Warning code: no lung mask could be derived from an image; the run goes on without that image's mask."""


def read_inputs(request: Request, preset: Preset, reporter: Reporter) -> Inputs:
    """Read and check both images (and masks), derive lung masks if the preset says so, normalise intensities.

    Raises :class:`nephireg.errors.InputError` naming the file for any bad input.
    """
    return _read(request, preset, reporter.stage, reporter.warn)


def _read(request: Request, preset: Preset, stage: StageCallback, warn: WarnCallback) -> Inputs:
    stage("read", "Reading and checking the images")
    fixed = io.read_image(request.fixed, "fixed")
    moving = io.read_image(request.moving, "moving")
    fixed_mask = io.read_mask(request.fixed_mask, fixed, "fixed mask") if request.fixed_mask else None
    moving_mask = io.read_mask(request.moving_mask, moving, "moving mask") if request.moving_mask else None
    initial = read_initial_transform(request.initial_transform) if request.initial_transform else None
    sources = ["none" if m is None else "given" for m in (fixed_mask, moving_mask)]
    alignment = None
    if preset.derive_lung_masks and (fixed_mask is None or moving_mask is None):
        stage("masks", "Deriving lung masks")
        fixed_mask, moving_mask = _derive_missing(request, fixed, moving, fixed_mask, moving_mask, sources, warn)
        alignment = _alignment_masks(fixed, moving, fixed_mask, moving_mask, sources)
    stage("preprocess", f"Normalising intensities ({preset.name})")
    regions = on_both(lambda m: None if m is None else dilate(m, preset.mask_dilation_mm), fixed_mask, moving_mask)
    fixed_norm, _ = normalise_with_window(fixed, preset, fixed_mask)
    moving_norm, moving_window = normalise_with_window(moving, preset, moving_mask)
    return Inputs(fixed, moving, fixed_norm, moving_norm, fixed_mask, moving_mask,
                  "derived" in sources, *regions, mask_sources=(sources[0], sources[1]), alignment_masks=alignment,
                  initial=initial, moving_window=moving_window)


def _derive_missing(request: Request, fixed: sitk.Image, moving: sitk.Image, fixed_mask: Optional[sitk.Image],
                    moving_mask: Optional[sitk.Image], sources: List[str], warn: WarnCallback):
    """Lung masks for the images that have none (a user's mask is kept; the other image's is derived, so that
    one given mask never leaves the other image unmasked). ``sources`` is updated in place. An image whose
    derivation fails goes on without a mask, with a :data:`LUNG_MASK_NOT_DERIVED` warning: a valid CT is never
    refused for its mask."""
    from nephireg.lungmask import lung_mask

    def derived(image_and_mask: Tuple[sitk.Image, Optional[sitk.Image]]) -> Union[sitk.Image, InputError, None]:
        image, given = image_and_mask
        if given is not None:
            return None
        try:
            return lung_mask(image)
        except InputError as exc:
            return exc

    masks = [fixed_mask, moving_mask]
    failures = []
    outcomes = on_both(derived, (fixed, fixed_mask), (moving, moving_mask))
    for n, (outcome, role, path) in enumerate(zip(outcomes, ("fixed", "moving"), (request.fixed, request.moving))):
        if isinstance(outcome, InputError):
            failures.append((role, path, outcome.problem))
        elif outcome is not None:
            masks[n] = outcome
            sources[n] = "derived"
    for role, path, problem in failures:
        kept = [f"the {r} image's {sources[n]} mask" for n, r in enumerate(("fixed", "moving")) if masks[n] is not None]
        course = f"the run goes on with {kept[0]} only" if kept else "the run goes on without masks"
        warn(LUNG_MASK_NOT_DERIVED, f"no lung mask could be derived from the {role} image ({path}): {problem}; "
                                    f"{course} (give a {role} mask to restore it)")
    return masks[0], masks[1]


def _alignment_masks(fixed: sitk.Image, moving: sitk.Image, fixed_mask: Optional[sitk.Image],
                     moving_mask: Optional[sitk.Image], sources: List[str]):
    """With one mask given and the other derived: both images' derived masks, for the pre-alignment only (None
    otherwise, or when the given image yields none). A user's mask and a derived one may draw the lung boundary
    differently: on the shared pair the reference masks' centroids sit (0.65, -0.13, 1.42) mm from the derived
    masks' on both images, so a centroid pre-alignment from one of each starts 1.5 mm off (adam then ends at
    1.362 mm mean against 1.328 with both centroids derived, docs/benchmarks.md). Similarity regions and the
    working-grid crop keep the user's mask."""
    from nephireg.lungmask import lung_mask

    if sorted(sources) != ["derived", "given"]:
        return None
    given = 0 if sources[0] == "given" else 1
    try:
        derived = lung_mask((fixed, moving)[given])
    except InputError:
        return None
    return (derived, moving_mask) if given == 0 else (fixed_mask, derived)


BEFORE_WAIT_S = 60.0
"""How long :meth:`PrefetchedInputs.before_registration` waits before the pipeline measures the checks itself (a
safeguard against a child that hangs; on the lung pair they are ready a second before they are asked for)."""

_LATER_STAGES = ("prealign", "prepare")
"""Stages the prefetch runs after reading; their events are replayed where the pipeline takes their outcome
(:meth:`PrefetchedInputs.prealignment`, :meth:`PrefetchedInputs.working_images`), not with the reading's."""


class PrefetchedInputs:
    """:func:`read_inputs`, then the pre-alignment, the images on the working grid and the result checks that need
    no result (:func:`nephireg.quality.before_registration`), in the background; :meth:`result` waits for the
    inputs, :meth:`prealignment` gives the pre-alignment, :meth:`working_images` the resampled pair,
    :meth:`before_registration` those measures (SimpleITK and numpy alone: this overlaps the time torch takes to load).

    Where it can (:func:`nephireg.forked.can_fork`: a command-line process before torch is imported) the work runs in
    a forked child on the other core, and a thread of this process takes its results (the images and the
    pre-alignment first, then the working arrays) and measures the checks before registration meanwhile; otherwise
    that thread does the work itself. A child that ends without a result (any error) leaves the rest of the work to
    the thread, so errors and warnings are the in-process ones.

    The stage and warning events are recorded and replayed by :meth:`result`, so a reporter sees them in the usual
    order after the run's start event; the time spent waiting is reported as the ``read`` stage (so a manifest's
    ``timings_s`` then counts the mask derivation, the pre-alignment and the resampling under ``read``). An error of
    the pre-alignment or the resampling is raised where the pipeline would have met it.
    """

    def __init__(self, request: Request, preset: Preset) -> None:
        self.request = request
        self.preset = preset
        self._stages: List[Tuple[str, str]] = []
        self._warnings = WarningsHeld()
        self._outcome: Optional[Inputs] = None
        self._error: Optional[BaseException] = None
        self._prealignment: Optional[Tuple[str, np.ndarray]] = None
        self._prealignment_error: Optional[BaseException] = None
        self._working: Optional[WorkingImages] = None
        self._working_error: Optional[BaseException] = None
        self._before: Optional[BeforeRegistration] = None
        self._cancelled = threading.Event()
        self._inputs_ready = threading.Event()  # outcome or error, prealignment and working images (or their errors)
        self._before_ready = threading.Event()
        self._child = _forked(self._in_child)
        self.worked_in = "none yet"  # who did the reading: "child process" or "this process" (diagnostics, tests)
        # Not a daemon: if a run in this process (a library call of cli.main) fails before taking the result, the
        # interpreter waits for the thread instead of finalising while it is inside SimpleITK. The command line
        # (cli.console_main) ends with os._exit, which does not wait: the thread only reads, so nothing is lost.
        self._thread = threading.Thread(target=self._run, name="nephireg-read")
        self._thread.start()

    def _run(self) -> None:
        measuring: Optional[threading.Thread] = None
        try:
            try:
                if not self._take_from_child(self._take_inputs):
                    if not self._cancelled.is_set():
                        self._read_and_prealign()
                        self._prepare()
                else:
                    # The checks before registration need only the images and the pre-alignment: measured here, on
                    # the core the child does not use, while it resamples (this process is waiting for it then).
                    measuring = threading.Thread(target=self._measure_before_here, name="nephireg-before")
                    try:
                        measuring.start()
                    except RuntimeError:  # no thread to be had: measured below, after the working arrays
                        measuring = None
                    if not self._take_from_child(self._take_working) and not self._cancelled.is_set():
                        self._prepare()
            finally:
                self._inputs_ready.set()
            if measuring is not None:
                measuring.join()
            elif not self._cancelled.is_set():
                self._measure_before_here()
        finally:
            self._before_ready.set()
            if self._child is not None:
                self._child.finish()

    def _measure_before_here(self) -> None:
        self._before = self._measure_before()

    def _stage(self, name: str, message: str) -> None:
        self._stages.append((name, message))

    def _read_and_prealign(self) -> None:
        """:func:`read_inputs` and the pre-alignment in this process; their errors kept for the pipeline."""
        self.worked_in = "this process"
        try:
            self._outcome = _read(self.request, self.preset, self._stage, self._warnings.warn)
        except BaseException as exc:  # handed to the caller's thread by result()
            self._error = exc
            return
        from nephireg.prealign import prealignment_of

        try:
            self._prealignment = prealignment_of(self.request, self.preset, self._outcome, self._stage,
                                                 self._cancelled.is_set)
        except BaseException as exc:  # handed over by prealignment()
            self._prealignment_error = exc

    def _prepare(self) -> None:
        """The pair on the working grid, after :meth:`_read_and_prealign` succeeded; its error kept."""
        if self._outcome is None or self._prealignment is None or self._cancelled.is_set():
            return
        try:  # bounded in size (preprocess.MAX_WORKING_VOXELS), so safe before the pipeline's geometry check
            self._stage("prepare", "Resampling the images onto the working grid")
            self._working = working_images(self._outcome, self.preset, self._prealignment[1])
        except BaseException as exc:  # handed over by working_images()
            self._working_error = exc

    def _measure_before(self) -> Optional[BeforeRegistration]:
        """:func:`nephireg.quality.before_registration`, or None when the inputs failed or it raised (the pipeline
        then measures it itself and meets the error there)."""
        if self._prealignment is None or self._outcome is None or self._cancelled.is_set():
            return None
        from nephireg.geometry import Grid
        from nephireg.quality import before_registration

        try:
            return before_registration(self._outcome, Grid.of(self._outcome.fixed), self._prealignment[1])
        except Exception:  # noqa: BLE001 - measured again, and raised, where the pipeline needs it
            return None

    def _in_child(self, send: Send) -> None:
        """The forked child's work: reading and pre-aligning, then the working grid, each result sent to the parent
        as it is ready (it copies the images and measures the checks before registration while the child still
        resamples); nothing sent after an error (the parent's thread then does that step and the rest itself, and
        meets the error where the pipeline expects it)."""
        self._read_and_prealign()
        if self._error is not None or self._prealignment_error is not None:
            return
        send((self._stages, self._warnings.held, self._outcome, self._prealignment))
        sent = len(self._stages)
        self._prepare()
        if self._working is not None:
            send((self._stages[sent:], self._working))

    def _take_from_child(self, take: Callable[[Any], None]) -> bool:
        """The child's next message given to ``take``; False when there is no child, it ended without one, or its
        message is not what ``take`` expects (the child is stopped then: this thread does the work)."""
        if self._child is None or self._cancelled.is_set():
            return False
        try:
            take(self._child.receive())
        except Exception:  # noqa: BLE001 - ChildEnded, or a message that does not fit: no result from the child
            self._child.stop()
            return False
        return True

    def _take_inputs(self, message: Any) -> None:
        stages, held, outcome, prealignment = message
        if not isinstance(outcome, Inputs) or not isinstance(prealignment[1], np.ndarray):
            raise TypeError("the child's first message is not (stages, warnings, Inputs, prealignment)")
        self._stages, self._warnings.held, self._outcome, self._prealignment = stages, held, outcome, prealignment
        self.worked_in = "child process"

    def _take_working(self, message: Any) -> None:
        # The arrays are views of this message's own mapping of the shared file (nephireg.forked): kept as they are
        # (the images' mapping is released with the first message, SimpleITK having copied them).
        stages, working = message
        if not isinstance(working, WorkingImages):
            raise TypeError("the child's second message is not (stages, WorkingImages)")
        self._stages = self._stages + list(stages)
        self._working = working

    def result(self, reporter: Reporter) -> Inputs:
        try:
            return self._result(reporter)
        except BaseException:  # e.g. a cancellation: the pre-alignment stops at its next iteration, a child is killed
            self.cancel()
            raise

    def _result(self, reporter: Reporter) -> Inputs:
        reporter.stage("read", "Reading and checking the images")
        while not self._inputs_ready.wait(0.1):  # short waits, so a cancellation is seen within 0.1 s
            reporter.check_cancel()
        for name, message in self._stages[1:]:
            if name in _LATER_STAGES:  # replayed where the pipeline takes their outcome
                continue
            reporter.stage(name, message)
            if name == "masks":  # the warnings of the mask stage, in it
                self._warnings.replay(reporter)
        if self._error is not None:
            raise self._error
        if self._outcome is None:  # cancelled before the work was done (the cancellation is raised above)
            raise RuntimeError("the prefetch ended without reading the inputs")
        return self._outcome

    def working_images(self, reporter: Reporter) -> WorkingImages:
        """The pair on the working grid (:func:`nephireg.preprocess.working_images`; after :meth:`prealignment`)."""
        self._replay("prepare", reporter)
        if self._working_error is not None:
            raise self._working_error
        if self._working is None:
            raise RuntimeError("working_images() before prealignment(), or after a cancellation")
        return self._working

    def before_registration(self, check_cancel: Callable[[], None] = lambda: None,
                            timeout_s: float = BEFORE_WAIT_S) -> Optional[BeforeRegistration]:
        """:func:`nephireg.quality.before_registration` of these inputs (call after :meth:`working_images`), once
        measured (in the child or this process's thread, while the method ran; on the lung pair it is ready long
        before the write stage asks); ``check_cancel`` is called every 0.1 s while waiting (it raises to cancel).
        None if it could not be measured here, the prefetch was cancelled, or it is not ready after ``timeout_s``
        (a child that hangs is then stopped): the caller measures it itself."""
        deadline = time.monotonic() + timeout_s
        while not self._before_ready.wait(0.1):
            check_cancel()
            if time.monotonic() > deadline:
                self.cancel()
                return None
        return self._before

    def _replay(self, name: str, reporter: Reporter) -> None:
        for stage, message in self._stages:
            if stage == name:
                reporter.stage(stage, message)

    def cancel(self) -> None:
        """Stop the pre-alignment at its next iteration, or kill the child (a run cancelled before it takes the
        result, or ended: no work goes on in a process whose run has ended)."""
        self._cancelled.set()
        if self._child is not None:
            self._child.stop()

    def prealignment(self, reporter: Reporter) -> Tuple[str, np.ndarray]:
        """``(mode, 4x4)`` as :func:`nephireg.prealign.prealignment_of` gave it (call after :meth:`result`)."""
        if not self._inputs_ready.is_set() or self._outcome is None:
            raise RuntimeError("prealignment() before result()")
        self._replay("prealign", reporter)
        if self._prealignment_error is not None:
            raise self._prealignment_error
        assert self._prealignment is not None
        return self._prealignment


def _forked(work: Callable[[Send], None]) -> Optional[ForkedWork]:
    """``work`` in a forked child where :func:`nephireg.forked.can_fork` allows it and the system gives a pipe, a
    memfd and a process; None otherwise (the prefetch thread then does the work)."""
    if not can_fork():
        return None
    try:
        return ForkedWork(work)
    except OSError:
        return None


def prefetch_inputs(request: Request) -> Optional[PrefetchedInputs]:
    """Start reading ``request``'s inputs in the background; None when its preset is unknown (the run reports it)."""
    try:
        preset = get_preset(request.preset)
    except ValueError:
        return None
    return PrefetchedInputs(request, preset)
