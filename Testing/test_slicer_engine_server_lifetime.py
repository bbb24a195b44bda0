"""The lifetime rules of the module's engine server (``engineserver.py``) with real processes standing in for the
engine (small interpreters that fail, or listen and wait): a failing server is not restarted for ever and its log
reaches Slicer's log, a server with a run in it is neither replaced nor stopped, a crashed session's folder is
removed while a live one is kept, and no server where its socket path would not fit. No torch needed."""

import fcntl
import logging
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from slicer_scene import MODULE_DIR  # noqa: F401 - puts the module folder on sys.path
from test_reliability_signals import wait_for

from NePhiRegistrationLib import engineserver

pytestmark = pytest.mark.skipif(not engineserver.supported(), reason="the engine server needs Linux with pidfds")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No shared server and no failures counted; servers' folders under this test's temp folder."""
    monkeypatch.setattr(engineserver, "_shared", None)
    monkeypatch.setattr(engineserver, "_failures", 0)
    monkeypatch.setattr(engineserver.tempfile, "tempdir", str(tmp_path))
    yield tmp_path
    engineserver.stopShared()


def fake_python(folder: Path, body: str) -> str:
    """An executable that ``EngineServer`` starts as ``<it> -m nephireg serve --socket PATH ...``."""
    script = folder / "fake-python"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body), encoding="utf-8")
    script.chmod(0o755)
    return str(script)


FAILING = """
    import sys
    print("boom: this engine cannot load", file=sys.stderr)
    sys.exit(1)
"""
LISTENING = """
    import signal, socket, sys, time
    path = sys.argv[sys.argv.index("--socket") + 1]
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    time.sleep(120)
"""

IDLE_EXIT = """
    import os, socket, sys, time
    path = sys.argv[sys.argv.index("--socket") + 1]
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    time.sleep(0.3)  # served nobody: an idle exit, as 'nephireg serve --idle-exit' does (socket removed, exit 0)
    os.unlink(path)
"""


def test_a_failing_server_is_started_only_max_failures_times_and_its_log_goes_to_slicers_log(fresh, caplog):
    python = fake_python(fresh, FAILING)
    caplog.set_level(logging.WARNING)
    started = []
    for _ in range(engineserver.MAX_FAILURES):
        server = engineserver.prepare(python, {"A": "1"})
        assert server is not None and server is not (started[-1] if started else None)
        started.append(server)
        wait_for(lambda s=server: not s.running)
        assert server.broken
    assert engineserver.prepare(python, {"A": "1"}) is None  # not again in this session
    assert engineserver._shared is None
    assert all(not Path(s.folder).exists() for s in started)  # each folder removed ...
    assert "boom: this engine cannot load" in caplog.text  # ... after its log went to Slicer's log
    assert "failed 2 times" in caplog.text


def test_a_server_with_a_run_in_it_is_neither_replaced_nor_stopped(fresh):
    python = fake_python(fresh, LISTENING)
    server = engineserver.prepare(python, {"A": "1"})
    wait_for(lambda: server.ready)
    job = object()
    server.acquire(job)
    assert engineserver.prepare(python, {"A": "2"}) is None  # another environment: not this server's runs ...
    engineserver.stopSharedIfIdle()  # ... and unticking the setting does not cancel the run in it
    assert engineserver._shared is server and server.running
    assert engineserver.prepare(python, {"A": "1"}) is server
    server.release(job)
    replacement = engineserver.prepare(python, {"A": "2"})  # now free: replaced
    assert replacement is not server and not server.running and not Path(server.folder).exists()
    assert not server.broken  # it was ready and stopped when asked: no failure counted
    wait_for(lambda: replacement.ready)
    engineserver.stopSharedIfIdle()
    assert engineserver._shared is None and not replacement.running and engineserver._failures == 0


def test_a_server_that_refused_a_run_is_replaced_after_it(fresh):
    python = fake_python(fresh, LISTENING)
    server = engineserver.prepare(python, {"A": "1"})
    wait_for(lambda: server.ready)
    server.failed = True  # what the job marks when the client says the server did not take its run
    replacement = engineserver.prepare(python, {"A": "1"})
    assert replacement is not None and replacement is not server and not server.running
    assert engineserver._failures == 1


def test_folders_a_crashed_session_left_are_removed_and_live_or_young_ones_kept(fresh):
    old = time.time() - 2 * engineserver.STALE_AFTER_S
    folders = {}
    for name in ("crashed", "live", "young", "no-lock"):
        folder = fresh / f"{engineserver.FOLDER_PREFIX}{name}"
        folder.mkdir(mode=0o700)
        if name != "no-lock":
            (folder / engineserver.LOCK_NAME).touch()
        (folder / engineserver.LOG_NAME).write_text("log")
        folders[name] = folder
    other = fresh / "someone-elses-folder"
    other.mkdir()
    held = os.open(folders["live"] / engineserver.LOCK_NAME, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # a server of another Slicer still runs there
    try:
        for name in ("crashed", "live", "no-lock"):
            os.utime(folders[name], (old, old))
        os.utime(other, (old, old))
        removed = engineserver.removeStaleFolders()
    finally:
        os.close(held)
    assert sorted(removed) == sorted(str(folders[n]) for n in ("crashed", "no-lock"))
    assert folders["live"].exists() and folders["young"].exists() and other.exists()
    assert not folders["crashed"].exists() and not folders["no-lock"].exists()


def test_no_server_where_its_socket_path_would_not_fit(fresh, monkeypatch):
    deep = fresh / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(engineserver.tempfile, "tempdir", str(deep))
    assert engineserver.prepare(fake_python(fresh, LISTENING), {"A": "1"}) is None
    assert list(deep.iterdir()) == []  # nothing left behind
    assert engineserver._failures == 0  # not the server's failure


def test_a_server_that_stopped_by_itself_without_an_error_is_replaced_and_not_counted(fresh, caplog):
    # an idle exit (30 minutes unused) or the like: nothing failed, whether or not anyone saw it ready
    python = fake_python(fresh, IDLE_EXIT)
    caplog.set_level(logging.WARNING)
    for _ in range(engineserver.MAX_FAILURES + 1):
        server = engineserver.prepare(python, {"A": "1"})
        assert server is not None
        wait_for(lambda s=server: not s.running)
        assert not server.broken
    assert engineserver._failures == 0 and "did not work" not in caplog.text
