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

from nephireg import io, resultdir, staging, validate
from nephireg.errors import InputError
from nephireg.geometry import Grid
from nephireg.preprocess import working_grid
from nephireg.presets import get_preset
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


def test_overwrite_removes_every_file_the_previous_manifest_listed(tmp_path):
    """The demo's ``inputs/*.nrrd`` (and any file another step adds to a manifest) stayed beside the new result:
    the previous manifest was read after it had been moved aside."""
    out = tmp_path / "out"
    with ResultFolder(out, overwrite=False) as first:
        (first.staging / "inputs").mkdir()
        for name in ("transform.h5", "inputs/fixed.nrrd", "extra.txt"):
            (first.staging / name).write_text("old")
        first.commit({"files": {"transform": "transform.h5", "demo_fixed": "inputs/fixed.nrrd",
                                "extra": "extra.txt"}})
    (out / "notes.txt").write_text("mine")  # not listed, not an engine name: kept
    with ResultFolder(out, overwrite=True) as second:
        (second.staging / "transform.h5").write_text("new")
        second.commit({"files": {"transform": "transform.h5"}})
    assert snapshot(out).keys() == {"transform.h5", "result.json", "notes.txt"}
    assert not (out / "inputs").exists() and (out / "transform.h5").read_text() == "new"


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
    monkeypatch.setattr(validate, "check_free_space", lambda folder, needed: None)  # the disk really fills now
    code, evs, err = register(capsys, pair, out, "--overwrite")
    assert code == ExitCode.BAD_INPUT and "Traceback" not in err
    assert "No space left on device" in evs[-1]["message"] or "cannot write" in evs[-1]["message"], evs[-1]
    assert snapshot(out) == before  # the old result, byte for byte, and no staging folder
    code, evs, _ = register(capsys, pair, small_disk / "p" / "q" / "r")
    assert code == ExitCode.BAD_INPUT
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "result"]  # the parents it made are gone


_REGISTER_PAST_THE_SPACE_CHECK = """
import sys
from nephireg import validate
validate.check_free_space = lambda folder, needed: None  # the disk fills while writing
from nephireg.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_full_disk_gives_one_line_naming_the_users_path(pair, small_disk, tmp_path):
    """HDF5 printed its error stack (dozens of lines) and the message named the private staging path."""
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - 40_000))
    out = small_disk / "result"
    proc = subprocess.run([sys.executable, "-c", _REGISTER_PAST_THE_SPACE_CHECK, "register", "--fixed",
                           pair["fixed"], "--moving", pair["moving"], "--out", str(out), *FAST[:-2],
                           "--progress", "none"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == ExitCode.BAD_INPUT
    assert proc.stderr.strip().splitlines() == [f"error: {out}/transform.h5: cannot write the transform (no space "
                                                "left on the device)"]
    transform = tmp_path / "t.h5"
    io.write_transform(np.zeros((16, 16, 16, 3)), Grid.of(sitk.ReadImage(pair["fixed"])), transform)
    points = tmp_path / "points.txt"
    points.write_text("1 2 3\n" * 20_000)
    warp = subprocess.run([sys.executable, "-m", "nephireg", "warp", "--transform", str(transform), "--points",
                           str(points), "--out", str(small_disk / "p.txt")], capture_output=True, text=True,
                          timeout=300)
    assert warp.returncode == ExitCode.BAD_INPUT
    assert warp.stderr.strip().splitlines() == [f"error: {small_disk}/p.txt: No space left on device"]
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_result_that_just_fits_is_not_refused(pair, small_disk, capsys):
    """The free-space check is a lower bound (the uncompressed transform, Jacobian, warped image, inverse): a result
    that fits runs, where the former estimate (1.2 x 64 bytes a voxel + 1 MB) refused it."""
    grid = Grid.of(sitk.ReadImage(pair["fixed"]))
    needed = validate.result_bytes(grid, grid, working_grid(grid, get_preset("generic").working_spacing_mm))
    # transform, Jacobian and warped image at the 1 mm voxels; the inverse on its 4 mm lattice (2x the working spacing)
    assert needed == 32 * 16 ** 3 + 24 * 5 ** 3
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - int(needed) - 120_000))  # the result + headers, png
    code, evs, _ = register(capsys, pair, small_disk / "result", "--no-overview")
    assert code == ExitCode.SUCCESS, evs[-1]


def test_files_named_like_outputs_are_never_replaced_without_overwrite(pair, tmp_path, capsys):
    """A folder without result.json holding someone's own warped.nrrd or overview.png: a run without
    --overwrite is refused before any work (whatever it writes: stale names would be removed at the swap too),
    and a file that appears there while the run writes is kept at the swap."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("warped.nrrd", "overview.png", "notes.txt"):
        (out / name).write_text(f"my own {name}")
    before = snapshot(out)
    code, evs, _ = register(capsys, pair, out, "--no-warped", "--no-overview")
    assert code == ExitCode.BAD_INPUT and "holds overview.png, warped.nrrd but no result.json" in evs[-1]["message"]
    assert [e["event"] for e in evs] == ["start", "error"] and snapshot(out) == before
    assert register(capsys, pair, out, "--overwrite", "--no-warped", "--no-overview")[0] == ExitCode.SUCCESS
    manifest = json.loads((out / "result.json").read_text())
    assert set(snapshot(out)) == set(manifest["files"].values()) | {"result.json", "notes.txt"}
    assert (out / "notes.txt").read_text() == "my own notes.txt"  # a name the engine never writes: kept
    fresh = tmp_path / "fresh"
    with ResultFolder(fresh, overwrite=False) as writer:
        (writer.staging / "transform.h5").write_text("t")
        (fresh / "warped.nrrd").write_text("arrived meanwhile")
        with pytest.raises(InputError, match="holds warped.nrrd but no result.json"):
            writer.commit({"files": {"transform": "transform.h5"}})
    assert snapshot(fresh) == {"warped.nrrd": b"arrived meanwhile"}


