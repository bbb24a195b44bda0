"""nephireg.forked: work in a forked child, its results back through shared memory (issue 13's prefetch).

Each test runs a fresh interpreter: forking is only allowed in a process without torch and with one thread
(:func:`nephireg.forked.can_fork`), which this test process is not."""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import process_gone

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the forked child is Linux only")


def run_script(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def test_messages_with_arrays_and_images_come_back_whole_and_the_child_is_reaped():
    done = run_script("""
        import json, os
        import numpy as np, SimpleITK as sitk
        from nephireg.forked import ChildEnded, ForkedWork, can_fork

        assert can_fork()

        def work(send):
            image = sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
            image.SetSpacing((1.5, 2.0, 3.0))
            image.SetOrigin((1.0, -2.0, 3.0))
            print("printed by the child")  # must not reach the parent's standard output
            send({"array": np.linspace(0.0, 1.0, 1000), "image": image, "text": "first"})
            send(("second", np.ones((2, 2), np.uint8)))

        forked = ForkedWork(work)
        first, second = forked.receive(), forked.receive()
        try:
            forked.receive()
            ended = False
        except ChildEnded:
            ended = True
        try:
            os.waitpid(forked.pid, os.WNOHANG)
            reaped = False
        except ChildProcessError:
            reaped = True
        forked.finish()
        array, image = first["array"], first["image"]
        array[0] = 42.0  # writable: a copy-on-write mapping, private to this process
        print(json.dumps({
            "array_ok": bool(np.allclose(array[1:], np.linspace(0.0, 1.0, 1000)[1:])), "first": float(array[0]),
            "image": sitk.GetArrayFromImage(image).ravel().tolist(), "pixel": image.GetPixelIDTypeAsString(),
            "spacing": image.GetSpacing(), "origin": image.GetOrigin(), "text": first["text"],
            "second": [second[0], second[1].tolist()], "ended": ended, "reaped": reaped}))
        """)
    assert done.returncode == 0, done.stderr
    assert "printed by the child" not in done.stdout
    result = json.loads(done.stdout)
    assert result["array_ok"] and result["first"] == 42.0
    assert result["image"] == list(range(60)) and result["pixel"] == "16-bit signed integer"
    assert result["spacing"] == [1.5, 2.0, 3.0] and result["origin"] == [1.0, -2.0, 3.0]
    assert result["text"] == "first" and result["second"] == ["second", [[1, 1], [1, 1]]]
    assert result["ended"] and result["reaped"]


def test_a_child_that_fails_ends_without_a_message():
    done = run_script("""
        from nephireg.forked import ChildEnded, ForkedWork

        def work(send):
            raise ValueError("the work failed")

        forked = ForkedWork(work)
        try:
            forked.receive()
            print("received")
        except ChildEnded:
            print("ended")
        forked.finish()
        """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ended"


def test_stop_kills_a_running_child_at_once():
    done = run_script("""
        import time
        from nephireg.forked import ForkedWork

        forked = ForkedWork(lambda send: time.sleep(60))
        started = time.monotonic()
        forked.stop()
        forked.stop()  # idempotent
        print(forked.pid, time.monotonic() - started)
        """)
    assert done.returncode == 0, done.stderr
    pid, seconds = done.stdout.split()
    assert float(seconds) < 5 and process_gone(int(pid))


def test_the_child_dies_with_its_parent():
    """A parent killed before it could stop its child (SIGKILL, a crash): the child is killed too
    (PR_SET_PDEATHSIG), so no work goes on for a run that has ended."""
    code = textwrap.dedent("""
        import os, sys, time
        from nephireg.forked import ForkedWork

        forked = ForkedWork(lambda send: time.sleep(60))
        time.sleep(0.5)  # the child has set up its death signal
        print(forked.pid, flush=True)
        os._exit(0)  # no stop(), no reaping
        """)
    # No pipe for standard error: the child inherits it, and reading it to its end would wait for the child.
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    pid = int(parent.stdout.readline())
    parent.wait(timeout=60)
    deadline = time.monotonic() + 5  # the child's own work would last 60 s
    while not process_gone(pid):
        assert time.monotonic() < deadline, "the orphaned child still runs"
        time.sleep(0.05)


def test_no_fork_with_torch_loaded_or_another_thread_running():
    done = run_script("""
        import threading, time
        from nephireg.forked import can_fork

        alone = can_fork()
        thread = threading.Thread(target=time.sleep, args=(1,))
        thread.start()
        with_thread = can_fork()
        thread.join()
        import torch  # noqa: F401
        print(alone, with_thread, can_fork())
        """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "False"]


def test_a_message_cut_short_or_a_refused_fork_leaves_nothing_open():
    """A child that dies within a message is "no message"; a system that refuses the fork (or the pipe, the memfd)
    raises OSError with nothing left open; a caller that ignores SIGCHLD gets no fork (the kernel would reap the
    child), and a child reaped behind our back does not break finish(). Open descriptors are counted around each."""
    done = run_script("""
        import errno, os, signal, time
        from nephireg import forked

        def open_fds():
            return len(os.listdir("/proc/self/fd"))

        before = open_fds()
        real_send = forked._send

        def cut_short(pipe, shared, offset, message):  # half a header, then the child dies
            pipe.write(forked._HEADER.pack(100, 10)[:5])
            pipe.flush()
            os._exit(0)

        forked._send = cut_short
        work = forked.ForkedWork(lambda send: send("never whole"))
        try:
            work.receive()
            cut = "received"
        except forked.ChildEnded:
            cut = "ended"
        work.finish()
        work.finish()  # idempotent
        forked._send = real_send
        after_cut = open_fds()

        real_fork = os.fork

        def refuse():
            raise OSError(errno.EAGAIN, "no more processes")

        os.fork = refuse
        try:
            forked.ForkedWork(lambda send: None)
            refused = "forked"
        except OSError:
            refused = "refused"
        os.fork = real_fork
        after_refused = open_fds()

        quick = forked.ForkedWork(lambda send: None)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # from now on the kernel reaps our children
        ignoring = forked.can_fork()
        time.sleep(0.5)
        quick.finish()  # its pid was reaped by the kernel: no error, no signal to another process
        after_reaped = open_fds()
        print(cut, refused, ignoring, before == after_cut == after_refused == after_reaped)
        """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ended", "refused", "False", "True"]
