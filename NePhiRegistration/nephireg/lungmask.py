"""Lung masks derived from a thorax CT in Hounsfield units (SimpleITK morphology and numpy, no learned model).

Pipeline (:func:`lung_mask`):

1. the *inside of the body* (:func:`body_hull`): tissue (above :data:`BODY_HU`), opened by :data:`BODY_OPENING_MM`
   so a patient table's thin shell and blankets come loose, its largest 3D component, and in every slice across
   the body axis the convex hull of that slice's body. Air is told apart from lung by this, not by touching the
   volume's border: the air around the body, a table's hollow core, the -1024 or -2048 padding of a rotated scan or
   outside a reconstruction circle all lie outside the hull, while a lung cut by a tight crop (the shared pair is
   cropped around one lung) still lies inside it, between the body's tissue on either side of the cut;
2. air = voxels below :data:`AIR_HU` inside the body, opened with a 1-voxel ball so thin links (slivers along the
   hull's edge, small airways) break;
3. connected components: keep the largest, and the second one too when it is a lung-sized partner (two lungs).
   Lungs joined by the trachea and main bronchi are one component, trachea included;
4. close (a ball of :data:`CLOSING_MM`) and fill holes in 3D and slice by slice across the body axis, so that
   vessels and nodules inside the lungs are included.

The steps run on the CT block-averaged to about :data:`ANALYSIS_SPACING_MM` (finer CTs only) and the mask is
interpolated back onto the CT's grid: the masks feed similarity weights dilated by millimetres and a working grid
of 1.5 mm, so sub-millimetre detail buys nothing, and 4x fewer voxels make every step 3-4x faster.
Measured against the shared lung pair's reference masks (docs/prealign.md).
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import SimpleITK as sitk

from nephireg.errors import InputError

AIR_HU = -400.0
"""Voxels below this (HU) are air-like: lung parenchyma (about -850) and outside air (-1000)."""

CLOSING_MM = 5.0
"""Radius of the closing that pulls vessels and fissures into the lung mask (mm)."""

MIN_LUNG_ML = 50.0
"""A lung component smaller than this (millilitres) is not a lung; none left -> InputError."""

SECOND_LUNG_FRACTION = 0.2
"""A second component is kept as the other lung when its volume is at least this fraction of the largest's."""

ANALYSIS_SPACING_MM = 2.5
"""Target spacing of the grid the mask is derived on: axes finer than this are block-averaged by an integer factor."""

BODY_HU = -500.0
"""Voxels above this (HU) are tissue: the body (and a table, which :data:`BODY_OPENING_MM` detaches)."""

BODY_OPENING_MM = 2.5
"""Radius (mm, at least one voxel) of the opening that detaches thin shells (a table's, blankets) from the body."""

BODY_PART_FRACTION = 0.05
"""Tissue components of at least this fraction of the largest one's volume count as body too."""


def lung_mask(ct: sitk.Image) -> sitk.Image:
    """uint8 {0, 1} lung mask of a thorax CT on the CT's own grid.

    ``ct``: 3D scalar image in Hounsfield units (any pixel type, any direction and spacing).
    Raises :class:`nephireg.errors.InputError` when no lung-sized air region lies inside the body (e.g. the image
    is not CT in HU, or holds no lung).
    """
    ct = sitk.Cast(ct, sitk.sitkFloat32)
    factors = [max(1, int(round(ANALYSIS_SPACING_MM / s))) for s in ct.GetSpacing()]
    if max(factors) == 1:
        return _lung_mask(ct)
    coarse = _lung_mask(sitk.BinShrink(ct, factors))
    # Linear interpolation of the {0, 1} mask, cut at one half: smooth boundaries, not blocks. BinShrink drops the
    # last n mod f layers of each axis; nearest-neighbour extrapolation carries the mask into them.
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(ct)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetUseNearestNeighborExtrapolator(True)
    back = resampler.Execute(sitk.Cast(coarse, sitk.sitkFloat32))
    return sitk.Cast(sitk.GreaterEqual(back, 0.5), sitk.sitkUInt8)


def _lung_mask(ct: sitk.Image) -> sitk.Image:
    """:func:`lung_mask` on ``ct`` (float32) as it is."""
    inside = body_hull(ct)
    air = sitk.BinaryMorphologicalOpening(sitk.And(sitk.Less(ct, AIR_HU), inside), [1, 1, 1])
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(air), sortByObjectSize=True)
    kept = _lung_labels(labels, ct.GetSpacing())
    if not kept:
        raise InputError(
            f"no lung found: no air-like region (< {AIR_HU:g} HU) of at least {MIN_LUNG_ML:g} ml inside the body; "
            "lung masks can only be derived from a thorax CT in Hounsfield units - give masks instead"
        )
    lungs = _select(labels, kept)
    lungs = _close_and_fill(lungs)
    return sitk.Cast(lungs, sitk.sitkUInt8)


