"""Engine exceptions; each maps to one :class:`nephireg.protocol.ExitCode`."""

from __future__ import annotations

import os
from typing import Optional, Union

from nephireg.protocol import ExitCode


class NephiregError(Exception):
    """Base of the engine's own errors."""

    exit_code = ExitCode.INTERNAL_ERROR
    kind = "internal"


class InputError(NephiregError):
    """Bad user input: the message names the file (when there is one) and the problem, on one line."""

    exit_code = ExitCode.BAD_INPUT
    kind = "bad-input"

    def __init__(self, problem: str, path: Optional[Union[str, os.PathLike]] = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{self.path}: {problem}")


class Cancelled(NephiregError):
    """The run was cancelled (SIGINT/SIGTERM or a caller's request)."""

    exit_code = ExitCode.CANCELLED
    kind = "cancelled"

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message)


class OutOfMemory(NephiregError):
    """The device ran out of memory."""

    exit_code = ExitCode.OUT_OF_MEMORY
    kind = "out-of-memory"
