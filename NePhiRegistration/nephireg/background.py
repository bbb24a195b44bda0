"""Work on a second thread while this one goes on: on a 2-core CPU the engine measures its result (SimpleITK
resampling and torch, which release the GIL) while it writes the files.

``with Background() as background: task = background.submit(fn, *args); ...; task.result()`` (the task's value,
or its exception re-raised). Leaving the block, for whatever reason, waits for the task running: no thread is left
working on what its caller is about to drop.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class Background:
    """One worker thread; tasks run in the order submitted."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nephireg-background")

    def __enter__(self) -> Background:
        return self

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def __exit__(self, exc_type, exc, tb) -> None:
        # After an error or a cancellation here, the tasks not yet started are dropped; the running one finishes.
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
