"""Finding the files that a query box overlaps, in plain Python, through a grid of bins."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

#: (left, bottom, right, top) in CRS units.
type Extent = tuple[float, float, float, float]


class ExtentIndex:
    """The files overlapping a box, found through a coarse grid of bins over their extents.

    A dataset looks up the files of every patch it reads. Plain float comparisons on the one
    to four candidate files of a patch cost a fraction of what a vectorised test over all
    files costs: on the per-sample path each numpy call takes several microseconds, more than
    the whole lookup (see BENCHMARKS.md). Bins are as large as the median file, so a patch
    touches one to four bins, whatever the number of files; each file is listed in every bin
    it touches.
    """

    def __init__(self, extents: Sequence[Extent]) -> None:
        """Index the files' extents.

        Args:
            extents: (left, bottom, right, top) of each file, in file order.
        """
        self.extents = [(float(a), float(b), float(c), float(d)) for a, b, c, d in extents]
        boxes = np.array(self.extents, dtype=np.float64).reshape(-1, 4)
        self.x0, self.y0 = float(boxes[:, 0].min()), float(boxes[:, 3].max())
        self.bin_width = float(np.median(boxes[:, 2] - boxes[:, 0]))
        self.bin_height = float(np.median(boxes[:, 3] - boxes[:, 1]))
        self.bins: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (left, bottom, right, top) in enumerate(self.extents):
            rows, cols = self._span(left, bottom, right, top)
            for row in rows:
                for col in cols:
                    self.bins[row, col].append(i)
        self.bins = dict(self.bins)  # lookups of empty bins must not add them

    def _span(self, xmin: float, ymin: float, xmax: float, ymax: float) -> tuple[range, range]:
        """Rows and columns of the bins that a box touches (edges included)."""
        rows = range(
            math.floor((self.y0 - ymax) / self.bin_height),
            math.floor((self.y0 - ymin) / self.bin_height) + 1,
        )
        cols = range(
            math.floor((xmin - self.x0) / self.bin_width),
            math.floor((xmax - self.x0) / self.bin_width) + 1,
        )
        return rows, cols

    def overlapping(self, xmin: float, ymin: float, xmax: float, ymax: float) -> list[int]:
        """Files whose extent overlaps the box by a positive area, in file order."""
        rows, cols = self._span(xmin, ymin, xmax, ymax)
        candidates: Sequence[int]
        if len(rows) == 1 and len(cols) == 1:
            candidates = self.bins.get((rows[0], cols[0]), ())
        elif len(rows) * len(cols) <= len(self.bins):
            candidates = sorted(
                {i for row in rows for col in cols for i in self.bins.get((row, col), ())}
            )
        else:  # a box larger than the data: walking its bins would cost more than all files
            candidates = range(len(self.extents))
        extents = self.extents
        return [
            i
            for i in candidates
            if extents[i][0] < xmax
            and extents[i][1] < ymax
            and extents[i][2] > xmin
            and extents[i][3] > ymin
        ]
