"""Issue 11, classes 6-8: batch CSVs as spreadsheets and users write them, progress output that nobody reads,
real CPU out of memory, and model downloads that trickle or are killed."""

import http.server
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nephireg import modelstore
from nephireg.errors import InputError
from nephireg.protocol import ExitCode, parse_event_line

FAST = ["--prealign", "none", "--option", "iterations=3", "--option", "coarse_iterations=1"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    base = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    for name, array in (("f", base), ("m", np.roll(base, 1, axis=0))):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / f"{name}.nrrd"))
    return folder


def nephireg(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "nephireg", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_batch_reports_short_rows_per_row_accepts_a_bom_and_checks_done_results(pair, tmp_path):
    csv_path = pair / "pairs.csv"
    csv_path.write_bytes("\ufeffid,fixed,moving\nA,f.nrrd,m.nrrd\nshort,f.nrrd\nC,m.nrrd,f.nrrd\n".encode())
    runs = tmp_path / "runs"
    (runs / "C").mkdir(parents=True)  # C holds the result of another pair: not "done already"
    (runs / "C" / "result.json").write_text('{"parameters": {"request": {"fixed": "/elsewhere/x.nrrd"}}}')
    proc = nephireg("batch", "--csv", csv_path, "--out-root", runs, "--", *FAST)
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stdout + proc.stderr  # the worst row's code
    assert (runs / "A" / "result.json").exists()  # the good row ran although a later row is short
    assert "row 1 has no moving" in proc.stdout and "holds the result of another pair" in proc.stdout
    assert "Traceback" not in proc.stderr
    again = nephireg("batch", "--csv", csv_path, "--out-root", runs, "--index", "0", "--", *FAST)
    assert again.returncode == 0 and "done already, skipped" in again.stdout


def test_batch_pairs_in_forks_of_the_loaded_engine_give_the_fresh_interpreters_results(pair, tmp_path):
    """The default children (forks of the batch, torch loaded once) and --fresh-processes: the same files and
    numbers for every pair, and a failing pair (a broken mask file) still fails alone, with its own message."""
    (pair / "broken.nrrd").write_bytes(b"NRRD0004\nnot really\n")
    csv_path = pair / "three.csv"
    csv_path.write_text("id,fixed,moving,fixed_mask\nA,f.nrrd,m.nrrd,\nB,m.nrrd,f.nrrd,\nC,f.nrrd,m.nrrd,broken.nrrd\n")
    outcomes = {}
    for mode, flags in (("fork", []), ("fresh", ["--fresh-processes"])):
        proc = nephireg("batch", "--csv", csv_path, "--out-root", tmp_path / mode, *flags, "--", *FAST)
        assert proc.returncode == ExitCode.BAD_INPUT, proc.stdout + proc.stderr  # C's code; A and B succeed
        assert "broken.nrrd" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
        forked = "each pair runs in a fork of this process" in proc.stdout
        assert forked == (mode == "fork"), proc.stdout  # the default on Linux uses the forks; the flag does not
        outcomes[mode] = proc
    for pair_id in ("A", "B"):
        forked, fresh = (tmp_path / mode / pair_id for mode in ("fork", "fresh"))
        assert (forked / "jacobian.nrrd").read_bytes() == (fresh / "jacobian.nrrd").read_bytes()
        assert (forked / "warped.nrrd").read_bytes() == (fresh / "warped.nrrd").read_bytes()
        metrics = [json.loads((folder / "result.json").read_text())["metrics"] for folder in (forked, fresh)]
        assert metrics[0] == metrics[1]
    assert not (tmp_path / "fork" / "C" / "result.json").exists()


@pytest.mark.parametrize("flags", [[], ["--fresh-processes"]])
def test_a_bad_register_option_fails_each_pair_with_its_usage_message_in_either_kind_of_child(pair, tmp_path, flags):
    csv_path = pair / "one.csv"
    csv_path.write_text("id,fixed,moving\nA,f.nrrd,m.nrrd\n")
    proc = nephireg("batch", "--csv", csv_path, "--out-root", tmp_path / "runs", *flags, "--", "--no-such-option")
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stdout + proc.stderr  # argparse's exit 2, as a fresh process
    assert "unrecognized arguments: --no-such-option" in proc.stderr and "Traceback" not in proc.stderr
    assert "[0]" in proc.stdout and "exit 2" in proc.stdout


@pytest.mark.parametrize("rows, words", [
    ("A,f.nrrd,m.nrrd\nA,m.nrrd,f.nrrd\n", "share the id 'A' but name different pairs"),
    ("A,f.nrrd,m.nrrd\na,m.nrrd,f.nrrd\n", "share the id 'A' / 'a' but name different pairs"),  # one folder on macOS
    ("../../x,f.nrrd,m.nrrd\n", "not a plain folder name"),
    ("..,f.nrrd,m.nrrd\n", "not a plain folder name"),
])
def test_batch_refuses_ambiguous_or_escaping_ids_before_any_run(pair, tmp_path, rows, words, capsys):
    from nephireg.cli import main

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(f"id,fixed,moving\n{rows}".replace("f.nrrd", str(pair / "f.nrrd"))
                        .replace("m.nrrd", str(pair / "m.nrrd")))
    code = main(["batch", "--csv", str(csv_path), "--out-root", str(tmp_path / "root" / "runs"), "--", *FAST])
    assert code == ExitCode.BAD_INPUT and words in capsys.readouterr().err
    assert not (tmp_path / "root").exists() and not (tmp_path / "x").exists()


def test_progress_output_nobody_reads_never_fails_a_result(pair, tmp_path):
    args = [sys.executable, "-m", "nephireg", "register", "--fixed", pair / "f.nrrd", "--moving", pair / "m.nrrd",
            *FAST, "--progress", "jsonl", "--out"]
    proc = subprocess.Popen([*map(str, args), str(tmp_path / "head")], stdout=subprocess.PIPE, text=True)
    assert parse_event_line(proc.stdout.readline())["event"] == "start"
    proc.stdout.close()  # `| head -1`: the reader is gone
    assert proc.wait(timeout=300) == ExitCode.SUCCESS
    assert (tmp_path / "head" / "result.json").exists()
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        code = subprocess.run([*map(str, args[:-3]), "--progress", "bar", "--out", str(tmp_path / "full")],
                              stdout=full, stderr=full, timeout=300).returncode
    assert code == ExitCode.SUCCESS and (tmp_path / "full" / "result.json").exists()


def test_cpu_out_of_memory_is_exit_4_with_one_line(pair, tmp_path):
    limit = 3 << 30  # address space: enough for torch, not for 10 million similarity points a step

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "nephireg", "register", "--fixed", str(pair / "f.nrrd"), "--moving",
                           str(pair / "m.nrrd"), "--out", str(tmp_path / "oom"), "--method", "nephi-io", "--option",
                           "similarity_points=10000000", "--option", "iterations=2", "--progress", "jsonl"],
                          capture_output=True, text=True, timeout=300, preexec_fn=cap_memory)
    error = [e for e in map(parse_event_line, proc.stdout.splitlines()) if e][-1]
    assert proc.returncode == ExitCode.OUT_OF_MEMORY, proc.stderr[-2000:]
    assert error["kind"] == "out-of-memory" and "Traceback" not in proc.stderr
    assert not (tmp_path / "oom").exists()


