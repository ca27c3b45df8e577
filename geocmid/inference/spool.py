"""Thresholds of a binary score: checked when given, found from the scores when asked for.

A rule (:mod:`geocmid.inference.thresholds`) needs the whole score distribution, which a
streamed scene never holds at once: :class:`ScoreSpool` spools the blended scores to a temporary
raster while counting their histogram, and replays them into the writer once the threshold is
known.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import numpy as np
import rasterio
from rasterio.windows import Window

from geocmid.errors import InputError
from geocmid.inference.thresholds import (
    THRESHOLD_RULES,
    StreamedHistogram,
    ThresholdRule,
    pick_threshold,
)
from geocmid.io.cog import GridLike

#: A score threshold, or the rule that finds it from the scores.
type Threshold = float | ThresholdRule

#: Range of the fine histogram of spooled scores (probabilities lie in [0, 1]; label-free
#: scores are standardised or chi statistics, rarely beyond a few hundred).
_HISTOGRAM_RANGE = (-50.0, 500.0)

#: Rows and columns of the spooled score raster replayed into the writer at once.
_REPLAY_ROWS = 256
_REPLAY_COLUMNS = 8192


def check_threshold(threshold: Threshold | str, *, bounded: bool = True) -> Threshold:
    """``threshold`` when it is a rule (``ki``, ``otsu``, ``fraction``) or a number.

    Args:
        threshold: the value given.
        bounded: numbers must lie in [0, 1] (a probability); False for label-free scores.

    Raises:
        InputError: any other value.
    """
    if isinstance(threshold, str) and threshold in THRESHOLD_RULES:
        return threshold
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = float('nan')
    if not np.isfinite(value) or (bounded and not 0.0 <= value <= 1.0):
        rules = ', '.join(THRESHOLD_RULES)
        expected = 'a number between 0 and 1' if bounded else 'a number'
        raise InputError('--threshold', f'must be {expected} or one of {rules}, got {threshold}')
    return value


class ScoreSpool:
    """A block sink that spools a blended binary score and counts its histogram.

    The scores go to a temporary raster, so that they can be thresholded once their whole
    distribution is known and then replayed into the writer.

    Args:
        path: the temporary GeoTIFF (float32, NaN where invalid).
        grid: the grid blocks come on.
        to_score: turns the engine's blended values into the score that is stored, counted and
            thresholded (label-free change undoes the engine's sigmoid); identity when None.
    """

    def __init__(
        self,
        path: Path,
        grid: GridLike,
        to_score: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.path = path
        self.to_score = to_score
        self.histogram = StreamedHistogram(*_HISTOGRAM_RANGE)
        self.dataset = rasterio.open(
            path, 'w', driver='GTiff', width=grid.width, height=grid.height, count=1,
            dtype='float32', crs=grid.crs, transform=grid.transform, nodata=float('nan'),
            tiled=True, blockxsize=256, blockysize=256,
        )  # fmt: skip

    def write_block(
        self, row_off: int, col_off: int, probabilities: np.ndarray, valid: np.ndarray
    ) -> None:
        """Take a finished block: (1, rows, cols) scores and their validity."""
        score = probabilities[0].astype(np.float32, copy=True)
        if self.to_score is not None:
            score = self.to_score(score).astype(np.float32)
        self.histogram.add(score[valid])
        score[~valid] = np.nan
        window = Window(col_off, row_off, score.shape[1], score.shape[0])
        self.dataset.write(score, 1, window=window)

    def threshold(self, rule: ThresholdRule, change_fraction: float | None = None) -> float:
        """The threshold ``rule`` finds in the scores written so far.

        Raises:
            InputError: no valid score was written, or a bad rule or change fraction.
        """
        if self.histogram.total == 0:
            raise InputError(None, 'no valid pixel to threshold')
        return pick_threshold(self.histogram, rule, change_fraction)

    def replay(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Yield the spooled scores the way the engine delivers blocks.

        Strips of at most ``_REPLAY_COLUMNS`` columns go from left to right, rows from top to
        bottom within a strip.

        Yields:
            ``(row_off, col_off, scores (1, rows, cols), valid (rows, cols))``.
        """
        self.close()
        with rasterio.open(self.path) as src:
            for col in range(0, src.width, _REPLAY_COLUMNS):
                width = min(_REPLAY_COLUMNS, src.width - col)
                for row in range(0, src.height, _REPLAY_ROWS):
                    window = Window(col, row, width, min(_REPLAY_ROWS, src.height - row))
                    score = src.read(1, window=window)
                    valid = ~np.isnan(score)
                    yield row, col, np.nan_to_num(score)[None], valid

    def close(self) -> None:
        """Finish writing the spool."""
        self.dataset.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
