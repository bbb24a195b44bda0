"""Reading and checking images and masks; writing images and displacement-field transforms.

Every check raises :class:`nephireg.errors.InputError` naming the file and the problem.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import SimpleITK as sitk

from nephireg.errors import OUT_OF_MEMORY_HINT, InputError, OutOfMemory, is_out_of_memory
from nephireg.geometry import Grid

PathLike = Union[str, os.PathLike]

# Two grids match when their geometry agrees to this tolerance (mm for origin, relative for spacing/direction).
GRID_TOLERANCE = 1e-3
MIN_SIZE_VOXELS = 4
MAX_IMAGE_VOXELS = 2**31  # a header claiming more is refused before anything is allocated (8 GiB as float32)
_COMPLEX_PIXELS = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


def read_image(path: PathLike, role: str = "image") -> sitk.Image:
    """A checked 3D scalar image as float32: a file SimpleITK reads, or a folder holding one DICOM series.

    ``role`` ("fixed", "moving", ...) only words the error messages.
    """
    image = _read_any(path, role)
    _check_is_3d_scalar(image, path, role)
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise InputError(f"{role} image has {bad} NaN or infinite voxel values", path)
    if float(values.max()) == float(values.min()):
        raise InputError(f"{role} image is constant (every voxel is {float(values.min()):g})", path)
    return image


def read_mask(path: PathLike, image: sitk.Image, role: str = "mask") -> sitk.Image:
    """A checked binary mask (uint8, 1 inside) on ``image``'s grid: any label map or segmentation, nonzero = in."""
    mask = _read_any(path, role)
    _check_is_3d_scalar(mask, path, role)
    if not same_grid(Grid.of(mask), Grid.of(image)):
        raise InputError(
            f"{role} grid does not match its image (mask size {mask.GetSize()}, spacing "
            f"{_fmt(mask.GetSpacing())}, origin {_fmt(mask.GetOrigin())}; image size {image.GetSize()}, "
            f"spacing {_fmt(image.GetSpacing())}, origin {_fmt(image.GetOrigin())})",
            path,
        )
    binary = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(binary)):
        raise InputError(f"{role} is empty (no nonzero voxel)", path)
    return binary


