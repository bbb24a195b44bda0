"""Small commands users expect beside ``register``: ``warp`` (images and point lists), ``jacobian``, ``batch``."""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, List

from nephireg.protocol import RESULT_MANIFEST, ExitCode

if TYPE_CHECKING:
    from nephireg import engine_children


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
    warp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    warp.set_defaults(func=_warp_command)

    jac = sub.add_parser("jacobian", help="Jacobian determinant map and folding of a displacement-field transform")
    jac.add_argument("--transform", required=True)
    jac.add_argument("--reference", help="grid to evaluate on (default: the displacement field's own grid)")
    jac.add_argument("--out", help="output image (float32), e.g. jacobian.nrrd")
    jac.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    jac.set_defaults(func=_jacobian_command)

    batch = sub.add_parser("batch", help="register the pairs of a CSV (fixed,moving[,fixed_mask,moving_mask][,id])")
    batch.add_argument("--csv", required=True)
    batch.add_argument("--out-root", required=True, help="one result folder per pair: OUT_ROOT/<id or row number>")
    batch.add_argument("--index", type=int, help="run only this 0-based row (for a cluster job array)")
    batch.add_argument("--fresh-processes", action="store_true",
                       help="start every pair in a fresh interpreter; by default (Linux) the batch loads the engine "
                            "once and each pair runs in a fork of it, without torch's import")
    batch.add_argument("register_args", nargs=argparse.REMAINDER,
                       help="after --: options passed to every 'register' (e.g. -- --method adam --preset lung-ct)")
    batch.set_defaults(func=_batch_command)


def _say(text: str) -> None:
    from nephireg.progress import say

    say(text)


def _warp_command(args: argparse.Namespace) -> int:
    from nephireg import io
    from nephireg.errors import InputError
    from nephireg.geometry import Grid
    from nephireg.resultdir import staged_file
    from nephireg.validate import check_output_file

    path = inverse_transform_path(args.transform) if args.inverse else args.transform
    inputs = [path, args.points, args.image, args.reference]
    check_output_file(args.out, args.overwrite, inputs)  # before any work
    if args.image and not args.reference:
        whose = "moving" if args.inverse else "fixed"
        raise InputError(f"--image needs --reference (the {whose} image whose grid the output takes)")
    transform = io.read_transform(path, "inverse transform" if args.inverse else "transform")
    if args.points:
        points = io.read_points(args.points)
        with staged_file(args.out, args.overwrite, inputs) as staged:
            io.write_points([transform.TransformPoint(tuple(p)) for p in points], staged)
        _say(f"mapped {len(points)} points -> {args.out}")
        return int(ExitCode.SUCCESS)
    image = io.read_image(args.image, "image")
    reference = io.read_image(args.reference, "reference")
    warped = io.resample_to(image, Grid.of(reference), transform, linear=not args.nearest)
    with staged_file(args.out, args.overwrite, inputs) as staged:
        io.write_image(warped, staged)
    _say(f"warped {args.image} -> {args.out}")
    return int(ExitCode.SUCCESS)


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
    return Path(name)  # read_manifest already joined it to the folder


def _jacobian_command(args: argparse.Namespace) -> int:
    from nephireg import io
    from nephireg.errors import InputError
    from nephireg.geometry import Grid
    from nephireg.jacobian import jacobian_determinant, jacobian_summary
    from nephireg.resultdir import staged_file
    from nephireg.validate import check_output_file

    inputs = [args.transform, args.reference]
    if args.out:
        check_output_file(args.out, args.overwrite, inputs)
    transform = io.read_transform(args.transform)
    if args.reference:
        grid = Grid.of(io.read_image(args.reference, "reference"))
    else:
        field = _displacement_field_of(transform, args.transform)
        grid = Grid.of(field)
    try:
        displacement = io.displacement_of(transform, grid)
    except RuntimeError as exc:  # SimpleITK cannot evaluate this transform (e.g. a broken field)
        raise InputError(f"transform cannot be evaluated on the grid ({str(exc).strip()[-200:]})",
                         args.transform) from None
    det = jacobian_determinant(displacement, grid)
    if args.out:
        with staged_file(args.out, args.overwrite, inputs) as staged:
            io.write_image(io.image_from_array(det, grid), staged)
    summary = jacobian_summary(det)
    _say(" ".join(f"{k}={'n/a' if v is None else format(v, '.6g')}" for k, v in summary.items()))
    return int(ExitCode.SUCCESS)


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


PAIR_COLUMNS = ("fixed", "moving", "fixed_mask", "moving_mask")


def read_pairs(csv_path: str) -> List[dict]:
    """Rows of a batch CSV (header with fixed, moving and optionally fixed_mask, moving_mask, id), checked as a
    whole: ids are safe folder names and name one pair each. A row with a missing cell gets ``row["problem"]``
    (reported when its turn comes; the other rows still run). A UTF-8 byte-order mark is accepted."""
    from nephireg.errors import InputError

    path = Path(csv_path)
    if not path.is_file():
        raise InputError("batch CSV not found", path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a byte-order mark
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"batch CSV cannot be read as UTF-8 CSV ({exc})", path) from None
    header = set(rows[0]) if rows else set()
    if not rows or not {"fixed", "moving"} <= header:
        raise InputError("batch CSV needs a header with at least 'fixed' and 'moving' columns and one row", path)
    base = path.parent
    for number, row in enumerate(rows):
        row["problem"] = _row_problem(row, number)
        for key in PAIR_COLUMNS:
            value = (row.get(key) or "").strip()
            row[key] = str((base / value).resolve()) if value and not os.path.isabs(value) else value
        row["id"] = (row.get("id") or "").strip() or f"pair-{number:04d}"
        _check_id(row["id"], number, path)
    _check_unique_ids(rows, path)
    return rows


