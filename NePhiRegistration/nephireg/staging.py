"""Private staging names and their clean-up, for every writer of the engine (result folders, single files, downloads).

STANDARD LIBRARY ONLY (the model store uses it inside Slicer's process).

A staged path's name carries its owner: ``<prefix><host>-<pid>-<token><suffix>``. A run that is killed outright
(SIGKILL, power loss) cannot remove its staged files; the next writer into the same folder removes those whose
owner process is gone (same host and pid namespace, the pid no longer runs) or, for another host's, those untouched for
:data:`FOREIGN_STALE_S`. Live writers' staged paths are never touched.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import List, Optional, Union

PathLike = Union[str, os.PathLike]
FOREIGN_STALE_S = 24 * 3600.0  # staged paths of another host's run are stale after a day untouched


def _host() -> str:
    """This machine's name, and on Linux its process-id namespace: a container sharing the host's name (host
    networking) numbers its processes apart, so its pids must not be judged by this process's view."""
    name = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
    try:
        return f"{name}_{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux, or no /proc
        return name


def staged_name(prefix: str, suffix: str = "") -> str:
    """A fresh private name ``<prefix><host>-<pid>-<token><suffix>``."""
    return f"{prefix}{_host()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _owner(name: str, prefix: str):
    """(host, pid) of a staged name, or None when ``name`` is not one."""
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix):].split("-")
    if len(parts) < 3 or not parts[-2].isdigit():
        return None
    return "-".join(parts[:-2]), int(parts[-2])


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _windows_process_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def is_stale(path: Path, prefix: str) -> bool:
    """Whether ``path`` is a staged path of a writer that can no longer finish it."""
    owner = _owner(path.name, prefix)
    if owner is None:
        return False
    host, pid = owner
    if host == _host():
        return pid != os.getpid() and not _process_alive(pid)
    try:
        return time.time() - path.lstat().st_mtime > FOREIGN_STALE_S
    except OSError:
        return False


def remove_stale(folder: PathLike, prefix: str) -> List[str]:
    """Remove the stale staged paths named ``prefix*`` in ``folder``; returns their names."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if is_stale(entry, prefix):
            remove_path(entry)
            removed.append(entry.name)
    return removed


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree, quietly (clean-up must not hide the error being handled)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


def make_parents(folder: Path) -> List[Path]:
    """Create ``folder`` and its missing parents; returns the ones created, outermost first (for
    :func:`remove_created`)."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    missing.reverse()
    created: List[Path] = []
    try:
        for path in missing:
            try:
                path.mkdir()
                created.append(path)
            except FileExistsError:  # a concurrent writer made it: not ours to remove
                pass
    except BaseException:
        remove_created(created)
        raise
    return created


def remove_created(created: List[Path]) -> None:
    """Remove folders :func:`make_parents` created, innermost first, each only while it is empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:  # not empty (someone else's files arrived), or already gone
            pass


def nearest_existing(path: Path) -> Optional[Path]:
    """``path`` or its closest ancestor that exists (None if none does, which cannot happen for an absolute path)."""
    current = path
    while True:
        try:
            if os.path.lexists(current):
                return current
        except OSError as exc:  # ENAMETOOLONG and friends: the caller reports ``path``
            if exc.errno != errno.ENAMETOOLONG:
                raise
        if current.parent == current:
            return None
        current = current.parent
