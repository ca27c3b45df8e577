"""Band stacks (``--stack``) and STAC input: one multi-band scene from several band files."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import shapely
from conftest import SAMPLE_DATA, write_geotiff
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.raster import RasterBand, RasterExtension
from rasterio.transform import from_origin

from geocmid.errors import InputError
from geocmid.raster.sources import resolve_scene, resolve_scenes
from geocmid_cli.main import main

S2 = SAMPLE_DATA / 'sentinel2' / 'S2A_MSIL2A_20170617T113321_36_85'
COMMON = {'B02': 'blue', 'B03': 'green', 'B04': 'red', 'B08': 'nir', 'B8A': 'nir08'}


def band(name: str) -> np.ndarray:
    with rasterio.open(S2 / f'{S2.name}_{name}.tif') as src:
        return src.read(1)


def run(argv: list) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return int(exit_info.value.code)


def s2_item(path: Path, *, scale: bool = False, **hrefs: str) -> Path:
    """A STAC Item over the Sentinel-2 sample, one asset per band, with common names."""
    item = pystac.Item('S2A_sample', None, None, datetime(2017, 6, 17), {})
    for key, common in COMMON.items():
        href = hrefs.get(key, str(S2 / f'{S2.name}_{key}.tif'))
        asset = pystac.Asset(href, media_type=pystac.MediaType.COG, roles=['data'])
        item.add_asset(key, asset)
        EOExtension.ext(asset, add_if_missing=True).bands = [
            Band.create(name=key, common_name=common)
        ]
        if scale:
            RasterExtension.ext(asset, add_if_missing=True).bands = [
                RasterBand.create(scale=0.0001, offset=-0.1, nodata=0)
            ]
    item.add_asset('thumbnail', pystac.Asset('thumb.png', roles=['thumbnail']))
    item.save_object(include_self_link=False, dest_href=str(path))
    return path


def test_stack_folder_is_one_scene_on_the_finest_grid() -> None:
    scene = resolve_scene(S2, stack=True)
    with rasterio.open(scene) as src:
        assert src.count == 12 and src.res == (10.0, 10.0) and src.shape == (120, 120)
        assert src.descriptions[:4] == ('B01', 'B02', 'B03', 'B04')
        assert src.crs.to_epsg() == 32629
        data = src.read()
    np.testing.assert_array_equal(data[1], band('B02'))
    # 20 m and 60 m bands repeated onto the 10 m grid (nearest: values kept exactly).
    np.testing.assert_array_equal(data[4], np.kron(band('B05'), np.ones((2, 2), np.uint16)))
    np.testing.assert_array_equal(data[0], np.kron(band('B01'), np.ones((6, 6), np.uint16)))


def test_stack_bands_and_resolution() -> None:
    scene = resolve_scene(S2, stack=True, bands=['B8A', 'b04'], resolution=20)
    with rasterio.open(scene) as src:
        assert src.descriptions == ('B8A', 'B04') and src.res == (20.0, 20.0)
        np.testing.assert_array_equal(src.read(1), band('B8A'))
    with pytest.raises(InputError, match=r"no band 'red' \(bands: B01, B02"):
        resolve_scene(S2, stack=True, bands=['red'])


def test_info_stack(capsys: pytest.CaptureFixture) -> None:
    assert run(['info', '--stack', S2]) == 0
    out = capsys.readouterr().out
    assert '120 x 120 px, 12 band(s), uint16' in out
    assert 'resolution  10 x 10' in out
    assert 'band 12     B8A (uint16)' in out


def test_stack_of_bands_in_different_crs_fails(tmp_path: Path) -> None:
    data = np.ones((1, 8, 8), np.uint16)
    write_geotiff(tmp_path / 'scene' / 'a.tif', data, crs='EPSG:32631')
    write_geotiff(tmp_path / 'scene' / 'b.tif', data, crs='EPSG:32632')
    with pytest.raises(InputError, match='different CRSs') as error:
        resolve_scene(tmp_path / 'scene', stack=True)
    assert error.value.source == str(tmp_path / 'scene')


def test_item_bands_by_common_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    item = s2_item(tmp_path / 'item.json')
    scene = resolve_scene(item, bands=['red', 'green', 'blue', 'nir08'])
    with rasterio.open(scene) as src:
        assert src.descriptions == ('red', 'green', 'blue', 'nir08')
        assert src.res == (10.0, 10.0) and src.count == 4
        data = src.read()
    np.testing.assert_array_equal(data[0], band('B04'))
    np.testing.assert_array_equal(data[3], np.kron(band('B8A'), np.ones((2, 2), np.uint16)))
    # By asset key too; without --bands every data asset (not the thumbnail).
    with rasterio.open(resolve_scene(item, bands=['B04'])) as src:
        np.testing.assert_array_equal(src.read(1), band('B04'))
    with rasterio.open(resolve_scene(item)) as src:
        assert src.count == len(COMMON)
    assert run(['info', item, '--bands', 'red,green,blue,nir']) == 0
    assert 'band 4      nir (uint16)' in capsys.readouterr().out


def test_item_scale_and_offset_are_applied(tmp_path: Path) -> None:
    item = s2_item(tmp_path / 'item.json', scale=True)
    with rasterio.open(resolve_scene(item, bands=['red'])) as src:
        assert src.dtypes[0] == 'float32'
        np.testing.assert_allclose(src.read(1), band('B04') * 0.0001 - 0.1, atol=1e-6)


def test_item_collection_is_one_scene_per_item(tmp_path: Path) -> None:
    first = pystac.Item.from_file(str(s2_item(tmp_path / 'a.json')))
    second = first.clone()
    second.id = 'second'
    collection = pystac.ItemCollection([first, second])
    (tmp_path / 'items.json').write_text(json.dumps(collection.to_dict()))
    scenes = resolve_scenes(tmp_path / 'items.json', bands=['red'])
    assert [s.stem for s in scenes] == ['S2A_sample', 'second']


def test_stac_geoparquet(tmp_path: Path) -> None:
    from stac_geoparquet.arrow import parse_stac_items_to_arrow, to_parquet

    item = pystac.Item.from_file(str(s2_item(tmp_path / 'a.json')))
    item.geometry = {'type': 'Point', 'coordinates': [-6.89, 52.3]}
    item.bbox = [-6.89, 52.3, -6.89, 52.3]
    to_parquet(parse_stac_items_to_arrow([item.to_dict()]), tmp_path / 'items.parquet')
    (scene,) = resolve_scenes(tmp_path / 'items.parquet', bands=['nir'])
    with rasterio.open(scene) as src:
        np.testing.assert_array_equal(src.read(1), band('B08'))


def test_bad_items(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    item = s2_item(tmp_path / 'item.json')
    with pytest.raises(InputError) as error:
        resolve_scene(item, bands=['red', 'swir22'])
    assert str(error.value) == (
        f"{item}: item 'S2A_sample' has no band 'swir22' (asset keys: B02, B03, B04, B08, B8A;"
        ' names: blue, green, red, nir, nir08)'
    )
    bare = pystac.Item('bare', None, None, datetime(2020, 1, 1), {})
    bare.add_asset('meta', pystac.Asset('meta.xml', media_type='application/xml'))
    bare.save_object(include_self_link=False, dest_href=str(tmp_path / 'bare.json'))
    with pytest.raises(InputError, match=r"item 'bare' has no raster asset \(assets: meta\)"):
        resolve_scene(tmp_path / 'bare.json')
    (tmp_path / 'broken.json').write_text('{"type": "Feature", ')
    assert run(['info', tmp_path / 'broken.json']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {tmp_path / "broken.json"}: malformed JSON')
    assert '\n' not in err
    (tmp_path / 'catalog.json').write_text(
        json.dumps(pystac.Catalog('c', 'a catalog').to_dict(include_self_link=False))
    )
    with pytest.raises(InputError, match='not a STAC Item or ItemCollection'):
        resolve_scene(tmp_path / 'catalog.json')


def test_item_assets_in_crss_that_cannot_share_a_grid(tmp_path: Path) -> None:
    data = np.ones((1, 8, 8), np.uint16)
    a = write_geotiff(tmp_path / 'a.tif', data, crs='EPSG:32629')
    b = write_geotiff(
        tmp_path / 'b.tif', data, crs='EPSG:32630', transform=from_origin(0.0, 0.0, 10.0, 10.0)
    )
    item = s2_item(tmp_path / 'item.json', B04=str(a), B08=str(b))
    with pytest.raises(InputError, match=r'bands in different CRSs \(EPSG:32629, EPSG:32630\)'):
        resolve_scene(item, bands=['red', 'nir'])


def test_embed_a_stacked_scene(tmp_path: Path) -> None:
    code = run(['embed', '--stack', '--rasters', S2, '--encoder', 'random:resnet18', '-o',
                tmp_path / 'e.parquet', '--tile', '64', '--bands', '4,3,2', '--device', 'cpu',
                '--quiet'])  # fmt: skip
    assert code == 0
    import geopandas as gpd

    table = gpd.read_parquet(tmp_path / 'e.parquet')
    assert len(table) == 4 and table.crs.to_epsg() == 32629


def label_cog(path: Path, left: float) -> Path:
    """A 64 x 64 label raster whose left half is nodata, with the tags segmentation writes."""
    labels = np.zeros((1, 64, 64), np.uint8)
    labels[:, :, 40:] = 1
    labels[:, :, :32] = 255
    write_geotiff(path, labels, crs='EPSG:32631', nodata=255,
                  transform=from_origin(left, 4000000.0, 10.0, 10.0))  # fmt: skip
    with rasterio.open(path, 'r+') as dst:
        dst.update_tags(
            CLASS_NAMES=json.dumps(['background', 'building roof']),
            CLASS_COLORS=json.dumps([[0, 0, 0], [230, 25, 75]]),
            MODEL='/models/run/model.ckpt', MODEL_SHA256='ab12', SCENE='/data/scene.tif',
            GEOCMID_VERSION='0.1.0',
        )  # fmt: skip
    return path


def test_prediction_item_and_collection(tmp_path: Path) -> None:
    from geocmid.io.stac import prediction_item, write_collection, write_item

    raster = label_cog(tmp_path / 'a.tif', 500000.0)
    item = prediction_item(raster, vector=tmp_path / 'a.gpkg')
    path = write_item(item, tmp_path / 'a.json')
    back = pystac.Item.from_file(str(path))
    assert back.to_dict(include_self_link=False) == json.loads(path.read_text())
    labels = back.assets['labels']
    assert labels.href == './a.tif' and back.assets['polygons'].href == './a.gpkg'
    props = back.properties
    assert props['proj:code'] == 'EPSG:32631' and props['proj:shape'] == [64, 64]
    assert props['proj:transform'] == [10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0]
    # The footprint is the valid right half, not the raster rectangle.
    footprint = shapely.geometry.shape(props['proj:geometry'])
    assert footprint.area == pytest.approx(32 * 64 * 100.0)
    assert footprint.bounds == (500320.0, 3999360.0, 500640.0, 4000000.0)
    assert labels.extra_fields['raster:bands'] == [{'data_type': 'uint8', 'nodata': 255.0}]
    classes = labels.extra_fields['classification:classes']
    assert [(c['value'], c['name'], c['color_hint']) for c in classes] == [
        (0, 'background', '000000'), (1, 'building_roof', 'E6194B')
    ]  # fmt: skip
    assert [link.href for link in back.get_links('derived_from')] == ['/data/scene.tif']
    assert 'sha256 ab12' in props['processing:lineage']
    with pytest.raises(InputError, match='exists'):
        write_item(item, tmp_path / 'a.json')

    other = label_cog(tmp_path / 'b.tif', 600000.0)
    second = write_item(prediction_item(other), tmp_path / 'b.json')
    collection = pystac.Collection.from_file(
        str(write_collection([path, second], tmp_path / 'collection.json', 'run'))
    )
    west, south, east, north = collection.extent.spatial.bboxes[0]
    for written in (back, pystac.Item.from_file(str(second))):
        left, bottom, right, top = written.bbox
        assert west <= left and south <= bottom and right <= east and top <= north
    assert len(collection.get_item_links()) == 2
