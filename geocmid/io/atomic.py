"""Atomic outputs: write beside the target under a hidden name, then rename into place.

Also: checking that an output can be written (by trying, before any work starts) and hidden
scratch folders that the next run removes when the run that made them was killed.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from geocmid.errors import InputError

#: Sidecars that GDAL keeps next to a raster; they travel with it when it is renamed.
SIDECAR_SUFFIXES = ('.aux.xml', '.msk', '.ovr')


def partial_path(path: str | os.PathLike[str]) -> Path:
    """The hidden temporary path used while ``path`` is being written.

    The name is fixed (not random) so that the leftover of a killed run is found and replaced
    by the next run instead of piling up. It keeps the target's suffix because GDAL and pyogrio
    pick drivers from it.

    Args:
        path: the final output path.

    Returns:
        ``<dir>/.<stem>.partial<suffix>``.
    """
    target = Path(path)
    return target.with_name(f'.{target.stem}.partial{target.suffix}')


def check_writable(path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Fail early, before any computation, if ``path`` cannot be written.

    Writability is checked by creating (and removing) a hidden file in the output folder:
    ``os.access`` says yes to root on read-only mounts and in ``/proc``.

    Args:
        path: the final output path.
        overwrite: whether an existing file may be replaced.

    Returns:
        ``path`` as an absolute :class:`~pathlib.Path`.

    Raises:
        InputError: if the target exists without ``overwrite``, is a directory, or its folder
            is missing, lies under a regular file, or cannot be written.
    """
    target = Path(path).absolute()
    if target.is_dir():
        raise InputError(path, 'is a directory, expected a file path')
    if target.exists() and not overwrite:
        raise InputError(path, 'exists; use --overwrite')
    folder = target.parent
    if not folder.is_dir():
        blocker = _file_above(folder)
        if blocker is not None:
            raise InputError(path, f'cannot be written: {blocker} is a file, not a folder')
        raise InputError(path, f'output folder {folder} does not exist')
    _try_writing(path, folder)
    return target


def check_folder_writable(
    folder: str | os.PathLike[str], source: str | os.PathLike[str] | None = None
) -> Path:
    """Fail early if ``folder`` (an output folder, created later if missing) cannot be written.

    The folder itself is not created: the check leaves nothing behind. It tries writing in
    ``folder`` or, when that does not exist yet, in its nearest existing parent.

    Args:
        folder: the output folder.
        source: what errors name (default ``folder``), e.g. the file to be written in it.

    Returns:
        ``folder`` as an absolute :class:`~pathlib.Path`.

    Raises:
        InputError: if ``folder`` or one of its parents is a regular file, or it cannot be
            written.
    """
    source = folder if source is None else source
    target = Path(folder).absolute()
    blocker = _file_above(target)
    if blocker is not None:
        where = 'is a file' if blocker == Path(source).absolute() else f'{blocker} is a file'
        raise InputError(source, f'cannot be written: {where}, not a folder')
    existing = next(p for p in (target, *target.parents) if p.is_dir())
    _try_writing(source, existing)
    return target


def _file_above(path: Path) -> Path | None:
    """The first of ``path`` and its parents that exists and is not a folder, if any."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _try_writing(source: str | os.PathLike[str], folder: Path) -> None:
    """Create and remove a hidden file in ``folder``; an :class:`InputError` if that fails."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.geocmid-probe-'):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(source, f'cannot write in {folder} ({reason.lower()})') from None


def _remove(path: Path) -> None:
    """Delete ``path`` and its GDAL sidecars, ignoring the ones that do not exist."""
    for candidate in (path, *(Path(f'{path}{suffix}') for suffix in SIDECAR_SUFFIXES)):
        candidate.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place when the block succeeds.

    The temporary file lives in the destination folder, so the final :func:`os.replace` is a
    rename on one filesystem: readers see either the old file or the complete new one, never a
    partial one. Sidecars written next to the temporary file (``.aux.xml`` and friends) are
    renamed with it. On any error the temporary file and its sidecars are removed.

    Args:
        path: the final output path.
        overwrite: whether an existing file may be replaced.

    Yields:
        The temporary path to write to (it does not exist yet).

    Raises:
        InputError: see :func:`check_writable`.
    """
    target = check_writable(path, overwrite)
    temporary = partial_path(target)
    _remove(temporary)  # the leftover of an interrupted run
    try:
        yield temporary
        if not temporary.exists():
            raise RuntimeError(f'{temporary}: nothing was written')
        with open(temporary, 'rb+') as written:
            os.fsync(written.fileno())
        # Sidecars first: a crash between the renames then leaves the old raster untouched
        # at worst with new metadata, never a new raster without its metadata.
        for suffix in SIDECAR_SUFFIXES:
            sidecar = Path(f'{temporary}{suffix}')
            if sidecar.exists():
                os.replace(sidecar, f'{target}{suffix}')
            elif overwrite:
                Path(f'{target}{suffix}').unlink(missing_ok=True)
        os.replace(temporary, target)
    except BaseException:
        _remove(temporary)
        raise


#: Name of the file that records which process owns a scratch folder.
OWNER_NAME = '.owner'


@contextmanager
def scratch_folder(folder: str | os.PathLike[str] | None, prefix: str) -> Iterator[Path]:
    """A hidden temporary folder in ``folder``, removed on exit, even after an error.

    A run that is killed (``kill -9``, power loss) cannot remove its scratch folder, so each
    one records its owner (host name and process id) in a marker file; on entry, folders with
    the same ``prefix`` whose owner is a process of this host that no longer runs are removed.

    Args:
        folder: where to create it (beside the outputs, so renames stay on one filesystem);
            None for the system's temporary folder.
        prefix: the folder name's start, e.g. ``'.geocmid-segment-'``.

    Yields:
        The new, empty folder (apart from the marker).
    """
    parent = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    remove_stale_scratch(parent, prefix)
    scratch = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        (scratch / OWNER_NAME).write_text(f'{socket.gethostname()} {os.getpid()}\n')
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_stale_scratch(folder: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Remove the scratch folders under ``folder`` left by dead processes of this host.

    Args:
        folder: the folder to look in.
        prefix: the scratch folders' name start.

    Returns:
        The folders removed.
    """
    removed = []
    for candidate in Path(folder).glob(f'{prefix}*'):
        if candidate.is_dir() and _owner_is_dead(candidate / OWNER_NAME):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _owner_is_dead(marker: Path) -> bool:
    """Whether ``marker`` names a process of this host that no longer runs."""
    try:
        host, pid = marker.read_text().split()
        pid_number = int(pid)
    except (OSError, ValueError):
        return False  # no marker (yet): the folder may be being created right now
    if host != socket.gethostname():
        return False  # another machine sharing this folder: its processes are not visible
    if pid_number == os.getpid():
        return False
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it runs, as another user
        return False
    return _is_zombie(pid_number)


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited but was not reaped yet (Linux only; False elsewhere)."""
    with suppress(OSError):
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] == 'Z'
    return False
