"""GeoRasterDataset: samples, target grid and reprojection, bands, nodata, validation, workers."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from conftest import SAMPLE_DATA, write_geotiff
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.warp import transform, transform_bounds
from torch.utils.data import DataLoader
from torchgeo.datasets import stack_samples
from torchgeo.samplers import GriddedPatchSampler, RandomPatchSampler

from geocmid.datasets.geo_raster import GeoRasterDataset, valid_from_sentinel
from geocmid.errors import InputError
from geocmid.samplers.valid_patch import ValidPatchSampler


def ramp(bands: int = 3, height: int = 40, width: int = 50, dtype: str = 'uint16') -> np.ndarray:
    """Distinct values: band b, row r, col c holds 1000 b + 50 r + c + 1."""
    b, r, c = np.mgrid[0:bands, 0:height, 0:width]
    return (1000 * b + width * r + c + 1).astype(dtype)


def window_query(t: rasterio.Affine, row: int, col: int, size: int) -> tuple[slice, slice]:
    """The GeoSlice of a size x size window whose upper-left pixel is (row, col) of ``t``."""
    left, top = t @ (col, row)
    right, bottom = t @ (col + size, row + size)
    return slice(left, right), slice(bottom, top)


# -- samples -----------------------------------------------------------------------------


def test_sample_values_and_float64_georeferencing(tmp_path: Path) -> None:
    # Sub-metre pixels at UTM northings: float32 would be off by a pixel (docs/data.md#samples).
    t = from_origin(500003.37, 3997641.11, 0.3, 0.3)
    data = ramp()
    write_geotiff(tmp_path / 'a.tif', data, transform=t)
    dataset = GeoRasterDataset(tmp_path / 'a.tif')
    assert dataset.crs.to_epsg() == 32631
    assert dataset.res == (0.3, 0.3)
    assert list(dataset.index.columns) == ['filepath', 'geometry']
    assert dataset.index.index.name == 'datetime'

    x, y = window_query(t, 7, 11, 16)
    sample = dataset[x, y]
    assert sample['image'].dtype == torch.float32
    assert sample['image'].shape == (3, 16, 16)
    np.testing.assert_array_equal(sample['image'].numpy(), data[:, 7:23, 11:27])
    assert sample['valid'].dtype == torch.bool and bool(sample['valid'].all())
    assert sample['transform'].dtype == torch.float64
    assert tuple(sample['transform'].tolist()) == tuple(from_origin(x.start, y.stop, 0.3, 0.3))
    assert sample['transform'][2].item() == t.c + 11 * 0.3
    assert sample['bounds'][:6].tolist() == [x.start, x.stop, 0.3, y.start, y.stop, 0.3]


def test_mosaic_fills_gaps_with_nodata_and_first_valid_pixel_wins(tmp_path: Path) -> None:
    a = ramp(1, 20, 20)
    a[0, 5, 15] = 0  # a hole the overlapping file fills
    b = ramp(1, 20, 20) + 5000
    write_geotiff(tmp_path / 'a.tif', a, transform=from_origin(0, 20, 1, 1), nodata=0)
    write_geotiff(tmp_path / 'b.tif', b, transform=from_origin(10, 20, 1, 1), nodata=0)
    dataset = GeoRasterDataset(tmp_path)
    sample = dataset[0:40, 10:20]  # rows 0-9: a, b beside it, then nothing from x = 30
    image, valid = sample['image'][0].numpy(), sample['valid'].numpy()
    np.testing.assert_array_equal(image[:, :10], a[0, :10, :10])
    # Where both lie, a comes first, except in its hole, which b fills.
    expected = a[0, :10, 10:20].copy()
    expected[5, 5] = b[0, 5, 5]
    np.testing.assert_array_equal(image[:, 10:20], expected)
    np.testing.assert_array_equal(image[:, 20:30], b[0, :10, 10:20])
    assert valid[:, :30].all() and not valid[:, 30:].any()
    assert (image[:, 30:] == 0).all()  # the fill value is the shared nodata
    with pytest.raises(IndexError):
        dataset[100:116, 100:116]


class DatedRasters(GeoRasterDataset):
    filename_regex = r'.*_(?P<date>\d{8})\.tif'


def test_time_slices_select_files_by_date(tmp_path: Path) -> None:
    early, late = ramp(1, 8, 8), ramp(1, 8, 8) + 100
    write_geotiff(tmp_path / 'a_20200101.tif', early, transform=from_origin(0, 8, 1, 1))
    write_geotiff(tmp_path / 'b_20210101.tif', late, transform=from_origin(0, 8, 1, 1))
    dataset = DatedRasters(tmp_path)
    both = dataset[0:8, 0:8]['image'][0].numpy()
    np.testing.assert_array_equal(both, early[0])  # the first file wins where both lie
    in_2021 = slice(pd.Timestamp('2020-06-01'), pd.Timestamp('2021-06-01'))
    np.testing.assert_array_equal(dataset[0:8, 0:8, in_2021]['image'][0].numpy(), late[0])
    with pytest.raises(IndexError):
        dataset[0:8, 0:8, slice(pd.Timestamp('2022-01-01'), pd.Timestamp('2022-02-01'))]


# -- target grid and reprojection -------------------------------------------------------


def field(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth field in EPSG:32631 metres (bilinear resampling reproduces it)."""
    return (0.2 * (x - 690000.0) + 0.1 * (y - 4980000.0) + 1000.0).astype(np.float32)


