"""Streamed per-band statistics, the windows they are sampled from, and their sidecar cache."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
from rasterio.windows import Window

#: Bumped whenever the meaning of a cached entry changes, so old sidecars are ignored.
CACHE_VERSION = 1

#: Name of the sidecar written beside the data (or in the user cache when that is read-only).
SIDECAR_NAME = 'geocmid.stats.json'

#: Entries kept per sidecar: one per band selection / nodata setting used on the same folder.
MAX_ENTRIES = 8


@dataclass(frozen=True, eq=False)  # numpy fields: no element-wise __eq__
class BandStats:
    """Per-band count, mean, spread and range of the valid pixels seen so far.

    Partial results merge exactly (Chan et al.'s parallel update of the sum of squared
    deviations), so windows can be streamed in any order without holding them in memory and
    without the cancellation that a running sum of squares suffers on large values.

    Attributes:
        count: valid pixels per band.
        mean: mean per band.
        m2: sum of squared deviations from the mean, per band.
        minimum: smallest valid value per band (``inf`` when nothing was seen).
        maximum: largest valid value per band (``-inf`` when nothing was seen).
        exact: True when every valid pixel was included (no sampling).
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray
    exact: bool = True

    @classmethod
    def empty(cls, bands: int) -> Self:
        """Statistics of nothing, for ``bands`` bands."""
        zeros = np.zeros(bands, dtype=np.float64)
        return cls(
            count=np.zeros(bands, dtype=np.int64),
            mean=zeros,
            m2=zeros.copy(),
            minimum=np.full(bands, np.inf),
            maximum=np.full(bands, -np.inf),
        )

    @classmethod
    def from_pixels(cls, data: np.ndarray, valid: np.ndarray) -> Self:
        """Statistics of one window.

        Args:
            data: (C, H, W) values.
            valid: (H, W) bool, True where every band holds data.

        Returns:
            The statistics of the valid pixels of ``data``.
        """
        values = data[:, valid].astype(np.float64)
        count = values.shape[1]
        if count == 0:
            return cls.empty(data.shape[0])
        mean = values.mean(axis=1)
        m2 = np.square(values - mean[:, None]).sum(axis=1)
        return cls(
            count=np.full(data.shape[0], count, dtype=np.int64),
            mean=mean,
            m2=m2,
            minimum=values.min(axis=1),
            maximum=values.max(axis=1),
        )

    def merge(self, other: BandStats) -> BandStats:
        """Statistics of the union of the pixels behind ``self`` and ``other``."""
        count = self.count + other.count
        # Where nothing was seen yet the weights would divide by zero; those bands stay empty.
        safe = np.maximum(count, 1)
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / safe
        m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / safe
        return BandStats(
            count=count,
            mean=mean,
            m2=m2,
            minimum=np.minimum(self.minimum, other.minimum),
            maximum=np.maximum(self.maximum, other.maximum),
            exact=self.exact and other.exact,
        )

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per band (0 where nothing was seen)."""
        return np.sqrt(self.m2 / np.maximum(self.count, 1))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form (see :meth:`from_json`)."""
        return {
            'count': self.count.tolist(),
            'mean': self.mean.tolist(),
            'std': self.std.tolist(),
            'm2': self.m2.tolist(),
            'min': self.minimum.tolist(),
            'max': self.maximum.tolist(),
            'exact': self.exact,
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Self:
        """Rebuild statistics written by :meth:`to_json`."""
        return cls(
            count=np.asarray(entry['count'], dtype=np.int64),
            mean=np.asarray(entry['mean'], dtype=np.float64),
            m2=np.asarray(entry['m2'], dtype=np.float64),
            minimum=np.asarray(entry['min'], dtype=np.float64),
            maximum=np.asarray(entry['max'], dtype=np.float64),
            exact=bool(entry['exact']),
        )


def sample_windows(
    height: int,
    width: int,
    block: tuple[int, int],
    max_pixels: int,
    rng: np.random.Generator,
) -> tuple[list[Window], bool]:
    """Windows to read for statistics: all of the raster, or a random subset of its blocks.

    Windows follow the raster's own blocks so every read decodes whole tiles once.

    Args:
        height: raster height in pixels.
        width: raster width in pixels.
        block: (rows, cols) of a window; the raster's block shape, or any size for
            untiled rasters.
        max_pixels: pixel budget; at least one window is always returned.
        rng: generator deciding which blocks are sampled.

    Returns:
        The windows, and whether they cover the whole raster.
    """
    rows, cols = block
    windows = [
        Window(col, row, min(cols, width - col), min(rows, height - row))
        for row in range(0, height, rows)
        for col in range(0, width, cols)
    ]
    if height * width <= max_pixels:
        return windows, True
    chosen: list[Window] = []
    budget = max_pixels
    for i in rng.permutation(len(windows)):
        if budget <= 0:
            break
        chosen.append(windows[i])
        budget -= windows[i].width * windows[i].height
    return chosen, False


def fingerprint(files: Sequence[Path], settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Key of a statistics entry.

    The files with their sizes and modification times, plus every setting the result depends
    on (bands, nodata, sampling budget, seed).

    Args:
        files: the rasters the statistics are computed over.
        settings: JSON-serialisable settings; NaN must already be spelled as a string.

    Returns:
        A short hex digest and the full key it was computed from.
    """
    listed = []
    for path in files:
        stat = os.stat(path)
        listed.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    key = {'version': CACHE_VERSION, 'files': listed, **settings}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return digest, key


def default_sidecar(files: Sequence[Path], roots: Iterable[Path]) -> Path:
    """Where statistics of ``files`` are cached when no path is given.

    The sidecar goes in the folder the user named (a single folder), else in the deepest
    folder holding every file. When that folder is not writable (shared, read-only data), or
    when ``$GEOCMID_STATS_DIR`` is set (keep data folders untouched), it goes in that folder or
    else in ``$XDG_CACHE_HOME/geocmid/stats`` (default ``~/.cache``), named after the folder.

    Args:
        files: the rasters.
        roots: the paths the user gave (folders or files).

    Returns:
        The sidecar path.
    """
    folders = [root for root in roots if root.is_dir()]
    if len(folders) == 1:
        anchor = folders[0].absolute()
    else:
        anchor = Path(os.path.commonpath([os.path.abspath(p.parent) for p in files]))
    stats_dir = os.environ.get('GEOCMID_STATS_DIR')
    if not stats_dir and os.access(anchor, os.W_OK | os.X_OK):
        return anchor / SIDECAR_NAME
    cache_home = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache')
    folder = Path(stats_dir) if stats_dir else cache_home / 'geocmid' / 'stats'
    name = hashlib.sha256(str(anchor).encode()).hexdigest()[:16]
    return folder / f'{name}.stats.json'


def load_cached(path: Path, digest: str) -> BandStats | None:
    """Statistics stored under ``digest`` in the sidecar ``path``, if present and readable.

    A missing, unreadable or foreign sidecar is a cache miss, never an error: it is only an
    optimisation and will be rewritten.
    """
    try:
        entries = json.loads(path.read_text())['entries']
        return BandStats.from_json(entries[digest]['stats'])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_cached(path: Path, digest: str, key: dict[str, Any], stats: BandStats) -> None:
    """Add (or refresh) the entry ``digest`` in the sidecar ``path``, written atomically.

    Several processes (DDP ranks, data-loader workers) may compute the same statistics at the
    same time, so the temporary file gets a unique name (not io.atomic's fixed one) and the
    last complete write wins. A failure to write only warns: the statistics are still used.
    """
    try:
        document = json.loads(path.read_text())
        entries = dict(document['entries'])
    except (OSError, ValueError, KeyError, TypeError):
        entries = {}
    entries.pop(digest, None)
    entries[digest] = {'key': key, 'stats': stats.to_json()}
    kept = dict(list(entries.items())[-MAX_ENTRIES:])
    text = json.dumps({'geocmid_stats': CACHE_VERSION, 'entries': kept}, indent=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp'
        )
        try:
            with os.fdopen(handle, 'w') as out:
                out.write(text)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        warnings.warn(f'{path}: could not cache band statistics ({exc})', stacklevel=2)


def json_number(value: float | None) -> float | str | None:
    """``value`` as JSON accepts it (NaN becomes the string 'nan')."""
    if value is not None and math.isnan(value):
        return 'nan'
    return value
