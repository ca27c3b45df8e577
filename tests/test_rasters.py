"""Finding, opening and validating rasters; band selection; validity; `info` descriptions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import write_geotiff
from rasterio.crs import CRS
from rasterio.transform import from_origin

from geocmid.errors import InputError
from geocmid.raster.files import (
    ValidityRule,
    check_bands,
    crs_name,
    describe_raster,
    describe_rasters,
    find_rasters,
    format_info,
    open_raster,
    raster_band_stats,
    require_georeferencing,
)


def ramp(bands: int = 3, height: int = 16, width: int = 20, dtype: str = 'uint16') -> np.ndarray:
    """Distinct values everywhere: band b, row r, col c holds 1000 b + 20 r + c + 1."""
    b, r, c = np.mgrid[0:bands, 0:height, 0:width]
    return (1000 * b + width * r + c + 1).astype(dtype)


def truncated_copy(source: Path, target: Path, keep: float = 0.6) -> Path:
    """The first ``keep`` share of ``source``'s bytes: the header survives, blocks do not."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


# -- find_rasters ------------------------------------------------------------------------


def test_find_rasters_searches_folders_recursively_and_skips_non_rasters(tmp_path: Path) -> None:
    a = write_geotiff(tmp_path / 'a.tif', ramp())
    b = write_geotiff(tmp_path / 'deep' / 'er' / 'B.TIFF', ramp())
    (tmp_path / 'notes.txt').write_text('not a raster')
    (tmp_path / 'a.tif.aux.xml').write_text('<PAMDataset/>')
    write_geotiff(tmp_path / '.hidden' / 'c.tif', ramp())  # e.g. an interrupted atomic write
    write_geotiff(tmp_path / '.d.partial.tif', ramp())
    assert find_rasters(tmp_path) == sorted([a, b])


def test_find_rasters_takes_named_files_whatever_their_extension(tmp_path: Path) -> None:
    envi = write_geotiff(tmp_path / 'scene.dat', ramp())
    folder = tmp_path / 'f'
    inside = write_geotiff(folder / 'x.tif', ramp())
    assert find_rasters([envi, folder, inside]) == sorted([envi, inside])


def test_find_rasters_rejects_missing_paths_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r'nope\.tif: no such file or folder'):
        find_rasters(tmp_path / 'nope.tif')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'readme.md').write_text('#')
    with pytest.raises(InputError, match=r'empty: no rasters found in folder'):
        find_rasters(tmp_path / 'empty')


# -- open_raster -------------------------------------------------------------------------


def test_open_raster_rejects_text_renamed_tif(tmp_path: Path) -> None:
    fake = tmp_path / 'fake.tif'
    fake.write_text('hello, I am not a GeoTIFF')
    with pytest.raises(InputError) as error:
        open_raster(fake)
    message = str(error.value)
    assert message.startswith(f'{fake}: not a readable raster')
    assert '\n' not in message


def test_open_raster_rejects_truncated_geotiff(tmp_path: Path) -> None:
    # GDAL writes the header first and the tiles after it, so the truncated file still opens.
    good = write_geotiff(tmp_path / 'good.tif', ramp(4, 512, 512, 'uint8'), tiled=True)
    bad = truncated_copy(good, tmp_path / 'bad.tif')
    with rasterio.open(bad) as src:
        assert src.shape == (512, 512)
    with pytest.raises(InputError, match=r'bad\.tif: corrupt or truncated raster'):
        open_raster(bad)
    open_raster(good).close()


def test_open_raster_rejects_complex_data(tmp_path: Path) -> None:
    path = write_geotiff(tmp_path / 'sar.tif', (ramp(1) + 1j).astype('complex64'))
    with pytest.raises(InputError, match='complex-valued'):
        open_raster(path)


@pytest.mark.filterwarnings('ignore::rasterio.errors.NotGeoreferencedWarning')
def test_require_georeferencing(tmp_path: Path) -> None:
    with open_raster(write_geotiff(tmp_path / 'nocrs.tif', ramp(), crs=None)) as src:
        with pytest.raises(InputError, match=r'nocrs\.tif: raster has no CRS'):
            require_georeferencing(src, src.name)
    with rasterio.open(tmp_path / 'plain.tif', 'w', driver='GTiff', width=4, height=4, count=1,
                       dtype='uint8', crs='EPSG:32631') as dst:  # fmt: skip
        dst.write(np.ones((1, 4, 4), 'uint8'))
    with open_raster(tmp_path / 'plain.tif') as src:
        with pytest.raises(InputError, match='no geotransform'):
            require_georeferencing(src, src.name)


