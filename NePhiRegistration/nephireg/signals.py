"""SIGINT and SIGTERM on the command line: a cancellation, from the process's first line to its last.

:func:`install` runs first thing in ``python -m nephireg`` (before argparse or torch), so a signal at any time
is recorded instead of killing the interpreter (exit -15) or raising KeyboardInterrupt in an import. A command
then takes the recorded signals in one of two ways:

* :func:`cooperative` (register, demo): a signal requests a cancel of the run's reporter, whose loops poll it
  (:meth:`nephireg.progress.Reporter.check_cancel`); one recorded earlier cancels it at once.
* :func:`interrupting` (warp, jacobian, batch, train, models): a signal raises :class:`nephireg.errors.Cancelled`
  in the main thread (these commands have no loop that polls; batch forwards it to its child first).

Either way the error boundary turns the cancellation into exit 3 and one line. Signals that arrive while the
interpreter itself starts (before :func:`install`, a few tens of ms) still end the process with the default
action.
"""

from __future__ import annotations

import gc
import importlib
import signal
import sys
import threading
from contextlib import contextmanager
from types import ModuleType
from typing import Callable, Iterator, List

from nephireg.errors import Cancelled

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: List[int] = []  # signal numbers received in this process, in order
_listeners: List[Callable[[], None]] = []
_interrupting = [False]


def _on_signal(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    _received.append(signum)
    for listener in list(_listeners):
        listener()
    if _interrupting[0]:
        raise Cancelled(f"cancelled by {signal.Signals(signum).name}")


def install() -> bool:
    """Record SIGINT/SIGTERM from now on (main thread only; returns whether it could)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    return True


def received_count() -> int:
    """How many SIGINT/SIGTERM this process has recorded (for :func:`reset_after_fork`)."""
    return len(_received)


def recorded() -> List[int]:
    """The SIGINT/SIGTERM numbers this process has recorded, oldest first."""
    return list(_received)


def reset_after_fork(received_before_fork: int) -> None:
    """In a child forked from a command (``nephireg batch``'s engine children): the state of a fresh process after
    :func:`install` - nothing listening, signals recorded rather than raised, and of the signals recorded only those
    that came after the fork (``received_before_fork``: :func:`received_count` just before it), so that the run
    the child then starts cancels at once on them."""
    del _received[:received_before_fork]
    _listeners.clear()
    install()
    _interrupting[0] = False
    if hasattr(signal, "pthread_sigmask"):  # the fork was made in blocked(): what came since is delivered now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextmanager
def blocked() -> Iterator[None]:
    """SIGINT/SIGTERM held back by the kernel in this thread for the block, delivered at its end. Around a fork
    whose child runs a command: CPython's after-fork code in the child drops signals that arrive before its own
    handlers run, so one sent to the child at once would be lost; blocked, it waits for
    :func:`reset_after_fork`, which unblocks it in the child."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def _handlers() -> Iterator[None]:
    """Our handlers for the block, the previous ones restored after (a library call of ``cli.main``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    if any(handler is not _on_signal for handler in previous.values()):
        _received.clear()  # not installed by console_main: nothing of ours can have been recorded before
    install()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def cooperative(request_cancel: Callable[[], None]) -> Iterator[None]:
    """Signals call ``request_cancel`` (e.g. a reporter's); a signal received before the block calls it now."""
    with _handlers():
        _listeners.append(request_cancel)
        if _received:
            request_cancel()
        try:
            yield
        finally:
            _listeners.remove(request_cancel)


@contextmanager
def interrupting() -> Iterator[None]:
    """Signals raise :class:`Cancelled` in the block; one received before the block raises at its start."""
    with _handlers():
        _interrupting[0] = True
        try:
            if _received:
                raise Cancelled(f"cancelled by {signal.Signals(_received[-1]).name}")
            yield
        finally:
            _interrupting[0] = False



@contextmanager
def held() -> Iterator[None]:
    """In an :func:`interrupting` block: signals in this block are recorded, not raised. For the renames that
    publish a complete output (the commit point: after them the command has succeeded) and for clean-up."""
    was = _interrupting[0]
    _interrupting[0] = False
    try:
        yield
    finally:
        _interrupting[0] = was


@contextmanager
def deferred() -> Iterator[None]:
    """In an :func:`interrupting` block: a signal in this block raises :class:`Cancelled` at its end, not inside it
    - for a step that must not be cut in two, such as starting a child process and keeping its handle."""
    was = _interrupting[0]
    count = len(_received)
    _interrupting[0] = False
    try:
        yield
    finally:
        _interrupting[0] = was
    if was and len(_received) > count:
        raise Cancelled(f"cancelled by {signal.Signals(_received[-1]).name}")


def import_frozen(name: str) -> ModuleType:
    """Import module ``name``; a first import runs with the cyclic garbage collector paused, and what it made is
    frozen after it (``gc.freeze``: later collections skip those objects, and forked children do not touch their
    pages). See :func:`import_polling` for what that saves on torch's import."""
    if name in sys.modules:  # a library call of cli.main after the import: nothing to pause or freeze
        return sys.modules[name]
    collecting = gc.isenabled()
    gc.disable()
    try:
        module = importlib.import_module(name)
        gc.freeze()  # what the import made: never garbage (not after a failed import: that may be)
    finally:
        if collecting:
            gc.enable()
    return module


def import_polling(name: str, check_cancel: Callable[[], None], every_s: float = 0.1) -> ModuleType:
    """Import module ``name`` in a helper thread while this one calls ``check_cancel`` every ``every_s``: loading
    torch takes a second or more, and a cancel must not wait for it. A cancel leaves the import running in its
    (daemon) thread; the command line exits without waiting for it.

    The cyclic garbage collector (of the whole process) is paused during a first import and what it made is frozen
    after it (``gc.freeze``: later collections skip those objects): torch's import allocates a few hundred
    thousand objects, none of them garbage, and the collector's passes over them were 0.13-0.16 s of its 1.1-1.3 s
    (``python -c "import torch"``, medians of 5 interleaved runs each way)."""
    done = threading.Event()
    failure: List[BaseException] = []

    def load() -> None:
        try:
            import_frozen(name)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=load, name=f"import {name}", daemon=True).start()
    while not done.wait(every_s):
        check_cancel()
    check_cancel()
    if failure:
        raise failure[0]
    return sys.modules[name]
