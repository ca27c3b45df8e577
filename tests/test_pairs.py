"""Pair alignment and pair lists (data.pairs); change-training patches (data.change_patches)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin
from rasterio.windows import Window

from geocmid.datasets.change_patches import (
    IGNORE_INDEX,
    ChangePatches,
    change_threshold,
    label_regions,
    split_regions,
)
from geocmid.datasets.pairs import align_pair, pair_statistics, read_pairs
from geocmid.errors import InputError

ORIGIN = (500000.0, 4000000.0)
# EPSG:32631 with the false easting moved by 1 km: the same grid, coordinates shifted by
# +1000 m, so a warp between the two is a pure translation with exact expectations.
SHIFTED_UTM = CRS.from_proj4(
    '+proj=tmerc +lat_0=0 +lon_0=3 +k=0.9996 +x_0=501000 +y_0=0 +datum=WGS84 +units=m +no_defs'
)


def ramp(bands: int, height: int, width: int, dtype: str = 'uint16') -> np.ndarray:
    """Distinct values everywhere: band b, row r, column c -> 1 + b * 10000 + r * 100 + c."""
    b, r, c = np.indices((bands, height, width))
    return (1 + b * 10000 + r * 100 + c).astype(dtype)


def at(col: float, row: float, res: float = 2.0) -> rasterio.Affine:
    """Transform of a grid whose origin is pixel (col, row) of the reference 2 m grid."""
    return from_origin(ORIGIN[0] + col * 2.0, ORIGIN[1] - row * 2.0, res, res)


def write_png(path: Path, data: np.ndarray) -> Path:
    """An image without georeferencing, as in LEVIR-CD / SZTAKI."""
    data = data if data.ndim == 3 else data[None]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', NotGeoreferencedWarning)
        with rasterio.open(
            path, 'w', driver='PNG', width=data.shape[2], height=data.shape[1],
            count=data.shape[0], dtype=data.dtype,
        ) as dst:  # fmt: skip
            dst.write(data)
    return path


def test_integer_shift_same_crs_is_read_pixel_for_pixel(make_geotiff) -> None:
    data = ramp(2, 20, 30)
    before = make_geotiff('a.tif', data, transform=at(0, 0))
    after = make_geotiff('b.tif', data[:, 2:, 3:].copy(), transform=at(3, 2))
    with align_pair(before, after) as pair:
        assert not pair.warped
        assert pair.window == Window(3, 2, 27, 18)
        with rasterio.open(before) as src:
            assert pair.transform == src.window_transform(pair.window)
            assert pair.crs == src.crs
        a, b, valid = pair.read()
    assert a.shape == b.shape == (2, 18, 27)
    np.testing.assert_array_equal(a, data[:, 2:, 3:])
    np.testing.assert_array_equal(b, data[:, 2:, 3:])
    assert valid.all()


def test_after_image_in_another_crs_is_warped_onto_the_before_grid(make_geotiff) -> None:
    data = ramp(1, 20, 30)
    before = make_geotiff('a.tif', data, transform=at(0, 0))
    origin = at(5, 4)
    shifted = from_origin(origin.c + 1000.0, origin.f, 2.0, 2.0)
    after = make_geotiff('b.tif', data[:, 4:14, 5:20].copy(), crs=SHIFTED_UTM, transform=shifted)
    with align_pair(before, after) as pair:
        assert pair.warped
        assert pair.window == Window(5, 4, 15, 10)
        assert pair.crs == CRS.from_epsg(32631)
        a, b, valid = pair.read()
    assert valid.all()
    np.testing.assert_array_equal(b, data[:, 4:14, 5:20])
    np.testing.assert_array_equal(a, b)


def test_coarser_after_image_is_resampled_to_the_before_resolution(make_geotiff) -> None:
    coarse = ramp(1, 5, 6)
    before = make_geotiff('a.tif', ramp(1, 10, 12), transform=at(0, 0))
    after = make_geotiff('b.tif', coarse, transform=at(0, 0, res=4.0))
    with align_pair(before, after, resampling='nearest') as pair:
        assert pair.warped and (pair.width, pair.height) == (12, 10)
        _, b, valid = pair.read()
    assert valid.all()
    np.testing.assert_array_equal(b[0], np.repeat(np.repeat(coarse[0], 2, axis=0), 2, axis=1))


def test_half_pixel_shift_is_interpolated_bilinearly(make_geotiff) -> None:
    columns = np.tile(np.arange(16, dtype=np.float32) * 10, (8, 1))
    before = make_geotiff('a.tif', columns, transform=at(0, 0))
    after = make_geotiff('b.tif', columns, transform=at(0.5, 0))
    with align_pair(before, after) as pair:
        assert pair.warped and pair.window == Window(0, 0, 16, 8)
        _, b, valid = pair.read()
    # Pixel j of the before grid is centred half-way between pixels j - 1 and j of the after
    # image, so it receives the mean of their values: 10 j - 5. Pixel 0 is centred on the
    # after image's edge, where GDAL takes the edge pixel.
    assert valid.all()
    expected = np.r_[0.0, np.arange(1, 16) * 10.0 - 5.0]
    np.testing.assert_allclose(b[0], np.tile(expected, (8, 1)))


def test_geographic_after_image_covers_its_footprint(make_geotiff) -> None:
    before = make_geotiff('a.tif', np.full((1, 40, 40), 3, np.uint8), transform=at(0, 0))
    # A 4326 image covering the middle of the before image, filled with 7.
    corner = ([ORIGIN[0] + 20], [ORIGIN[1] - 20])
    lon0, lat0 = rasterio.warp.transform('EPSG:32631', 'EPSG:4326', *corner)
    after = make_geotiff(
        'b.tif', np.full((1, 20, 20), 7, np.uint8), crs='EPSG:4326',
        transform=from_origin(lon0[0], lat0[0], 2e-5, 2e-5),
    )  # fmt: skip
    with align_pair(before, after) as pair:
        assert pair.warped and pair.crs == CRS.from_epsg(32631)
        a, b, valid = pair.read()
    assert valid.mean() > 0.8  # the footprint is slightly rotated in UTM
    assert (a[:, valid] == 3).all() and (b[:, valid] == 7).all()
    # The after image's top-left corner lies 20 m (10 px) into the before image.
    rows, cols = np.nonzero(valid)
    assert abs(rows.min() + pair.window.row_off - 10) <= 1
    assert abs(cols.min() + pair.window.col_off - 10) <= 1


def test_nodata_is_the_union_of_both_images(make_geotiff) -> None:
    a = np.full((2, 6, 6), 5, np.uint8)
    b = np.full((2, 6, 6), 9, np.uint8)
    a[0, 1, 1] = 0  # one band is enough to invalidate a pixel
    b[1, 4, 2] = 0
    before = make_geotiff('a.tif', a, transform=at(0, 0), nodata=0)
    after = make_geotiff('b.tif', b, transform=at(0, 0), nodata=0)
    with align_pair(before, after) as pair:
        _, _, valid = pair.read()
    expected = np.ones((6, 6), bool)
    expected[1, 1] = expected[4, 2] = False
    np.testing.assert_array_equal(valid, expected)
    # An override replaces the files' nodata value for both images.
    with align_pair(before, after, nodata=9) as pair:
        _, _, valid = pair.read()
    assert not valid.any()


def test_nodata_survives_the_warp(make_geotiff) -> None:
    a = np.full((1, 8, 8), 5, np.uint8)
    b = np.full((1, 8, 8), 9, np.uint8)
    b[0, 3, 3] = 0
    before = make_geotiff('a.tif', a, transform=at(0, 0))
    shifted = from_origin(ORIGIN[0] + 1000, ORIGIN[1], 2, 2)
    after = make_geotiff('b.tif', b, crs=SHIFTED_UTM, nodata=0, transform=shifted)
    with align_pair(before, after) as pair:
        assert pair.warped
        _, values, valid = pair.read()
    assert not valid[3, 3] and valid.sum() == 63
    assert (values[0][valid] == 9).all()


def test_window_reads_match_the_whole_grid(make_geotiff) -> None:
    data = ramp(3, 32, 24)
    before = make_geotiff('a.tif', data, transform=at(0, 0), tiled=True, blocksize=16)
    after = make_geotiff('b.tif', data[:, 1:, 1:].copy(), transform=at(1, 1), crs=SHIFTED_UTM)
    with rasterio.open(after, 'r+') as dst:  # move the after image 1 km to match its CRS
        dst.transform = from_origin(ORIGIN[0] + 1002, ORIGIN[1] - 2, 2, 2)
    with align_pair(before, after) as pair:
        whole = pair.read(indexes=[3, 1], out_dtype='float32')
        window = Window(5, 7, 9, 11)
        part = pair.read(window, indexes=[3, 1], out_dtype='float32')
    assert part[0].dtype == np.float32 and part[0].shape == (2, 11, 9)
    for full, piece in zip(whole, part, strict=True):
        np.testing.assert_array_equal(full[..., 7:18, 5:14], piece)


def test_envi_landsat_pair(shared_data: Path) -> None:
    folder = shared_data / 'change' / 'landsat_taizhou_nanjing' / 'Taizhou'
    with align_pair(folder / '2000TM', folder / '2003TM') as pair:
        assert (pair.count, pair.dtype, pair.width, pair.height) == (6, np.uint8, 400, 400)
        assert pair.crs == CRS.from_epsg(32651) and not pair.warped
        a, b, valid = pair.read(Window(0, 0, 64, 64))
    assert a.shape == (6, 64, 64) and valid.all() and (a != b).any()


def test_real_naip_pair_with_subpixel_shift() -> None:
    naip = Path(__file__).resolve().parents[1] / 'sample_data' / 'naip'
    with align_pair(naip / 'naip_2012.tif', naip / 'naip_2016.tif') as pair:
        assert pair.warped  # 2016 is offset by 0.6 m, 1.2 m: not on the 2012 pixels
        with rasterio.open(naip / 'naip_2012.tif') as src:
            assert pair.transform == src.transform and pair.crs == src.crs
        _, _, valid = pair.read(Window(0, 0, 50, 50))
    assert valid.mean() > 0.9


# Errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize('which', ['before', 'after'])
def test_image_without_crs_is_rejected(make_geotiff, which: str) -> None:
    paths = {
        name: make_geotiff(
            f'{name}.tif', ramp(1, 8, 8), crs=None if name == which else 'EPSG:32631'
        )
        for name in ('before', 'after')
    }
    with pytest.raises(InputError, match=rf'{which}\.tif: raster has no CRS'):
        align_pair(paths['before'], paths['after'])


def test_no_overlap_is_rejected(make_geotiff) -> None:
    before = make_geotiff('a.tif', ramp(1, 8, 8), transform=at(0, 0))
    after = make_geotiff('b.tif', ramp(1, 8, 8), transform=at(8, 0))  # touches, no overlap
    with pytest.raises(InputError, match=r'b\.tif: no overlap with .*a\.tif'):
        align_pair(before, after)


def test_band_count_mismatch_is_rejected(make_geotiff) -> None:
    before = make_geotiff('a.tif', ramp(4, 8, 8))
    after = make_geotiff('b.tif', ramp(3, 8, 8))
    with pytest.raises(InputError, match=r'b\.tif: has 3 band\(s\) but .*a\.tif has 4'):
        align_pair(before, after)


def test_incompatible_dtypes_are_rejected_but_float_widths_mix(make_geotiff) -> None:
    before = make_geotiff('a.tif', ramp(1, 8, 8, 'uint8'))
    after = make_geotiff('b.tif', ramp(1, 8, 8, 'uint16'))
    with pytest.raises(InputError, match=r'b\.tif: data type uint16 does not match uint8'):
        align_pair(before, after)
    f32 = make_geotiff('c.tif', ramp(1, 8, 8, 'float32'))
    f64 = make_geotiff('d.tif', ramp(1, 8, 8, 'float64'))
    with align_pair(f32, f64) as pair:
        a, b, _ = pair.read(out_dtype='float64')
    np.testing.assert_array_equal(a, b)


def test_missing_file_is_named(make_geotiff, tmp_path: Path) -> None:
    before = make_geotiff('a.tif', ramp(1, 8, 8))
    with pytest.raises(InputError, match=r'missing\.tif: no such file'):
        align_pair(before, tmp_path / 'missing.tif')


def test_pairs_without_georeferencing(tmp_path: Path) -> None:
    a = write_png(tmp_path / 'a.png', ramp(3, 8, 10, 'uint8'))
    b = write_png(tmp_path / 'b.png', ramp(3, 8, 10, 'uint8'))
    with pytest.raises(InputError, match=r'a\.png: raster has no CRS'):
        align_pair(a, b)
    with align_pair(a, b, allow_ungeoreferenced=True) as pair:
        assert pair.crs is None and (pair.width, pair.height) == (10, 8)
        x, y, valid = pair.read()
    np.testing.assert_array_equal(x, y)
    assert valid.all()
    small = write_png(tmp_path / 'small.png', ramp(3, 8, 9, 'uint8'))
    with pytest.raises(InputError, match=r'small\.png: is 9 x 8 px but .* is 10 x 8 px'):
        align_pair(a, small, allow_ungeoreferenced=True)


# Pair lists -------------------------------------------------------------------------------


def test_csv_pairs_resolve_relative_paths_and_name_pairs(tmp_path: Path) -> None:
    (tmp_path / 'pairs.csv').write_text(
        'Before,after,name\nx/2012.tif,x/2016.tif,\n/abs/a.tif,/abs/b.tif,custom\n'
    )
    records = read_pairs(tmp_path / 'pairs.csv')
    assert [r.name for r in records] == ['2012_2016', 'custom']
    assert records[0].before == tmp_path / 'x' / '2012.tif'
    assert records[1].after == Path('/abs/b.tif')
    assert records[0].source == f'{tmp_path / "pairs.csv"}:2'
    with pytest.raises(InputError, match=r'pairs\.csv:2: before file .*2012\.tif not found'):
        records[0].check_files()


def test_csv_errors(tmp_path: Path) -> None:
    csv = tmp_path / 'pairs.csv'
    csv.write_text('before,later\na.tif,b.tif\n')
    missing = r'pairs\.csv: missing column\(s\) after \(header: before,later\)'
    with pytest.raises(InputError, match=missing):
        read_pairs(csv)
    csv.write_text('before,after\na.tif,b.tif\n')
    with pytest.raises(InputError, match=r'missing column\(s\) label'):
        read_pairs(csv, labels=True)
    csv.write_text('before,after\na.tif,\n')
    with pytest.raises(InputError, match=r"pairs\.csv:2: empty 'after' cell"):
        read_pairs(csv)
    csv.write_text('before,after,name\na.tif,b.tif,x\nc.tif,d.tif,x\n')
    with pytest.raises(InputError, match=r"pairs\.csv:3: duplicate pair name 'x'"):
        read_pairs(csv)
    csv.write_text('before,after\n')
    with pytest.raises(InputError, match='lists no pairs'):
        read_pairs(csv)


def test_folder_layouts(tmp_path: Path) -> None:
    image = ramp(3, 4, 4, 'uint8')
    for sub in ('A', 'B', 'label'):
        (tmp_path / 'levir' / sub).mkdir(parents=True)
        for stem in ('t1', 't2'):
            write_png(tmp_path / 'levir' / sub / f'{stem}.png', image)
    records = read_pairs(tmp_path / 'levir', labels=True)
    found = [(r.name, *(p.parent.name for p in (r.before, r.after, r.label))) for r in records]
    assert found == [('t1', 'A', 'B', 'label'), ('t2', 'A', 'B', 'label')]
    for folder in ('Szada/1', 'Szada/2'):
        for stem in ('im1', 'im2', 'gt'):
            (tmp_path / 'sztaki' / folder).mkdir(parents=True, exist_ok=True)
            write_png(tmp_path / 'sztaki' / folder / f'{stem}.png', image)
    records = read_pairs(tmp_path / 'sztaki', labels=True)
    assert [r.name for r in records] == ['Szada_1', 'Szada_2']
    assert records[0].label == tmp_path / 'sztaki' / 'Szada' / '1' / 'gt.png'
    (tmp_path / 'other').mkdir()
    with pytest.raises(InputError, match='LEVIR-CD layout'):
        read_pairs(tmp_path / 'other')
    (tmp_path / 'levir' / 'B' / 't2.png').unlink()
    with pytest.raises(InputError, match=r't2\.png: has no counterpart'):
        read_pairs(tmp_path / 'levir')


# Training patches ---------------------------------------------------------------------------


def labelled_png_pair(tmp_path: Path, gt: np.ndarray) -> Path:
    height, width = gt.shape
    before = np.zeros((3, height, width), np.uint8)
    after = before.copy()
    after[:, gt > 127] = 200
    folder = tmp_path / 'pairs' / 'p1'
    folder.mkdir(parents=True)
    write_png(folder / 'im1.png', before)
    write_png(folder / 'im2.png', after)
    write_png(folder / 'gt.png', gt)
    return tmp_path / 'pairs'


def test_change_patches_from_png_pairs(tmp_path: Path) -> None:
    gt = np.zeros((20, 24), np.uint8)
    gt[5:10, 6:12] = 255
    gt[0, 0] = 213  # a stray value above 127 is change
    regions = label_regions(read_pairs(labelled_png_pair(tmp_path, gt), labels=True))
    assert regions[0].threshold == 128 and regions[0].rows == (0, 20)
    grid = ChangePatches(regions, 16, [1, 2, 3])
    assert len(grid) == 4  # 2 x 2 patches of 16 px over 20 x 24 px, the last ones padded
    sample = grid[0]
    assert sample['image'].shape == (2, 3, 16, 16) and sample['image'].dtype == torch.float32
    assert sample['mask'].shape == (1, 16, 16) and sample['mask'].dtype == torch.int64
    np.testing.assert_array_equal(sample['mask'][0].numpy(), (gt[:16, :16] > 127).astype(np.int64))
    torch.testing.assert_close(sample['image'][0], torch.zeros(3, 16, 16))
    torch.testing.assert_close(sample['image'][1][:, 5, 6], torch.full((3,), 200.0))
    assert sample['valid'].all()
    padded = grid[3]['mask'][0]  # rows 16..19, columns 16..23 exist
    assert (padded[4:] == IGNORE_INDEX).all() and (padded[:, 8:] == IGNORE_INDEX).all()
    assert (padded[:4, :8] != IGNORE_INDEX).all()
    assert grid[3]['valid'].sum() == 4 * 8
    # Every labelled pixel is seen exactly once by the grid.
    seen = sum(int((grid[i]['mask'] != IGNORE_INDEX).sum()) for i in range(len(grid)))
    assert seen == gt.size
    random = ChangePatches(regions, 16, [1, 2, 3], length=5)
    assert len(random) == 5 and random[0]['image'].shape == (2, 3, 16, 16)


def test_georeferenced_label_and_nodata_are_ignored(make_geotiff) -> None:
    image = np.full((1, 8, 8), 10, np.uint8)
    image[0, 2, 2] = 0
    before = make_geotiff('a.tif', image, transform=at(0, 0), nodata=0)
    make_geotiff('b.tif', np.full((1, 8, 8), 20, np.uint8), transform=at(0, 0), nodata=0)
    label = np.zeros((1, 4, 4), np.uint8)
    label[0, 0, 0] = 1  # a 4 m label pixel: 2 x 2 pixels of the pair
    make_geotiff('gt.tif', label, transform=at(0, 0, res=4.0))
    csv = before.parent / 'pairs.csv'
    csv.write_text('before,after,label\na.tif,b.tif,gt.tif\n')
    regions = label_regions(read_pairs(csv, labels=True))
    assert regions[0].threshold == 1
    sample = ChangePatches(regions, 8, [1])[0]
    mask = sample['mask'][0].numpy()
    expected = np.zeros((8, 8), np.int64)
    expected[:2, :2] = 1
    expected[2, 2] = IGNORE_INDEX
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(sample['valid'].numpy(), expected != IGNORE_INDEX)


def test_label_regions_name_the_bad_pair(make_geotiff) -> None:
    make_geotiff('a.tif', ramp(3, 8, 8))
    make_geotiff('b.tif', ramp(4, 8, 8))
    csv = make_geotiff('a.tif', ramp(3, 8, 8)).parent / 'pairs.csv'
    csv.write_text('before,after,label\na.tif,b.tif,a.tif\n')
    with pytest.raises(InputError, match=r'pairs\.csv:2: .*b\.tif: has 4 band\(s\)'):
        label_regions(read_pairs(csv, labels=True))


def test_change_threshold_for_binary_masks(make_geotiff) -> None:
    assert change_threshold(make_geotiff('01.tif', np.eye(4, dtype=np.uint8))) == 1
    assert change_threshold(make_geotiff('255.tif', 255 * np.eye(4, dtype=np.uint8))) == 128


def test_split_regions(tmp_path: Path) -> None:
    gt = np.zeros((20, 24), np.uint8)
    regions = label_regions(read_pairs(labelled_png_pair(tmp_path, gt), labels=True))
    train, val = split_regions(regions, 0.25)
    assert (train[0].rows, val[0].rows) == ((0, 15), (15, 20))
    many = [regions[0]] * 5
    train, val = split_regions(many, 0.2, seed=1)
    assert (len(train), len(val)) == (4, 1)
    with pytest.raises(InputError, match='--val-fraction'):
        split_regions(regions, 1.5)


def test_pair_statistics_cover_both_images(tmp_path: Path) -> None:
    gt = np.zeros((20, 24), np.uint8)
    gt[:10] = 255  # the after image is 200 there, 0 elsewhere; the before image is 0
    record = read_pairs(labelled_png_pair(tmp_path, gt), labels=True)[0]
    with align_pair(record.before, record.after, allow_ungeoreferenced=True) as pair:
        stats = pair_statistics(pair, [1, 2, 3])
        np.testing.assert_allclose(stats.mean, [50.0] * 3)
        assert (stats.count == 2 * gt.size).all()
        bottom = pair_statistics(pair, [2], rows=(10, 20))
    np.testing.assert_allclose(bottom.mean, [0.0])
    assert bottom.count.tolist() == [2 * 10 * 24]
