"""Work in a forked child process whose results come back pickled (Linux; no torch in the child).

Why a process and not a thread: the command line reads the images, derives the lung masks and pre-aligns them while
torch loads (:class:`nephireg.inputs.PrefetchedInputs`). Loading torch holds the interpreter lock for most of its
second (module code and the loading of its libraries), so a thread doing that work runs mostly when the import lets
it: on the lung pair the two together took 1.81 s against 1.18 s for the import alone. A child process forked just
before the import runs on the other core without that lock.

The child is only a faster way to the same result: the caller treats a child that ends without its message
(any error, a crash, a kill) as "not done" and does that work itself, so errors, warnings and their order are those
of the in-process path. :func:`can_fork` says when forking is safe: only on Linux, only from a process with one
thread and without torch (no OpenMP pool, no lock held by another thread that the child would inherit locked).

The child: default SIGINT/SIGTERM (a signal to the process group ends it at once), SIGKILL when the parent dies
(``PR_SET_PDEATHSIG``), standard output on ``/dev/null`` (it must never write into the parent's progress stream),
and ``os._exit`` at the end (no clean-up of the parent's state runs twice).

How a message travels: pickled (protocol 5) with its arrays and SimpleITK images as out-of-band buffers; the
buffers are written into an anonymous shared-memory file (``memfd``, made before the fork, so both processes hold
it) and the pickle with the buffers' places goes through a pipe. The parent maps the file copy-on-write and
unpickles over it, without copying the buffers; through a pipe, tens of MB move in 1 MiB pieces, each waiting for
the interpreter lock that torch's import holds (measured: 0.15 s for the lung pair's inputs, against 0.04 s).

Memory: while the child works, the inputs exist in the child, in the shared file and, once received, in the
parent - about twice their size more than a thread needs, for the second the prefetch lasts; the child exits after
its last message and the parent closes the file then. Each message is mapped on its own (its buffers start on a
page), and a large buffer is a view of that mapping (:data:`MAPPED_FROM_BYTES`): a message whose objects copied
everything (SimpleITK images copy as they are made) is unmapped and its part of the file freed at once; a message
of arrays stays mapped as long as its arrays are used - as much memory as the arrays themselves.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import struct
import sys
import threading
from typing import Any, BinaryIO, Callable, List, Optional, Tuple

Send = Callable[[Any], None]
"""``send(message)``: pickles ``message`` to the parent (in the child)."""

_HEADER = struct.Struct("<QQ")  # pickle length (bytes), length of the buffer table (bytes)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
CHILD_NICENESS = 10
"""The child runs at a lower priority: it has a core to itself while torch loads on the other (the import is one
thread), but where both processes want both cores (the child's filters are multi-threaded; later the parent's
network and writing) the parent, which the run waits for, goes first."""


MAPPED_FROM_BYTES = 1 << 20
"""Buffers from this size on come as views of their message's mapping of the shared file (not copied; SimpleITK
images copy them as they are made, arrays do not): an array kept keeps its message's mapping, so a message should
carry either what is kept (arrays) or what is copied (images), not both. Smaller buffers (a 4x4 matrix) are
copied."""


class ChildEnded(Exception):
    """The child ended (or was stopped) before sending the message asked for."""


def can_fork() -> bool:
    """Whether :class:`ForkedWork` may be used in this process now (see the module's docstring): Linux with memfd,
    no torch, one thread, and children reaped by this process (a caller that ignores SIGCHLD has them reaped by
    the kernel, and a pid this module waits for could then belong to another process)."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork") and hasattr(os, "memfd_create")
            and "torch" not in sys.modules and threading.active_count() == 1
            and signal.getsignal(signal.SIGCHLD) in (signal.SIG_DFL, None))


