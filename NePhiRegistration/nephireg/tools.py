"""Small commands users expect beside ``register``: ``warp`` (images and point lists), ``jacobian``, ``batch``."""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import List

from nephireg.protocol import RESULT_MANIFEST, ExitCode


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    warp = sub.add_parser("warp", help="apply a transform to an image or to a point list")
    warp.add_argument("--transform", required=True,
                      help="transform file (fixed -> moving, e.g. transform.h5); with --inverse: a result folder "
                           "or its transform.h5")
    warp.add_argument("--inverse", action="store_true",
                      help="the other direction, with the result's inverse.h5 (moving -> fixed): --points are "
                           "moving-space points mapped into fixed space, --image is a fixed-space image resampled "
                           "onto --reference (the moving image)")
    what = warp.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="moving image to resample onto --reference (the fixed image)")
    what.add_argument("--points", help="text file of fixed-space points (LPS mm, 3 numbers a line)")
    warp.add_argument("--reference", help="fixed image whose grid the warped image gets (with --image; "
                                          "with --inverse: the moving image)")
    warp.add_argument("--nearest", action="store_true", help="nearest-neighbour interpolation (label maps)")
    warp.add_argument("--out", required=True, help="output image or point file")
    warp.set_defaults(func=_warp_command)

    jac = sub.add_parser("jacobian", help="Jacobian determinant map and folding of a displacement-field transform")
    jac.add_argument("--transform", required=True)
    jac.add_argument("--reference", help="grid to evaluate on (default: the displacement field's own grid)")
    jac.add_argument("--out", help="output image (float32), e.g. jacobian.nrrd")
    jac.set_defaults(func=_jacobian_command)

    batch = sub.add_parser("batch", help="register the pairs of a CSV (fixed,moving[,fixed_mask,moving_mask][,id])")
    batch.add_argument("--csv", required=True)
    batch.add_argument("--out-root", required=True, help="one result folder per pair: OUT_ROOT/<id or row number>")
    batch.add_argument("--index", type=int, help="run only this 0-based row (for a cluster job array)")
    batch.add_argument("register_args", nargs=argparse.REMAINDER,
                       help="after --: options passed to every 'register' (e.g. -- --method adam --preset lung-ct)")
    batch.set_defaults(func=_batch_command)


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return int(getattr(exc, "exit_code", ExitCode.BAD_INPUT))


def _warp_command(args: argparse.Namespace) -> int:
    from nephireg import io
    from nephireg.errors import InputError
    from nephireg.geometry import Grid

    try:
        path = inverse_transform_path(args.transform) if args.inverse else args.transform
        transform = io.read_transform(path, "inverse transform" if args.inverse else "transform")
        if args.points:
            points = io.read_points(args.points)
            io.write_points([transform.TransformPoint(tuple(p)) for p in points], args.out)
            print(f"mapped {len(points)} points -> {args.out}")
            return int(ExitCode.SUCCESS)
        if not args.reference:
            whose = "moving" if args.inverse else "fixed"
            raise InputError(f"--image needs --reference (the {whose} image whose grid the output takes)")
        image = io.read_image(args.image, "image")
        reference = io.read_image(args.reference, "reference")
        warped = io.resample_to(image, Grid.of(reference), transform, linear=not args.nearest)
        io.write_image(warped, args.out)
        print(f"warped {args.image} -> {args.out}")
        return int(ExitCode.SUCCESS)
    except InputError as exc:
        return _fail(exc)


def inverse_transform_path(result: str) -> Path:
    """The inverse transform file (moving -> fixed) of a registration result: ``result`` is its folder or a file in
    it (e.g. its transform.h5); the folder's result.json names the file (``files["inverse"]``)."""
    from nephireg.errors import InputError
    from nephireg.protocol import read_manifest

    given = Path(result)
    folder = given if given.is_dir() else given.parent
    if not (folder / RESULT_MANIFEST).exists():
        raise InputError(f"--inverse needs a registration result: no {RESULT_MANIFEST} in {folder} (to apply an "
                         "inverse transform file directly, give it without --inverse)", result)
    try:
        name = read_manifest(str(folder)).get("files", {}).get("inverse")
    except ValueError as exc:  # not JSON, or another protocol version
        raise InputError(f"{RESULT_MANIFEST} cannot be read ({exc})", folder / RESULT_MANIFEST) from None
    if not name:
        raise InputError("this result has no inverse transform (results of engines before the inverse was written "
                         "have none); run the registration again", folder / RESULT_MANIFEST)
    return folder / name


