"""The one writer of results: a private staging folder, swapped in only when complete; and its file-level sibling.

:class:`ResultFolder` (``register``, ``demo``): outputs are written into ``OUT/.partial-<host>-<pid>-<token>/``;
:meth:`ResultFolder.commit` checks that the staging folder holds exactly the files the manifest lists, writes the
manifest there, then - holding a lock on ``OUT`` and after a last cancellation check (the commit point) - moves
the previous result (its ``result.json`` first, then its files and any file named like an engine output) aside,
moves the new files in and the new ``result.json`` last. A folder therefore holds either no result or one
complete result: ``result.json`` names exactly the files of the run that wrote it. On any failure or cancellation
before the commit point the staging folder and the folders the run created are removed; a previous result is
untouched. A result that another run committed meanwhile is never replaced without ``overwrite``.

:func:`staged_file` (``warp``, ``jacobian``, ``train``): one output file written under a private name beside it
and renamed over the target when complete.

Stale staging paths of killed runs are removed by the next writer into the same folder (:mod:`nephireg.staging`).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence

from nephireg.errors import InputError, NephiregError
from nephireg.protocol import OUTPUT_FILES, RESULT_MANIFEST, write_manifest
from nephireg.staging import make_parents, remove_created, remove_path, remove_stale, staged_name
from nephireg.validate import check_output_file, check_output_folder

STAGING_PREFIX = ".partial-"
_REPLACED = ".replaced"  # inside the staging folder: the previous result during the swap
_LEGACY_PARTIAL_MANIFEST = RESULT_MANIFEST + ".partial"


class ResultFolder:
    """A result folder being written: ``with ResultFolder(out, overwrite) as result:`` write into
    ``result.staging``, then ``result.commit(manifest, check_cancel)``. Leaving the block without a commit (an
    error, a cancellation) removes everything the run made."""

    def __init__(self, out: os.PathLike, overwrite: bool) -> None:
        self.out = Path(os.fspath(out)).absolute()
        self.overwrite = overwrite
        self.staging: Optional[Path] = None
        self.committed = False
        self._created: List[Path] = []

    def __enter__(self) -> ResultFolder:
        check_output_folder(self.out, overwrite=True)  # the location; a result there is checked next
        self._refuse_a_concurrent_result()  # the run checked at its start: one now came from another run
        self._created = make_parents(self.out)
        remove_stale(self.out, STAGING_PREFIX)
        legacy = self.out / _LEGACY_PARTIAL_MANIFEST  # an interrupted manifest write of older versions
        if legacy.exists():
            remove_path(legacy)
        self.staging = self.out / staged_name(STAGING_PREFIX)
        self.staging.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging is not None:
            remove_path(self.staging)
        if not self.committed:
            remove_created(self._created)

    def commit(self, manifest: Mapping[str, Any], check_cancel: Callable[[], None] = lambda: None) -> str:
        """Swap the staged result in; returns the path of its ``result.json``. ``check_cancel`` raises to
        cancel: it is called once more right before the swap (after that the result is committed)."""
        assert self.staging is not None, "commit() outside the with block"
        names = [_safe_name(name) for name in manifest.get("files", {}).values()]
        _check_staged_exactly(self.staging, names)
        write_manifest(str(self.staging), manifest)
        check_cancel()
        with _folder_lock(self.out):
            check_cancel()  # the commit point: a cancellation up to here leaves the folder as it was
            self._refuse_a_concurrent_result()
            _swap(self.out, self.staging, names)
            self.committed = True
        return str(self.out / RESULT_MANIFEST)

    def _refuse_a_concurrent_result(self) -> None:
        if (self.out / RESULT_MANIFEST).exists() and not self.overwrite:
            raise InputError("another run wrote a result into this folder while this one ran; it was kept "
                             "(use --overwrite to replace it)", self.out)


def _safe_name(name: Any) -> str:
    """A manifest file name: relative, inside the folder (sub-folders allowed, no ``..``)."""
    path = PurePosixPath(str(name))
    if not str(name) or path.is_absolute() or ".." in path.parts or path.name == RESULT_MANIFEST:
        raise NephiregError(f"manifest file name {name!r} is not a plain relative name")
    return str(path)


def _check_staged_exactly(staging: Path, names: Sequence[str]) -> None:
    """The contract: a run's result is exactly the files its manifest lists (a bug otherwise, exit 1)."""
    present = {p.relative_to(staging).as_posix() for p in staging.rglob("*") if not p.is_dir()}
    missing = sorted(set(names) - present)
    extra = sorted(present - set(names))
    if missing or extra:
        raise NephiregError(f"result files do not match the manifest (missing {missing}, not listed {extra})")