def field_raster(path: Path, crs: str, left: float, top: float, res: float, size: int) -> Path:
    """A raster in ``crs`` whose pixels hold :func:`field` at their centres, exactly."""
    t = from_origin(left, top, res, res)
    cols, rows = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    xs, ys = t @ (cols.ravel(), rows.ravel())
    if crs != 'EPSG:32631':
        xs, ys = transform(crs, 'EPSG:32631', xs, ys)
    values = field(np.asarray(xs), np.asarray(ys)).reshape(1, size, size)
    return write_geotiff(path, values, crs=crs, transform=t)


def utm31_area_in(crs: str, left: float, top: float, side: float) -> tuple[float, float]:
    """Upper-left corner, in ``crs``, of an area given in EPSG:32631."""
    west, _, _, north = transform_bounds('EPSG:32631', crs, left, top - side, left + side, top)
    return west, north


def test_files_in_other_crss_are_reprojected_onto_the_majority_grid(tmp_path: Path) -> None:
    # Two rasters in EPSG:32631 (the majority; the 5 m one is the finest), one in the next
    # UTM zone and one in geographic coordinates, at different places near 5.6 E, 45 N.
    field_raster(tmp_path / 'a.tif', 'EPSG:32631', 690000, 4985000, 10.0, 48)
    field_raster(tmp_path / 'd.tif', 'EPSG:32631', 691000, 4985000, 5.0, 64)
    left, top = utm31_area_in('EPSG:32632', 692000, 4985000, 480)
    field_raster(tmp_path / 'b.tif', 'EPSG:32632', left, top, 10.0, 60)
    left, top = utm31_area_in('EPSG:4326', 693500, 4985000, 480)
    field_raster(tmp_path / 'c.tif', 'EPSG:4326', left, top, 1e-4, 60)

    dataset = GeoRasterDataset(tmp_path)
    assert CRS.from_user_input(dataset.crs) == CRS.from_epsg(32631)
    assert dataset.res == (5.0, 5.0)
    assert [p.warp for p in dataset.placements] == [True, True, True, False]  # a, b, c, d
    assert dataset.grid.c == 691000 and dataset.grid.f == 4985000  # anchored on d

    for x0 in (692100.0, 693600.0, 690020.0):  # inside b, c and a (a is 10 m: resampled)
        x, y = slice(x0, x0 + 160), slice(4984700.0, 4984860.0)
        sample = dataset[x, y]
        assert sample['valid'].all()
        centres_x = x0 + 2.5 + 5 * np.arange(32)
        centres_y = 4984860.0 - 2.5 - 5 * np.arange(32)
        expected = field(*np.meshgrid(centres_x, centres_y))
        # Bilinear interpolation of a linear field, within GDAL's 1/8 px warp approximation.
        np.testing.assert_allclose(sample['image'][0].numpy(), expected, atol=0.5)

    # The warped collar of the geographic raster is invalid, not zeros taken for data.
    left, bottom, right, top = dataset.index.geometry.iloc[2].bounds
    whole = dataset[left:right, bottom:top]
    assert 0.9 < whole['valid'].float().mean() < 1