class ForkedWork:
    """``work(send)`` running in a forked child; :meth:`receive` gives its messages in order (blocking).

    Create it on the thread that may fork (:func:`can_fork`; raises OSError when the system refuses a pipe, a
    memfd or a fork, with nothing left open); :meth:`receive` may then run on another thread, and :meth:`stop` on
    any. :meth:`finish` (or :meth:`stop`) ends the child and closes everything; both are idempotent.
    """

    def __init__(self, work: Callable[[Send], None]) -> None:
        self._lock = threading.Lock()  # kill and reap never race: a reaped pid may belong to another process
        self._reaped = False
        self._closed = False
        parent = os.getpid()
        opened: List[int] = []
        try:
            self._shared = os.memfd_create("nephireg-forked", os.MFD_CLOEXEC)
            opened.append(self._shared)
            read_end, write_end = os.pipe()
            opened += [read_end, write_end]
            self.pid = os.fork()
        except OSError:
            for fd in opened:
                os.close(fd)
            raise
        if self.pid == 0:  # the child: never returns, whatever happens (even a KeyboardInterrupt right here)
            try:
                os.close(read_end)
                _run_child(work, write_end, self._shared, parent)
            finally:
                os._exit(1)
        os.close(write_end)
        self._pipe = os.fdopen(read_end, "rb")

    def receive(self) -> Any:
        """The child's next message; :class:`ChildEnded` once it has ended without one (or sent one that cannot
        be read: whatever went wrong, the caller then does the work itself). Arrays of :data:`MAPPED_FROM_BYTES` or
        more in it are views of the shared file: copy what is kept."""
        try:
            header = self._pipe.read(_HEADER.size)
            if len(header) < _HEADER.size:
                raise ChildEnded("the child sent nothing more")
            length, table_length = _HEADER.unpack(header)
            data, table = self._pipe.read(length), self._pipe.read(table_length)
            if len(data) < length or len(table) < table_length:
                raise ChildEnded("the child ended within a message")
            places: List[Tuple[int, int]] = pickle.loads(table)
            mapping, start, end = _mapped(self._shared, places)
            whole = memoryview(mapping) if mapping is not None else memoryview(b"")
            views = [whole[offset - start:offset - start + size] for offset, size in places]
            message = pickle.loads(data, buffers=[bytearray(view) if view.nbytes < MAPPED_FROM_BYTES else view
                                                  for view in views])
            if _unused(views + [whole], mapping):  # everything made from it copied (images): free it now
                _punch_hole(self._shared, start, end - start)
            return message
        except Exception:  # noqa: BLE001 - a short or unreadable message (or no memory for it): no result
            self.stop()
            raise ChildEnded("the child ended without its message") from None

    def stop(self) -> None:
        """Kill the child if it still runs and reap it."""
        self._reap()

    def finish(self) -> None:
        """End the child (after its last message it is exiting anyway; nothing it could still send is read) and
        close the pipe and the shared file."""
        try:
            self._reap()
        finally:
            with self._lock:
                if not self._closed:
                    self._closed = True
                    self._pipe.close()
                    os.close(self._shared)

    def _reap(self) -> None:
        with self._lock:
            if self._reaped:
                return
            self._reaped = True  # first: after a failure below, no later call may signal this pid
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:  # already ended (a zombie until reaped below)
                pass
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:  # reaped elsewhere after all (SIGCHLD ignored since can_fork)
                pass


def _run_child(work: Callable[[Send], None], write_end: int, shared: int, parent: int) -> None:
    code = 1
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        die_with(parent, signal.SIGKILL)
        os.nice(CHILD_NICENESS)
        gc.disable()  # a short life that makes no garbage worth a collector's passes
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        pipe = os.fdopen(write_end, "wb")
        end = [0]  # where the next buffer goes in the shared file

        def send(message: Any) -> None:
            end[0] = _send(pipe, shared, end[0], message)

        work(send)
        code = 0
    except BaseException:  # noqa: BLE001 - the parent redoes the work and meets the error itself
        pass
    finally:
        os._exit(code)


def die_with(parent: int, signum: int) -> None:
    """In a forked child (Linux): ``signum`` for this child when ``parent`` (the pid that forked it; its forking
    thread, precisely) ends; then check that it has not ended already (this child would then have been adopted by
    another process, and exits at once)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _send(pipe: BinaryIO, shared: int, offset: int, message: Any) -> int:
    """Writes ``message`` (its buffers into ``shared`` from ``offset`` on, rounded up to a page: each message is
    mapped on its own); returns the offset after them."""
    import mmap

    buffers: List[pickle.PickleBuffer] = []
    data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    offset = -(-offset // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
    places = []
    for buffer in buffers:
        raw = buffer.raw()
        _write_at(shared, raw, offset)
        places.append((offset, raw.nbytes))
        offset += raw.nbytes
    table = pickle.dumps(places)
    pipe.write(_HEADER.pack(len(data), len(table)) + data + table)
    pipe.flush()
    return offset


def _write_at(fd: int, view: memoryview, offset: int) -> None:
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _mapped(fd: int, places: List[Tuple[int, int]]) -> Tuple[Optional[Any], int, int]:
    """The part of the shared file that holds one message's buffers, mapped copy-on-write (arrays unpickled over it
    are writable, and a write stays in this process), and the file range (start, end) it covers; None for a message
    without buffers. The mapping lives as long as an object made over it (another message's objects keep only
    their own)."""
    import mmap

    if not places:
        return None, 0, 0
    start = min(offset for offset, _ in places)
    end = max(offset + length for offset, length in places)
    if start % mmap.ALLOCATIONGRANULARITY or os.fstat(fd).st_size < end:
        raise ChildEnded("the shared file does not hold the message")
    if end == start:  # only empty buffers
        return None, start, end
    mapping = mmap.mmap(fd, end - start, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=start)
    return mapping, start, end


def _unused(views: List[memoryview], mapping: Optional[Any]) -> bool:
    """Release ``views`` and close ``mapping``; False when an object made from them still uses one (an array):
    the mapping then stays with it. The guard is ``close()``: it raises BufferError while any export of the mapping
    lives (an array keeps its own view of it even after ``views`` are released), so never skip it."""
    in_use = False
    for view in views:
        try:
            view.release()
        except BufferError:
            in_use = True
    if mapping is not None and not in_use:
        try:
            mapping.close()
        except BufferError:
            in_use = True
    return mapping is not None and not in_use


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the shared file's memory in [offset, offset + length) (Linux ``fallocate`` with
    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE); where that fails it is freed when the file is closed."""
    import ctypes

    fallocate = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)
    if fallocate is None or length <= 0:
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate(fd, 0x02 | 0x01, offset, length)