def _jacobian_command(args: argparse.Namespace) -> int:
    from nephireg import io
    from nephireg.errors import InputError
    from nephireg.geometry import Grid
    from nephireg.jacobian import jacobian_determinant, jacobian_summary

    try:
        transform = io.read_transform(args.transform)
        if args.reference:
            grid = Grid.of(io.read_image(args.reference, "reference"))
        else:
            field = _displacement_field_of(transform, args.transform)
            grid = Grid.of(field)
        displacement = io.displacement_of(transform, grid)
        det = jacobian_determinant(displacement, grid)
        if args.out:
            io.write_image(io.image_from_array(det, grid), args.out)
        summary = jacobian_summary(det)
        print(" ".join(f"{k}={v:.6g}" for k, v in summary.items()))
        return int(ExitCode.SUCCESS)
    except (InputError, RuntimeError) as exc:
        return _fail(exc)


def _displacement_field_of(transform, path: str):
    import SimpleITK as sitk

    from nephireg.errors import InputError

    candidates = [transform]
    if isinstance(transform, sitk.CompositeTransform):
        candidates = [transform.GetNthTransform(n) for n in range(transform.GetNumberOfTransforms())]
    for t in candidates:
        if t.GetName() == "DisplacementFieldTransform":
            return sitk.DisplacementFieldTransform(t).GetDisplacementField()
    raise InputError("not a displacement-field transform; give --reference to choose the grid", path)


def read_pairs(csv_path: str) -> List[dict]:
    """Rows of a batch CSV (header with fixed, moving and optionally fixed_mask, moving_mask, id)."""
    from nephireg.errors import InputError

    path = Path(csv_path)
    if not path.exists():
        raise InputError("batch CSV not found", path)
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"fixed", "moving"} <= set(rows[0]):
        raise InputError("batch CSV needs a header with at least 'fixed' and 'moving' columns and one row", path)
    base = path.parent
    for row in rows:
        for key in ("fixed", "moving", "fixed_mask", "moving_mask"):
            if row.get(key):
                row[key] = str((base / row[key]).resolve()) if not os.path.isabs(row[key]) else row[key]
    return rows


def _batch_command(args: argparse.Namespace) -> int:
    from nephireg.errors import InputError

    try:
        rows = read_pairs(args.csv)
    except InputError as exc:
        return _fail(exc)
    extra = [a for a in args.register_args if a != "--"]
    indices = [args.index] if args.index is not None else range(len(rows))
    failures = 0
    for index in indices:
        if not 0 <= index < len(rows):
            return _fail(InputError(f"--index {index} is outside the CSV's {len(rows)} rows", args.csv))
        row = rows[index]
        out = Path(args.out_root) / (row.get("id") or f"pair-{index:04d}")
        if (out / RESULT_MANIFEST).exists():
            print(f"[{index}] {out}: done already, skipped")
            continue
        command = [sys.executable, "-m", "nephireg", "register", "--fixed", row["fixed"], "--moving", row["moving"],
                   "--out", str(out), "--progress", "none"] + extra
        for key in ("fixed_mask", "moving_mask"):
            if row.get(key):
                command += [f"--{key.replace('_', '-')}", row[key]]
        code = subprocess.call(command)  # one pair per process: a crash or OOM cannot take the batch down
        print(f"[{index}] {out}: exit {code}")
        failures += code != 0
        if code == ExitCode.CANCELLED:
            return code
    return int(ExitCode.SUCCESS if failures == 0 else ExitCode.INTERNAL_ERROR)