def test_explicit_crs_and_res_and_crs_setter(tmp_path: Path) -> None:
    field_raster(tmp_path / 'a.tif', 'EPSG:32631', 690000, 4985000, 10.0, 48)
    left, top = utm31_area_in('EPSG:32632', 692000, 4985000, 480)
    field_raster(tmp_path / 'b.tif', 'EPSG:32632', left, top, 10.0, 60)
    dataset = GeoRasterDataset(tmp_path, crs='EPSG:32632')
    assert dataset.crs.to_epsg() == 32632
    assert dataset.res == (10.0, 10.0)
    assert [p.warp for p in dataset.placements] == [True, False]
    dataset.crs = CRS.from_epsg(32631)  # as IntersectionDataset does
    assert dataset.crs.to_epsg() == 32631 and [p.warp for p in dataset.placements] == [False, True]
    dataset.res = 20.0
    assert dataset.res == (20.0, 20.0) and dataset.placements[0].width == 24
    sample = dataset[690000:690400, 4984600:4985000]
    assert sample['image'].shape == (1, 20, 20) and sample['valid'].all()


def test_off_grid_query_is_resampled(tmp_path: Path) -> None:
    data = ramp(1, 32, 32, 'float32')
    write_geotiff(tmp_path / 'a.tif', data, transform=from_origin(0, 32, 1, 1))
    dataset = GeoRasterDataset(tmp_path)
    sample = dataset[0:16:2, 16:32:2]  # 2 m pixels
    assert sample['image'].shape == (1, 8, 8) and sample['valid'].all()
    # GDAL's bilinear kernel widens when downsampling; on a linear ramp it is symmetric, so
    # pixels away from the raster's edge get the mean of their 2 x 2 block.
    expected = data[0, :16, :16].reshape(8, 2, 8, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(sample['image'][0, 1:, 1:].numpy(), expected[1:, 1:], atol=1e-3)
    shifted = dataset[4.5:12.5, 19.5:27.5]  # half a pixel off the grid, away from the edges
    assert shifted['image'].shape == (1, 8, 8) and shifted['valid'].all()
    # Pixel centres fall on source pixel corners: bilinear gives the mean of four pixels.
    d = data[0]
    corners = (d[4:12, 4:12] + d[5:13, 5:13] + d[4:12, 5:13] + d[5:13, 4:12]) / 4
    np.testing.assert_allclose(shifted['image'][0].numpy(), corners, atol=1e-3)


# -- bands and nodata ------------------------------------------------------------------


def test_band_selection_by_index_and_name(tmp_path: Path) -> None:
    data = ramp(4, 16, 16)
    path = write_geotiff(tmp_path / 'a.tif', data)
    with rasterio.open(path, 'r+') as dst:
        for band, name in enumerate(('blue', 'green', 'red', 'nir'), 1):
            dst.set_band_description(band, name)
    by_index = GeoRasterDataset(path, bands=[4, 1])
    by_name = GeoRasterDataset(path, bands=['nir', 'blue'])
    for dataset in (by_index, by_name):
        assert dataset.band_indexes == (4, 1)
        assert dataset.band_names == ('nir', 'blue')
        np.testing.assert_array_equal(dataset[:, :]['image'].numpy(), data[[3, 0]])
    assert GeoRasterDataset(write_geotiff(tmp_path / 'n' / 'b.tif', data)).band_names == (
        'band_1',
        'band_2',
        'band_3',
        'band_4',
    )
    with pytest.raises(InputError, match=r'a\.tif: band 5 out of range'):
        GeoRasterDataset(path, bands=[1, 5])
    with pytest.raises(InputError, match=r"a\.tif: no band named 'swir'"):
        GeoRasterDataset(path, bands=['swir'])


def test_band_count_mismatch_names_the_file(tmp_path: Path) -> None:
    write_geotiff(tmp_path / 'a.tif', ramp(3, 8, 8))
    write_geotiff(tmp_path / 'b.tif', ramp(2, 8, 8))
    with pytest.raises(InputError, match=r'b\.tif: has 2 selected band\(s\) but a\.tif has 3'):
        GeoRasterDataset(tmp_path)
    assert GeoRasterDataset(tmp_path, bands=[1, 2])[:, :]['image'].shape == (2, 8, 8)


def test_nodata_from_file_and_override(tmp_path: Path) -> None:
    data = ramp(2, 8, 8)  # values 1 to 1064
    data[:, 0, :] = 9999
    data[1, 1, 1] = 7777
    path = write_geotiff(tmp_path / 'a.tif', data, transform=from_origin(0, 8, 1, 1), nodata=9999)
    from_file = GeoRasterDataset(path)
    assert from_file.nodata == 9999
    valid = from_file[0:8, 0:8]['valid']
    assert valid.sum() == 56 and not valid[0].any()
    override = GeoRasterDataset(path, nodata=7777)
    assert override.nodata == 7777
    valid = override[0:8, 0:8]['valid']
    assert valid.sum() == 63 and not valid[1, 1]


# -- native images and implied validity ---------------------------------------------------


def test_native_images_keep_the_stored_dtype(tmp_path: Path) -> None:
    small = ramp(3, 16, 16, 'uint8')
    large = ramp(3, 16, 16, 'int16') - 500  # negative values too
    write_geotiff(tmp_path / 'a.tif', small, transform=from_origin(0, 16, 1, 1))
    write_geotiff(tmp_path / 'b.tif', large, transform=from_origin(16, 16, 1, 1))
    uint8 = GeoRasterDataset(tmp_path / 'a.tif', dtype='native')[0:16, 0:16]['image']
    assert uint8.dtype == torch.uint8
    np.testing.assert_array_equal(uint8.numpy(), small)

    # A mosaic is read in the files' common dtype, here int16 for uint8 and int16.
    native = GeoRasterDataset(tmp_path, dtype='native')[8:24, 0:16]['image']
    floats = GeoRasterDataset(tmp_path)[8:24, 0:16]['image']
    assert native.dtype == torch.int16 and floats.dtype == torch.float32
    expected = np.concatenate([small[:, :, 8:], large[:, :, :8]], axis=2)
    np.testing.assert_array_equal(native.numpy(), expected)
    np.testing.assert_array_equal(floats.numpy(), expected.astype(np.float32))
    with pytest.raises(InputError, match="dtype must be 'float32' or 'native', got 'float64'"):
        GeoRasterDataset(tmp_path, dtype='float64')  # type: ignore[arg-type]


def test_sentinel_only_where_one_nodata_value_marks_validity(tmp_path: Path) -> None:
    def sentinel(name: str, data: np.ndarray, nodata: float | None) -> float | None:
        write_geotiff(tmp_path / name / 'a.tif', data, nodata=nodata)
        return GeoRasterDataset(tmp_path / name).sentinel

    uint8 = ramp(2, 8, 8, 'uint8')
    assert sentinel('zero', uint8, 0) == 0
    assert math.isnan(sentinel('nan', ramp(2, 8, 8, 'float32'), math.nan))  # type: ignore[arg-type]
    assert sentinel('given', uint8, None) is None  # every pixel valid: nothing marks them
    # -1 cannot be stored in uint8, so uncovered pixels hold 0, which is not the sentinel.
    assert GeoRasterDataset(tmp_path / 'given', nodata=-1).sentinel is None
    assert GeoRasterDataset(tmp_path / 'given', nodata=7).sentinel == 7

    write_geotiff(tmp_path / 'mixed' / 'a.tif', uint8, nodata=0)
    write_geotiff(tmp_path / 'mixed' / 'b.tif', uint8, nodata=255)
    assert GeoRasterDataset(tmp_path / 'mixed').sentinel is None

    masked = write_geotiff(tmp_path / 'masked' / 'a.tif', uint8)
    with rasterio.open(masked, 'r+') as dst:
        dst.write_mask(np.full((8, 8), 255, dtype=np.uint8))
    assert GeoRasterDataset(masked).sentinel is None  # a GDAL mask, which values cannot express


def test_omitted_valid_is_rebuilt_exactly_from_the_sentinel(tmp_path: Path) -> None:
    a = ramp(3, 20, 20)
    a[:, 2:5, 2:5] = 0  # a nodata block
    a[1, 8, 8] = 0  # one band only: the pixel is invalid, its other bands keep their values
    b = ramp(3, 20, 20) + 3000
    b[0, 6, 4] = 0  # under a's valid pixels: a wins
    b[2, 3, 12] = 0
    write_geotiff(tmp_path / 'a.tif', a, transform=from_origin(0, 20, 1, 1), nodata=0)
    write_geotiff(tmp_path / 'b.tif', b, transform=from_origin(10, 20, 1, 1), nodata=0)
    with_valid = GeoRasterDataset(tmp_path, dtype='native')
    lean = GeoRasterDataset(tmp_path, dtype='native', omit_implied_valid=True)
    assert lean.sentinel == 0
    queries = [
        (slice(0, 16), slice(4, 20)),  # inside a
        (slice(6, 26), slice(0, 20)),  # across a and b (a mosaic)
        (slice(20, 40), slice(8, 20)),  # b and the uncovered area beyond it
        (slice(1.5, 17.5), slice(2.5, 18.5)),  # off the grid: resampled
    ]
    images, masks = [], []
    for query in queries:
        sample, expected = lean[query], with_valid[query]
        assert 'valid' not in sample
        torch.testing.assert_close(sample['image'], expected['image'])
        assert not expected['valid'].all() and expected['valid'].any()
        assert torch.equal(valid_from_sentinel(sample['image'], 0), expected['valid'])
        if sample['image'].shape[-2:] == (16, 16):
            images.append(sample['image'])
            masks.append(expected['valid'])
    # On a batch, as on the device after the transfer.
    assert torch.equal(valid_from_sentinel(torch.stack(images), 0), torch.stack(masks))

    # float32 images hold uint16 exactly, so the mask is left out there too ...
    assert 'valid' not in GeoRasterDataset(tmp_path, omit_implied_valid=True)[queries[0]]
    # ... but not uint32, whose large values float32 would merge with the nodata value.
    write_geotiff(tmp_path / 'big' / 'a.tif', ramp(1, 8, 8, 'uint32'), nodata=2**32 - 1)
    big = GeoRasterDataset(tmp_path / 'big', omit_implied_valid=True)
    assert big.sentinel == 2**32 - 1 and 'valid' in big[:, :]
    native = GeoRasterDataset(tmp_path / 'big', dtype='native', omit_implied_valid=True)
    assert 'valid' not in native[:, :]


def test_valid_from_sentinel_is_exact_for_large_integers_and_nan() -> None:
    top = 2**32 - 1
    image = torch.tensor([[[top, top - 1, 5]], [[1, 1, 1]]], dtype=torch.uint32)  # (2, 1, 3)
    assert valid_from_sentinel(image, float(top)).tolist() == [[False, True, True]]
    # What the int conversion avoids: in float32, top - 1 would match the sentinel too.
    assert (image.to(torch.float32) == float(top)).sum() == 2
    image = torch.tensor([[[1.0, math.nan]], [[math.nan, 2.0]], [[3.0, 4.0]]])
    assert valid_from_sentinel(image, math.nan).tolist() == [[False, False]]
    image = torch.tensor([[[-9999.0, -9999.5]]], dtype=torch.float64)
    assert valid_from_sentinel(image, -9999.0).tolist() == [[False, True]]


# -- validation ----------------------------------------------------------------------------


def test_validation_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match='missing: no such file or folder'):
        GeoRasterDataset(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(InputError, match='empty: no rasters found'):
        GeoRasterDataset(tmp_path / 'empty')

    folder = tmp_path / 'data'
    write_geotiff(folder / 'good.tif', ramp(), tiled=True, blocksize=16)
    (folder / 'notes.tif').write_text('a text file renamed .tif')
    with pytest.raises(InputError, match=r'notes\.tif: not a readable raster'):
        GeoRasterDataset(folder)
    (folder / 'notes.tif').unlink()

    whole = write_geotiff(
        tmp_path / 'big.tif', ramp(4, 256, 256, 'uint8'), tiled=True, blocksize=64
    )
    (folder / 'cut.tif').write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InputError, match=r'cut\.tif: corrupt or truncated raster'):
        GeoRasterDataset(folder)
    (folder / 'cut.tif').unlink()

    write_geotiff(folder / 'sub' / 'nocrs.tif', ramp(), crs=None)
    with pytest.raises(InputError, match=r'nocrs\.tif: raster has no CRS'):
        GeoRasterDataset(folder)
    with pytest.raises(InputError, match='max_nodata_fraction'):
        GeoRasterDataset(folder / 'good.tif', max_nodata_fraction=1.0)


