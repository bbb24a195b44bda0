"""Work on a second thread while this one goes on: on a 2-core CPU the engine measures its result (SimpleITK
resampling and torch, which release the GIL) while it writes the files.

``with Background() as background: task = background.submit(fn, *args); ...; task.result()`` (the task's value,
or its exception re-raised). Leaving the block, for whatever reason, waits for the task running: no thread is left
working on what its caller is about to drop. A task that polls :meth:`Background.check` stops early when the block
is left with an error (a failed write need not wait for a long computation nobody will use).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from nephireg.errors import Cancelled


class Background:
    """One worker thread; tasks run in the order submitted."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nephireg-background")
        self._abandoned = threading.Event()

    def __enter__(self) -> Background:
        return self

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def check(self) -> None:
        """Raises :class:`nephireg.errors.Cancelled` once the block was left with an error (for tasks to poll)."""
        if self._abandoned.is_set():
            raise Cancelled()

    def __exit__(self, exc_type, exc, tb) -> None:
        # After an error or a cancellation here, the tasks not yet started are dropped; the running one finishes
        # (at its next check() if it polls).
        if exc_type is not None:
            self._abandoned.set()
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