# -- check_bands -------------------------------------------------------------------------


def test_check_bands_by_index_and_name() -> None:
    names = ('Red', 'green', None, 'NIR')
    assert check_bands('x.tif', 4, None, names) == (1, 2, 3, 4)
    assert check_bands('x.tif', 4, [4, '1'], names) == (4, 1)
    assert check_bands('x.tif', 4, ['nir', 'Red', 'green'], names) == (4, 1, 2)


@pytest.mark.parametrize(
    ('bands', 'problem'),
    [
        ([5], r'x\.tif: band 5 out of range: the raster has 4 band\(s\)'),
        ([0], 'band 0 out of range'),
        (['swir'], r"x\.tif: no band named 'swir' \(band names: 1 'Red', 2 'green', 4 'NIR'\)"),
        ([], 'empty band selection'),
    ],
)
def test_check_bands_errors_name_the_file(bands: list[int | str], problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        check_bands('x.tif', 4, bands, ('Red', 'green', None, 'NIR'))


# -- crs_name ----------------------------------------------------------------------------


def test_crs_name() -> None:
    assert crs_name(CRS.from_epsg(32631)) == 'EPSG:32631'
    custom = CRS.from_proj4('+proj=aea +lat_1=29.5 +lat_2=45.5 +lon_0=-96 +datum=WGS84 +units=m')
    assert crs_name(custom) == 'unknown'  # proj4 strings carry no name; GDAL calls it 'unknown'
    named = CRS.from_wkt(
        'PROJCS["My Albers",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,'
        '298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],'
        'PROJECTION["Albers_Conic_Equal_Area"],PARAMETER["standard_parallel_1",29.5],'
        'PARAMETER["standard_parallel_2",45.5],PARAMETER["latitude_of_center",23],'
        'PARAMETER["longitude_of_center",-96],PARAMETER["false_easting",0],'
        'PARAMETER["false_northing",0],UNIT["metre",1]]'
    )
    assert crs_name(named) == 'My Albers'
    assert crs_name(None) == 'none'


# -- validity ----------------------------------------------------------------------------


def test_validity_from_nodata_requires_every_band(tmp_path: Path) -> None:
    data = ramp(3, 8, 8)
    data[0, 0, 0] = 0  # one band missing: the pixel is invalid (docs/data.md#validity)
    data[:, 1, 1] = 0
    path = write_geotiff(tmp_path / 'n.tif', data, nodata=0)
    with open_raster(path) as src:
        rule = ValidityRule.of(src, (1, 2, 3))
        assert rule == ValidityRule(nodata=0)
        valid = rule.valid(src, (1, 2, 3))
    expected = np.ones((8, 8), bool)
    expected[0, 0] = expected[1, 1] = False
    np.testing.assert_array_equal(valid, expected)
    # Only band 2 selected: band 1's hole no longer matters.
    with open_raster(path) as src:
        assert not rule.valid(src, (2,))[1, 1]
        assert rule.valid(src, (2,))[0, 0]


def test_validity_nan_nodata_and_override(tmp_path: Path) -> None:
    data = ramp(2, 4, 4, 'float32')
    data[1, 2, 3] = np.nan
    path = write_geotiff(tmp_path / 'f.tif', data, nodata=math.nan)
    with open_raster(path) as src:
        valid = ValidityRule.of(src, (1, 2)).valid(src, (1, 2))
        assert valid.sum() == 15 and not valid[2, 3]
        # An override replaces the file's nodata value, but NaN is never data.
        override = ValidityRule.of(src, (1, 2), nodata=float(data[0, 0, 0]))
        assert override.nodata == 1.0
        valid = override.valid(src, (1, 2))
        assert valid.sum() == 14 and not valid[0, 0] and not valid[2, 3]


def test_validity_from_internal_mask_and_alpha_band(tmp_path: Path) -> None:
    mask = np.full((8, 8), 255, 'uint8')
    mask[:, :3] = 0
    masked = tmp_path / 'masked.tif'
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(masked, 'w', driver='GTiff', width=8, height=8, count=2,
                           dtype='uint16', crs='EPSG:32631',
                           transform=from_origin(0, 8, 1, 1)) as dst:  # fmt: skip
            dst.write(ramp(2, 8, 8))
            dst.write_mask(mask)
    with open_raster(masked) as src:
        rule = ValidityRule.of(src, (1, 2))
        assert rule.masks and rule.per_dataset
        np.testing.assert_array_equal(rule.valid(src, (1, 2)), mask > 0)
    # A 4-band uint8 GeoTIFF written without photometric becomes RGBA: band 4 is alpha.
    rgba = ramp(4, 8, 8, 'uint8')
    rgba[3] = 255
    rgba[3, :2] = 0
    with open_raster(write_geotiff(tmp_path / 'rgba.tif', rgba)) as src:
        assert ValidityRule.of(src, (1, 2, 3)).valid(src, (1, 2, 3)).sum() == 48
    with open_raster(write_geotiff(tmp_path / 'plain.tif', ramp())) as src:
        rule = ValidityRule.of(src, (1, 2, 3))
        assert rule == ValidityRule()
        assert rule.valid(src, (1,)).all()


def test_raster_band_stats_exclude_invalid_pixels(tmp_path: Path) -> None:
    data = ramp(2, 30, 40)
    data[:, :5] = 7
    path = write_geotiff(tmp_path / 's.tif', data, nodata=7)
    with open_raster(path) as src:
        stats = raster_band_stats(src, (2, 1), ValidityRule.of(src, (2, 1)), 10**6,
                                  np.random.default_rng(0))  # fmt: skip
    kept = data[:, 5:].reshape(2, -1).astype(np.float64)
    assert stats.exact
    np.testing.assert_allclose(stats.mean, kept.mean(axis=1)[::-1])
    np.testing.assert_allclose(stats.std, kept.std(axis=1)[::-1])
    np.testing.assert_array_equal(stats.minimum, kept.min(axis=1)[::-1])


# -- describe (geocmid info) -------------------------------------------------------------


def test_describe_raster_reports_everything(tmp_path: Path) -> None:
    path = write_geotiff(
        tmp_path / 'd.tif', ramp(), transform=from_origin(500000.0, 4000000.0, 0.5, 0.5), nodata=0
    )
    with rasterio.open(path, 'r+') as dst:
        dst.set_band_description(1, 'red')
    info = describe_raster(path)
    assert (info.driver, info.width, info.height, info.count) == ('GTiff', 20, 16, 3)
    assert info.dtypes == ('uint16',) * 3
    assert info.crs == 'EPSG:32631'
    assert info.res == (0.5, 0.5)
    assert info.bounds == (500000.0, 3999992.0, 500010.0, 4000000.0)
    assert info.nodata == 0
    assert info.descriptions == ('red', None, None)
    assert info.stats is None
    text = format_info(info)
    expected = ['GTiff', '20 x 16 px, 3 band(s), uint16', 'EPSG:32631', '0.5 x 0.5',
                'top 4000000', 'nodata      0 (valid pixels: nodata value)', 'red']  # fmt: skip
    for part in expected:
        assert part in text


def test_describe_rasters_with_stats_and_without_crs(tmp_path: Path) -> None:
    data = ramp(2, 16, 20)
    write_geotiff(tmp_path / 'a.tif', data)
    write_geotiff(tmp_path / 'sub' / 'nocrs.tif', data, crs=None)
    infos = describe_rasters(tmp_path, stats=True)
    assert [info.path.name for info in infos] == ['a.tif', 'nocrs.tif']
    assert infos[1].crs == 'none'
    flat = data.reshape(2, -1).astype(np.float64)
    np.testing.assert_allclose(infos[0].stats.mean, flat.mean(axis=1))
    np.testing.assert_allclose(infos[0].stats.std, flat.std(axis=1))
    text = format_info(infos[0])
    assert f'mean {flat[0].mean():.6g}' in text and 'max 320' in text
    assert 'crs         none' in format_info(infos[1])


def test_describe_rasters_fails_on_any_corrupt_file(tmp_path: Path) -> None:
    write_geotiff(tmp_path / 'a.tif', ramp())
    (tmp_path / 'broken.tif').write_bytes(b'II*\x00garbage')
    with pytest.raises(InputError, match=r'broken\.tif: not a readable raster'):
        describe_rasters(tmp_path)
