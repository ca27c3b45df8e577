"""The data layer on a grid: label realignment, alpha bands, odd paths, units, device reads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import timm
import torch
from pyproj import CRS
from rasterio.transform import from_origin
from rasterio.warp import calculate_default_transform, reproject

from geocmid.datasets.geo_raster import restore_on_device, valid_from_sentinel
from geocmid.datasets.labels import VectorLabels
from geocmid.datasets.pairs import align_pair
from geocmid.errors import InputError
from geocmid.io.cards import ModelCard, read_card, write_card
from geocmid.models.weights import save_encoder
from geocmid.raster.files import open_raster
from geocmid.raster.normalise import normalise, normalise_window
from geocmid.raster.units import crs_units_to_metres, metres_per_unit, metres_to_crs_units
from geocmid_cli.main import main

UTM = CRS.from_epsg(32631)
ORIGIN = (500000.0, 4000000.0)
GRID = from_origin(*ORIGIN, 1.0, 1.0)


def test_empty_geometry_does_not_shift_labels(tmp_path: Path) -> None:
    # The middle feature has no geometry: it is dropped, and `tree` must keep its polygon.
    x0, y0 = ORIGIN
    shapes = [shapely.box(x0, y0 - 2, x0 + 2, y0), None, shapely.box(x0 + 4, y0 - 2, x0 + 6, y0)]
    path = tmp_path / 'labels.gpkg'
    frame = gpd.GeoDataFrame({'kind': ['road', 'grass', 'tree']}, geometry=shapes, crs=UTM)
    frame.to_file(path)

    labels = VectorLabels(
        path, UTM, label_field='kind', class_names=['bg', 'road', 'grass', 'tree']
    )
    mask = labels.read(GRID, (2, 8))

    np.testing.assert_array_equal(mask[0], [1, 1, 0, 0, 3, 3, 0, 0])
    assert len(labels.shapes) == 2
    assert labels.shapes.geometry.notna().all()


def write_encoder(folder: Path, bands: int) -> Path:
    """A random resnet18 encoder with a card taking ``bands`` bands."""
    torch.manual_seed(0)
    encoder = timm.create_model('resnet18', in_chans=bands, num_classes=0)
    path = save_encoder(folder / 'encoder.pt', encoder.state_dict())
    card = ModelCard(
        method='random', backbone='resnet18', bands=[f'b{i}' for i in range(1, bands + 1)],
        band_indices=list(range(1, bands + 1)), mean=[100.0] * bands, std=[50.0] * bands,
        patch_size=64,
    )  # fmt: skip
    write_card(path, card)
    return path


def write_rgba(path: Path, data: np.ndarray, alpha: np.ndarray, **profile: object) -> Path:
    """A 3-band uint8 GeoTIFF with a declared alpha band."""
    profile = {
        'driver': 'GTiff', 'width': data.shape[2], 'height': data.shape[1], 'count': 4,
        'dtype': 'uint8', 'crs': UTM, 'transform': from_origin(*ORIGIN, 2.0, 2.0),
        'photometric': 'RGB', 'alpha': 'YES', **profile,
    }  # fmt: skip
    with rasterio.open(path, 'w', **profile) as dst:
        dst.write(np.concatenate([data, alpha[None]]))
    return path


def reproject_to(path: Path, out: Path, crs: str) -> Path:
    """``path`` warped to ``crs`` (every band, nearest), alpha band kept."""
    with rasterio.open(path) as src:
        transform, width, height = calculate_default_transform(
            src.crs, crs, src.width, src.height, *src.bounds
        )
        profile = src.profile | {'crs': crs, 'transform': transform, 'width': width,
                                 'height': height}  # fmt: skip
        with rasterio.open(out, 'w', **profile) as dst:
            for band in range(1, src.count + 1):
                reproject(rasterio.band(src, band), rasterio.band(dst, band))
    return out


@pytest.mark.parametrize('crs', [None, 'EPSG:3857'])
def test_change_with_an_alpha_band_in_the_after_image(
    make_geotiff, tmp_path: Path, crs: str | None, capsys
) -> None:
    rng = np.random.default_rng(0)
    before = rng.integers(60, 90, (3, 64, 80)).astype(np.uint8)
    alpha = np.full((64, 80), 255, dtype=np.uint8)
    alpha[:, :16] = 0  # the after image has no data in its 16 left columns
    before_path = make_geotiff('before.tif', before, transform=from_origin(*ORIGIN, 2.0, 2.0))
    after_path = write_rgba(tmp_path / 'after.tif', before, alpha)
    if crs is not None:
        after_path = reproject_to(after_path, tmp_path / 'after_other.tif', crs)

    with align_pair(before_path, after_path) as pair:
        assert pair.count == 3 and pair.warped == (crs is not None)
        _, after, valid = pair.read()
    assert after.shape == (3, 64, 80)
    assert not valid[:, :15].any()  # alpha 0 is invalid (one column of slack for the warp)
    assert valid[2:-2, 18:-2].all()

    encoder = write_encoder(tmp_path, 3)
    out = tmp_path / 'out.gpkg'
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in ['change', before_path, after_path, '-o', out, '--encoder', encoder,
                               '--raster', '--threshold', '0.05', '--quiet']])  # fmt: skip
    assert exit_info.value.code == 0, capsys.readouterr()
    with rasterio.open(tmp_path / 'out_change.tif') as src:
        assert src.crs == UTM and src.transform == from_origin(*ORIGIN, 2.0, 2.0)
        masked = src.read(1, masked=True)
    assert masked.mask[:, :15].all() and not masked.mask[2:-2, 18:-2].any()


def test_pair_of_alpha_images_in_two_crss(tmp_path: Path) -> None:
    # Both images RGBA: the warped one keeps its own alpha band (adding one is a GDAL error).
    data = np.random.default_rng(1).integers(1, 255, (3, 64, 80)).astype(np.uint8)
    alpha = np.full((64, 80), 255, dtype=np.uint8)
    alpha[:8] = 0
    before = write_rgba(tmp_path / 'before.tif', data, np.full((64, 80), 255, dtype=np.uint8))
    after = reproject_to(
        write_rgba(tmp_path / 'a.tif', data, alpha), tmp_path / 'b.tif', 'EPSG:3857'
    )

    with align_pair(before, after) as pair:
        first, second, valid = pair.read()
    assert pair.count == 3 and first.shape == second.shape == (3, 64, 80)
    assert not valid[:7].any() and valid[10:-2, 2:-2].all()
    np.testing.assert_array_equal(first, data)


def test_non_utf8_file_name_is_an_input_error(make_geotiff, tmp_path: Path, capsys) -> None:
    source = make_geotiff('scene.tif', np.ones((1, 8, 8), dtype=np.uint8))
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b'/sc\xffne.tif'))
    shutil.copy(source, odd)

    with pytest.raises(InputError, match=r'sc\\xffne\.tif: file name is not valid UTF-8'):
        open_raster(odd)
    with pytest.raises(SystemExit) as exit_info:
        main(['info', os.fspath(odd)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and 'not valid UTF-8' in err


def test_ground_resolution_in_metres_for_every_crs() -> None:
    # One conversion: metres in projected units, feet converted, degrees by the geodesic.
    assert metres_per_unit('EPSG:32631', (0, 0, 1, 1)) == 1.0
    assert metres_per_unit('EPSG:2263', (0, 0, 1, 1)) == pytest.approx(0.3048006096)  # US ft
    at_equator = metres_per_unit('EPSG:4326', (0.0, -1.0, 1.0, 1.0))
    assert at_equator == pytest.approx(110_574, rel=1e-3)  # a degree of latitude there
    assert metres_to_crs_units(at_equator, 'EPSG:4326', (0.0, -1.0, 1.0, 1.0)) == 1.0
    assert crs_units_to_metres(2.0, 'EPSG:2263', (0, 0, 1, 1)) == pytest.approx(0.6096012)


def test_model_trained_on_degrees_segments_at_model_resolution(
    make_geotiff, tmp_path: Path, capsys
) -> None:
    # A model trained on EPSG:4326 rasters records its resolution in metres, so that
    # `segment --resolution model` can use it.
    res = 1e-5  # degrees, about 1.1 m
    transform = from_origin(3.0, 45.0, res, res)
    rng = np.random.default_rng(0)
    image = rng.integers(50, 60, size=(2, 64, 64)).astype(np.uint16)
    image[:, 8:32, 8:32] += 100
    raster = make_geotiff('scene.tif', image, crs='EPSG:4326', transform=transform)
    labels = tmp_path / 'labels.gpkg'
    roof = shapely.box(3.0 + 8 * res, 45.0 - 32 * res, 3.0 + 32 * res, 45.0 - 8 * res)
    gpd.GeoDataFrame({'kind': ['roof']}, geometry=[roof], crs='EPSG:4326').to_file(labels)
    run_dir = tmp_path / 'run'

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in ['train', 'segment', '--rasters', raster, '--labels', labels,
                               '-o', run_dir, '--label-field', 'kind', '--max-steps', '1',
                               '--batch-size', '2', '--patch-size', '32', '--quiet']])  # fmt: skip
    assert exit_info.value.code == 0, capsys.readouterr().err
    card = read_card(run_dir)
    metres = res * metres_per_unit('EPSG:4326', (3.0, 45.0 - 64 * res, 3.0 + 64 * res, 45.0))
    assert card.resolution == pytest.approx(metres, rel=1e-6)
    assert 1.0 < card.resolution < 1.2

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in ['segment', raster, '--model', run_dir, '-o', tmp_path / 'out.gpkg',
                               '--resolution', 'model', '--quiet']])  # fmt: skip
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert (tmp_path / 'out.gpkg').exists()


def test_restore_on_device_rebuilds_validity_and_ignores_labels() -> None:
    image = torch.tensor([[[[0, 5], [7, 9]], [[1, 0], [3, 4]]]], dtype=torch.uint8)  # (1, 2, 2, 2)
    mask = torch.ones(1, 2, 2, dtype=torch.long)
    batch = restore_on_device({'image': image, 'mask': mask}, sentinel=0, ignore_index=255)

    assert batch['image'].dtype == torch.float32
    assert batch['valid'].tolist() == [[[False, False], [True, True]]]
    assert batch['mask'].tolist() == [[[255, 255], [1, 1]]]
    # NaN is never data, whatever the sentinel.
    floats = torch.tensor([[[[1.0, float('nan')], [-9.0, 2.0]]]])
    assert valid_from_sentinel(floats, -9.0).tolist() == [[[True, False], [False, True]]]


def test_one_normalisation_for_batches_and_windows() -> None:
    data = np.array([[[10, 20], [30, 0]], [[5, 5], [5, 0]]], dtype=np.uint16)
    valid = data.min(axis=0) != 0
    mean, std = np.array([20.0, 5.0]), np.array([10.0, 2.0])

    image, mask = normalise_window(data, valid, mean, std, (3, 3))

    expected = normalise(
        torch.from_numpy(data.astype(np.int32)), torch.tensor(mean), torch.tensor(std),
        torch.from_numpy(valid),
    )  # fmt: skip
    np.testing.assert_allclose(image[:, :2, :2], expected.numpy())
    np.testing.assert_allclose(image[0, :2, :2], [[-1.0, 0.0], [1.0, 0.0]])
    assert (image[:, 2] == 0).all() and (image[:, :, 2] == 0).all()
    assert mask.tolist() == [[True, True, False], [True, False, False], [False, False, False]]
