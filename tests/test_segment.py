"""`geocmid.segment` and many scenes: outputs on the scene grid, nodata, bands, devices, errors."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from conftest import SAMPLE_DATA, write_geotiff
from rasterio.features import rasterize
from rasterio.windows import Window

import geocmid
from geocmid.errors import InputError
from geocmid.inference.bands import model_bands
from geocmid.inference.jobs import run_jobs
from geocmid.inference.outputs import (
    check_item_outputs,
    check_outputs,
    outputs_complete,
    provenance_tags,
    unique_names,
)
from geocmid.inference.products.segment import find_scenes, segment_scenes
from geocmid.inference.tiling import TileGrid
from geocmid.io.cards import ModelCard
from geocmid.io.cog import validate_cog, write_cog
from geocmid.runs.segmentation import SegmentConfig, train_segmentation

SPACENET = SAMPLE_DATA / 'spacenet' / 'buildings.tif'
LANDSAT = SAMPLE_DATA / 'landsat' / 'RGB.byte.tif'


def train(rasters: Path, labels: Path, output: Path) -> Path:
    """A resnet18 U-Net trained for 2 steps on 64 px patches: fast, and enough to run."""
    config = SegmentConfig(
        rasters=rasters, labels=labels, output=output, backbone='resnet18', patch_size=64,
        batch_size=2, max_steps=2, val_fraction=0.0, seed=0,
    )  # fmt: skip
    return train_segmentation(config, progress=False).run_dir


@pytest.fixture(scope='module')
def spacenet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-band building model (background, foreground) from the SpaceNet footprints."""
    output = tmp_path_factory.mktemp('spacenet') / 'run'
    return train(SPACENET, SAMPLE_DATA / 'spacenet' / 'buildings.geojson', output)


