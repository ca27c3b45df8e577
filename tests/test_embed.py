"""Tests for geocmid.inference.products.embed.

Window grid, exact footprints, nodata skipping, GeoParquet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import timm
import torch
from rasterio.transform import Affine, from_origin
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

from geocmid.errors import InputError
from geocmid.inference.products.embed import embed, grid_windows
from geocmid.io.cards import ModelCard, write_card
from geocmid.models.weights import save_encoder

MEAN, STD = [100.0, 110.0, 120.0], [50.0, 40.0, 30.0]


def noisy(bands: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 pixels in 1..255, so 0 is free to mark nodata."""
    return np.random.default_rng(seed).integers(1, 256, (bands, height, width), dtype=np.uint8)


@pytest.fixture
def encoder(tmp_path: Path) -> Path:
    """A resnet18 encoder.pt taking raster bands 1, 2, 3 on 32 px patches."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', in_chans=3, num_classes=0)
    path = save_encoder(tmp_path / 'encoder.pt', model.state_dict())
    write_card(
        path,
        ModelCard(
            method='test',
            backbone='resnet18',
            bands=['red', 'green', 'blue'],
            band_indices=[1, 2, 3],
            mean=MEAN,
            std=STD,
            patch_size=32,
        ),
    )
    return path


def test_grid_windows_cover_the_raster_from_the_origin() -> None:
    windows = grid_windows(70, 100, 32, 32)
    assert [(w.row_off, w.col_off) for w in windows[:4]] == [(0, 0), (0, 32), (0, 64), (0, 68)]
    assert {w.row_off for w in windows} == {0, 32, 38}
    assert all((w.width, w.height) == (32, 32) for w in windows)
    assert grid_windows(10, 20, 32, 16) == [Window(0, 0, 20, 10)]
    assert len(grid_windows(64, 64, 32, 16)) == 9


def test_footprints_match_the_windows_georeferencing(
    make_geotiff: Callable[..., Path], encoder: Path
) -> None:
    # A non-integral origin and 0.3 m pixels: float32 arithmetic would be off by centimetres.
    transform = from_origin(500000.123456, 4000000.654321, 0.3, 0.3)
    raster = make_geotiff('scene.tif', noisy(4, 70, 100), transform=transform, crs='EPSG:32631')
    table = embed(raster, encoder, tile=32)
    assert table.crs == rasterio.crs.CRS.from_epsg(32631)
    assert len(table) == 12  # 3 window rows x 4 window columns
    for row in table.itertuples():
        window = Window(row.col, row.row, row.width, row.height)
        left, bottom, right, top = window_bounds(window, transform)
        assert row.geometry.bounds == (left, bottom, right, top)
        expected = shapely.box(left, bottom, right, top)
        assert shapely.equals_exact(shapely.normalize(row.geometry), shapely.normalize(expected), 0)
        assert row.source == str(raster) and row.valid_fraction == 1.0


def test_footprints_follow_a_rotated_geotransform(
    make_geotiff: Callable[..., Path], encoder: Path
) -> None:
    transform = Affine(0.8, 0.3, 600000.5, 0.2, -0.9, 5000000.25)  # rotated and sheared
    raster = make_geotiff('rotated.tif', noisy(3, 40, 40), transform=transform)
    table = embed(raster, encoder, tile=32, stride=32)
    for row in table.itertuples():
        rows = [row.row, row.row, row.row + row.height, row.row + row.height]
        cols = [row.col, row.col + row.width, row.col + row.width, row.col]
        xs, ys = rasterio.transform.xy(transform, rows, cols, offset='ul')
        np.testing.assert_array_equal(
            np.asarray(row.geometry.exterior.coords)[:4], np.column_stack([xs, ys])
        )


def test_nodata_only_windows_are_skipped(make_geotiff: Callable[..., Path], encoder: Path) -> None:
    data = noisy(3, 64, 64)
    data[:, :32, :32] = 0  # the top-left window holds nodata only
    data[:, 32:48, 32:] = 0  # the bottom-right window is one half nodata
    raster = make_geotiff('holes.tif', data, nodata=0)
    table = embed(raster, encoder, tile=32)
    assert sorted(zip(table.row, table.col, strict=True)) == [(0, 32), (32, 0), (32, 32)]
    fractions = dict(zip(zip(table.row, table.col, strict=True), table.valid_fraction, strict=True))
    assert fractions[32, 32] == 0.5 and fractions[0, 32] == 1.0


def test_embedding_is_the_encoder_on_the_normalised_window(
    make_geotiff: Callable[..., Path], encoder: Path
) -> None:
    data = noisy(3, 48, 48, seed=5)
    data[:, 40:, :] = 0
    raster = make_geotiff('one.tif', data, nodata=0)
    table = embed(raster, encoder, tile=32, stride=16)
    row = table[(table.row == 16) & (table.col == 16)].iloc[0]
    # Reference: read the window with rasterio, normalise with the card, zero the nodata.
    with rasterio.open(raster) as src:
        pixels = src.read(window=Window(16, 16, 32, 32)).astype(np.float32)
    valid = (pixels != 0).all(axis=0)
    image = (pixels - np.float32(MEAN)[:, None, None]) / np.float32(STD)[:, None, None]
    image[:, ~valid] = 0
    model = timm.create_model('resnet18', in_chans=3, num_classes=0)
    model.load_state_dict(torch.load(encoder, weights_only=True))
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(image)[None])[0].numpy()
    np.testing.assert_allclose(row.embedding, expected, rtol=1e-4, atol=1e-5)
    assert row.embedding.dtype == np.float32 and row.embedding.shape == (512,)
    assert row.valid_fraction == pytest.approx(valid.mean())


def test_folder_of_rasters_and_band_override(
    make_geotiff: Callable[..., Path], encoder: Path, tmp_path: Path
) -> None:
    make_geotiff('tiles/a.tif', noisy(4, 32, 32, seed=1))
    make_geotiff('tiles/b.tif', noisy(4, 32, 64, seed=2))
    table = embed(tmp_path / 'tiles', encoder)  # tile defaults to the card's patch size
    assert table.groupby('source').size().to_dict() == {
        str(tmp_path / 'tiles' / 'a.tif'): 1,
        str(tmp_path / 'tiles' / 'b.tif'): 2,
    }
    reordered = embed(tmp_path / 'tiles' / 'a.tif', encoder, bands=[3, 2, 1])
    assert not np.allclose(reordered.embedding[0], table.embedding[0])


def test_random_encoder_needs_bands_and_tile(make_geotiff: Callable[..., Path]) -> None:
    raster = make_geotiff('r.tif', noisy(3, 32, 32))
    with pytest.raises(InputError, match='--bands'):
        embed(raster, 'random:resnet18', tile=32)
    with pytest.raises(InputError, match='--tile'):
        embed(raster, 'random:resnet18', bands=[1, 2, 3])
    table = embed(raster, 'random:resnet18', bands=[1, 2, 3], tile=16)
    again = embed(raster, 'random:resnet18', bands=[1, 2, 3], tile=16)
    assert len(table) == 4
    np.testing.assert_array_equal(np.stack(table.embedding), np.stack(again.embedding))


def test_bad_rasters_are_input_errors(
    make_geotiff: Callable[..., Path], encoder: Path, tmp_path: Path
) -> None:
    make_geotiff('mixed/a.tif', noisy(3, 32, 32), crs='EPSG:32631')
    make_geotiff('mixed/b.tif', noisy(3, 32, 32), crs='EPSG:32632')
    with pytest.raises(InputError, match='b.tif: CRS EPSG:32632 differs from EPSG:32631'):
        embed(tmp_path / 'mixed', encoder)
    no_crs = make_geotiff('nocrs.tif', noisy(3, 32, 32), crs=None)
    with pytest.raises(InputError, match='nocrs.tif: raster has no CRS'):
        embed(no_crs, encoder)
    two_bands = make_geotiff('two.tif', noisy(2, 32, 32))
    with pytest.raises(InputError, match='two.tif'):
        embed(two_bands, encoder)
    with pytest.raises(InputError, match='--stride'):
        embed(no_crs, encoder, stride=-1)


def test_geoparquet_round_trip(
    make_geotiff: Callable[..., Path], encoder: Path, tmp_path: Path
) -> None:
    pytest.importorskip('pyarrow', reason='pyarrow is needed to write GeoParquet')
    import geopandas as gpd

    raster = make_geotiff('scene.tif', noisy(3, 64, 64))
    out = tmp_path / 'embeddings.parquet'
    table = embed(raster, encoder, out)
    back = gpd.read_parquet(out)
    assert back.crs == table.crs and len(back) == 4
    assert back.geometry.equals(table.geometry)
    np.testing.assert_array_equal(np.stack(back.embedding), np.stack(table.embedding))
    with pytest.raises(InputError, match='exists; use --overwrite'):
        embed(raster, encoder, out)


def test_cli_bad_input_exits_2(
    make_geotiff: Callable[..., Path],
    encoder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from geocmid_cli.main import main

    raster = make_geotiff('nocrs.tif', noisy(3, 32, 32), crs=None)
    (tmp_path / 'e.parquet').write_bytes(b'')  # an existing output: refused before any work
    for args in (
        ['--rasters', str(tmp_path / 'missing'), '--encoder', str(encoder), '-o', 'x.parquet'],
        ['--rasters', str(raster), '--encoder', str(encoder), '-o', str(tmp_path / 'e.parquet')],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(['embed', *args])
        assert exit_info.value.code == 2, capsys.readouterr().err
    assert capsys.readouterr().err.count('error: ') == 2


def test_top_level_api_exposes_the_function() -> None:
    # The module is geocmid.inference.products.embed, not geocmid.embed: a submodule of that
    # name would shadow the function in the package namespace once imported.
    import geocmid
    import geocmid.inference.products.embed

    assert geocmid.embed is embed and callable(geocmid.embed)
    assert geocmid.evaluate_knn.__module__ == 'geocmid.evaluation.evaluate'