# -- samplers and workers ------------------------------------------------------------------


def test_gridded_patch_sampler_tiles_the_raster_exactly(tmp_path: Path) -> None:
    data = ramp(2, 40, 50)
    t = from_origin(500000.0, 4000000.0, 2.0, 2.0)
    write_geotiff(tmp_path / 'a.tif', data, transform=t)
    dataset = GeoRasterDataset(tmp_path)
    mosaic = np.zeros_like(data, dtype=np.float32)
    covered = np.zeros(data.shape[1:], dtype=int)
    for query in GriddedPatchSampler(dataset, size=16, stride=16):
        sample = dataset[query]
        # Place each patch by its float64 transform; windows hang over the edges
        # (docs/inference.md#tiling).
        col0 = round((sample['transform'][2].item() - t.c) / t.a)
        row0 = round((sample['transform'][5].item() - t.f) / t.e)
        valid = sample['valid'].numpy()
        rows, cols = np.nonzero(valid)
        mosaic[:, rows + row0, cols + col0] = sample['image'].numpy()[:, rows, cols]
        assert (rows + row0 >= 0).all() and (rows + row0 < 40).all()  # invalid outside
        assert (cols + col0 >= 0).all() and (cols + col0 < 50).all()
        covered[rows + row0, cols + col0] += 1
    assert (covered == 1).all()
    np.testing.assert_array_equal(mosaic, data)


