"""ValidPatchSampler: nodata threshold, exact validity bounds, DDP sharding, epochs, errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch.distributed as dist
from conftest import write_geotiff
from rasterio.transform import from_origin

from geocmid.datasets.geo_raster import GeoRasterDataset
from geocmid.errors import InputError
from geocmid.samplers.valid_patch import ValidityGrid, ValidPatchSampler


def raster_with_mask(path: Path, valid: np.ndarray, left: float = 0.0) -> Path:
    """A 2-band uint8 raster, nodata 0 exactly where ``valid`` is False."""
    height, width = valid.shape
    data = np.where(valid, np.arange(1, height * width + 1).reshape(height, width) % 250 + 1, 0)
    data = np.stack([data, data]).astype('uint8')
    return write_geotiff(path, data, transform=from_origin(left, height, 1, 1), nodata=0)


def triangle(size: int, legs: int) -> np.ndarray:
    """Valid only in the upper-left triangle (r + c < legs)."""
    rows, cols = np.mgrid[0:size, 0:size]
    return rows + cols < legs


@pytest.mark.parametrize('max_nodata', [0.5, 0.1, 0.0])
def test_no_patch_exceeds_the_nodata_threshold(tmp_path: Path, max_nodata: float) -> None:
    valid = triangle(120, 70)  # about 83% nodata
    assert valid.mean() < 0.2
    dataset = GeoRasterDataset(raster_with_mask(tmp_path / 'a.tif', valid))
    sampler = ValidPatchSampler(dataset, size=16, length=200, max_nodata_fraction=max_nodata)
    fractions = [1 - dataset[query]['valid'].float().mean().item() for query in sampler]
    assert len(fractions) == 200
    assert max(fractions) <= max_nodata
    if max_nodata > 0:
        assert max(fractions) > 0  # patches do reach into the nodata edge


def test_validity_grid_bounds_never_exceed_the_true_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Blocky nodata with speckle, on a size that does not divide into cells.
    valid = np.kron(rng.random((13, 11)) > 0.3, np.ones((10, 10), bool))[:123, :105]
    valid &= rng.random(valid.shape) > 0.05
    dataset = GeoRasterDataset(raster_with_mask(tmp_path / 'a.tif', valid))
    grid = ValidityGrid.build(dataset, 0)
    assert grid.total == valid.sum()
    for _ in range(300):
        height, width = rng.integers(1, 60, size=2)
        row, col = rng.integers(0, 123 - height + 1), rng.integers(0, 105 - width + 1)
        true = valid[row : row + height, col : col + width].sum()
        exact = grid.valid_lower_bound(row, col, height, width)
        fast = grid.valid_lower_bound_fast(np.array([row]), np.array([col]), height, width)[0]
        assert fast <= exact <= true
    full = GeoRasterDataset(raster_with_mask(tmp_path / 'full' / 'b.tif', np.ones((50, 70), bool)))
    full_grid = ValidityGrid.build(full, 0)
    for row, col in [(0, 0), (3, 5), (34, 54), (17, 9)]:  # fully valid: both bounds are exact
        assert full_grid.valid_lower_bound(row, col, 16, 16) == 256
        assert full_grid.valid_lower_bound_fast(np.array([row]), np.array([col]), 16, 16)[0] == 256


def test_ranks_split_one_global_sequence(tmp_path: Path) -> None:
    dataset = GeoRasterDataset(raster_with_mask(tmp_path / 'a.tif', np.ones((200, 200), bool)))
    single = list(ValidPatchSampler(dataset, size=16, length=40, seed=5, world_size=1, rank=0))
    ranks = [list(ValidPatchSampler(dataset, size=16, length=40, seed=5, world_size=2, rank=r))
             for r in range(2)]  # fmt: skip
    assert [len(r) for r in ranks] == [20, 20]
    assert [q for pair in zip(*ranks, strict=True) for q in pair] == single
    as_keys = [{(x.start, y.start) for x, y in r} for r in ranks]
    assert not as_keys[0] & as_keys[1]  # disjoint patches
    # Lengths that do not divide: the ranks still share one prefix of the same sequence.
    odd = [list(ValidPatchSampler(dataset, size=16, length=41, seed=5, world_size=2, rank=r))
           for r in range(2)]  # fmt: skip
    merged = [q for pair in zip(*odd, strict=True) for q in pair]
    assert len(merged) == 42 and merged[:40] == single


def test_rank_and_world_size_default_to_torch_distributed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = GeoRasterDataset(raster_with_mask(tmp_path / 'a.tif', np.ones((64, 64), bool)))
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'get_rank', lambda: 2)
    monkeypatch.setattr(dist, 'get_world_size', lambda: 3)
    sampler = ValidPatchSampler(dataset, size=8, length=10)
    assert (sampler.rank, sampler.world_size, len(sampler)) == (2, 3, 4)
    with pytest.raises(InputError, match=r'rank 3 is not in \[0, 3\)'):
        ValidPatchSampler(dataset, size=8, rank=3)


def test_epochs_reseed_and_set_epoch_replays(tmp_path: Path) -> None:
    dataset = GeoRasterDataset(raster_with_mask(tmp_path / 'a.tif', np.ones((100, 100), bool)))
    sampler = ValidPatchSampler(dataset, size=16, length=10, seed=1)
    first, second = list(sampler), list(sampler)
    assert first != second  # iterating advances the epoch
    sampler.set_epoch(0)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) == second
    other_seed = ValidPatchSampler(dataset, size=16, length=10, seed=2)
    assert list(other_seed) != first


@pytest.mark.parametrize('world_size', [1, 2])
def test_resume_continues_an_epoch_part_way(tmp_path: Path, world_size: int) -> None:
    dataset = GeoRasterDataset(raster_with_mask(tmp_path / 'a.tif', np.ones((100, 100), bool)))
    for rank in range(world_size):
        sampler = ValidPatchSampler(
            dataset, size=16, length=12, seed=1, rank=rank, world_size=world_size
        )
        epochs = [list(sampler) for _ in range(3)]
        resumed = ValidPatchSampler(
            dataset, size=16, length=12, seed=1, rank=rank, world_size=world_size
        )
        resumed.resume(1, 4)
        resumed.set_epoch(1)  # as Lightning does before iterating (a no-op here)
        assert list(resumed) == epochs[1][4:]  # the rest of epoch 1, not its start
        assert list(resumed) == epochs[2]  # later epochs in full
        resumed.set_epoch(1)
        assert list(resumed) == epochs[1]  # replaying the epoch skips nothing


def test_patches_are_drawn_in_proportion_to_valid_area(tmp_path: Path) -> None:
    raster_with_mask(tmp_path / 'a.tif', np.ones((100, 100), bool))
    small = np.zeros((100, 100), bool)
    small[:50, :50] = True  # a quarter of the other file's valid area
    raster_with_mask(tmp_path / 'b.tif', small, left=1000)
    dataset = GeoRasterDataset(tmp_path)
    sampler = ValidPatchSampler(dataset, size=8, length=1000, max_nodata_fraction=0.0, seed=0)
    files = Counter(x.start >= 1000 for x, _ in sampler)
    assert 0.15 < files[True] / 1000 < 0.25  # expected 0.2
    assert len(sampler) == 1000


def test_roi_keeps_patches_inside(tmp_path: Path) -> None:
    dataset = GeoRasterDataset(raster_with_mask(tmp_path / 'a.tif', np.ones((100, 100), bool)))
    roi = shapely.box(10, 10, 60, 50)
    for x, y in ValidPatchSampler(dataset, size=16, length=50, roi=roi):
        assert roi.contains(shapely.box(x.start, y.start, x.stop, y.stop))


def test_default_length_and_errors(tmp_path: Path) -> None:
    dataset = GeoRasterDataset(raster_with_mask(tmp_path / 'a.tif', triangle(64, 64)))
    assert len(ValidPatchSampler(dataset, size=16)) == (64 * 65 // 2) // 256
    with pytest.raises(InputError, match=r'a\.tif: patch size 80x80 px is larger than every'):
        ValidPatchSampler(dataset, size=80)
    checker = (np.add.outer(np.arange(64), np.arange(64)) % 2).astype(bool)
    stripes = GeoRasterDataset(raster_with_mask(tmp_path / 'c' / 'c.tif', checker))
    with pytest.raises(InputError, match=r'c\.tif: no 16x16 px patch has at most 10% nodata'):
        ValidPatchSampler(stripes, size=16, max_nodata_fraction=0.1)
    assert len(ValidPatchSampler(stripes, size=16, length=5, max_nodata_fraction=0.5)) == 5


def test_validity_grids_are_built_once_per_dataset_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = GeoRasterDataset(raster_with_mask(tmp_path / 'a.tif', triangle(64, 64)))
    first = ValidPatchSampler(dataset, size=8, length=4)

    def fail(*args: object) -> None:
        raise AssertionError('validity read again')

    monkeypatch.setattr(dataset, 'read_valid', fail)
    second = ValidPatchSampler(dataset, size=8, length=4, rank=1, world_size=2)
    assert second.grids[0] is first.grids[0]
    dataset.res = 2.0  # another grid: the counts must be rebuilt
    with pytest.raises(AssertionError, match='validity read again'):
        ValidPatchSampler(dataset, size=8, length=4)
