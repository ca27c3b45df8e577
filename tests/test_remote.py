"""Rasters read where users keep them, from servers the tests start on 127.0.0.1.

An HTTP server honouring Range requests (``range_server.py``) and an S3 server (moto), both
stopped after the tests.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import rasterio
from conftest import SAMPLE_DATA, write_geotiff
from pystac.extensions.eo import Band, EOExtension
from rasterio.transform import from_origin
from rasterio.windows import Window

from geocmid.errors import InputError
from geocmid.raster.files import open_raster
from geocmid.raster.locations import normalise_location
from geocmid.raster.sources import resolve_scene
from geocmid_cli.main import main

S2 = SAMPLE_DATA / 'sentinel2' / 'S2A_MSIL2A_20170617T113321_36_85'


class Server:
    """The Range-capable HTTP server of ``range_server.py``, in its own process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name('range_server.py')), str(root)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.url = f'http://127.0.0.1:{self.process.stdout.readline().strip()}'

    def served(self) -> int:
        """Bytes of file content sent since the last call."""
        with urllib.request.urlopen(f'{self.url}/__served__', timeout=10) as answer:
            return int(answer.read())

    def stop(self) -> None:
        """Terminate the server and wait for it."""
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process.stdout.close()


@pytest.fixture(scope='module')
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of a temporary folder on 127.0.0.1 (stopped after the tests)."""
    server = Server(tmp_path_factory.mktemp('served'))
    try:
        yield server
    finally:
        server.stop()


def cog(path: Path, size: int = 1024, seed: int = 0) -> Path:
    """A tiled (256 px), compressed GeoTIFF of random uint16 values."""
    data = np.random.default_rng(seed).integers(0, 4000, (1, size, size), dtype=np.uint16)
    write_geotiff(path, data, transform=from_origin(500000.0, 4000000.0, 10.0, 10.0), tiled=True)
    return path


def run(argv: list) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return int(exit_info.value.code)


def test_locations_are_normalised_once() -> None:
    assert normalise_location('https://h.org/a/b.tif') == '/vsicurl/https://h.org/a/b.tif'
    # pathlib and click.Path collapse '//'; the URL is still recognised.
    assert normalise_location(Path('https://h.org/a/b.tif')) == '/vsicurl/https://h.org/a/b.tif'
    assert normalise_location('s3://bucket/k/x.tif') == '/vsis3/bucket/k/x.tif'
    assert normalise_location('gs://bucket/x.tif') == '/vsigs/bucket/x.tif'
    assert normalise_location('/vsizip/{/data/a.zip}/x.tif') == '/vsizip/{/data/a.zip}/x.tif'
    assert normalise_location('local/x.tif') == 'local/x.tif'
    with pytest.raises(ValueError, match='ftp'):
        normalise_location('ftp://h.org/x.tif')


def test_remote_window_equals_local_and_reads_only_its_blocks(
    http_server: Server,
) -> None:
    root, url = http_server.root, http_server.url
    local = cog(root / 'window.tif')
    window = Window(512, 256, 256, 256)
    with rasterio.open(local) as src:
        expected = src.read(window=window)
    with open_raster(f'{url}/window.tif') as src:
        assert src.shape == (1024, 1024)
        http_server.served()
        got = src.read(window=window)
        served = http_server.served()
    np.testing.assert_array_equal(got, expected)
    size = local.stat().st_size
    # One 256 x 256 tile of a 4 x 4 tiled file: about 1/16 of it, never the whole file.
    assert 0 < served < size / 8, (served, size)


def test_info_on_a_url(http_server: Server, capsys: pytest.CaptureFixture) -> None:
    root, url = http_server.root, http_server.url
    cog(root / 'info.tif', size=512)
    assert run(['info', f'{url}/info.tif']) == 0
    out = capsys.readouterr().out
    assert 'size        512 x 512 px, 1 band(s), uint16' in out
    assert 'EPSG:32631' in out


@pytest.mark.parametrize(('name', 'problem'), [
    ('missing.tif', 'HTTP 404 (not found)'),
    ('forbidden/x.tif', 'HTTP 403 (access denied)'),
])  # fmt: skip
def test_http_errors_are_one_line_naming_the_url(
    http_server: Server, capsys: pytest.CaptureFixture, name: str, problem: str
) -> None:
    url = http_server.url
    assert run(['info', f'{url}/{name}']) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'error: {url}/{name}: {problem}'


def test_a_server_that_does_not_answer_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('GDAL_HTTP_TIMEOUT', '1')
    monkeypatch.setenv('GDAL_HTTP_MAX_RETRY', '0')
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(('127.0.0.1', 0))
        silent.listen()
        url = f'http://127.0.0.1:{silent.getsockname()[1]}/scene.tif'
        with pytest.raises(InputError, match='did not answer') as error:
            open_raster(url)
    assert error.value.source == url


def test_stack_of_remote_bands_from_a_stac_item(http_server: Server, tmp_path: Path) -> None:
    """A STAC Item whose assets are remote COGs at 10 m and 20 m: one scene at 10 m.

    The scene equals the local files.
    """
    root, url = http_server.root, http_server.url
    (root / 's2').mkdir()
    for band in ('B04', 'B8A'):
        shutil.copy(S2 / f'{S2.name}_{band}.tif', root / 's2' / f'{band}.tif')
    item = pystac.Item('s2-remote', None, None, datetime(2017, 6, 17), {})
    for band, common in (('B04', 'red'), ('B8A', 'nir08')):
        asset = pystac.Asset(
            f'{url}/s2/{band}.tif', media_type=pystac.MediaType.COG, roles=['data']
        )
        item.add_asset(band, asset)
        EOExtension.ext(asset, add_if_missing=True).bands = [
            Band.create(name=band, common_name=common)
        ]
    item.save_object(include_self_link=False, dest_href=str(tmp_path / 'item.json'))

    scene = resolve_scene(tmp_path / 'item.json', bands=['nir08', 'red'])
    with rasterio.open(scene) as src:
        assert src.descriptions == ('nir08', 'red')
        assert src.res == (10.0, 10.0) and src.shape == (120, 120)
        data = src.read()
    with rasterio.open(S2 / f'{S2.name}_B8A.tif') as src:
        nir = src.read(1)
    with rasterio.open(S2 / f'{S2.name}_B04.tif') as src:
        red = src.read(1)
    np.testing.assert_array_equal(data[1], red)
    np.testing.assert_array_equal(data[0], np.repeat(np.repeat(nir, 2, axis=0), 2, axis=1))


def test_embed_a_remote_scene(http_server: Server, tmp_path: Path) -> None:
    root, url = http_server.root, http_server.url
    cog(root / 'embed.tif', size=128)
    code = run(['embed', '--rasters', f'{url}/embed.tif', '--encoder', 'random:resnet18',
                '-o', tmp_path / 'e.parquet', '--tile', '64', '--bands', '1,1,1', '--device',
                'cpu', '--quiet'])  # fmt: skip
    assert code == 0
    import geopandas as gpd

    table = gpd.read_parquet(tmp_path / 'e.parquet')
    assert len(table) == 4
    assert table.crs.to_epsg() == 32631


@pytest.fixture(scope='module')
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A boto3 S3 client on moto's server (127.0.0.1), and GDAL pointed at it."""
    boto3 = pytest.importorskip('boto3')
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {
        'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing',
        'AWS_REGION': 'us-east-1', 'AWS_DEFAULT_REGION': 'us-east-1',
        'AWS_S3_ENDPOINT': f'{host}:{port}', 'AWS_HTTPS': 'NO', 'AWS_VIRTUAL_HOSTING': 'FALSE',
    }  # fmt: skip
    patch = pytest.MonkeyPatch()
    for key, value in settings.items():
        patch.setenv(key, value)
    # Set by an earlier read without credentials; with credentials, nothing may set it.
    patch.delenv('AWS_NO_SIGN_REQUEST', raising=False)
    client = boto3.client('s3', endpoint_url=f'http://{host}:{port}', region_name='us-east-1')
    client.create_bucket(Bucket='scenes')
    try:
        yield client
    finally:
        patch.undo()
        server.stop()