@pytest.fixture(scope='module')
def landsat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-band model on the Landsat corner whose class 1 wins everywhere.

    Its head's bias is pushed to class 1, so that the expected polygons are known exactly:
    the valid area of the scene, and nothing over its nodata collar.
    """
    folder = tmp_path_factory.mktemp('landsat')
    with rasterio.open(LANDSAT) as src:
        box = shapely.box(*rasterio.windows.bounds(Window(200, 150, 60, 60), src.transform))
        labels = folder / 'field.gpkg'
        gpd.GeoDataFrame(geometry=[box], crs=src.crs).to_file(labels)
    run_dir = train(LANDSAT, labels, folder / 'run')
    checkpoint = torch.load(run_dir / 'model.ckpt', weights_only=True)
    checkpoint['state_dict']['model.segmentation_head.0.bias'] = torch.tensor([-50.0, 50.0])
    torch.save(checkpoint, run_dir / 'model.ckpt')
    return run_dir


def crop(path: Path, target: Path, window: Window, **overrides: object) -> Path:
    """Write a window of ``path`` as a GeoTIFF on the same grid (a small, real test scene)."""
    with rasterio.open(path) as src:
        return write_geotiff(
            target, src.read(window=window), **{
                'crs': src.crs.to_string(), 'transform': src.window_transform(window),
                'nodata': src.nodata, **overrides,
            },
        )  # fmt: skip


def test_spacenet_tile_outputs_on_the_scene_grid(spacenet_run: Path, tmp_path: Path) -> None:
    vector, raster, probs = tmp_path / 'b.gpkg', tmp_path / 'b.tif', tmp_path / 'p.tif'

    result = geocmid.segment(
        SPACENET, spacenet_run, vector=vector, raster=raster, probabilities=probs, tile=128,
        probability_dtype='float32', progress=False,
    )  # fmt: skip

    assert result.paths == [vector, raster, probs] and all(p.is_file() for p in result.paths)
    assert validate_cog(raster) == [] and validate_cog(probs) == []
    assert result.stats.windows == len(TileGrid(512, 512, 128, 32))
    with rasterio.open(SPACENET) as scene, rasterio.open(raster) as out, rasterio.open(probs) as p:
        for written in (out, p):
            assert written.crs == scene.crs
            assert written.transform == scene.transform  # exactly: float64, never float32
            assert written.shape == scene.shape
        labels, probabilities = out.read(1), p.read()
        tags = out.tags()
        valid = scene.read_masks(1) > 0
    assert out.nodata == 255 and set(np.unique(labels[valid])) <= {0, 1}
    assert (labels[~valid] == 255).all()
    np.testing.assert_array_equal(labels[valid], probabilities.argmax(axis=0)[valid])
    checkpoint = (spacenet_run / 'model.ckpt').read_bytes()
    assert tags['MODEL_SHA256'] == hashlib.sha256(checkpoint).hexdigest()
    assert tags['SCENE'] == str(SPACENET) and tags['TILE'] == '128' and tags['OVERLAP'] == '32'
    assert tags['BLEND'] == 'cosine'

    assert pyogrio.list_layers(vector).tolist() == [['predictions', 'Polygon']]
    frame = gpd.read_file(vector)
    assert frame.crs == 'EPSG:32616'
    assert list(frame.columns) == ['class_id', 'class_name', 'area_m2', 'mean_score', 'geometry']
    assert len(frame) == len(result.polygons) > 0
    # Background is not polygonised; the polygons cover the class-1 pixels (0.25 m2 each).
    assert set(frame['class_id']) == {1} and set(frame['class_name']) == {'foreground'}
    assert frame['area_m2'].sum() == pytest.approx((labels == 1).sum() * 0.25)
    assert frame.geometry.is_valid.all()
    assert ((frame['mean_score'] >= 0.5) & (frame['mean_score'] <= 1.0)).all()


def test_model_resolution_runs_coarser_but_writes_the_scene_grid(
    spacenet_run: Path, tmp_path: Path
) -> None:
    scene = crop(SPACENET, tmp_path / 'scene.tif', Window(0, 0, 128, 96))
    raster = tmp_path / 'labels.tif'

    result = geocmid.segment(
        scene, spacenet_run, raster=raster, resolution=1.0, tile=64, progress=False
    )

    # The model saw a 64 x 48 grid of 1 m pixels ...
    assert result.stats.windows == len(TileGrid(48, 64, 64, 16))
    assert result.vector is None and result.raster == raster
    # ... and the labels come back on the 0.5 m scene grid.
    with rasterio.open(scene) as src, rasterio.open(raster) as out:
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
        assert out.tags()['RESOLUTION'] == '1.0'
    # The card's resolution is the scene's own 0.5 m: nothing to resample.
    same = geocmid.segment(scene, spacenet_run, resolution='model', tile=64, progress=False)
    assert same.stats.windows == len(TileGrid(96, 128, 64, 16))


def test_no_polygon_over_the_nodata_collar(landsat_run: Path, tmp_path: Path) -> None:
    raster = tmp_path / 'labels.tif'

    result = geocmid.segment(LANDSAT, landsat_run, raster=raster, tile=128, progress=False)

    with rasterio.open(LANDSAT) as src, rasterio.open(raster) as out:
        valid = (src.read() != 0).all(axis=0)  # nodata 0 in any band
        labels = out.read(1)
        covered = rasterize(
            result.polygons.geometry, out_shape=src.shape, transform=src.transform
        ).astype(bool)
    assert 0.3 < valid.mean() < 0.9  # the collar is there
    np.testing.assert_array_equal(labels, np.where(valid, 1, 255))
    np.testing.assert_array_equal(covered, valid)  # polygons: all valid pixels, no collar
    assert set(result.polygons['class_id']) == {1}


def test_all_nodata_scene_leaves_no_file(spacenet_run: Path, tmp_path: Path) -> None:
    scene = write_geotiff(tmp_path / 'in' / 'empty.tif', np.zeros((1, 64, 64), np.uint16), nodata=0)
    out = tmp_path / 'out'
    out.mkdir()

    with pytest.raises(InputError, match='no valid pixel'):
        geocmid.segment(scene, spacenet_run, vector=out / 'a.gpkg', raster=out / 'a.tif',
                        progress=False)  # fmt: skip

    assert list(out.iterdir()) == []  # no output, no partial file, no scratch folder


def card(band_indices: list[int]) -> ModelCard:
    names = [f'b{i}' for i in band_indices]
    return ModelCard(method='supervised', backbone='resnet18', bands=names,
                     band_indices=band_indices)  # fmt: skip


@pytest.mark.parametrize(
    ('indices', 'count', 'bands', 'expected'),
    [
        ([1, 2, 3], 3, None, (1, 2, 3)),
        ([1, 2, 3], 1, None, 'has 1 band(s) but the model takes 3 (b1, b2, b3)'),
        ([1, 2, 3], 4, None, 'has 4 band(s) but the model takes 3'),  # another sensor?
        ([1, 2, 3], 4, [3, 2, 1], (3, 2, 1)),  # picked explicitly
        ([1, 2, 3], 4, ['nir', 1, 2], (4, 1, 2)),  # by name
        ([1, 2, 3], 4, [1, 2], '2 band(s) selected but the model takes 3'),
        ([2, 4], 4, None, (2, 4)),  # trained on a subset: more bands are fine
        ([2, 4], 3, None, 'has 3 band(s) but the model takes 2 (b2, b4): band(s) 2, 4'),
    ],
)
def test_model_bands(
    indices: list[int], count: int, bands: list | None, expected: tuple | str
) -> None:
    names = ('red', 'green', 'blue', 'nir')[:count]
    if isinstance(expected, tuple):
        assert model_bands('s.tif', count, names, card(indices), bands) == expected
    else:
        with pytest.raises(InputError) as error:
            model_bands('s.tif', count, names, card(indices), bands)
        assert expected in str(error.value)


def test_check_outputs(tmp_path: Path) -> None:
    scene = write_geotiff(tmp_path / 'scene.tif', np.ones((1, 8, 8), np.uint8))
    (tmp_path / 'old.gpkg').write_text('old')

    assert check_outputs([tmp_path / 'a.gpkg', None], overwrite=False) == [tmp_path / 'a.gpkg']
    assert check_outputs([tmp_path / 'old.gpkg'], overwrite=True) == [tmp_path / 'old.gpkg']
    for paths, overwrite, problem in [
        ([tmp_path / 'old.gpkg'], False, 'exists; use --overwrite'),
        ([tmp_path / 'a.tif', tmp_path / '.' / 'a.tif'], False, 'is given for two outputs'),
        ([scene], True, 'is an input of this run'),
        ([tmp_path / 'missing' / 'a.tif'], False, 'does not exist'),
    ]:
        with pytest.raises(InputError, match=problem):
            check_outputs(paths, overwrite, inputs=[scene])


def test_outputs_complete_and_skipping(tmp_path: Path) -> None:
    plain = write_geotiff(tmp_path / 'plain.tif', np.ones((1, 8, 8), np.uint8), crs='EPSG:32631')
    cog = write_cog(plain, tmp_path / 'cog.tif', resampling='nearest')
    frame = gpd.GeoDataFrame({'class_id': [1]}, geometry=[shapely.box(0, 0, 1, 1)], crs=32631)
    frame.to_file(tmp_path / 'a.gpkg', layer='predictions')
    (tmp_path / 'broken.tif').write_bytes(cog.read_bytes()[:100])
    (tmp_path / 'broken.gpkg').write_text('not a GeoPackage')

    assert outputs_complete([tmp_path / 'a.gpkg', cog, None], 'predictions')
    for paths, layer in [
        ([tmp_path / 'a.gpkg', cog], 'changes'),  # another product's layer
        ([tmp_path / 'a.gpkg', plain], 'predictions'),  # a GeoTIFF but no COG
        ([tmp_path / 'a.gpkg', tmp_path / 'broken.tif'], 'predictions'),
        ([tmp_path / 'broken.gpkg', cog], 'predictions'),
        ([tmp_path / 'a.gpkg', tmp_path / 'missing.tif'], 'predictions'),
    ]:
        assert not outputs_complete(paths, layer)

    done = [tmp_path / 'a.gpkg', cog]
    assert check_item_outputs(done, 'predictions', overwrite=False, skip_existing=True)
    # Incomplete outputs are to be replaced when resuming, and refused otherwise.
    partial = [tmp_path / 'a.gpkg', plain]
    assert not check_item_outputs(partial, 'predictions', overwrite=False, skip_existing=True)
    with pytest.raises(InputError, match='exists; use --overwrite'):
        check_item_outputs(done, 'predictions', overwrite=False, skip_existing=False)


def test_unique_names() -> None:
    paths = ['a/s.tif', 'b/s.tif', 'c/t.tif', 's_2.tif', 'd/s.tif']
    assert unique_names(paths) == ['s', 's_2', 't', 's_2_2', 's_3']


def test_find_scenes(tmp_path: Path) -> None:
    for name in ('b.tif', 'a.tif', 'sub/c.tif'):
        write_geotiff(tmp_path / name, np.ones((1, 4, 4), np.uint8))
    (tmp_path / 'notes.txt').write_text('not a raster')

    assert find_scenes(str(tmp_path / '*.tif')) == [tmp_path / 'a.tif', tmp_path / 'b.tif']
    assert find_scenes([tmp_path / 'sub', tmp_path / 'a.tif']) == [
        tmp_path / 'a.tif', tmp_path / 'sub' / 'c.tif'
    ]  # fmt: skip
    with pytest.raises(InputError, match='matches no file'):
        find_scenes(str(tmp_path / '*.jp2'))
    with pytest.raises(InputError, match='no such file'):
        find_scenes(tmp_path / 'missing.tif')


def test_provenance_tags(tmp_path: Path) -> None:
    weights = tmp_path / 'model.ckpt'
    weights.write_bytes(b'weights')

    tags = provenance_tags(
        weights, inputs={'before': 'x.tif'}, tile=256, overlap=None, blend='linear',
        threshold=0.5, nodata=None,
    )  # fmt: skip

    assert tags == {
        'GEOCMID_VERSION': geocmid.__version__,
        'MODEL': str(weights),
        'MODEL_SHA256': hashlib.sha256(b'weights').hexdigest(),
        'BEFORE': str(Path('x.tif').absolute()),
        'TILE': '256',
        'OVERLAP': '64',
        'BLEND': 'linear',
        'THRESHOLD': '0.5',
    }


def tenfold(device: torch.device) -> Callable[[int], int]:
    def run(value: int) -> int:
        if value < 0:
            raise InputError(None, 'negative')
        return value * 10

    return run


def test_run_jobs_reports_bad_inputs_by_name() -> None:
    jobs = {'a': 1, 'b': -1, 'c': 2}
    with pytest.raises(InputError, match='^b: negative$'):
        run_jobs(jobs, tenfold, progress=False)

    failures: list[tuple[str, str]] = []
    results = run_jobs(
        jobs, tenfold, fail_fast=False, progress=False,
        on_error=lambda name, error: failures.append((name, str(error))),
    )  # fmt: skip

    assert results == {'a': 10, 'c': 20}
    assert failures == [('b', 'b: negative')]


def test_many_scenes_into_a_folder(spacenet_run: Path, tmp_path: Path) -> None:
    scenes = [
        crop(SPACENET, tmp_path / 'in' / 'a' / 'tile.tif', Window(0, 0, 96, 64)),
        crop(SPACENET, tmp_path / 'in' / 'b' / 'tile.tif', Window(200, 300, 64, 64)),
    ]
    bad = crop(SPACENET, tmp_path / 'in' / 'nocrs.tif', Window(0, 0, 32, 32), crs=None)
    out = tmp_path / 'out'

    # Fail fast (the default): the bad scene is found before any scene is segmented.
    with pytest.raises(InputError, match='nocrs.tif: raster has no CRS'):
        segment_scenes([*scenes, bad], spacenet_run, out, tile=64, progress=False)
    assert list(out.iterdir()) == []

    failures: list[str] = []
    results = segment_scenes(
        tmp_path / 'in', spacenet_run, out, tile=64, probabilities=True, fail_fast=False,
        on_error=lambda name, error: failures.append(name), progress=False,
    )  # fmt: skip

    assert failures == ['nocrs']
    assert list(results) == ['tile', 'tile_2']
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith('.aux.xml')) == [
        'run.parquet', 'tile.gpkg', 'tile.tif', 'tile_2.gpkg', 'tile_2.tif',
        'tile_2_probabilities.tif', 'tile_probabilities.tif',
    ]  # fmt: skip
    for name, scene in zip(results, scenes, strict=True):
        assert results[name].paths == [out / f'{name}.gpkg', out / f'{name}.tif',
                                       out / f'{name}_probabilities.tif']  # fmt: skip
        with rasterio.open(scene) as src, rasterio.open(out / f'{name}.tif') as labels:
            assert (labels.transform, labels.shape) == (src.transform, src.shape)
            assert labels.tags()['SCENE'] == str(scene)


def test_devices_need_as_many_gpus(spacenet_run: Path, tmp_path: Path) -> None:
    if torch.cuda.device_count() >= 2:
        pytest.skip('this machine has 2 GPUs')
    with pytest.raises(InputError, match='--devices: 2 GPUs requested but'):
        segment_scenes(SPACENET, spacenet_run, tmp_path / 'out', devices=2, progress=False)
    with pytest.raises(InputError, match='--device: give either one'):
        segment_scenes(SPACENET, spacenet_run, tmp_path / 'out', devices=['cpu', 'cpu'],
                       device='cpu', progress=False)  # fmt: skip


@pytest.mark.slow
def test_worker_processes_give_the_same_labels(spacenet_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / 'in'
    for i in range(3):
        crop(SPACENET, folder / f's{i}.tif', Window(100 * i, 64 * i, 96, 64))

    here = segment_scenes(folder, spacenet_run, tmp_path / 'here', tile=64, progress=False)
    # Two CPU worker processes stand in for two GPUs (each loads the model itself).
    spread = segment_scenes(
        folder, spacenet_run, tmp_path / 'spread', tile=64, devices=['cpu', 'cpu'],
        progress=False,
    )  # fmt: skip

    assert list(spread) == list(here) == ['s0', 's1', 's2']
    for name in here:
        with rasterio.open(here[name].raster) as a, rasterio.open(spread[name].raster) as b:
            np.testing.assert_array_equal(a.read(), b.read())
        assert len(spread[name].polygons) == len(here[name].polygons)


def test_api_is_exported_lazily() -> None:
    assert geocmid.segment is geocmid.api.segment
    assert geocmid.load_encoder is geocmid.api.load_encoder
    assert {'segment', 'segment_scenes', 'load_encoder'} <= set(dir(geocmid))
    assert sorted(geocmid.API) == sorted(geocmid.api.__all__)
    # `import geocmid` alone (as `geocmid info` does) does not import torch.
    code = 'import sys, geocmid; print("torch" in sys.modules)'
    light = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert light.stdout.strip() == 'False', light.stderr
