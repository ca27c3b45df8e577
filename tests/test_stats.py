"""Streamed band statistics: the merge, exactness against numpy, sampling, the sidecar cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_geotiff
from rasterio.transform import from_origin

import geocmid.datasets.geo_raster as dataset_module
from geocmid.datasets.geo_raster import GeoRasterDataset
from geocmid.raster.stats import SIDECAR_NAME, BandStats, sample_windows


@pytest.fixture(autouse=True)
def _sidecars_beside_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check where sidecars go by default, so undo the suite-wide redirection."""
    monkeypatch.delenv('GEOCMID_STATS_DIR', raising=False)


def test_stats_dir_overrides_the_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / 'data'
    two_rasters(data)
    monkeypatch.setenv('GEOCMID_STATS_DIR', str(tmp_path / 'stats'))
    _ = GeoRasterDataset(data).stats
    assert not (data / SIDECAR_NAME).exists()
    assert len(list((tmp_path / 'stats').glob('*.stats.json'))) == 1


def test_merge_matches_numpy_over_the_union() -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.normal(1e4, 50, size=(3, rng.integers(0, 9), 7)) for _ in range(12)]
    valids = [rng.random(chunk.shape[1:]) > 0.3 for chunk in chunks]
    total = BandStats.empty(3)
    for chunk, valid in zip(chunks, valids, strict=True):
        total = total.merge(BandStats.from_pixels(chunk, valid))
    pixels = np.concatenate([c[:, v] for c, v in zip(chunks, valids, strict=True)], axis=1)
    assert (total.count == pixels.shape[1]).all()
    np.testing.assert_allclose(total.mean, pixels.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(total.std, pixels.std(axis=1), rtol=1e-9)
    np.testing.assert_array_equal(total.minimum, pixels.min(axis=1))
    np.testing.assert_array_equal(total.maximum, pixels.max(axis=1))
    restored = BandStats.from_json(json.loads(json.dumps(total.to_json())))
    for field in ('count', 'mean', 'm2', 'minimum', 'maximum'):
        np.testing.assert_array_equal(getattr(restored, field), getattr(total, field))


def test_sample_windows_respects_the_budget() -> None:
    rng = np.random.default_rng(0)
    everything, whole = sample_windows(100, 70, (32, 32), 10**6, rng)
    assert whole and sum(w.width * w.height for w in everything) == 7000
    some, whole = sample_windows(100, 70, (32, 32), 2000, rng)
    assert not whole
    assert 2000 <= sum(w.width * w.height for w in some) < 2000 + 32 * 32
    assert len({(w.col_off, w.row_off) for w in some}) == len(some)


def two_rasters(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two uint16 rasters with nodata 0 in places; returns their data."""
    rng = np.random.default_rng(1)
    a = rng.integers(1, 4000, size=(3, 40, 30)).astype('uint16')
    b = rng.integers(1000, 9000, size=(3, 25, 50)).astype('uint16')
    a[:, :5] = 0
    b[1, 3, 4] = 0  # one band missing: the whole pixel is left out
    write_geotiff(folder / 'a.tif', a, nodata=0)
    write_geotiff(folder / 'sub' / 'b.tif', b, nodata=0, transform=from_origin(600000, 4e6, 1, 1))
    return a, b


def valid_pixels(*arrays: np.ndarray, bands: list[int] | None = None) -> np.ndarray:
    """(C, N) float64 pixels where every selected band is non-zero."""
    out = []
    for array in arrays:
        array = array if bands is None else array[bands]
        out.append(array[:, (array != 0).all(axis=0)])
    return np.concatenate(out, axis=1).astype(np.float64)


def test_dataset_stats_equal_numpy_on_the_whole_data(tmp_path: Path) -> None:
    a, b = two_rasters(tmp_path)
    dataset = GeoRasterDataset(tmp_path)
    pixels = valid_pixels(a, b)
    assert dataset.stats.exact
    assert (dataset.stats.count == pixels.shape[1]).all()
    torch.testing.assert_close(dataset.mean, torch.tensor(pixels.mean(axis=1), dtype=torch.float32))
    torch.testing.assert_close(dataset.std, torch.tensor(pixels.std(axis=1), dtype=torch.float32))
    selected = GeoRasterDataset(tmp_path, bands=[3, 1])
    np.testing.assert_allclose(selected.stats.mean, valid_pixels(a, b, bands=[2, 0]).mean(axis=1))


def test_sampled_stats_are_close_and_deterministic(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    data = rng.normal(500, 40, size=(1, 256, 256)).astype('float32')
    write_geotiff(tmp_path / 'big.tif', data, tiled=True, blocksize=32)
    budget = 256 * 256 // 8
    first = GeoRasterDataset(tmp_path, stats_max_pixels=budget, stats_path=tmp_path / '1.json')
    again = GeoRasterDataset(tmp_path, stats_max_pixels=budget, stats_path=tmp_path / '2.json')
    assert not first.stats.exact
    assert first.stats.count[0] == budget  # whole 32 x 32 blocks fill the budget exactly
    np.testing.assert_array_equal(first.stats.mean, again.stats.mean)
    assert abs(first.stats.mean[0] - data.mean()) < 2
    assert abs(first.stats.std[0] - data.std()) < 2


def test_constant_band_gets_unit_std(tmp_path: Path) -> None:
    write_geotiff(tmp_path / 'c.tif', np.stack([np.full((8, 8), 3), np.arange(64).reshape(8, 8)]))
    dataset = GeoRasterDataset(tmp_path)
    assert dataset.stats.std[0] == 0
    assert dataset.std.tolist()[0] == 1.0 and dataset.mean.tolist()[0] == 3.0


def forbid_computing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any statistics computation fail, to prove a value came from the cache."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError('statistics were recomputed')

    monkeypatch.setattr(dataset_module, 'raster_band_stats', fail)


def test_sidecar_is_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two_rasters(tmp_path)
    first = GeoRasterDataset(tmp_path).stats
    sidecar = tmp_path / SIDECAR_NAME
    assert sidecar.is_file()

    with monkeypatch.context() as patch:
        forbid_computing(patch)
        cached = GeoRasterDataset(tmp_path).stats
        np.testing.assert_array_equal(cached.mean, first.mean)
        np.testing.assert_array_equal(cached.count, first.count)
        with pytest.raises(AssertionError, match='recomputed'):
            _ = GeoRasterDataset(tmp_path, bands=[1]).stats  # another band selection: another key
        with pytest.raises(AssertionError, match='recomputed'):
            _ = GeoRasterDataset(tmp_path, nodata=1).stats  # another nodata: another key

    # Rewriting a file changes its size or modification time: the entry no longer applies.
    b[:] = 5000
    write_geotiff(tmp_path / 'sub' / 'b.tif', b, nodata=0, transform=from_origin(600000, 4e6, 1, 1))
    stat = (tmp_path / 'sub' / 'b.tif').stat()
    os.utime(tmp_path / 'sub' / 'b.tif', ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fresh = GeoRasterDataset(tmp_path).stats
    np.testing.assert_allclose(fresh.mean, valid_pixels(a, b).mean(axis=1))
    assert not np.allclose(fresh.mean, first.mean)
    entries = json.loads(sidecar.read_text())['entries']
    assert len(entries) == 2
    assert not list(tmp_path.glob('.*.tmp'))  # written atomically, nothing left behind


def test_corrupt_sidecar_is_ignored_and_rewritten(tmp_path: Path) -> None:
    two_rasters(tmp_path)
    (tmp_path / SIDECAR_NAME).write_text('{not json')
    stats = GeoRasterDataset(tmp_path).stats
    assert json.loads((tmp_path / SIDECAR_NAME).read_text())['entries']
    assert stats.count[0] > 0


def test_read_only_data_caches_in_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / 'data'
    two_rasters(data)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    real_access = os.access

    def access(path: str, mode: int) -> bool:
        return Path(path) != data and real_access(path, mode)

    monkeypatch.setattr(os, 'access', access)
    _ = GeoRasterDataset(data).stats
    assert not (data / SIDECAR_NAME).exists()
    assert len(list((tmp_path / 'cache' / 'geocmid' / 'stats').glob('*.stats.json'))) == 1
    forbid_computing(monkeypatch)
    _ = GeoRasterDataset(data).stats
