"""Manifests and shards: runs too long for a command line, split over array jobs.

A manifest (``--inputs``) lists one input file per line (``.txt``; blank lines and ``#``
comments are ignored) or per row of a ``.csv`` (its ``path`` or ``scene`` column, else its
first). Relative paths are taken from the manifest's folder, so a manifest and its scenes move
together. Files are not looked for here: a missing one fails as its own input, in the run table,
while the others run.

A shard (``--shard I/N``) is every N-th input starting at the I-th (0-based), so N array jobs
(SLURM ``--array=0-<N-1>``, AWS Batch) split one manifest without a scheduler.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from geocmid.errors import InputError
from geocmid.types import PathLike

#: Columns of a CSV manifest that name the input file, in order of preference.
PATH_COLUMNS = ('path', 'scene', 'raster', 'file')


def read_manifest(path: PathLike) -> list[Path]:
    """The input files a manifest lists, in its order, absolute.

    Raises:
        InputError: the manifest cannot be read, or lists nothing.
    """
    manifest = Path(path)
    try:
        text = manifest.read_text(encoding='utf-8-sig')
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, 'strerror', None) or str(exc)
        raise InputError(path, f'cannot read the manifest ({reason})') from None
    if manifest.suffix.lower() == '.csv':
        rows = list(csv.DictReader(text.splitlines()))
        fields = list(rows[0]) if rows else []
        column = next((c for c in PATH_COLUMNS if c in fields), fields[0] if fields else None)
        entries = [(row.get(column) or '').strip() for row in rows] if column else []
    else:
        entries = [line.strip() for line in text.splitlines()]
        entries = [line for line in entries if not line.startswith('#')]
    entries = [entry for entry in entries if entry]
    if not entries:
        raise InputError(path, 'the manifest lists no input')
    folder = manifest.absolute().parent
    return [folder / entry if not Path(entry).is_absolute() else Path(entry) for entry in entries]


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``--shard I/N`` -> ``(I, N)`` with ``0 <= I < N``; None stays None.

    Raises:
        InputError: not of the form I/N, N below 1, or I outside 0..N-1.
    """
    if value is None:
        return None
    index, _, count = value.partition('/')
    if not (index.strip().isdigit() and count.strip().isdigit()):
        raise InputError('--shard', f'expected I/N such as 0/4 (I from 0 to N-1), got {value!r}')
    shard = int(index), int(count)
    check_shard(shard)
    return shard


def check_shard(shard: tuple[int, int]) -> None:
    """Refuse a shard that is not one of N.

    Raises:
        InputError: N below 1, or I outside 0..N-1.
    """
    index, count = shard
    if count < 1:
        raise InputError('--shard', f'{index}/{count}: the number of shards must be at least 1')
    if not 0 <= index < count:
        raise InputError('--shard', f'{index}/{count}: the shard must be 0 to {count - 1}')


def take_shard[T](items: Mapping[str, T], shard: tuple[int, int]) -> dict[str, T]:
    """Every N-th item starting at the I-th, in order: shard ``(I, N)`` of ``items``."""
    check_shard(shard)
    index, count = shard
    return {name: item for n, (name, item) in enumerate(items.items()) if n % count == index}
