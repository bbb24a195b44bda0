"""The command line as a user and the Slicer module run it: bad inputs, exit codes, events, cancellation, tools."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nephireg import io
from nephireg.geometry import Grid
from nephireg.protocol import ExitCode, parse_event_line

FAST = ["--option", "iterations=4", "--option", "coarse_iterations=2", "--progress", "jsonl"]


def run_in_process(capsys, *args, check_code):
    """The CLI in this process (torch imported once: fast); returns the protocol events it printed."""
    from nephireg.cli import main

    code = main([str(a) for a in args])
    printed = capsys.readouterr()
    assert code == check_code, printed.out + printed.err
    return events(printed.out)


def run_cli(*args, check_code=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "nephireg", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if check_code is not None:
        assert proc.returncode == check_code, proc.stdout + proc.stderr
    return proc


def events(stdout: str):
    return [e for e in (parse_event_line(line) for line in stdout.splitlines()) if e is not None]


def _image(path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return str(path)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    base = rng.random((16, 16, 16)).astype(np.float32)
    return {"fixed": _image(folder / "f.nrrd", base), "moving": _image(folder / "m.nrrd", np.roll(base, 1, axis=0)),
            "folder": folder}


def _bad_inputs(folder: Path, good):
    rng = np.random.default_rng(1)
    cases = {}
    cases["missing file"] = (folder / "nope.nrrd", "file not found")
    garbage = folder / "garbage.nrrd"
    garbage.write_bytes(b"NRRD0004\nthis is not a header\n" + bytes(range(256)))
    cases["corrupt file"] = (garbage, "cannot be read")
    empty = folder / "empty.nii.gz"
    empty.write_bytes(b"")
    cases["empty file"] = (empty, "empty")
    flat2d = sitk.GetImageFromArray(rng.random((16, 16)).astype(np.float32))
    sitk.WriteImage(flat2d, str(folder / "flat.nrrd"))
    cases["2D image"] = (folder / "flat.nrrd", "2D image")
    four = sitk.JoinSeries([sitk.GetImageFromArray(rng.random((8, 8, 8)).astype(np.float32))] * 3)
    sitk.WriteImage(four, str(folder / "four.nrrd"))
    cases["4D image"] = (folder / "four.nrrd", "4D image")
    vec = sitk.GetImageFromArray(rng.random((8, 8, 8, 3)).astype(np.float32), isVector=True)
    sitk.WriteImage(vec, str(folder / "vector.nrrd"))
    cases["vector image"] = (folder / "vector.nrrd", "components per voxel")
    nan = rng.random((8, 8, 8)).astype(np.float32)
    nan[2, 3, 4] = np.nan
    cases["NaN voxels"] = (_image(folder / "nan.nrrd", nan), "NaN or infinite")
    cases["constant image"] = (_image(folder / "const.nrrd", np.full((8, 8, 8), 5, np.float32)), "constant")
    cases["tiny image"] = (_image(folder / "tiny.nrrd", rng.random((2, 8, 8)).astype(np.float32)), "too small")
    return cases


def test_every_bad_image_gives_its_error_and_exit_code(good, tmp_path, capsys):
    for name, (path, words) in _bad_inputs(tmp_path, good).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        error = run_in_process(capsys, "register", "--fixed", good["fixed"], "--moving", path, "--out", out, *FAST,
                               check_code=ExitCode.BAD_INPUT)[-1]
        assert error["event"] == "error" and error["code"] == ExitCode.BAD_INPUT, name
        assert str(path) in error["message"] and words in error["message"], (name, error["message"])
        assert "\n" not in error["message"]
        assert not out.exists(), f"{name}: no partial output"


def test_mask_grid_mismatch_and_no_overlap(good, tmp_path, capsys):
    mask = _image(tmp_path / "mask.nrrd", np.ones((16, 16, 12), np.uint8))
    message = run_in_process(capsys, "register", "--fixed", good["fixed"], "--moving", good["moving"], "--fixed-mask",
                             mask, "--out", tmp_path / "o1", *FAST, check_code=ExitCode.BAD_INPUT)[-1]["message"]
    assert mask in message and "grid does not match its image" in message
    far = _image(tmp_path / "far.nrrd", np.random.default_rng(2).random((16, 16, 16)).astype(np.float32),
                 origin=(500.0, 0.0, 0.0))
    message = run_in_process(capsys, "register", "--fixed", good["fixed"], "--moving", far, "--prealign", "none",
                             "--out", tmp_path / "o2", *FAST, check_code=ExitCode.BAD_INPUT)[-1]["message"]
    assert "do not overlap in physical space" in message
    assert not (tmp_path / "o2").exists()


def test_success_events_and_refusal_to_overwrite(good, tmp_path):
    out = tmp_path / "result dir ü"  # spaces and non-ASCII in paths
    proc = run_cli("register", "--fixed", good["fixed"], "--moving", good["moving"], "--out", out,
                   "--prealign", "none", *FAST, check_code=ExitCode.SUCCESS)
    evs = events(proc.stdout)
    kinds = [e["event"] for e in evs]
    assert kinds[0] == "start" and kinds[-1] == "result" and "stage" in kinds and "progress" in kinds
    progress = [e for e in evs if e["event"] == "progress"]
    assert all({"stage", "step", "total", "loss", "elapsed_s", "eta_s"} <= set(e) for e in progress)
    manifest = json.loads(Path(evs[-1]["manifest"]).read_text())
    assert (out / manifest["files"]["transform"]).exists()
    again = run_cli("register", "--fixed", good["fixed"], "--moving", good["moving"], "--out", out, *FAST,
                    check_code=ExitCode.BAD_INPUT)
    assert "already holds a result" in events(again.stdout)[-1]["message"]
    run_cli("register", "--fixed", good["fixed"], "--moving", good["moving"], "--out", out, "--overwrite",
            "--prealign", "none", *FAST, check_code=ExitCode.SUCCESS)


def test_bad_option_values_are_bad_input(good, tmp_path, capsys):
    message = run_in_process(capsys, "register", "--fixed", good["fixed"], "--moving", good["moving"], "--out",
                             tmp_path / "o", "--option", "no_such_option=1", "--progress", "jsonl",
                             check_code=ExitCode.BAD_INPUT)[-1]["message"]
    assert "no_such_option" in message
    malformed = run_in_process(capsys, "register", "--fixed", good["fixed"], "--moving", good["moving"], "--out",
                               tmp_path / "o", "--option", "iterations", "--progress", "jsonl",
                               check_code=ExitCode.BAD_INPUT)
    assert [e["event"] for e in malformed] == ["start", "error"]  # the start event comes first, always
    assert "not KEY=VALUE" in malformed[-1]["message"]
    if not torch.cuda.is_available():  # a device that is not there: also an error after the start event
        no_gpu = run_in_process(capsys, "register", "--fixed", good["fixed"], "--moving", good["moving"], "--out",
                                tmp_path / "o", "--device", "cuda", "--progress", "jsonl",
                                check_code=ExitCode.BAD_INPUT)
        assert [e["event"] for e in no_gpu] == ["start", "error"] and "cuda" in no_gpu[-1]["message"]
    run_cli("register", "--fixed", good["fixed"], "--moving", good["moving"], "--out", tmp_path / "o",
            "--method", "bogus", check_code=2)  # argparse's usage error


def test_sigterm_cancels_promptly_and_leaves_no_result(tmp_path, small_pair):
    out = tmp_path / "cancelled"
    proc = subprocess.Popen([sys.executable, "-m", "nephireg", "register", "--fixed", small_pair["fixed"],
                             "--moving", small_pair["moving"], "--out", str(out), "--preset", "generic",
                             "--prealign", "none", "--option", "iterations=100000", "--progress", "jsonl"],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until the optimisation runs
        event = parse_event_line(line)
        if event and event["event"] == "progress" and event["stage"] == "optimise":
            break
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    code = proc.wait(timeout=60)
    assert code == ExitCode.CANCELLED
    assert time.monotonic() - started < 20
    assert events(rest)[-1]["event"] == "error" and events(rest)[-1]["kind"] == "cancelled"
    assert not (out / "result.json").exists()


def test_warp_points_and_image_and_jacobian(tmp_path, small_pair):
    grid: Grid = small_pair["grid"]
    shift = np.zeros(grid.shape_zyx + (3,))
    shift[...] = [1.5, -2.0, 0.5]
    io.write_transform(shift, grid, tmp_path / "t.h5")
    points = grid.center_physical() + np.array([[0.0, 0.0, 0.0], [10.0, -5.0, 12.0]])  # inside the field
    io.write_points(points, tmp_path / "p.txt")
    run_cli("warp", "--transform", tmp_path / "t.h5", "--points", tmp_path / "p.txt", "--out", tmp_path / "q.txt",
            check_code=0)
    assert np.allclose(io.read_points(tmp_path / "q.txt"), points + [1.5, -2.0, 0.5], atol=1e-5)
    run_cli("warp", "--transform", tmp_path / "t.h5", "--image", small_pair["moving"], "--reference",
            small_pair["fixed"], "--out", tmp_path / "w.nrrd", check_code=0)
    assert io.same_grid(Grid.of(sitk.ReadImage(str(tmp_path / "w.nrrd"))), grid)
    proc = run_cli("jacobian", "--transform", tmp_path / "t.h5", "--out", tmp_path / "j.nrrd", check_code=0)
    assert "folding_percent=0" in proc.stdout
    assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "j.nrrd"))), 1.0, atol=1e-5)
    bad = run_cli("warp", "--transform", tmp_path / "p.txt", "--points", tmp_path / "p.txt", "--out", tmp_path / "x")
    assert bad.returncode == ExitCode.BAD_INPUT and "cannot be read as an ITK transform" in bad.stderr


def test_batch_runs_each_pair_once_and_resumes(good, tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(f"id,fixed,moving\nA,{good['fixed']},{good['moving']}\nB,{good['moving']},{good['fixed']}\n")
    args = ["batch", "--csv", csv_path, "--out-root", tmp_path / "runs", "--index", "1", "--",
            "--prealign", "none", "--option", "iterations=3", "--option", "coarse_iterations=1"]
    run_cli(*args, check_code=0)
    assert (tmp_path / "runs" / "B" / "result.json").exists() and not (tmp_path / "runs" / "A").exists()
    proc = run_cli(*[a for a in args if a not in ("--index", "1")], check_code=0)
    assert "B: done already, skipped" in proc.stdout and (tmp_path / "runs" / "A" / "result.json").exists()


def test_demo_command_help_lists_subcommands():
    proc = run_cli("--help", check_code=0)
    for command in ("register", "demo", "warp", "jacobian", "batch"):
        assert command in proc.stdout
