"""Lung masks derived from a thorax CT in Hounsfield units (binary morphology, components, hole filling; no learned
model).

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

from nephireg import binary_morphology
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
    hull = body_hull(ct)  # held: a SimpleITK array view does not keep its image alive
    inside = sitk.GetArrayViewFromImage(hull) > 0
    air = _image_like(binary_morphology.opening((sitk.GetArrayViewFromImage(ct) < AIR_HU) & inside, [1, 1, 1]), ct)
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
    radius = binary_morphology.ball_radius_voxels(BODY_OPENING_MM, ct.GetSpacing())
    tissue = _image_like(binary_morphology.opening(sitk.GetArrayViewFromImage(ct) > BODY_HU, radius), ct)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(tissue), sortByObjectSize=True)
    sizes = np.bincount(sitk.GetArrayViewFromImage(components).ravel())  # sizes[0]: background
    if sizes.size < 2:
        empty = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
        empty.CopyInformation(ct)
        return empty
    parts = np.flatnonzero(sizes[1:] >= BODY_PART_FRACTION * sizes[1]) + 1  # label 1 is the largest
    body = np.isin(sitk.GetArrayViewFromImage(components), parts)  # [k, j, i]
    array_axis = 2 - _axial_axis(ct)
    hull = convex_hulls_2d(np.moveaxis(body, array_axis, 0))
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(hull, 0, array_axis)))
    out.CopyInformation(ct)
    return out


def convex_hulls_2d(sections: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W): in each section of ``sections`` (N, H, W), the pixels whose centres lie in the convex hull of
    its nonzero pixels (on its boundary included); where those are all on one line, the rows' spans themselves.

    The hull of a pixel set is the hull of each row's two end pixels, and its extent along a row is bounded by the
    lower convex envelope of the rows' first pixels and the upper concave envelope of their last ones (functions of
    the row). The envelopes are built per section (Andrew's monotone chain, on the rows' ends only); each row's
    bounds are then rounded inwards in exact integer arithmetic, and all sections are filled in one operation.
    """
    count, height, width = sections.shape
    occupied = sections != 0
    any_in_row = occupied.any(axis=2)  # (N, H)
    first = occupied.argmax(axis=2)
    last = width - 1 - occupied[:, :, ::-1].argmax(axis=2)
    low = np.full((count, height), width, dtype=np.int64)  # an empty row: low > high
    high = np.full((count, height), -1, dtype=np.int64)
    for n in np.flatnonzero(any_in_row.any(axis=1)):
        rows = np.flatnonzero(any_in_row[n])
        lefts, rights = first[n, rows], last[n, rows]
        if _collinear(rows, lefts, rights):
            low[n, rows], high[n, rows] = lefts, rights
            continue
        span = np.arange(rows[0], rows[-1] + 1)
        low[n, span] = _envelope_at(_envelope(rows.tolist(), lefts.tolist(), lower=True), span, ceil=True)
        high[n, span] = _envelope_at(_envelope(rows.tolist(), rights.tolist(), lower=False), span, ceil=False)
    columns = np.arange(width)
    return ((columns >= low[:, :, None]) & (columns <= high[:, :, None])).astype(np.uint8)


def _collinear(rows: np.ndarray, lefts: np.ndarray, rights: np.ndarray) -> bool:
    """Whether the points (row, left) and (row, right) all lie on one line (exact: integer cross products)."""
    r = np.concatenate([rows, rows]).astype(np.int64)
    c = np.concatenate([lefts, rights]).astype(np.int64)
    far = int(np.argmax(np.abs(r - r[0]) + np.abs(c - c[0])))  # a point other than the first, if any
    return not np.any((r[far] - r[0]) * (c - c[0]) - (c[far] - c[0]) * (r - r[0]))


def _envelope(rows: List[int], columns: List[int], lower: bool) -> Tuple[List[int], List[int]]:
    """Vertices (rows, columns) of the lower convex (``lower``) or upper concave envelope of the points, as functions
    of the row; ``rows`` ascending, distinct. Collinear points are dropped."""
    out_r: List[int] = []
    out_c: List[int] = []
    sign = 1 if lower else -1
    for r, c in zip(rows, columns):
        # pop while the last two vertices and (r, c) make no turn towards the envelope's side
        while len(out_r) >= 2 and sign * ((out_r[-1] - out_r[-2]) * (c - out_c[-2])
                                          - (out_c[-1] - out_c[-2]) * (r - out_r[-2])) <= 0:
            out_r.pop()
            out_c.pop()
        out_r.append(r)
        out_c.append(c)
    return out_r, out_c


def _envelope_at(vertices: Tuple[List[int], List[int]], rows: np.ndarray, ceil: bool) -> np.ndarray:
    """The envelope through ``vertices`` (at least two) at integer ``rows``, rounded up (``ceil``) or down to a
    column, exactly: c0 + (c1 - c0)(r - r0)/(r1 - r0) in integers."""
    vr = np.asarray(vertices[0], dtype=np.int64)
    vc = np.asarray(vertices[1], dtype=np.int64)
    k = np.clip(np.searchsorted(vr, rows, side="right") - 1, 0, len(vr) - 2)
    step = vr[k + 1] - vr[k]
    numerator = vc[k] * step + (vc[k + 1] - vc[k]) * (rows - vr[k])
    return -((-numerator) // step) if ceil else numerator // step


def _select(labels: sitk.Image, kept: List[int]) -> sitk.Image:
    mask = sitk.Equal(labels, kept[0])
    for label in kept[1:]:
        mask = sitk.Or(mask, sitk.Equal(labels, label))
    return mask


def _close_and_fill(mask: sitk.Image) -> sitk.Image:
    """Closing with a ball of :data:`CLOSING_MM`, 3D hole filling, then 2D hole filling across the body axis."""
    radius = binary_morphology.ball_radius_voxels(CLOSING_MM, mask.GetSpacing())
    # on the mask padded by the radius (binary_morphology.closing): not glued to the volume border
    closed = binary_morphology.closing(sitk.GetArrayViewFromImage(mask) > 0, radius)
    filled = sitk.BinaryFillhole(_image_like(closed, mask))
    return _fill_slices(filled, _axial_axis(mask))


def _image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """uint8 {0, 1} image of the (Z, Y, X) bool ``array`` with ``reference``'s geometry."""
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


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
