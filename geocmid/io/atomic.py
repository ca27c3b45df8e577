"""Atomic outputs: write beside the target under a hidden name, then rename into place."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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

    Args:
        path: the final output path.
        overwrite: whether an existing file may be replaced.

    Returns:
        ``path`` as an absolute :class:`~pathlib.Path`.

    Raises:
        InputError: if the target exists without ``overwrite``, is a directory, or its folder
            is missing or not writable.
    """
    target = Path(path).absolute()
    if target.is_dir():
        raise InputError(path, 'is a directory, expected a file path')
    if target.exists() and not overwrite:
        raise InputError(path, 'exists; use --overwrite')
    folder = target.parent
    if not folder.is_dir():
        raise InputError(path, f'output folder {folder} does not exist')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(path, f'output folder {folder} is not writable')
    return target


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