def test_torchgeo_random_patch_sampler_and_stack_samples(tmp_path: Path) -> None:
    write_geotiff(tmp_path / 'a.tif', ramp(3, 64, 64))
    dataset = GeoRasterDataset(tmp_path)
    sampler = RandomPatchSampler(dataset, size=16, length=6, generator=0)
    batch = next(iter(DataLoader(dataset, sampler=sampler, batch_size=6, collate_fn=stack_samples)))
    assert batch['image'].shape == (6, 3, 16, 16)
    assert batch['valid'].shape == (6, 16, 16) and bool(batch['valid'].all())
    assert batch['transform'].shape == (6, 9) and batch['transform'].dtype == torch.float64


def test_two_workers_give_the_same_samples_and_handles_are_not_pickled(tmp_path: Path) -> None:
    write_geotiff(tmp_path / 'a.tif', ramp(3, 64, 64), nodata=0)
    write_geotiff(tmp_path / 'b.tif', ramp(3, 64, 64) + 7, transform=from_origin(500100, 4e6, 1, 1))
    dataset = GeoRasterDataset(tmp_path)
    dataset[500000:500016, 3999950:3999966]  # opens a file in the parent before forking
    assert dataset._readers
    copy = pickle.loads(pickle.dumps(dataset))
    assert not copy._readers  # each process opens its own files
    query = (slice(500100, 500116), slice(3999950, 3999966))
    torch.testing.assert_close(copy[query]['image'], dataset[query]['image'])

    def load(workers: int) -> list[torch.Tensor]:
        sampler = ValidPatchSampler(dataset, size=16, length=12, seed=3)
        loader = DataLoader(dataset, sampler=sampler, batch_size=4, num_workers=workers,
                            collate_fn=stack_samples)  # fmt: skip
        return [batch['image'] for batch in loader]

    single, parallel = load(0), load(2)
    assert len(parallel) == 3
    for a, b in zip(single, parallel, strict=True):
        torch.testing.assert_close(a, b)


def test_sample_data_naip_by_band_name() -> None:
    naip = SAMPLE_DATA / 'naip'
    dataset = GeoRasterDataset(naip, bands=['nir', 'red'])
    assert len(dataset) == len(list(naip.glob('*.tif')))
    assert dataset.band_names == ('nir', 'red')
    sampler = ValidPatchSampler(dataset, size=64, length=4, seed=0)
    for query in sampler:
        sample = dataset[query]
        assert sample['image'].shape == (2, 64, 64)
        assert sample['valid'].float().mean() >= 0.5
        assert sample['image'][:, sample['valid']].min() > 0  # nodata 0 never marked valid