def test_read_a_raster_from_s3(s3: Any, tmp_path: Path) -> None:
    local = cog(tmp_path / 'scene.tif', size=512)
    s3.upload_file(str(local), 'scenes', 'a/scene.tif')
    window = Window(256, 0, 256, 256)
    with open_raster('s3://scenes/a/scene.tif') as src, rasterio.open(local) as ref:
        np.testing.assert_array_equal(src.read(window=window), ref.read(window=window))
    with pytest.raises(InputError) as error:
        open_raster('s3://scenes/a/missing.tif')
    assert error.value.source == '/vsis3/scenes/a/missing.tif'


def test_info_on_a_private_s3_object(
    s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """With credentials in the environment, requests are signed.

    The CLI once forced AWS_NO_SIGN_REQUEST=YES, which made every private bucket answer 403.
    """
    s3.upload_file(str(cog(tmp_path / 'p.tif', size=256)), 'scenes', 'private/p.tif')
    assert run(['info', 's3://scenes/private/p.tif']) == 0
    assert '256 x 256 px' in capsys.readouterr().out


def test_patch_sampler_reads_remote_validity_from_overviews(
    http_server: Server,
) -> None:
    """The sampler's validity grid of a remote file comes from one coarse read.

    The read is served by the overviews, not by reading the file whole; patches then avoid
    the file's nodata half.
    """
    from geocmid.datasets.geo_raster import GeoRasterDataset
    from geocmid.samplers.valid_patch import ValidityGrid, ValidPatchSampler

    root, url = http_server.root, http_server.url
    data = np.random.default_rng(1).integers(1, 4000, (1, 1024, 1024), dtype=np.uint16)
    data[:, :, :512] = 0
    path = write_geotiff(root / 'half.tif', data, nodata=0, tiled=True)
    with rasterio.open(path, 'r+') as dst:
        dst.build_overviews([2, 4, 8, 16], rasterio.enums.Resampling.nearest)
    dataset = GeoRasterDataset(f'{url}/half.tif')
    http_server.served()
    grid = ValidityGrid.of(dataset, 0)
    served = http_server.served()
    assert served < path.stat().st_size / 8, (served, path.stat().st_size)
    assert grid.counts[:, : grid.counts.shape[1] // 2].sum() == 0
    assert grid.total == 512 * 1024
    sampler = ValidPatchSampler(dataset, size=64, length=16, seed=0, max_nodata_fraction=0.0)
    left = dataset.bounds[0].start + 512  # metres: 1 m pixels
    for x, _ in sampler:
        assert x.start >= left


@pytest.fixture(scope='module')
def building_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-band building model trained for 2 steps by `geocmid train segment`."""
    spacenet = SAMPLE_DATA / 'spacenet'
    output = tmp_path_factory.mktemp('model') / 'run'
    code = run([
        'train', 'segment', '--rasters', spacenet / 'buildings.tif', '--labels',
        spacenet / 'buildings.geojson', '-o', output, '--backbone', 'resnet18',
        '--patch-size', '64', '--batch-size', '2', '--max-steps', '2', '--quiet',
    ])  # fmt: skip
    assert code == 0
    return output


def test_segment_a_remote_scene(http_server: Server, building_model: Path, tmp_path: Path) -> None:
    """A scene read over HTTP segments exactly as the same file read from disk."""
    with rasterio.open(SAMPLE_DATA / 'spacenet' / 'buildings.tif') as src:
        window = Window(0, 0, 96, 96)
        scene = write_geotiff(
            http_server.root / 'remote_scene.tif', src.read(window=window), crs=src.crs,
            transform=src.window_transform(window), nodata=src.nodata, tiled=True, blocksize=32,
        )  # fmt: skip
    outputs = {}
    for name, source in (('local', scene), ('remote', f'{http_server.url}/remote_scene.tif')):
        output = tmp_path / name / 'buildings.gpkg'
        output.parent.mkdir()
        code = run(['segment', source, '-o', output, '--model', building_model, '--raster',
                    '--tile', '64', '--min-area', '1', '--quiet', '--stac'])  # fmt: skip
        assert code == 0
        outputs[name] = output.with_suffix('.tif')
    with rasterio.open(outputs['local']) as local, rasterio.open(outputs['remote']) as remote:
        assert (remote.crs, remote.transform, remote.shape) == (
            local.crs,
            local.transform,
            local.shape,
        )
        np.testing.assert_array_equal(remote.read(), local.read())
    # The STAC Item beside the outputs names the URL it was derived from.
    item = pystac.Item.from_file(str(outputs['remote'].with_suffix('.json')))
    (link,) = item.get_links('derived_from')
    assert link.href == f'{http_server.url}/remote_scene.tif'
    assert sorted(item.assets) == ['labels', 'polygons']
    assert item.properties['proj:code'] == 'EPSG:32616'
    assert 'resnet18' in item.properties['processing:lineage']


def test_segment_to_s3(
    s3: Any, building_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Outputs are written to the S3 server whole.

    A missing bucket or an existing object fails before any work (exit 2, one line).
    """
    with rasterio.open(SAMPLE_DATA / 'spacenet' / 'buildings.tif') as src:
        window = Window(0, 0, 64, 64)
        scene = write_geotiff(
            tmp_path / 'scene.tif', src.read(window=window), crs=src.crs,
            transform=src.window_transform(window), nodata=src.nodata,
        )  # fmt: skip
    argv = ['segment', scene, '--model', building_model, '--raster', '--tile', '64', '--quiet',
            '--stac', '-o']  # fmt: skip
    assert run([*argv, 's3://scenes/maps/buildings.gpkg']) == 0
    listed = s3.list_objects_v2(Bucket='scenes', Prefix='maps/')['Contents']
    keys = sorted(entry['Key'] for entry in listed)
    assert keys == ['maps/buildings.gpkg', 'maps/buildings.json', 'maps/buildings.tif',
                    'maps/buildings.tif.aux.xml']  # fmt: skip
    with open_raster('s3://scenes/maps/buildings.tif') as labels:
        assert labels.shape == (64, 64)
    capsys.readouterr()
    assert run([*argv, 's3://scenes/maps/buildings.gpkg']) == 2
    assert capsys.readouterr().err.strip() == (
        'error: s3://scenes/maps/buildings.gpkg: already exists; add --overwrite to replace it'
    )
    assert run([*argv, 's3://scenes/maps/buildings.gpkg', '--overwrite']) == 0
    assert run([*argv, 's3://no-such-bucket/buildings.gpkg']) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith('error: s3://no-such-bucket/buildings.gpkg: bucket does not exist')
    )
