"""One registration from files to a result folder: read -> preset -> masks -> pre-alignment -> method -> outputs.

:func:`register` is the library entry point behind ``nephireg register`` and the Slicer module.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch

import nephireg
from nephireg import io, quality
from nephireg.compose import affine_matrix, affine_transform, compose_prealignment
from nephireg.errors import InputError, OutOfMemory
from nephireg.fields import evaluate_on_grid
from nephireg.geometry import Grid, overlap_fraction
from nephireg.inputs import Inputs, PrefetchedInputs, Request, read_inputs
from nephireg.jacobian import jacobian_determinant, jacobian_summary
from nephireg.methods import get_method, model_record, resolved_settings
from nephireg.overview import overview
from nephireg.pair import PreparedPair
from nephireg.preprocess import crop_to_mask, working_grid
from nephireg.presets import Preset, get_preset
from nephireg.progress import Reporter, SilentReporter
from nephireg.protocol import METHODS, OUTPUT_FILES, PREALIGN_MODES, RESULT_MANIFEST, write_manifest


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available (use auto or cpu)")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def prealign_matrix(request: Request, preset: Preset, inputs: Inputs, reporter: Reporter) -> Tuple[str, np.ndarray]:
    """The pre-alignment mode used and its 4x4 matrix (fixed -> moving, LPS mm)."""
    mode = preset.prealign if request.prealign == "preset" else request.prealign
    if mode not in PREALIGN_MODES or mode == "preset":
        raise InputError(f"unknown pre-alignment {mode!r}; choose one of {', '.join(PREALIGN_MODES)}")
    if mode == "none":
        return mode, np.eye(4)
    from nephireg.prealign import prealign

    reporter.stage("prealign", f"Pre-alignment ({mode})")
    transform = prealign(inputs.fixed_norm, inputs.moving_norm, mode, inputs.fixed_mask, inputs.moving_mask)
    return mode, affine_matrix(transform)


def check_overlap(fixed: Grid, moving: Grid, prealign: np.ndarray, request: Request) -> None:
    """Refuse pairs whose fields of view share no physical space (after pre-alignment)."""
    if overlap_fraction(fixed, moving, samples_per_axis=7, a_to_b=prealign) == 0.0:
        raise InputError(f"fixed ({request.fixed}) and moving ({request.moving}) images do not overlap in physical "
                         "space; check their origins or use a pre-alignment (--prealign center)", request.moving)


def prepare(request: Request, inputs: Inputs, preset: Preset, prealign: np.ndarray, device: torch.device
            ) -> PreparedPair:
    """The working-grid tensors a method receives (moving resampled through the pre-alignment)."""
    region = Grid.of(inputs.fixed)
    if preset.crop_margin_mm is not None and inputs.fixed_mask is not None:
        region = crop_to_mask(region, inputs.fixed_mask, preset.crop_margin_mm)
    grid = working_grid(region, preset.working_spacing_mm)
    transform = affine_transform(prealign)
    fixed = to_tensor(inputs.fixed_norm, grid, None, device)
    moving = to_tensor(inputs.moving_norm, grid, transform, device)
    fixed_mask = moving_mask = None
    if inputs.fixed_region is not None:
        fixed_mask = to_tensor(inputs.fixed_region, grid, None, device, is_mask=True)
    if inputs.moving_region is not None:
        moving_mask = to_tensor(inputs.moving_region, grid, transform, device,
                                is_mask=True)
    if preset.mask_images:
        fixed = fixed * fixed_mask if fixed_mask is not None else fixed
        moving = moving * moving_mask if moving_mask is not None else moving
    return PreparedPair(grid, fixed, moving, fixed_mask, moving_mask, seed=request.seed, preset=preset.name)


def to_tensor(image: sitk.Image, grid: Grid, transform: Optional[sitk.Transform], device: torch.device,
              is_mask: bool = False) -> torch.Tensor:
    """``image`` resampled onto ``grid`` (through ``transform``, fixed -> image space) as (1, 1, Z, Y, X) float32.

    Masks are resampled linearly and thresholded at 0.5, which keeps them faithful under downsampling.
    """
    source = sitk.Cast(image, sitk.sitkFloat32) if is_mask else image
    resampled = io.resample_to(source, grid, transform, linear=True, default=0.0)
    array = sitk.GetArrayFromImage(resampled).astype(np.float32)
    if is_mask:
        array = (array >= 0.5).astype(np.float32)
    return torch.from_numpy(array)[None, None].to(device)


def register(request: Request, reporter: Optional[Reporter] = None,
             prefetched: Optional[PrefetchedInputs] = None) -> Dict[str, Any]:
    """Run one registration and write its result folder; returns the manifest (also in ``out/result.json``).

    ``prefetched``: the inputs of this same ``request`` already being read (:func:`nephireg.inputs.prefetch_inputs`).

    Raises InputError for bad input (nothing is written), Cancelled when the reporter is cancelled, OutOfMemory
    when the device runs out of memory. A failed run leaves no result behind.
    """
    reporter = reporter or SilentReporter()
    started = time.perf_counter()
    if request.method not in METHODS:
        raise InputError(f"unknown method {request.method!r}; choose one of {', '.join(METHODS)}")
    preset = get_preset(request.preset)
    out = Path(request.out)
    _check_out_dir(out, request.overwrite)
    device = resolve_device(request.device)
    torch.manual_seed(request.seed)
    if prefetched is not None and prefetched.request is not request:
        raise ValueError("prefetched inputs belong to another request")
    inputs = prefetched.result(reporter) if prefetched is not None else read_inputs(request, preset, reporter)
    mode, prealign = prealign_matrix(request, preset, inputs, reporter)
    fixed_grid = Grid.of(inputs.fixed)
    check_overlap(fixed_grid, Grid.of(inputs.moving), prealign, request)
    method = get_method(request.method)
    options = preset.options_for(request.method, request.options)
    try:
        pair = prepare(request, inputs, preset, prealign, device)
        field_ = method(pair, options, reporter)
        reporter.stage("field", "Evaluating the displacement on the fixed grid")
        displacement = evaluate_on_grid(field_, fixed_grid, device)
    except torch.cuda.OutOfMemoryError as exc:
        raise OutOfMemory(f"the GPU ran out of memory ({exc}); run again with --device cpu") from None
    displacement = compose_prealignment(fixed_grid, displacement, prealign)
    return _write_result(request, preset, mode, prealign, inputs, fixed_grid, displacement, options, device, reporter,
                         started)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError("output path exists and is not a folder", out)
    if (out / RESULT_MANIFEST).exists() and not overwrite:
        raise InputError("output folder already holds a result (result.json); use --overwrite to replace it", out)


def _write_result(request: Request, preset: Preset, mode: str, prealign: np.ndarray, inputs: Inputs, grid: Grid,
                  displacement: np.ndarray,
                  options: Dict[str, Any], device: torch.device, reporter: Reporter, started: float) -> Dict[str, Any]:
    reporter.stage("write", "Writing the transform, Jacobian and warped image")
    out = Path(request.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        manifest = _write_files(request, preset, mode, prealign, inputs, grid, displacement, options, device, staging,
                                reporter)
        if request.overwrite:
            (out / RESULT_MANIFEST).unlink(missing_ok=True)
        for name in manifest["files"].values():
            os.replace(staging / name, out / name)
        manifest["warnings"] = list(reporter.warnings)
        manifest["timings_s"] = reporter.finish()
        manifest["timings_s"]["total"] = round(time.perf_counter() - started, 3)
        write_manifest(str(out), manifest)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write_files(request: Request, preset: Preset, mode: str, prealign: np.ndarray, inputs: Inputs, grid: Grid,
                 displacement: np.ndarray,
                 options: Dict[str, Any], device: torch.device, folder: Path, reporter: Reporter) -> Dict[str, Any]:
    files = {"transform": OUTPUT_FILES["transform"], "jacobian": OUTPUT_FILES["jacobian"]}
    transform = io.displacement_transform(displacement, grid)
    sitk.WriteTransform(transform, str(folder / files["transform"]))
    det = jacobian_determinant(displacement, grid)
    reporter.check_cancel()
    io.write_image(io.image_from_array(det, grid), folder / files["jacobian"])
    fixed_norm = sitk.GetArrayViewFromImage(inputs.fixed_norm)
    warped_norm = sitk.GetArrayFromImage(io.resample_to(inputs.moving_norm, grid, transform))
    if request.write_warped:
        files["warped"] = OUTPUT_FILES["warped"]
        background = float(sitk.GetArrayViewFromImage(inputs.moving).min())  # e.g. air in CT, not 0 HU
        io.write_image(io.resample_to(inputs.moving, grid, transform, default=background), folder / files["warped"])
    if request.write_overview:
        files["overview"] = OUTPUT_FILES["overview"]
        overview(fixed_norm, warped_norm, det, grid.spacing, folder / files["overview"])
    metrics = jacobian_summary(det)
    metrics.update(quality.assess(inputs, grid, prealign, warped_norm, metrics["folding_percent"], reporter))
    metrics["displacement_max_mm"] = float(np.linalg.norm(displacement, axis=-1).max())
    return {
        "files": files,
        "metrics": metrics,
        "method": request.method,
        "preset": preset.name,
        "model": model_record(request.method, options, preset.name),
        "parameters": {"options": options, "prealign": mode, "seed": request.seed, "preset_values": asdict(preset),
                       "settings": resolved_settings(request.method, options, request.seed),
                       "masks": "derived (lung)" if inputs.masks_derived else
                       ("given" if request.fixed_mask or request.moving_mask else "none"),
                       "request": asdict(request)},
        "inputs": {"fixed": os.path.abspath(request.fixed), "moving": os.path.abspath(request.moving),
                   "fixed_grid": _grid_dict(grid)},
        "device": str(device),
        "versions": {"nephireg": nephireg.__version__, "torch": torch.__version__,
                     "SimpleITK": sitk.Version_VersionString(),
                     "numpy": np.__version__, "python": platform.python_version()},
    }


def _grid_dict(grid: Grid) -> Dict[str, Any]:
    return {"size": list(grid.size), "spacing": list(grid.spacing), "origin": list(grid.origin),
            "direction": list(grid.direction)}
