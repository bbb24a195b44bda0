"""The one check of a whole request before any work: paths, output location, every option, then the geometry.

:func:`check_request` needs no images (it runs before reading); :func:`check_geometry` runs on the images' grids
as soon as they are read, before anything is allocated from them. Every refusal is an
:class:`nephireg.errors.InputError` (exit 2) naming the file or option and what is allowed.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable, List, Optional

import numpy as np

from nephireg.errors import InputError
from nephireg.geometry import Grid, inverse_lattice, inverse_lattice_mm
from nephireg.options import GRID_SPACING_RULE, SEED_RULE
from nephireg.protocol import DEVICES, METHODS, OUTPUT_FILES, PREALIGN_MODES, PRESETS, RESULT_MANIFEST
from nephireg.staging import nearest_existing

# Options with their own flag are checked even by methods that ignore them (a typo should not pass silently).
COMMON_RULES = {"grid_spacing_mm": GRID_SPACING_RULE}
MIN_LEVEL_VOXELS = 2  # voxels along every axis of the coarsest pooled level a method uses
SPACING_RANGE_MM = (1e-4, 1e4)  # plausible voxel spacings of a medical image (0.1 um .. 10 m)
TRANSFORM_BYTES_PER_VOXEL = 24  # float64 3-vectors (transform.h5 on the fixed grid, inverse.h5 on its lattice)
IMAGE_BYTES_PER_VOXEL = 4  # float32 maps on the fixed grid (jacobian.nrrd, warped.nrrd, uncompressed)


def check_request(request: Any) -> None:
    """Everything about a :class:`nephireg.inputs.Request` that is known before reading its images."""
    for label, value, choices in (("--method", request.method, METHODS), ("--preset", request.preset, PRESETS),
                                  ("--device", request.device, DEVICES),
                                  ("--prealign", request.prealign, PREALIGN_MODES)):
        if value not in choices:
            raise InputError(f"{label} {value!r} is not allowed; choose one of {', '.join(choices)}")
    check_input_path(request.fixed, "--fixed", "fixed image")
    check_input_path(request.moving, "--moving", "moving image")
    for flag, path in (("--fixed-mask", request.fixed_mask), ("--moving-mask", request.moving_mask)):
        if path is not None:
            check_input_path(path, flag, flag[2:].replace("-", " "))
    if getattr(request, "initial_transform", None) is not None:
        check_initial_transform(request.initial_transform, request.prealign)
    SEED_RULE.parse("seed", request.seed)
    for name, rule in COMMON_RULES.items():
        rule.parse(name, request.options.get(name))
    check_output_folder(request.out, request.overwrite)
    check_inputs_survive(request)


def check_inputs_survive(request: Any) -> None:
    """No input is a file a result in ``--out`` would replace (e.g. ``--moving out/warped.nrrd --out out
    --overwrite``, refining a result): it would be gone after the run, whatever ``--overwrite`` says."""
    out = os.path.realpath(os.fspath(request.out))
    replaced = set(OUTPUT_FILES.values()) | set(listed_files(Path(out) / RESULT_MANIFEST))
    for flag, path in (("--fixed", request.fixed), ("--moving", request.moving),
                       ("--fixed-mask", request.fixed_mask), ("--moving-mask", request.moving_mask)):
        if path is None:
            continue
        relative = os.path.relpath(os.path.realpath(os.fspath(path)), out)
        if Path(relative).as_posix() in replaced:
            raise InputError(f"{flag} is a file of the result in --out, which this run replaces; copy it "
                             "elsewhere or choose another --out", path)


def listed_files(manifest: Path) -> List[str]:
    """The file names a result manifest lists (as written; empty when it cannot be read)."""
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8")).get("files", {})
        return [str(name) for name in listed.values()]
    except (OSError, ValueError, AttributeError):
        return []


def method_settings(request: Any) -> Any:
    """The method's typed, checked ``Settings`` for the request's preset and options (imports the method)."""
    from nephireg.methods import method_module
    from nephireg.presets import get_preset

    module = method_module(request.method)
    options = get_preset(request.preset).options_for(request.method, request.options)
    if request.method == "nephi-io":
        options = {"seed": request.seed, **options}
    settings = module.Settings.from_options(options)
    model = getattr(settings, "model", None)
    if model and (os.sep in model or model.endswith(".pt")) and not os.path.isfile(model):
        raise InputError("--model file not found", model)
    return settings


def check_initial_transform(path: Any, prealign: str) -> None:
    """``--initial-transform``: a readable, linear, invertible ITK transform file, and no automatic pre-alignment
    asked for beside it (the file replaces it)."""
    from nephireg.initial import read_initial_transform

    check_input_path(path, "--initial-transform", "initial transform")
    if prealign not in ("preset", "none"):
        raise InputError(f"--initial-transform replaces the pre-alignment; drop --prealign {prealign} (or the "
                         "initial transform)", path)
    read_initial_transform(path)


def check_input_path(path: Any, flag: str, role: str) -> None:
    """An input argument names something: not empty (an unset shell variable), not over-long, existing."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise InputError(f"{flag} is empty; give the {role}'s file or DICOM folder")
    text = os.fspath(path)
    check_name_lengths(Path(text), flag)
    if not os.path.exists(text):
        raise InputError(f"{role} file not found", text)