def test_an_input_that_the_result_replaces_is_refused_even_with_overwrite(pair, tmp_path, capsys):
    """Refining a result (``--moving out/warped.nrrd --out out --overwrite``) would delete its own input."""
    out = tmp_path / "out"
    assert register(capsys, pair, out)[0] == ExitCode.SUCCESS
    before = snapshot(out)
    code, evs, _ = run(capsys, "register", "--fixed", pair["fixed"], "--moving", out / "warped.nrrd", "--out", out,
                       "--overwrite", "--no-warped", *FAST)
    assert code == ExitCode.BAD_INPUT and "--moving is a file of the result in --out" in evs[-1]["message"]
    assert snapshot(out) == before
    (out / "mine.nrrd").write_bytes(Path(pair["moving"]).read_bytes())  # any other file there is a fine input
    code, _, _ = run(capsys, "register", "--fixed", pair["fixed"], "--moving", out / "mine.nrrd", "--out", out,
                     "--overwrite", *FAST)
    assert code == ExitCode.SUCCESS and (out / "mine.nrrd").exists()


_KILL_DURING_SWAP = """
import os, signal, sys
from nephireg import resultdir
from nephireg.cli import main
swap, count = resultdir._swap, [0]
def killing_replace(source, destination, _replace=os.replace):
    count[0] += 1
    if count[0] > int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill, between two renames of the swap
    _replace(source, destination)
def swap_then_die(*args):
    resultdir.os.replace = killing_replace
    swap(*args)
resultdir._swap = swap_then_die
main(sys.argv[2:])
"""


# renames done before the kill: the old manifest aside (1), some (3) or all old files aside (5), some (7) or all
# new files in (9); the new manifest would be the 10th
@pytest.mark.parametrize("renames", [1, 3, 5, 7, 9])
def test_a_result_a_sigkill_left_half_replaced_is_restored_by_the_next_run(pair, tmp_path, capsys, renames):
    out = tmp_path / "out"
    assert register(capsys, pair, out)[0] == ExitCode.SUCCESS
    before = snapshot(out)
    killed = subprocess.run([sys.executable, "-c", _KILL_DURING_SWAP, str(renames), "register", "--fixed",
                             pair["moving"], "--moving", pair["fixed"], "--out", str(out), "--overwrite", *FAST],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir())  # what the kill left
    code, evs, _ = register(capsys, pair, out)  # the next run into the folder, without --overwrite
    assert code == ExitCode.BAD_INPUT and "already holds a result" in evs[-1]["message"]
    assert snapshot(out) == before  # the previous result is back, byte for byte, and nothing else


