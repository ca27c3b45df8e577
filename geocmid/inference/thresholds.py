"""Thresholds for a change score seen only as a streamed histogram.

The score of a whole scene never exists as one array: windows add their valid scores to a
:class:`StreamedHistogram`, and a rule turns the histogram into one cut. Rules:

- ``ki``: Kittler and Illingworth's minimum-error threshold (1986): the cut whose two-Gaussian
  fit of the histogram misclassifies least. It holds when the changed class is small, where
  Otsu's between-class variance drifts into the large unchanged class.
- ``otsu``: Otsu's threshold (1979), the cut that maximises the between-class variance.
- ``fraction``: the cut above which a stated share of the valid pixels lies.

Measured on the labelled Landsat pairs in ``bench/change.py``; see docs/change.md.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from geocmid.errors import InputError

__all__ = (
    'THRESHOLD_RULES',
    'StreamedHistogram',
    'ThresholdRule',
    'fraction_threshold',
    'kittler_illingworth',
    'otsu_threshold',
    'pick_threshold',
)

ThresholdRule = Literal['ki', 'otsu', 'fraction']
THRESHOLD_RULES: tuple[ThresholdRule, ...] = ('ki', 'otsu', 'fraction')

#: Bins of the histogram a rule sees (re-binned between the smallest and largest score).
RULE_BINS = 256


def otsu_threshold(counts: np.ndarray, edges: np.ndarray) -> float:
    """Otsu's threshold of a histogram: the cut that maximises the between-class variance.

    Hand-written because the scores exist only as a streamed histogram (scikit-image's
    ``threshold_otsu`` would add a dependency for ten lines).

    Args:
        counts: pixels per bin.
        edges: bin edges, one more than ``counts``.

    Returns:
        The lower edge of the first bin of the upper class: values ``>=`` it are class 1.

    Raises:
        ValueError: The histogram is empty.
    """
    total = counts.sum()
    if total == 0:
        raise ValueError('empty histogram')
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts) / total  # share of the lower class, cutting after each bin
    mean = np.cumsum(counts * centres) / total
    with np.errstate(divide='ignore', invalid='ignore'):
        between = (mean[-1] * weight - mean) ** 2 / (weight * (1 - weight))
    between[~np.isfinite(between)] = -1.0  # cuts with an empty class
    if between.max() < 0:  # a single populated bin: nothing to separate
        return float(edges[np.flatnonzero(counts)[0] + 1])
    return float(edges[int(np.argmax(between)) + 1])


def kittler_illingworth(counts: np.ndarray, edges: np.ndarray) -> float:
    """Kittler and Illingworth's minimum-error threshold of a histogram.

    Each cut splits the histogram into two classes fitted by Gaussians; the criterion
    ``J = 1 + 2 (P1 ln s1 + P2 ln s2) - 2 (P1 ln P1 + P2 ln P2)`` is the fit's classification
    error, and the cut with the least ``J`` wins. Hand-written: no maintained Python library
    offers it (scikit-image has Otsu, Li, Yen, triangle, minimum, but not minimum error).

    Args:
        counts: pixels per bin.
        edges: bin edges, one more than ``counts``.

    Returns:
        The cut: values ``>=`` it are class 1. Falls back to Otsu's threshold when no cut leaves
        both classes with a spread (e.g. two populated bins).

    Raises:
        ValueError: The histogram is empty.
    """
    total = counts.sum()
    if total == 0:
        raise ValueError('empty histogram')
    p = counts / total
    centres = (edges[:-1] + edges[1:]) / 2
    p1 = np.cumsum(p)[:-1]  # lower class share, cutting after bin i
    p2 = 1 - p1
    m1_sum = np.cumsum(p * centres)[:-1]
    s1_sum = np.cumsum(p * centres**2)[:-1]
    with np.errstate(divide='ignore', invalid='ignore'):
        m1 = m1_sum / p1
        m2 = (np.sum(p * centres) - m1_sum) / p2
        v1 = s1_sum / p1 - m1**2
        v2 = (np.sum(p * centres**2) - s1_sum) / p2 - m2**2
        criterion = 1 + p1 * np.log(v1) + p2 * np.log(v2) - 2 * (p1 * np.log(p1) + p2 * np.log(p2))
    usable = np.isfinite(criterion) & (v1 > 0) & (v2 > 0) & (p1 > 0) & (p2 > 0)
    if not usable.any():
        return otsu_threshold(counts, edges)
    criterion[~usable] = np.inf
    return float(edges[int(np.argmin(criterion)) + 1])


def fraction_threshold(counts: np.ndarray, edges: np.ndarray, fraction: float) -> float:
    """The cut above which ``fraction`` of the histogram's pixels lie (linear within a bin).

    Raises:
        ValueError: The histogram is empty.
    """
    total = counts.sum()
    if total == 0:
        raise ValueError('empty histogram')
    below = np.concatenate([[0.0], np.cumsum(counts)]) / total  # share below each edge
    return float(np.interp(1.0 - fraction, below, edges))


class StreamedHistogram:
    """A fine histogram of scores added window by window, with the exact smallest and largest.

    Scores outside ``[low, high]`` are counted in the end bins; the rules see the histogram
    re-binned to :data:`RULE_BINS` bins between the smallest and largest score seen, so that
    their resolution follows the data rather than the fixed range.

    Args:
        low: lower edge of the fine histogram.
        high: upper edge of the fine histogram.
        bins: fine bins.
    """

    def __init__(self, low: float, high: float, bins: int = 1 << 16) -> None:
        self.edges = np.linspace(low, high, bins + 1)
        self.counts = np.zeros(bins, dtype=np.int64)
        self.minimum = np.inf
        self.maximum = -np.inf

    @property
    def total(self) -> int:
        """Scores added so far."""
        return int(self.counts.sum())

    def add(self, scores: np.ndarray) -> None:
        """Count finite scores (any shape)."""
        values = scores[np.isfinite(scores)].astype(np.float64, copy=False)
        if values.size == 0:
            return
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))
        clipped = np.clip(values, self.edges[0], self.edges[-1])
        self.counts += np.histogram(clipped, bins=self.edges)[0]

    def rebinned(self, bins: int = RULE_BINS) -> tuple[np.ndarray, np.ndarray]:
        """The histogram on ``bins`` equal bins between the smallest and largest score."""
        if self.total == 0:
            raise ValueError('empty histogram')
        low = max(self.minimum, self.edges[0])
        high = min(self.maximum, self.edges[-1])
        if high <= low:
            high = low + 1e-6
        edges = np.linspace(low, high, bins + 1)
        centres = (self.edges[:-1] + self.edges[1:]) / 2
        counts = np.histogram(np.clip(centres, low, high), bins=edges, weights=self.counts)[0]
        return counts.astype(np.int64), edges


def pick_threshold(
    histogram: StreamedHistogram, rule: ThresholdRule, change_fraction: float | None = None
) -> float:
    """Apply ``rule`` to ``histogram``.

    Args:
        histogram: the valid scores of the scene.
        rule: ``ki``, ``otsu`` or ``fraction``.
        change_fraction: the expected share of changed pixels, required by ``fraction``.

    Raises:
        InputError: An unknown rule, or ``fraction`` without a share in (0, 1).
        ValueError: No valid score was seen.
    """
    if rule not in THRESHOLD_RULES:
        raise InputError('--threshold', f'unknown rule {rule!r} (use one of {THRESHOLD_RULES})')
    if rule == 'fraction':
        if change_fraction is None or not 0 < change_fraction < 1:
            raise InputError('--change-fraction', f'must be in (0, 1), got {change_fraction}')
        return fraction_threshold(histogram.counts, histogram.edges, change_fraction)
    counts, edges = histogram.rebinned()
    if rule == 'otsu':
        return otsu_threshold(counts, edges)
    return kittler_illingworth(counts, edges)
