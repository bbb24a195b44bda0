"""The one writer of results: a private staging folder, swapped in only when complete; and its file-level sibling.

:class:`ResultFolder` (``register``, ``demo``): outputs are written into ``OUT/.partial-<host>-<pid>-<token>/``;
:meth:`ResultFolder.commit` checks that the staging folder holds exactly the files the manifest lists, writes the
manifest there, then - holding a lock on ``OUT`` and after a last cancellation check (the commit point) - moves
the previous result (its ``result.json`` first, then its files and, with ``overwrite``, any file named like an
engine output; without it such files refuse the run, as they are someone's own) aside,
moves the new files in and the new ``result.json`` last. A folder therefore holds either no result or one
complete result: ``result.json`` names exactly the files of the run that wrote it. On any failure or cancellation
before the commit point the staging folder and the folders the run created are removed; a previous result is
untouched. A result that another run committed meanwhile is never replaced without ``overwrite``.

:func:`staged_file` (``warp``, ``jacobian``, ``train``): one output file written under a private name beside it
and renamed over the target when complete.

Stale staging paths of killed runs are removed by the next writer into the same folder (:mod:`nephireg.staging`);
a previous result that a run killed during the swap left in its staging folder is put back first
(:func:`restore_interrupted_swap`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence

from nephireg.errors import InputError, NephiregError, is_environment_error
from nephireg.protocol import OUTPUT_FILES, RESULT_MANIFEST, write_manifest
from nephireg.signals import held
from nephireg.staging import is_stale, make_parents, remove_created, remove_path, remove_stale, staged_name
from nephireg.validate import check_no_unlisted_outputs, check_output_file, check_output_folder, listed_files

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
        try:
            restore_interrupted_swap(self.out)  # before the stale staging folders (which may hold it) are removed
            remove_stale(self.out, STAGING_PREFIX)
            legacy = self.out / _LEGACY_PARTIAL_MANIFEST  # an interrupted manifest write of older versions
            if legacy.exists():
                remove_path(legacy)
            self._refuse_a_concurrent_result()  # a restored result counts
            self.staging = self.out / staged_name(STAGING_PREFIX)
            self.staging.mkdir()
        except BaseException:
            remove_created(self._created)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging is not None:
            remove_path(self.staging)
        if not self.committed:
            remove_created(self._created)
        renamed = _naming_the_target(exc, self.staging, self.out) if self.staging is not None else None
        if renamed is not None:
            raise renamed from None

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
            self._refuse_a_concurrent_result(names)
            _swap(self.out, self.staging, names)
            self.committed = True
        return str(self.out / RESULT_MANIFEST)

    def _refuse_a_concurrent_result(self, names: Sequence[str] = ()) -> None:
        if self.overwrite:
            return
        if (self.out / RESULT_MANIFEST).exists():
            raise InputError("another run wrote a result into this folder while this one ran; it was kept "
                             "(use --overwrite to replace it)", self.out)
        check_no_unlisted_outputs(self.out, sorted(set(OUTPUT_FILES.values()) | set(names)))


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
    """Files of the result now in ``out``: its manifest's ``files``, plus any file named like an engine output
    (the writer only gets here with ``overwrite`` or when no such file exists, see ``_refuse_a_concurrent_result``)."""
    safe = set(_listed_names(out / RESULT_MANIFEST))
    safe.update(_safe_name(name) for name in OUTPUT_FILES.values())
    return sorted(safe)


def _swap(out: Path, staging: Path, names: Sequence[str]) -> None:
    """Previous result aside (manifest first), new files in, new manifest last; undone if a rename fails."""
    replaced = staging / _REPLACED
    replaced.mkdir()
    moves: List[tuple] = []  # (source, destination) done so far, for the undo

    def move(source: Path, destination: Path) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
        moves.append((source, destination))

    previous = _previous_names(out)  # read before its manifest moves aside
    try:
        if (out / RESULT_MANIFEST).exists():
            move(out / RESULT_MANIFEST, replaced / RESULT_MANIFEST)
        for name in previous:
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
    _remove_emptied_folders(out, previous)


def _remove_emptied_folders(out: Path, names: Sequence[str]) -> None:
    """Sub-folders of ``out`` that held only the previous result's files (e.g. the demo's ``inputs/``)."""
    for name in names:
        folder = (out / name).parent
        while folder != out:
            try:
                folder.rmdir()  # only while empty
            except OSError:
                break
            folder = folder.parent


def restore_interrupted_swap(out: Path) -> List[str]:
    """Put back the previous result that a run killed during its swap (SIGKILL, power loss: milliseconds) left
    in its staging folder's ``.replaced``; returns the names restored.

    Only while ``out`` holds no ``result.json`` (the new manifest moves last, so with one in place the swap had
    finished and ``.replaced`` is the result the run was asked to replace) and only from the staging folders of
    dead runs (:func:`nephireg.staging.is_stale`). The files the killed run had already moved in - those its own
    manifest lists - are removed first, and the staging folder after: they are an incomplete result."""
    restored: List[str] = []
    with _folder_lock(out):
        for staging in _stale_stagings(out):
            replaced = staging / _REPLACED
            if (out / RESULT_MANIFEST).exists() or not replaced.is_dir():
                continue
            for name in _listed_names(staging / RESULT_MANIFEST):
                if not (staging / name).exists() and os.path.isfile(out / name):
                    remove_path(out / name)  # moved in by the killed run: part of its incomplete result
            kept = [p for p in sorted(replaced.rglob("*")) if not p.is_dir()]
            kept.sort(key=lambda p: p.name == RESULT_MANIFEST)  # the manifest last, as in the swap
            for path in kept:
                name = path.relative_to(replaced).as_posix()
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, out / name)
                restored.append(name)
            remove_path(staging)  # what is left is the killed run's incomplete result
    return restored


def _stale_stagings(out: Path) -> List[Path]:
    try:
        return sorted(p for p in out.iterdir() if p.is_dir() and is_stale(p, STAGING_PREFIX))
    except OSError:
        return []


def _listed_names(manifest: Path) -> List[str]:
    """The safe file names a manifest lists (a hand-edited one never leads out of the folder)."""
    names = []
    for value in listed_files(manifest):
        try:
            names.append(_safe_name(value))
        except NephiregError:
            continue
    return names


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (flock on its descriptor: no lock file is left) for the swap.
    Where there is none - Windows, or a file system that refuses to lock a folder (NFS emulates flock with
    byte-range locks, which need a descriptor open for writing) - the swap runs unlocked and the re-check
    before it still holds (a race of milliseconds remains, see docs/protocol.md)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            pass  # unlocked, as above
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
        with held():  # the commit point: a signal now no longer stops the command (see docs/protocol.md)
            _publish_file(staged, target, overwrite)
    except BaseException as exc:
        with held():  # a second signal must not interrupt the clean-up
            remove_path(staged)
            remove_created(created)
        renamed = _naming_the_target(exc, staged, target)
        if renamed is not None:
            raise renamed from None
        raise


def _naming_the_target(exc: Optional[BaseException], staged: Path, target: Path) -> Optional[InputError]:
    """The failure of writing under the private path ``staged`` as an InputError naming the user's ``target``
    (the private name is gone by the time the user reads the message); None to keep ``exc`` as it is."""
    if isinstance(exc, InputError) and exc.path is not None:
        where = _as_target(exc.path, staged, target)
        return None if where is None else InputError(exc.problem, where)
    if is_environment_error(exc):
        filename = getattr(exc, "filename", None)
        where = target if filename is None else _as_target(filename, staged, target)
        return None if where is None else InputError(exc.strerror or str(exc), where)
    return None


def _as_target(path: Any, staged: Path, target: Path) -> Optional[Path]:
    try:
        relative = Path(os.path.abspath(os.fspath(path))).relative_to(staged)
    except (TypeError, ValueError):
        return None
    return target if str(relative) == "." else target / relative


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
