"""Thresholds of a streamed change-score histogram."""

import numpy as np
import pytest

from geocmid.errors import InputError
from geocmid.inference.thresholds import (
    StreamedHistogram,
    fraction_threshold,
    kittler_illingworth,
    otsu_threshold,
    pick_threshold,
)


def mixture(changed_share: float, seed: int = 0) -> np.ndarray:
    """Unchanged N(0, 1) pixels and a small changed N(6, 1) class."""
    rng = np.random.default_rng(seed)
    total = 200_000
    changed = int(total * changed_share)
    return np.concatenate([rng.normal(0, 1, total - changed), rng.normal(6, 1, changed)])


def histogram(values: np.ndarray) -> StreamedHistogram:
    streamed = StreamedHistogram(-20, 40)
    for chunk in np.array_split(values, 7):  # added window by window
        streamed.add(chunk)
    return streamed


def test_ki_holds_when_little_changes_where_otsu_drifts() -> None:
    values = mixture(0.01)
    streamed = histogram(values)
    ki = pick_threshold(streamed, 'ki')
    otsu = pick_threshold(streamed, 'otsu')
    # The Bayes cut between N(0,1) at 99 % and N(6,1) at 1 % lies near 3.77.
    assert 3.0 < ki < 4.5
    truth = np.r_[np.zeros(198_000, bool), np.ones(2_000, bool)]
    errors_ki = ((values >= ki) != truth).sum()
    errors_otsu = ((values >= otsu) != truth).sum()
    assert errors_ki <= errors_otsu


def test_balanced_classes_ki_and_otsu_agree_near_the_middle() -> None:
    streamed = histogram(mixture(0.5))
    assert pick_threshold(streamed, 'ki') == pytest.approx(3.0, abs=0.3)
    assert pick_threshold(streamed, 'otsu') == pytest.approx(3.0, abs=0.3)


def test_fraction_rule_cuts_the_stated_share() -> None:
    values = np.random.default_rng(1).uniform(0, 10, 100_000)
    threshold = pick_threshold(histogram(values), 'fraction', change_fraction=0.05)
    assert (values >= threshold).mean() == pytest.approx(0.05, abs=0.002)


@pytest.mark.parametrize('fraction', [None, 0.0, 1.0, -0.1, 1.5])
def test_fraction_outside_open_unit_interval_is_an_input_error(fraction: float | None) -> None:
    with pytest.raises(InputError, match='--change-fraction'):
        pick_threshold(histogram(mixture(0.1)), 'fraction', change_fraction=fraction)


def test_unknown_rule_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unknown rule 'mean'"):
        pick_threshold(histogram(mixture(0.1)), 'mean')  # type: ignore[arg-type]


def test_histogram_tracks_extremes_and_ignores_nan() -> None:
    streamed = StreamedHistogram(0, 10, bins=100)
    streamed.add(np.array([np.nan, 2.0, 3.0, np.inf, 50.0]))
    assert streamed.total == 3  # 50 clipped into the last bin, NaN and inf dropped
    assert (streamed.minimum, streamed.maximum) == (2.0, 50.0)
    counts, edges = streamed.rebinned(4)
    assert counts.sum() == 3 and edges[0] == 2.0 and edges[-1] == 10.0


def test_empty_histogram_raises() -> None:
    with pytest.raises(ValueError, match='empty'):
        StreamedHistogram(0, 1).rebinned()
    for rule in (otsu_threshold, kittler_illingworth):
        with pytest.raises(ValueError, match='empty'):
            rule(np.zeros(4, np.int64), np.linspace(0, 1, 5))
    with pytest.raises(ValueError, match='empty'):
        fraction_threshold(np.zeros(4, np.int64), np.linspace(0, 1, 5), 0.5)


def test_two_populated_bins_fall_back_to_a_cut_between_them() -> None:
    counts = np.array([10, 0, 0, 5])
    edges = np.linspace(0, 4, 5)
    cut = kittler_illingworth(counts, edges)
    assert 1.0 <= cut <= 3.0
