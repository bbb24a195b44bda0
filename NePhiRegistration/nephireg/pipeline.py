"""One registration from files to a result folder: read -> preset -> masks -> pre-alignment -> method -> outputs.

:func:`register` is the library entry point behind ``nephireg register`` and the Slicer module.
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch

import nephireg
from nephireg import io, quality, validate
from nephireg.background import Background
from nephireg.compose import compose_prealignment
from nephireg.errors import InputError, OutOfMemory
from nephireg.fields import evaluate_on_grid
from nephireg.geometry import Grid, inverse_lattice_mm, overlap_fraction
from nephireg.inputs import Inputs, PrefetchedInputs, Request, read_inputs
from nephireg.inverse import InverseMap, inverse_consistency, invert, write_inverse
from nephireg.jacobian import jacobian_determinant, jacobian_summary
from nephireg.methods import get_method, model_record
from nephireg.overview import overview
from nephireg.pair import PreparedPair
from nephireg.prealign import Prealignment
from nephireg.preprocess import WorkingImages, working_grid_of, working_images
from nephireg.presets import Preset, get_preset
from nephireg.progress import Reporter, SilentReporter, WarningsHeld
from nephireg.protocol import OUTPUT_FILES
from nephireg.resultdir import ResultFolder


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available (use auto or cpu)")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def prealign_matrix(request: Request, preset: Preset, inputs: Inputs, reporter: Reporter) -> Prealignment:
    """The pre-alignment mode used and its 4x4 matrix (fixed -> moving, LPS mm),
    :func:`nephireg.prealign.prealignment_of` on this thread."""
    from nephireg.prealign import prealignment_of

    result = prealignment_of(request, preset, inputs, reporter.stage, lambda: reporter.cancel_requested)
    reporter.check_cancel()
    return result


def check_overlap(fixed: Grid, moving: Grid, prealign: np.ndarray, request: Request) -> None:
    """Refuse pairs whose fields of view share no physical space (after pre-alignment)."""
    if overlap_fraction(fixed, moving, samples_per_axis=7, a_to_b=prealign) == 0.0:
        raise InputError(f"fixed ({request.fixed}) and moving ({request.moving}) images do not overlap in physical "
                         "space; check their origins or use a pre-alignment (--prealign center)", request.moving)


def prepare(request: Request, preset: Preset, images: WorkingImages, device: torch.device) -> PreparedPair:
    """The working-grid tensors a method receives, (1, 1, Z, Y, X) float32, from :class:`WorkingImages`."""
    def tensor(array: Optional[np.ndarray]) -> Optional[torch.Tensor]:
        return None if array is None else torch.from_numpy(array)[None, None].to(device)

    return PreparedPair(images.grid, tensor(images.fixed), tensor(images.moving), tensor(images.fixed_mask),
                        tensor(images.moving_mask), seed=request.seed, preset=preset.name)


Inverse = Callable[[Callable[[], None]], InverseMap]
"""``inverse(stop)``: computes the inverse map, calling ``stop()`` (which raises to give up) between its steps."""
Before = Callable[[Callable[[], None]], Optional[quality.BeforeRegistration]]
"""``before(check)``: :func:`nephireg.quality.before_registration` as the prefetch measured it, or None (then measured
here); ``check`` is called while it waits (raises to stop waiting)."""
BeforeCommit = Callable[[Dict[str, Any], Path], None]
"""``(manifest, staging folder)``: adds files (listed in ``manifest["files"]``) and keys before the commit."""


def register(request: Request, reporter: Optional[Reporter] = None,
             prefetched: Optional[PrefetchedInputs] = None,
             before_commit: Optional[BeforeCommit] = None) -> Dict[str, Any]:
    """Run one registration and write its result folder; returns the manifest (also in ``out/result.json``).

    ``prefetched``: the inputs of this same ``request`` already being read (:func:`nephireg.inputs.prefetch_inputs`).

    ``before_commit``: called with the manifest and the staging folder once the outputs are written (the demo adds
    its inputs and score there), so they become part of the one atomic result.

    Raises InputError for bad input (nothing is written), Cancelled when the reporter is cancelled, OutOfMemory
    when the device runs out of memory. A failed or cancelled run leaves no result behind and a previous result
    untouched (:mod:`nephireg.resultdir`).
    """
    reporter = reporter or SilentReporter()
    started = time.perf_counter()
    validate.check_request(request)  # paths, output folder, every option: before any work
    settings = validate.method_settings(request)
    preset = get_preset(request.preset)
    device = resolve_device(request.device)
    torch.manual_seed(request.seed)
    if prefetched is not None and prefetched.request is not request:
        raise ValueError("prefetched inputs belong to another request")
    inputs = prefetched.result(reporter) if prefetched is not None else read_inputs(request, preset, reporter)
    validate.check_geometry(request, settings, Grid.of(inputs.fixed), Grid.of(inputs.moving),
                            working_grid_of(inputs, preset))
    if prefetched is not None:  # computed while torch loaded
        mode, prealign = prefetched.prealignment(reporter)
    else:
        mode, prealign = prealign_matrix(request, preset, inputs, reporter)
    fixed_grid = Grid.of(inputs.fixed)
    check_overlap(fixed_grid, Grid.of(inputs.moving), prealign, request)
    method = get_method(request.method)
    options = preset.options_for(request.method, request.options)
    try:
        if prefetched is not None:  # resampled while torch loaded
            images = prefetched.working_images(reporter)
        else:
            reporter.stage("prepare", "Resampling the images onto the working grid")
            images = working_images(inputs, preset, prealign)
        pair = prepare(request, preset, images, device)
        field_ = method(pair, options, reporter)
        reporter.stage("field", "Evaluating the displacement on the fixed grid")
        displacement = evaluate_on_grid(field_, fixed_grid, device, cancel=reporter.check_cancel)
    except torch.cuda.OutOfMemoryError as exc:
        raise _gpu_out_of_memory(exc) from None

    def inverse(stop: Callable[[], None]) -> InverseMap:  # from u (the method's own field), while phi is written
        def cancel() -> None:  # the run's cancellation, or the write stage given up (``stop`` raises)
            reporter.check_cancel()
            stop()

        try:
            return invert(field_, u_float32, fixed_grid, Grid.of(inputs.moving), prealign, device,
                          inverse_lattice_mm(pair.grid), cancel=cancel)
        except torch.cuda.OutOfMemoryError as exc:
            raise _gpu_out_of_memory(exc) from None

    # u as the inverse needs it (it iterates in float32); then phi's displacement replaces u in place (one
    # full-grid float64 array fewer to allocate and fault in)
    u_float32 = np.ascontiguousarray(displacement, dtype=np.float32)
    composed = compose_prealignment(fixed_grid, displacement, prealign, out=displacement)
    before: Before = prefetched.before_registration if prefetched is not None else lambda check: None
    return _write_result(request, preset, (mode, prealign), settings, inputs, fixed_grid, composed, inverse, before,
                         options, device, reporter, started, before_commit)


def _gpu_out_of_memory(exc: BaseException) -> OutOfMemory:
    return OutOfMemory(f"the GPU ran out of memory ({exc}); run again with --device cpu")


def _write_result(request: Request, preset: Preset, prealigned: Prealignment, settings: Any, inputs: Inputs, grid: Grid,
                  displacement: np.ndarray, inverse: Inverse, before: Before, options: Dict[str, Any],
                  device: torch.device, reporter: Reporter, started: float,
                  before_commit: Optional[BeforeCommit] = None) -> Dict[str, Any]:
    """The outputs written through the one result writer (:class:`nephireg.resultdir.ResultFolder`); ``inverse``
    computes the inverse map (on a second thread, while phi's files are written)."""
    reporter.stage("write", "Inverting the transform; writing the transform, Jacobian, warped image and inverse")
    with ResultFolder(request.out, request.overwrite) as result:
        manifest = _write_files(request, preset, prealigned, settings, inputs, grid, displacement, inverse, before,
                                options, device, result.staging, reporter)
        if before_commit is not None:
            before_commit(manifest, result.staging)
        reporter.check_cancel()
        manifest["warnings"] = list(reporter.warnings)
        manifest["timings_s"] = reporter.finish()
        manifest["timings_s"]["total"] = round(time.perf_counter() - started, 3)
        result.commit(manifest, reporter.check_cancel)
    return manifest


def _write_files(request: Request, preset: Preset, prealigned: Prealignment, settings: Any, inputs: Inputs, grid: Grid,
                 displacement: np.ndarray, inverse: Inverse, before: Before, options: Dict[str, Any],
                 device: torch.device, folder: Path, reporter: Reporter) -> Dict[str, Any]:
    """The output files, written on this thread in a fixed order, while a second thread
    (:class:`nephireg.background.Background`) computes the inverse map, its consistency and the result's measures
    (SimpleITK's writing and resampling and torch release the GIL: on 2 cores the two overlap). The inverse is the
    longest task (0.25-0.5 s on the lung pair): this thread resamples the warped image itself once det J and the
    forward transform are written, rather than queueing it behind the inverse and then waiting for both."""
    files = {"transform": OUTPUT_FILES["transform"], "jacobian": OUTPUT_FILES["jacobian"],
             "inverse": OUTPUT_FILES["inverse"]}
    mode, prealign = prealigned
    mask = quality.fixed_mask_array(inputs)
    with Background() as background:  # its tasks in the order this thread needs their results
        inverted = background.submit(inverse, background.check)  # the longest task: first, before det J here

        def stop_measuring() -> None:  # the run's cancellation, or the write stage given up
            reporter.check_cancel()
            background.check()
        transform = io.displacement_transform(displacement, grid)
        consistency = background.submit(lambda: inverse_consistency(inverted.result(), displacement, grid, mask))
        det = jacobian_determinant(displacement, grid)
        metrics = jacobian_summary(det)
        warnings = WarningsHeld()  # the second thread's warnings, emitted on this one (one thread, fixed order)
        # The warped image, set by this thread below (a Future the executor did not make: only its result/cancel
        # hand-over is used, so the measuring task can wait on it like on any other task).
        warped: Optional[Future] = Future() if request.write_warped else None
        try:
            measured = background.submit(_measure, inputs, grid, prealign, transform, displacement,
                                         metrics["folding_percent"], warnings, lambda: before(stop_measuring),
                                         warped)
            io.save_transform(transform, folder / files["transform"])
            reporter.check_cancel()
            io.write_image(io.image_from_array(det, grid), folder / files["jacobian"])
            reporter.check_cancel()
            if warped is not None:
                warped.set_result(io.warp_image(inputs.moving, grid, transform))
                files["warped"] = OUTPUT_FILES["warped"]
                io.write_image(warped.result(), folder / files["warped"])
                reporter.check_cancel()
        finally:  # the measuring task waits for the warped image: never leave it waiting
            if warped is not None and not warped.done():
                warped.cancel()
        write_inverse(inverted.result(), folder / files["inverse"])
        reporter.check_cancel()
        metrics.update(consistency.result())
        warped_norm, measures = measured.result()
        warnings.replay(reporter)
        metrics.update(measures)
        if request.write_overview:
            files["overview"] = OUTPUT_FILES["overview"]
            overview(sitk.GetArrayViewFromImage(inputs.fixed_norm), warped_norm, det, grid.spacing,
                     folder / files["overview"])
    return {
        "files": files,
        "metrics": metrics,
        "method": request.method,
        "preset": preset.name,
        "model": model_record(request.method, settings, preset.name),
        "parameters": {"options": options, "prealign": mode, "seed": request.seed, "preset_values": asdict(preset),
                       "settings": asdict(settings),
                       "masks": inputs.describe_masks(),
                       "request": asdict(request)},
        "inputs": {"fixed": os.path.abspath(request.fixed), "moving": os.path.abspath(request.moving),
                   "fixed_grid": _grid_dict(grid)},
        "device": str(device),
        "versions": {"nephireg": nephireg.__version__, "torch": torch.__version__,
                     "SimpleITK": sitk.Version_VersionString(),
                     "numpy": np.__version__, "python": platform.python_version()},
    }


def _measure(inputs: Inputs, grid: Grid, prealign: np.ndarray, transform: sitk.Transform, displacement: np.ndarray,
             folding_percent: float, reporter: WarningsHeld,
             before: Callable[[], Optional[quality.BeforeRegistration]], warped: Optional[Future]
             ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """The result's metrics beyond det J and the inverse (similarity at each step and the quality checks, the
    largest displacement) and the normalised moving image warped onto ``grid`` (Z, Y, X) for the overview
    (:func:`nephireg.quality.normalised_warped`, from the ``warped`` output when it is written)."""
    warped_norm = quality.normalised_warped(inputs, grid, transform, warped.result() if warped is not None else None)
    metrics = quality.assess(inputs, grid, prealign, warped_norm, folding_percent, reporter, before())
    metrics["displacement_max_mm"] = float(torch.from_numpy(displacement).reshape(-1, 3).norm(dim=1).max())
    return warped_norm, metrics


def _grid_dict(grid: Grid) -> Dict[str, Any]:
    return {"size": list(grid.size), "spacing": list(grid.spacing), "origin": list(grid.origin),
            "direction": list(grid.direction)}