def _row_problem(row: dict, number: int) -> str:
    if None in row:
        return f"row {number} has {len(row[None])} more cells than the header"
    missing = [key for key in ("fixed", "moving") if not (row.get(key) or "").strip()]
    return f"row {number} has no {' and no '.join(missing)} (a short row?)" if missing else ""


def _check_id(pair_id: str, number: int, path: Path) -> None:
    """An id is one folder name inside --out-root: no separators, no '..', nothing hidden."""
    from nephireg.errors import InputError

    bad = pair_id in (".", "..") or pair_id.startswith(".") or any(c in pair_id for c in "/\\:\0")
    if bad or len(pair_id.encode()) > 200:
        raise InputError(f"row {number}: id {pair_id!r} is not a plain folder name (no / \\ : or leading '.'); "
                         "results must stay inside --out-root", path)


def _check_unique_ids(rows: List[dict], path: Path) -> None:
    from nephireg.errors import InputError

    seen: dict = {}
    for number, row in enumerate(rows):
        pair = tuple(row[key] for key in PAIR_COLUMNS)
        first = seen.setdefault(row["id"].casefold(), (number, pair))  # "A" and "a": one folder on macOS, Windows
        if first[1] != pair:
            ids = repr(row["id"]) if rows[first[0]]["id"] == row["id"] else f"{rows[first[0]]['id']!r} / {row['id']!r}"
            raise InputError(f"rows {first[0]} and {number} share the id {ids} but name different pairs (an id is a "
                             "folder name, and case does not tell folders apart everywhere)", path)


def _done_already(out: Path, row: dict) -> str:
    """"done" when ``out`` holds this row's result, "" when it holds none; else the conflict, in words."""
    try:
        manifest = json.loads((out / RESULT_MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ""
    except (OSError, ValueError):
        return f"{out / RESULT_MANIFEST} cannot be read; remove it or choose another --out-root"
    request = manifest.get("parameters", {}).get("request", {})
    for key in ("fixed", "moving"):
        if request.get(key) and os.path.abspath(request[key]) != row[key]:
            return f"{out} holds the result of another pair ({key} {request[key]}); not replaced"
    return "done"


def _batch_command(args: argparse.Namespace) -> int:
    """Every row, one child process each (:mod:`nephireg.engine_children`). Runs inside the command line's error
    boundary (``cli.run_command``): a SIGINT/SIGTERM raises Cancelled here, which :func:`_run_child` forwards to the
    running child first."""
    from nephireg import engine_children
    from nephireg.errors import InputError

    rows = read_pairs(args.csv)
    if args.index is not None and not 0 <= args.index < len(rows):
        raise InputError(f"--index {args.index} is outside the CSV's {len(rows)} rows", args.csv)
    indices = [args.index] if args.index is not None else range(len(rows))
    extra = [a for a in args.register_args if a != "--"]
    launcher = engine_children.Launcher(fork=not args.fresh_processes, say=_say)
    codes = [_batch_row(index, rows[index], Path(args.out_root), extra, launcher) for index in indices]
    failed = [code for code in codes if code != ExitCode.SUCCESS]
    return int(ExitCode.SUCCESS if not failed else failed[0] if len(set(failed)) == 1 else ExitCode.INTERNAL_ERROR)


def _batch_row(index: int, row: dict, out_root: Path, extra: List[str], launcher: engine_children.Launcher) -> int:
    """One row: skipped when done, refused when broken, else registered in a child process (exit code back)."""
    out = out_root / row["id"]
    problem = row["problem"] or _done_already(out, row)
    if problem == "done":
        _say(f"[{index}] {out}: done already, skipped")
        return int(ExitCode.SUCCESS)
    if problem:
        _say(f"[{index}] {out}: exit {int(ExitCode.BAD_INPUT)} ({problem})")
        return int(ExitCode.BAD_INPUT)
    register_argv = ["--fixed", row["fixed"], "--moving", row["moving"], "--out", str(out), "--progress", "none",
                     *extra]
    for key in ("fixed_mask", "moving_mask"):
        if row.get(key):
            register_argv += [f"--{key.replace('_', '-')}", row[key]]
    code = _run_child(register_argv, launcher)  # one pair per process: a crash or OOM cannot take the batch down
    _say(f"[{index}] {out}: exit {code}")
    return code


def _run_child(register_argv: List[str], launcher: engine_children.Launcher) -> int:
    """``register`` with ``register_argv`` in a child (:class:`nephireg.engine_children.Launcher`); a cancellation
    of the batch (the Cancelled its signal raises) is forwarded to the child as SIGTERM, the child is waited for
    (further signals meanwhile are recorded, not raised), and the cancellation goes on up.

    SIGTERM whatever the batch received: a fresh interpreter still starting (before its handlers exist) then ends
    quietly instead of printing a KeyboardInterrupt traceback."""
    from nephireg import signals
    from nephireg.errors import Cancelled

    launcher.load()  # once per batch, before its first child
    try:
        with signals.deferred():  # the child started and its handle kept, or neither: never an orphan
            child = launcher.start(register_argv)
        code = child.wait()
    except Cancelled:
        with signals.held():
            child.terminate()
            child.wait()
        raise
    return int(code) if code >= 0 else int(ExitCode.INTERNAL_ERROR)  # killed by a signal the batch did not get