def same_grid(a: Grid, b: Grid, tol: float = GRID_TOLERANCE) -> bool:
    if a.size != b.size:
        return False
    spacing_ok = np.allclose(a.spacing, b.spacing, rtol=tol, atol=0)
    origin_ok = np.allclose(a.origin, b.origin, atol=tol * max(1.0, max(a.spacing)))
    direction_ok = np.allclose(a.direction, b.direction, atol=tol)
    return bool(spacing_ok and origin_ok and direction_ok)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _read_any(path: PathLike, role: str) -> sitk.Image:
    if not str(path).strip():  # Path("") is the current folder: never read "whatever DICOM series is here"
        raise InputError(f"{role} path is empty")
    p = Path(path)
    if not p.exists():
        raise InputError(f"{role} file not found", path)
    if p.is_dir():
        return _read_dicom_folder(p, role)
    if p.stat().st_size == 0:
        raise InputError(f"{role} file is empty (0 bytes)", path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()  # the header only: checked before the voxels are allocated
        _check_header(reader, path, role)
        return reader.Execute()
    except RuntimeError as exc:
        _refuse_out_of_memory(exc, path)
        raise InputError(f"{role} file cannot be read as an image ({_itk_reason(exc)})", path) from None


def _refuse_out_of_memory(exc: RuntimeError, path: PathLike, doing: str = "reading") -> None:
    """An allocation that failed inside ITK is out of memory (exit 4), not a file that cannot be read."""
    if is_out_of_memory(exc):
        raise OutOfMemory(f"{path}: out of memory {doing} this file; {OUT_OF_MEMORY_HINT}") from None


FULL_DISK_BYTES = 1 << 20  # a failed write with less free than this: the disk is full (ITK rarely says so)


def _write_reason(exc: RuntimeError, path: PathLike) -> str:
    """Why a write failed, in the user's words where we can tell: ITK's HDF5 errors name no cause."""
    try:
        if shutil.disk_usage(os.path.dirname(os.path.abspath(os.fspath(path)))).free < FULL_DISK_BYTES:
            return "no space left on the device"
    except OSError:
        pass
    return _itk_reason(exc)


def _itk_reason(exc: RuntimeError) -> str:
    """The informative last line of an ITK exception's message."""
    reason = str(exc).strip().splitlines()
    return next((line.strip() for line in reversed(reason) if line.strip()), "unknown reason")[:200]


def _check_header(reader: sitk.ImageFileReader, path: PathLike, role: str) -> None:
    """Refuse headers that would allocate absurdly or carry impossible geometry, before reading the voxels."""
    from nephireg.validate import check_image_geometry

    size = reader.GetSize()
    voxels = float(np.prod(np.asarray(size, dtype=float))) * reader.GetNumberOfComponents()
    if voxels > MAX_IMAGE_VOXELS:
        raise InputError(f"{role} header claims {size} voxels ({voxels:.3g}); at most {MAX_IMAGE_VOXELS:.3g} are "
                         "read", path)
    if reader.GetDimension() == 3:
        check_image_geometry(Grid(tuple(size), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()),
                             role, path)


def _read_dicom_folder(folder: Path, role: str) -> sitk.Image:
    series = _quietly(sitk.ImageSeriesReader.GetGDCMSeriesIDs, str(folder))  # ITK warns on stderr when none
    if not series:
        raise InputError(f"{role} folder holds no DICOM series", folder)
    if len(series) > 1:
        raise InputError(f"{role} folder holds {len(series)} DICOM series; point to a folder with one", folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        return reader.Execute()
    except RuntimeError as exc:
        _refuse_out_of_memory(exc, folder)
        raise InputError(f"{role} DICOM series cannot be read ({str(exc).strip()[:200]})", folder) from None


@contextmanager
def _native_stderr_dropped_on_failure() -> Iterator[None]:
    """Hold what native code writes to file descriptor 2 during the block: HDF5 prints its whole error stack
    (dozens of lines) before ITK raises, and the error we raise is the one line the user gets. On success the
    held text is written out after all."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to hold
        yield
        return
    failed = True
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                text = held.read()
                if text:
                    try:
                        os.write(2, text)
                    except OSError:
                        pass


def _quietly(function, *args):
    """``function(*args)`` without ITK's warnings on stderr (the error we raise is the one line the user gets)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return function(*args)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _check_is_3d_scalar(image: sitk.Image, path: PathLike, role: str) -> None:
    if image.GetPixelID() in _COMPLEX_PIXELS:
        raise InputError(f"{role} has complex-valued voxels; a real scalar image is needed", path)
    dim = image.GetDimension()
    if dim != 3:
        raise InputError(f"{role} is a {dim}D image; a 3D image is needed", path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        n = image.GetNumberOfComponentsPerPixel()
        raise InputError(f"{role} has {n} components per voxel (a vector/colour image); a scalar image is needed", path)
    if min(image.GetSize()) < MIN_SIZE_VOXELS:
        raise InputError(
            f"{role} is too small ({image.GetSize()} voxels; at least {MIN_SIZE_VOXELS} along each axis)", path
        )


def image_from_array(array_zyx: np.ndarray, grid: Grid) -> sitk.Image:
    """A SimpleITK image on ``grid`` from an array indexed [k, j, i] (vector images: trailing component axis)."""
    is_vector = array_zyx.ndim == 4
    image = sitk.GetImageFromArray(array_zyx, isVector=is_vector)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image


def write_image(image: sitk.Image, path: PathLike, compress: bool = False) -> None:
    """Write ``image`` (format from the suffix). Uncompressed by default: on the lung pair's Jacobian and warped
    image zlib saved only 13-18 % of the size and cost 0.25 s per file, 10x the plain write."""
    try:
        sitk.WriteImage(image, str(path), compress)
    except RuntimeError as exc:  # ITK reports a failed write (full disk, no permission) as a RuntimeError
        _refuse_out_of_memory(exc, path, "writing")
        raise InputError(f"cannot write the image ({_write_reason(exc, path)})", path) from None


def displacement_transform(displacement_lps_mm: np.ndarray, grid: Grid) -> sitk.DisplacementFieldTransform:
    """The ITK transform x -> x + u(x) for a displacement ``u`` (nz, ny, nx, 3) in LPS mm on ``grid``.

    This is the resampling direction (fixed -> moving): what ITK/SimpleITK resamplers and Slicer expect.
    """
    field = image_from_array(np.ascontiguousarray(displacement_lps_mm, dtype=np.float64), grid)
    return sitk.DisplacementFieldTransform(field)


def write_transform(displacement_lps_mm: np.ndarray, grid: Grid, path: PathLike) -> None:
    """Write the displacement field as an ITK transform file (``.h5``), readable by SimpleITK and Slicer."""
    save_transform(displacement_transform(displacement_lps_mm, grid), path)


def save_transform(transform: sitk.Transform, path: PathLike) -> None:
    """``sitk.WriteTransform`` with a failed write (full disk, no permission) as an InputError naming the file."""
    try:
        with _native_stderr_dropped_on_failure():
            sitk.WriteTransform(transform, str(path))
    except RuntimeError as exc:
        _refuse_out_of_memory(exc, path, "writing")
        raise InputError(f"cannot write the transform ({_write_reason(exc, path)})", path) from None


def read_transform(path: PathLike, role: str = "transform") -> sitk.Transform:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{role} file not found", path)
    try:
        with _native_stderr_dropped_on_failure():
            return sitk.ReadTransform(str(p))
    except RuntimeError as exc:
        _refuse_out_of_memory(exc, path)
        raise InputError(f"{role} file cannot be read as an ITK transform ({str(exc).strip()[-200:]})", path) from None


def displacement_of(transform: sitk.Transform, grid: Grid) -> np.ndarray:
    """(nz, ny, nx, 3) LPS mm displacement T(x) - x of any SimpleITK transform, sampled on ``grid``."""
    reference = sitk.Image(list(grid.size), sitk.sitkUInt8)
    reference.SetSpacing(grid.spacing)
    reference.SetOrigin(grid.origin)
    reference.SetDirection(grid.direction)
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(reference)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    return sitk.GetArrayFromImage(to_field.Execute(transform))


def read_points(path: PathLike) -> np.ndarray:
    """(n, 3) points from a text file: an optional header (e.g. elastix's ``point`` / count lines), then one
    point a line, three numbers separated by spaces, tabs or commas. Returns LPS mm as written."""
    p = Path(path)
    if not p.exists():
        raise InputError("point file not found", path)
    rows = []
    for line in p.read_text().splitlines():
        fields = line.replace(",", " ").split()
        try:
            values = [float(v) for v in fields]
        except ValueError:
            continue  # header or comment line
        if len(values) == 3:
            rows.append(values)
        elif values and len(values) not in (1,):
            raise InputError(f"line {line!r} has {len(values)} numbers; 3 are needed", path)
    if not rows:
        raise InputError("no points (3 numbers a line) found", path)
    return np.asarray(rows, dtype=float)


def write_points(points: np.ndarray, path: PathLike) -> None:
    """Write (n, 3) points in the format :func:`read_points` reads (elastix-style header)."""
    lines = ["point", str(len(points))] + [" ".join(f"{v:.6f}" for v in p) for p in np.asarray(points)]
    Path(path).write_text("\n".join(lines) + "\n")


def resample_to(image: sitk.Image, grid: Grid, transform: Optional[sitk.Transform] = None,
                linear: bool = True, default: float = 0.0) -> sitk.Image:
    """``image`` resampled onto ``grid`` through ``transform`` (grid point x samples image at T(x))."""
    reference = sitk.Image(list(grid.size), sitk.sitkUInt8)
    reference.SetSpacing(grid.spacing)
    reference.SetOrigin(grid.origin)
    reference.SetDirection(grid.direction)
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    return sitk.Resample(image, reference, transform or sitk.Transform(), interpolator, default, image.GetPixelID())


def warp_image(moving: sitk.Image, grid: Grid, transform: Optional[sitk.Transform] = None) -> sitk.Image:
    """The moving image resampled onto ``grid`` through ``transform`` (the warped output), in its own pixel type;
    outside it: its minimum (e.g. air in CT, not 0 HU)."""
    background = float(sitk.GetArrayViewFromImage(moving).min())
    return resample_to(moving, grid, transform, default=background)