def _previous_names(out: Path) -> List[str]:
    """Files of the result now in ``out``: its manifest's ``files``, plus any file named like an engine output."""
    names = set(OUTPUT_FILES.values())
    try:
        listed = json.loads((out / RESULT_MANIFEST).read_text(encoding="utf-8")).get("files", {})
        names.update(str(v) for v in listed.values())
    except (OSError, ValueError, AttributeError):
        pass
    safe = []
    for name in sorted(names):
        try:
            safe.append(_safe_name(name))
        except NephiregError:
            continue  # a hand-edited manifest: never follow a name out of the folder
    return safe


def _swap(out: Path, staging: Path, names: Sequence[str]) -> None:
    """Previous result aside (manifest first), new files in, new manifest last; undone if a rename fails."""
    replaced = staging / _REPLACED
    replaced.mkdir()
    moves: List[tuple] = []  # (source, destination) done so far, for the undo

    def move(source: Path, destination: Path) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
        moves.append((source, destination))

    try:
        if (out / RESULT_MANIFEST).exists():
            move(out / RESULT_MANIFEST, replaced / RESULT_MANIFEST)
        for name in _previous_names(out):
            if os.path.lexists(out / name) and not (out / name).is_dir():
                move(out / name, replaced / name)
        for name in names:
            move(staging / name, out / name)
        move(staging / RESULT_MANIFEST, out / RESULT_MANIFEST)
    except BaseException:
        for source, destination in reversed(moves):
            try:
                os.replace(destination, source)
            except OSError:
                pass
        raise


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (flock on its descriptor: no lock file is left) for the swap;
    where there is no flock (Windows) the swap runs unlocked and the re-check above still holds."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


@contextmanager
def staged_file(target: os.PathLike, overwrite: bool, inputs: Sequence[Any] = (),
                check_cancel: Callable[[], None] = lambda: None) -> Iterator[Path]:
    """Yield a private path beside ``target`` (same suffixes, so writers pick the same format); when the block
    ends normally it becomes ``target``. Refuses (InputError) to replace an existing file without ``overwrite``
    or to write over one of ``inputs``. Missing parent folders are created, and removed again on failure."""
    target = Path(os.fspath(target)).absolute()
    check_output_file(target, overwrite, inputs)
    created = make_parents(target.parent)
    prefix = f".{target.name}.partial-"
    remove_stale(target.parent, prefix)
    staged = target.parent / staged_name(prefix, "".join(target.suffixes[-2:]))
    try:
        yield staged
        check_cancel()
        if not staged.exists():
            raise NephiregError(f"nothing was written for {target}")
        _publish_file(staged, target, overwrite)
    except BaseException:
        remove_path(staged)
        remove_created(created)
        raise


def _publish_file(staged: Path, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(staged, target)
        return
    try:
        os.link(staged, target)  # atomic "create if absent": a file that appeared meanwhile is kept
    except FileExistsError:
        raise InputError("output file appeared while this command ran; it was kept (use --overwrite)",
                         target) from None
    except OSError:  # no hard links here (some network or Windows file systems): check, then rename
        if target.exists():
            raise InputError("output file appeared while this command ran; it was kept (use --overwrite)",
                             target) from None
        os.replace(staged, target)
        return
    staged.unlink()
