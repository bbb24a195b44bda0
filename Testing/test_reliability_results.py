"""Issue 11, classes 1, 2, 6 and 8: one writer builds a result privately and swaps it in; an old result survives
any failure of a new run; a finished result is exactly the new run's files; concurrent results are kept; a full
disk leaves nothing; stale staging of killed runs is cleaned; warp/jacobian refuse to clobber."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nephireg import io, staging, validate
from nephireg.errors import InputError
from nephireg.geometry import Grid
from nephireg.protocol import ExitCode, parse_event_line
from nephireg.resultdir import STAGING_PREFIX, ResultFolder

FAST = ["--prealign", "none", "--option", "iterations=3", "--option", "coarse_iterations=1", "--progress", "jsonl"]


def run(capsys, *args):
    from nephireg.cli import main

    code = main([str(a) for a in args])
    printed = capsys.readouterr()
    evs = [e for e in (parse_event_line(line) for line in printed.out.splitlines()) if e is not None]
    return code, evs, printed.err


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    base = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    paths = {}
    for name, array in (("fixed", base), ("moving", np.roll(base, 1, axis=0))):
        paths[name] = str(folder / f"{name}.nrrd")
        sitk.WriteImage(sitk.GetImageFromArray(array), paths[name])
    return paths


def register(capsys, pair, out, *extra):
    return run(capsys, "register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out, *FAST, *extra)


def snapshot(folder: Path):
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_with_fewer_outputs_leaves_exactly_the_new_files(pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert register(capsys, pair, out)[0] == ExitCode.SUCCESS
    assert {"warped.nrrd", "overview.png"} <= set(snapshot(out))
    code, _, _ = register(capsys, pair, out, "--overwrite", "--no-warped", "--no-overview")
    assert code == ExitCode.SUCCESS
    manifest = json.loads((out / "result.json").read_text())
    assert set(snapshot(out)) == set(manifest["files"].values()) | {"result.json"}  # nothing stale, nothing hidden
    assert "warped" not in manifest["files"]


def test_a_result_committed_meanwhile_is_kept_without_overwrite(tmp_path):
    out = tmp_path / "out"
    with ResultFolder(out, overwrite=False) as slow, ResultFolder(out, overwrite=False) as fast:
        for writer, text in ((slow, "slow"), (fast, "fast")):
            (writer.staging / "transform.h5").write_text(text)
        fast.commit({"files": {"transform": "transform.h5"}})
        with pytest.raises(InputError, match="another run wrote a result"):
            slow.commit({"files": {"transform": "transform.h5"}})
    assert (out / "transform.h5").read_text() == "fast"
    assert set(snapshot(out)) == {"transform.h5", "result.json"}  # both staging folders gone


def test_a_retried_job_finishing_first_keeps_its_result(pair, tmp_path, capsys):
    """Two runs into one --out, neither with --overwrite: the one that finishes second is refused (when it starts
    writing, or at the swap under the folder lock) and the first one's result stays."""
    out = tmp_path / "out"
    slow = subprocess.Popen([sys.executable, "-m", "nephireg", "register", "--fixed", pair["fixed"], "--moving",
                             pair["moving"], "--out", str(out), "--prealign", "none", "--option", "iterations=600",
                             "--option", "coarse_iterations=1", "--progress", "jsonl"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in slow.stdout:  # the slow run is optimising: its start-up check saw no result
        event = parse_event_line(line)
        if event and event["event"] == "progress" and event["stage"] == "optimise":
            break
    assert register(capsys, pair, out)[0] == ExitCode.SUCCESS  # the retry finishes first
    committed = snapshot(out)
    rest, err = slow.communicate(timeout=300)
    assert slow.returncode == ExitCode.BAD_INPUT, err
    assert "another run wrote a result" in [e for e in map(parse_event_line, rest.splitlines()) if e][-1]["message"]
    assert snapshot(out) == committed


def test_the_manifest_must_list_exactly_the_staged_files(tmp_path):
    with ResultFolder(tmp_path / "out", overwrite=False) as writer:
        (writer.staging / "transform.h5").write_text("t")
        (writer.staging / "stray.txt").write_text("s")
        with pytest.raises(Exception, match="not listed"):
            writer.commit({"files": {"transform": "transform.h5"}})
    assert not (tmp_path / "out").exists()  # it created the folder, so it removed it


def test_a_failure_removes_the_parents_it_created(tmp_path):
    nested = tmp_path / "p" / "q" / "r"
    with pytest.raises(RuntimeError):
        with ResultFolder(nested, overwrite=False) as writer:
            (writer.staging / "transform.h5").write_text("t")
            raise RuntimeError("the method failed")
    assert not (tmp_path / "p").exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_of_a_killed_run_is_removed_by_the_next_run(pair, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    host = staging.staged_name("").rsplit("-", 2)[0]
    stale = out / f"{STAGING_PREFIX}{host}-{_dead_pid()}-0badc0de"
    live = out / f"{STAGING_PREFIX}{host}-{os.getppid()}-0000beef"  # a running process's: never touched
    for folder in (stale, live):
        folder.mkdir()
        (folder / "transform.h5").write_bytes(b"x" * 1000)
    assert register(capsys, pair, out)[0] == ExitCode.SUCCESS
    assert not stale.exists() and live.exists()


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount for a real small file system")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_keeps_the_old_result_and_leaves_nothing(pair, small_disk, capsys, monkeypatch):
    out = small_disk / "result"
    assert register(capsys, pair, out)[0] == ExitCode.SUCCESS
    before = snapshot(out)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - 100_000))  # room for less than one more result
    code, evs, _ = register(capsys, pair, out, "--overwrite")
    assert code == ExitCode.BAD_INPUT and "not enough free space" in evs[-1]["message"]
    assert [e["stage"] for e in evs if e["event"] == "stage"] == ["read", "preprocess"]  # refused before the method
    monkeypatch.setattr(validate, "SPACE_MARGIN", 0.0)  # skip the estimate: the disk really fills while writing
    code, evs, err = register(capsys, pair, out, "--overwrite")
    assert code == ExitCode.BAD_INPUT and "Traceback" not in err
    assert "No space left on device" in evs[-1]["message"] or "cannot write" in evs[-1]["message"], evs[-1]
    assert snapshot(out) == before  # the old result, byte for byte, and no staging folder
    code, evs, _ = register(capsys, pair, small_disk / "p" / "q" / "r")
    assert code == ExitCode.BAD_INPUT
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "result"]  # the parents it made are gone