def check_name_lengths(path: Path, what: str) -> None:
    """Refuse a path the file system cannot hold (ENAMETOOLONG) before anything touches it."""
    limit = _limit("PC_NAME_MAX", 255)
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise InputError(f"{what}: a name in the path is {len(os.fsencode(part))} bytes long; the file "
                             f"system allows {limit}", _short(path))
    if len(os.fsencode(str(path.absolute()))) >= _limit("PC_PATH_MAX", 4096):
        raise InputError(f"{what}: the path is longer than the file system allows", _short(path))


def _limit(name: str, default: int) -> int:
    try:
        return int(os.pathconf("/", name))
    except (AttributeError, OSError, ValueError):
        return default


def _short(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 120 else text[:60] + "..." + text[-40:]


def check_output_folder(out: Any, overwrite: bool) -> None:
    """``--out`` can receive a result: a folder (or creatable), not a dangling link, writable, and free of a
    result - or of files a result would replace - unless ``overwrite``.

    First it puts back a previous result that a killed run left half-replaced
    (:func:`nephireg.resultdir.restore_interrupted_swap`), so the answer is about the folder as it should be."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out).strip():
        raise InputError("--out is empty; give the output folder")
    folder = Path(os.fspath(out))
    check_name_lengths(folder, "--out")
    if folder.is_symlink() and not folder.exists():
        raise InputError("output path is a dangling symbolic link", folder)
    if folder.exists() and not folder.is_dir():
        raise InputError("output path exists and is not a folder", folder)
    if folder.is_dir():
        from nephireg.resultdir import restore_interrupted_swap  # resultdir imports this module

        restore_interrupted_swap(folder)
    if overwrite:
        check_writable(folder)
        return
    if (folder / RESULT_MANIFEST).exists():
        raise InputError("output folder already holds a result (result.json); use --overwrite to replace it", folder)
    check_no_unlisted_outputs(folder, OUTPUT_FILES.values())
    check_writable(folder)


def check_no_unlisted_outputs(folder: Path, names: Iterable[str]) -> None:
    """Without ``--overwrite`` a result only goes where it replaces nothing: refuse a folder (without a
    ``result.json``) that holds files with the names of outputs - someone's own files, never ours to delete."""
    present = sorted(name for name in names if os.path.lexists(folder / name))
    if present:
        raise InputError(f"output folder holds {', '.join(present)} but no result.json; a result would replace "
                         "them: use --overwrite to replace them, or another folder", folder)


def check_output_file(path: Any, overwrite: bool, inputs: Iterable[Any] = (), flag: str = "--out") -> None:
    """A single output file (warp, jacobian, train): writable, not one of the command's ``inputs``, not
    replacing an existing file unless ``overwrite``."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise InputError(f"{flag} is empty; give the output file")
    target = Path(os.fspath(path))
    check_name_lengths(target, flag)
    if target.is_symlink() and not target.exists():
        raise InputError("output path is a dangling symbolic link", target)
    if target.is_dir():
        raise InputError("output path is a folder; give a file name", target)
    for given in inputs:
        if given and _same_file(target, Path(os.fspath(given))):
            raise InputError(f"{flag} is one of the command's inputs ({given}); choose another output file", target)
    if target.exists() and not overwrite:
        raise InputError("output file exists; use --overwrite to replace it", target)
    check_writable(target.parent, named=target)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def check_writable(folder: Path, named: Optional[Path] = None) -> None:
    """Create and remove a probe in ``folder``'s closest existing ancestor: the real test (permission bits say
    nothing to root, a read-only mount or a full inode table does). ``named``: the path the message names
    (default ``folder``; the output file for single-file commands)."""
    existing = nearest_existing(folder.absolute())
    if existing is None or not existing.is_dir():
        raise InputError(f"cannot create the output: {existing} is not a folder", named or folder)
    probe = existing / f".nephireg-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise InputError(f"output location is not writable ({_reason(exc)} in {existing})",
                         named or folder) from None


def _reason(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))


def check_free_space(folder: Path, needed_bytes: float) -> None:
    """Refuse to start a run whose result cannot fit: fewer bytes free than ``needed_bytes`` (a lower bound, so
    a result that fits is never refused; a disk that fills anyway is cleaned up by the writer)."""
    existing = nearest_existing(folder.absolute())
    try:
        free = shutil.disk_usage(existing).free
    except (OSError, TypeError):
        return  # unknown: the writer still cleans up if the disk fills
    if free < needed_bytes:
        raise InputError(f"not enough free space for the result: at least {needed_bytes / 1e6:.1f} MB needed, "
                         f"{free / 1e6:.1f} MB free", folder)


def result_bytes(fixed: Grid, moving: Grid, working: Grid, write_warped: bool = True) -> float:
    """The least a result folder takes: the uncompressed transform and Jacobian (and warped image) on the fixed
    grid and the inverse on its lattice over the moving image (the method's working grid ``working`` sets it).
    Headers, overview.png and files other steps add are not counted (a lower bound)."""
    per_fixed_voxel = TRANSFORM_BYTES_PER_VOXEL + IMAGE_BYTES_PER_VOXEL * (2 if write_warped else 1)
    lattice = inverse_lattice(moving, inverse_lattice_mm(working))
    return float(per_fixed_voxel) * _voxels(fixed) + float(TRANSFORM_BYTES_PER_VOXEL) * _voxels(lattice)


def _voxels(grid: Grid) -> float:
    return float(np.prod(np.asarray(grid.size, dtype=float)))


def check_image_geometry(grid: Grid, role: str, path: Any) -> None:
    """A header's geometry is finite and plausible (spacing within :data:`SPACING_RANGE_MM`)."""
    values = np.concatenate([grid.spacing, grid.origin, grid.direction]).astype(float)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{role} header has a NaN or infinite spacing, origin or direction", path)
    low, high = SPACING_RANGE_MM
    if min(grid.spacing) < low or max(grid.spacing) > high:
        raise InputError(f"{role} voxel spacing {_fmt(grid.spacing)} mm is outside the plausible range "
                         f"[{low:g}, {high:g}] mm; check the file's header", path)


def check_geometry(request: Any, settings: Any, fixed: Grid, moving: Grid, working: Grid) -> None:
    """The read images give the request's method a usable working grid, and their result fits on the disk."""
    from nephireg.methods import method_module

    coarsest = method_module(request.method).coarsest_pooling(settings, working)
    check_working_grid(working, coarsest, request.preset, request.method, request.fixed, fixed.extent_mm())
    check_free_space(Path(os.fspath(request.out)), result_bytes(fixed, moving, working, request.write_warped))


def check_working_grid(working: Grid, coarsest_factor: int, preset: str, method: str, fixed_path: str,
                       extent_mm: Optional[np.ndarray] = None) -> None:
    """The working grid holds at least :data:`MIN_LEVEL_VOXELS` voxels per axis at the method's coarsest
    pooling level (``coarsest_factor``)."""
    needed = MIN_LEVEL_VOXELS * max(1, int(coarsest_factor))
    if min(working.size) >= needed:
        return
    spacing = max(working.spacing)
    extent = "" if extent_mm is None else f"{_fmt(extent_mm)} mm, "
    raise InputError(f"fixed image is physically too small for the {preset} preset with {method}: its field of "
                     f"view ({extent}working grid {working.size} voxels of {spacing:.3g} mm) needs at least {needed} "
                     f"voxels along every axis (about {needed * spacing:.3g} mm); check the header's spacing, use "
                     "a preset with a finer working grid, or pool less (adam: --option levels=[2]; nephi: "
                     "--option coarse_level=2)", fixed_path)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