def _lung_labels(labels: sitk.Image, spacing: Tuple[float, float, float]) -> List[int]:
    """Labels of the lung components (largest first), at most two, small pieces dropped."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(labels)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lungs: List[int] = []
    for label in sorted(stats.GetLabels(), key=stats.GetNumberOfPixels, reverse=True):
        volume_ml = stats.GetNumberOfPixels(label) * voxel_ml
        if volume_ml < MIN_LUNG_ML:
            break  # sorted by size: every later one is smaller
        if lungs and volume_ml < SECOND_LUNG_FRACTION * stats.GetNumberOfPixels(lungs[0]) * voxel_ml:
            break
        lungs.append(label)
        if len(lungs) == 2:
            break
    return lungs


def body_hull(ct: sitk.Image) -> sitk.Image:
    """uint8 {0, 1}: the inside of the body, slice by slice across the body axis the convex hull of its tissue.

    Tissue = voxels above :data:`BODY_HU`, opened by :data:`BODY_OPENING_MM`; its largest 3D component and those
    at least :data:`BODY_PART_FRACTION` of it (a crop through the lung can leave the body in pieces: the chest wall,
    the mediastinum). Empty where no tissue is found.
    """
    radius = [max(1, int(round(BODY_OPENING_MM / s))) for s in ct.GetSpacing()]
    tissue = sitk.BinaryMorphologicalOpening(sitk.Greater(ct, BODY_HU), radius)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(tissue), sortByObjectSize=True)
    sizes = np.bincount(sitk.GetArrayViewFromImage(components).ravel())  # sizes[0]: background
    if sizes.size < 2:
        empty = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
        empty.CopyInformation(ct)
        return empty
    parts = np.flatnonzero(sizes[1:] >= BODY_PART_FRACTION * sizes[1]) + 1  # label 1 is the largest
    body = np.isin(sitk.GetArrayViewFromImage(components), parts)  # [k, j, i]
    array_axis = 2 - _axial_axis(ct)
    slices = np.moveaxis(body, array_axis, 0)
    hull = np.zeros(slices.shape, dtype=np.uint8)
    for n, section in enumerate(slices):
        hull[n] = _convex_hull_2d(section)
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(hull, 0, array_axis)))
    out.CopyInformation(ct)
    return out


def _convex_hull_2d(section: np.ndarray) -> np.ndarray:
    """uint8 (H, W): the pixels whose centres lie in the convex hull of the nonzero pixels of ``section``."""
    rows = np.flatnonzero(section.any(axis=1))
    if rows.size == 0:
        return np.zeros(section.shape, dtype=np.uint8)
    occupied = section[rows] > 0
    first = occupied.argmax(axis=1)
    last = section.shape[1] - 1 - occupied[:, ::-1].argmax(axis=1)
    # The hull of a pixel set is the hull of each row's two end pixels.
    points = np.concatenate([np.stack([rows, first], 1), np.stack([rows, last], 1)]).astype(float)
    hull = _monotone_chain(points)
    if len(hull) < 3:  # all on one line: the row spans themselves are the hull
        spans = np.zeros(section.shape, dtype=np.uint8)
        for row, lo, hi in zip(rows, first, last):
            spans[row, lo:hi + 1] = 1
        return spans
    r, c = np.mgrid[:section.shape[0], :section.shape[1]]
    inside = np.ones(section.shape, dtype=bool)
    for (r0, c0), (r1, c1) in zip(hull, np.roll(hull, -1, axis=0)):
        inside &= (r1 - r0) * (c - c0) - (c1 - c0) * (r - r0) >= -1e-9  # left of (or on) every edge
    return inside.astype(np.uint8)


def _monotone_chain(points: np.ndarray) -> np.ndarray:
    """Vertices (n, 2) of the convex hull of 2D ``points``, counter-clockwise in (row, column) axes; collinear
    points dropped (Andrew's monotone chain)."""
    ordered = sorted(set(map(tuple, points.tolist())))
    if len(ordered) < 3:
        return np.asarray(ordered)

    def chain(sequence):
        out: list = []
        for p in sequence:
            # pop while the last two points and p make no left turn (cross product <= 0)
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return np.asarray(chain(ordered) + chain(ordered[::-1]))


def _select(labels: sitk.Image, kept: List[int]) -> sitk.Image:
    mask = sitk.Equal(labels, kept[0])
    for label in kept[1:]:
        mask = sitk.Or(mask, sitk.Equal(labels, label))
    return mask


def _close_and_fill(mask: sitk.Image) -> sitk.Image:
    """Closing with a ball of :data:`CLOSING_MM`, 3D hole filling, then 2D hole filling across the body axis."""
    radius = [max(1, int(round(CLOSING_MM / s))) for s in mask.GetSpacing()]
    # Pad so the closing does not glue the mask to the volume border (a dilation there has nothing to erode back).
    padded = sitk.ConstantPad(mask, radius, radius, 0)
    closed = sitk.BinaryMorphologicalClosing(padded, radius)
    closed = sitk.Crop(closed, radius, radius)
    closed.CopyInformation(mask)
    filled = sitk.BinaryFillhole(closed)
    return _fill_slices(filled, _axial_axis(mask))


def _axial_axis(image: sitk.Image) -> int:
    """The voxel axis (0=i, 1=j, 2=k) closest to the patient's superior-inferior (LPS z) direction."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return int(np.argmax(np.abs(direction[2])))


def _fill_slices(mask: sitk.Image, axis: int) -> sitk.Image:
    """Fill holes in every 2D slice normal to voxel ``axis`` (vessels crossing a slice are holes there).

    One 2D hole filling over a mosaic of all slices stacked with a background frame around each: the frame joins
    every slice's border to the mosaic's border, so a hole is exactly a hole of its own slice (and one filter call
    instead of one per slice, which cost milliseconds of overhead each).
    """
    array = sitk.GetArrayFromImage(mask)  # [k, j, i]
    array_axis = 2 - axis
    slices = np.moveaxis(array, array_axis, 0)
    count, height, width = slices.shape
    framed = np.pad(slices, ((0, 0), (1, 1), (1, 1)))
    mosaic = sitk.BinaryFillhole(sitk.GetImageFromArray(framed.reshape(count * (height + 2), width + 2)))
    filled = sitk.GetArrayFromImage(mosaic).reshape(count, height + 2, width + 2)[:, 1:-1, 1:-1]
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(filled, 0, array_axis)))
    out.CopyInformation(mask)
    return out