def test_warp_and_jacobian_refuse_to_clobber_and_write_atomically(pair, tmp_path, capsys):
    grid = Grid.of(sitk.ReadImage(pair["fixed"]))
    shift = np.zeros(grid.shape_zyx + (3,))
    shift[...] = [1.0, 0.0, 0.0]
    transform = tmp_path / "t.h5"
    io.write_transform(shift, grid, transform)
    warped = tmp_path / "new" / "folder" / "w.nrrd"  # a missing folder is created
    assert run(capsys, "warp", "--transform", transform, "--image", pair["moving"], "--reference", pair["fixed"],
               "--out", warped)[0] == ExitCode.SUCCESS
    first = warped.read_bytes()
    code, _, err = run(capsys, "warp", "--transform", transform, "--image", pair["fixed"], "--reference",
                       pair["fixed"], "--out", warped)
    assert code == ExitCode.BAD_INPUT and "--overwrite" in err and warped.read_bytes() == first
    code, _, err = run(capsys, "warp", "--transform", transform, "--image", pair["moving"], "--reference",
                       pair["fixed"], "--out", pair["moving"], "--overwrite")
    assert code == ExitCode.BAD_INPUT and "one of the command's inputs" in err
    code, _, err = run(capsys, "jacobian", "--transform", transform, "--out", transform, "--overwrite")
    assert code == ExitCode.BAD_INPUT and "one of the command's inputs" in err
    assert run(capsys, "warp", "--transform", transform, "--image", pair["fixed"], "--reference", pair["fixed"],
               "--out", warped, "--overwrite")[0] == ExitCode.SUCCESS
    assert warped.read_bytes() != first
    assert [p.name for p in warped.parent.iterdir()] == ["w.nrrd"]  # no staged file left beside it
    missing = run(capsys, "warp", "--transform", tmp_path / "nope.h5", "--points", transform,
                  "--out", tmp_path / "gone" / "q.txt")
    assert missing[0] == ExitCode.BAD_INPUT and not (tmp_path / "gone").exists()


def test_identical_runs_give_identical_transforms_as_documented(pair, tmp_path, capsys):
    """HDF5 stores write times, so the files' bytes differ; docs/protocol.md says to compare the fields."""
    fields = []
    for name in ("a", "b"):
        assert register(capsys, pair, tmp_path / name)[0] == ExitCode.SUCCESS
        field = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(tmp_path / name / "transform.h5")))
        fields.append(sitk.GetArrayFromImage(field.GetDisplacementField()))
    assert np.array_equal(fields[0], fields[1]) and np.abs(fields[0]).max() > 0