def test_an_image_too_big_for_the_memory_is_exit_4_not_unreadable(tmp_path):
    """ITK's failed allocation ("Failed to allocate memory for image") was reported as a file that cannot be read
    (exit 2). The header claims 1.8e9 voxels (within the header check's 2^31), 7 GB that a 3 GB cap refuses."""
    limit = 3 << 30

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    (tmp_path / "big.raw").write_bytes(bytes(1000))
    header = tmp_path / "big.nhdr"
    header.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 1500 1500 800\nencoding: raw\n"
                      "endian: little\ndata file: big.raw\n\n")
    proc = subprocess.run([sys.executable, "-m", "nephireg", "register", "--fixed", str(header), "--moving",
                           str(header), "--out", str(tmp_path / "out"), "--progress", "none"],
                          capture_output=True, text=True, timeout=300, preexec_fn=cap_memory)
    assert proc.returncode == ExitCode.OUT_OF_MEMORY, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: {header}: out of memory reading this file; try a coarser "
                                                "--grid-spacing-mm, smaller images or another device"]
    assert not (tmp_path / "out").exists()


class _Trickle(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        for _ in range(200):  # a byte every 50 ms: each read succeeds, the whole never ends in time
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.05)

    def log_message(self, *args):
        pass


def test_download_deadline_and_no_part_files_left(tmp_path, monkeypatch):
    monkeypatch.setenv(modelstore.CACHE_ENV, str(tmp_path / "cache"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "cache").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = modelstore.staged_name("").rsplit("-", 2)[0]
    stale = tmp_path / "cache" / f".slow.{host}-{dead.pid}-00c0ffee.part"  # a killed download's leftover
    stale.write_bytes(b"partial")
    entry = {"name": "slow", "url": f"http://127.0.0.1:{server.server_address[1]}/m.pt", "sha256": "0" * 64}
    started = time.monotonic()
    try:
        with pytest.raises(InputError, match="download took longer than 0.5 s"):
            modelstore.fetch(entry, timeout_s=0.5)
    finally:
        server.shutdown()
    assert time.monotonic() - started < 5
    assert os.listdir(tmp_path / "cache") == []  # neither the stale .part nor this one's
    assert not Path(stale).exists()


def test_a_batch_that_cannot_load_the_engine_or_fork_starts_fresh_interpreters_instead(monkeypatch):
    """The fallbacks of the batch's children (forks switched on by hand: whether this test process may fork depends
    on what other tests imported): an engine that fails to load in the batch, and a refused fork, each leave the
    pair to a fresh interpreter (which then meets and reports any error itself)."""
    from nephireg import engine_children, signals

    said = []
    launcher = engine_children.Launcher(fork=False, say=said.append)
    launcher.fork = True

    def broken_import(name):
        raise ImportError(f"no module {name} today")

    monkeypatch.setattr(signals, "import_frozen", broken_import)
    launcher.load()
    assert not launcher.fork and "could not be loaded" in said[-1] and "fresh interpreter" in said[-1]
    monkeypatch.undo()

    refused = engine_children.Launcher(fork=False, say=said.append)
    refused.fork, refused._loaded = True, True  # as after a successful load

    def no_fork():
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(engine_children.os, "fork", no_fork)
    child = refused.start(["--help"])
    assert type(child).__name__ == "_FreshInterpreter" and child.wait() == 0
