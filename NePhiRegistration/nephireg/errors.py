"""Engine exceptions; each maps to one :class:`nephireg.protocol.ExitCode`."""

from __future__ import annotations

import errno
import os
from typing import Optional, Tuple, Union

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


# Messages of allocation failures that are not MemoryError (torch's CPU allocator, ITK, the C++ runtime).
_OUT_OF_MEMORY_MARKERS = ("DefaultCPUAllocator: can't allocate", "DefaultCPUAllocator: not enough memory",
                          "CUDA out of memory", "std::bad_alloc", "Failed to allocate memory", "out of memory")
# OSErrors of the user's environment (an output location, a disk, a name): bad input, exit 2, with the path.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
                       errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST, errno.EFBIG, errno.EXDEV,
                       getattr(errno, "EDQUOT", errno.ENOSPC)}
OUT_OF_MEMORY_HINT = "try a coarser --grid-spacing-mm, smaller images or another device"


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: MemoryError, ENOMEM, or a native library's (torch, ITK) RuntimeError saying so."""
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OUT_OF_MEMORY_MARKERS))


def is_environment_error(exc: BaseException) -> bool:
    """An OSError of the user's environment (a full disk, a permission, a name): bad input, not a bug."""
    return isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS


def describe_failure(exc: BaseException) -> Tuple[ExitCode, str, str]:
    """The error boundary's one mapping: (exit code, kind, one-line message) for any exception of a command.

    Kinds are those of the protocol's ``error`` event: bad-input, cancelled, out-of-memory, internal."""
    if isinstance(exc, NephiregError):
        return exc.exit_code, exc.kind, _one_line(str(exc))
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.CANCELLED, Cancelled.kind, "cancelled"
    if is_out_of_memory(exc):
        return ExitCode.OUT_OF_MEMORY, OutOfMemory.kind, f"out of memory; {OUT_OF_MEMORY_HINT}"
    if is_environment_error(exc):
        where = exc.filename if exc.filename is not None else "output"
        return ExitCode.BAD_INPUT, InputError.kind, _one_line(f"{where}: {exc.strerror or exc}")
    return ExitCode.INTERNAL_ERROR, NephiregError.kind, _one_line(f"internal error: {type(exc).__name__}: {exc}")


def _one_line(text: str, limit: int = 2000) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit] + " ..."