def test_after_a_completed_swap_the_replaced_result_is_not_restored(pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert register(capsys, pair, out)[0] == ExitCode.SUCCESS
    killed = subprocess.run([sys.executable, "-c", _KILL_DURING_SWAP, "99", "register", "--fixed",
                             pair["moving"], "--moving", pair["fixed"], "--out", str(out), "--overwrite", *FAST],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 0, killed.stderr
    new = snapshot(out)
    stale = out / f"{STAGING_PREFIX}{staging.staged_name('').rsplit('-', 2)[0]}-{_dead_pid()}-0badc0de"
    (stale / ".replaced").mkdir(parents=True)  # as a kill right after the new result.json moved in leaves it
    (stale / ".replaced" / "result.json").write_text("{}")
    assert resultdir.restore_interrupted_swap(out) == []
    assert register(capsys, pair, out, "--overwrite")[0] == ExitCode.SUCCESS and not stale.exists()
    assert set(snapshot(out)) == set(new)


def test_the_swap_runs_where_a_folder_cannot_be_locked(pair, tmp_path, capsys, monkeypatch):
    """NFS emulates flock with byte-range locks, which a folder's read-only descriptor cannot take (EBADF)."""
    import errno
    import fcntl

    def refuse(descriptor, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", refuse)
    code, evs, _ = register(capsys, pair, tmp_path / "out")
    assert code == ExitCode.SUCCESS, evs[-1]
    assert (tmp_path / "out" / "result.json").exists()


def test_staged_names_of_another_pid_namespace_are_judged_by_age(tmp_path):
    """A container with the host's name (host networking) numbers its processes apart: its pid says nothing here."""
    host = staging.staged_name("").rsplit("-", 2)[0]
    if "_" not in host:
        pytest.skip("no pid namespace on this system")
    other = tmp_path / f"{STAGING_PREFIX}{host.rsplit('_', 1)[0]}_1-{_dead_pid()}-0badc0de"
    other.mkdir()
    assert not staging.is_stale(other, STAGING_PREFIX)
    os.utime(other, (0, 0))  # untouched since 1970
    assert staging.is_stale(other, STAGING_PREFIX)


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


@pytest.mark.parametrize("failing", ["warp_image", "save_transform"])
def test_a_failure_in_the_write_stage_ends_the_run_with_its_error_and_keeps_the_old_result(pair, tmp_path, capsys,
                                                                                          monkeypatch, failing):
    """The write stage's second thread measures the result from the warped image this thread resamples: when the
    resampling (or a write before it) fails, the run ends with that error at once - the measuring task is not left
    waiting for an image that never comes - and the previous result stays as it was."""
    import threading
    import time

    out = tmp_path / "out"
    assert register(capsys, pair, out)[0] == ExitCode.SUCCESS
    before = snapshot(out)

    def fail(*args, **kwargs):
        time.sleep(1.0)  # the second thread is done with the inverse by now and waits for the warped image
        raise OSError(28, "No space left on device", str(out / "warped.nrrd"))

    monkeypatch.setattr(io, failing, fail)
    outcome = []
    runner = threading.Thread(target=lambda: outcome.append(register(capsys, pair, out, "--overwrite")), daemon=True)
    runner.start()
    runner.join(timeout=120)
    assert not runner.is_alive(), "the run hung in the write stage"
    code, evs, err = outcome[0]
    assert code == ExitCode.BAD_INPUT and "Traceback" not in err
    assert "No space left on device" in evs[-1]["message"], evs[-1]
    assert snapshot(out) == before
