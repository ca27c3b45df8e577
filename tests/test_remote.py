"""Rasters read where users keep them: an HTTP server honouring Range requests and an S3 server
(moto), both started by the tests on 127.0.0.1 and stopped after them."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import rasterio
from conftest import SAMPLE_DATA, write_geotiff
from geocmid_cli.main import main
from pystac.extensions.eo import Band, EOExtension
from rasterio.transform import from_origin
from rasterio.windows import Window

from geocmid.errors import InputError
from geocmid.raster.files import open_raster
from geocmid.raster.locations import normalise_location
from geocmid.raster.sources import resolve_scene

S2 = SAMPLE_DATA / 'sentinel2' / 'S2A_MSIL2A_20170617T113321_36_85'


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with ``Range: bytes=a-b`` support (test scaffolding: Python's handler
    answers whole files only) and counts the bytes of file content it sends."""

    served = 0

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet."""

    def send_head(self) -> Any:
        """A 206 partial answer for a Range request; 403 under forbidden/."""
        if self.path.startswith('/forbidden/'):
            self.send_error(403)
            return None
        path = self.translate_path(self.path)
        match = re.fullmatch(r'bytes=(\d+)-(\d*)', self.headers.get('Range', '').strip())
        if match is None or not os.path.isfile(path):
            self._remaining = None
            return super().send_head()
        size = os.path.getsize(path)
        start = int(match.group(1))
        end = min(int(match.group(2) or size - 1), size - 1)
        source = open(path, 'rb')  # noqa: SIM115 (closed by the base class)
        source.seek(start)
        self.send_response(206)
        self.send_header('Content-Type', 'application/octet-stream')
        self.send_header('Content-Range', f'bytes {start}-{end}/{size}')
        self.send_header('Content-Length', str(end - start + 1))
        self.send_header('Accept-Ranges', 'bytes')
        self.end_headers()
        self._remaining = end - start + 1
        return source

    def copyfile(self, source: Any, outputfile: Any) -> None:
        """Send the requested range only, counting it."""
        remaining = getattr(self, '_remaining', None)
        data = source.read() if remaining is None else source.read(remaining)
        type(self).served += len(data)
        outputfile.write(data)


@pytest.fixture(scope='module')
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, type]]:
    """(served folder, base URL, handler class) of a Range-capable server on 127.0.0.1."""
    root = tmp_path_factory.mktemp('served')
    handler = type('Handler', (RangeHandler,), {'served': 0})
    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f'http://127.0.0.1:{server.server_address[1]}', handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


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
    http_root: tuple[Path, str, type],
) -> None:
    root, url, handler = http_root
    local = cog(root / 'window.tif')
    window = Window(512, 256, 256, 256)
    with rasterio.open(local) as src:
        expected = src.read(window=window)
    with open_raster(f'{url}/window.tif') as src:
        assert src.shape == (1024, 1024)
        handler.served = 0
        got = src.read(window=window)
        served = handler.served
    np.testing.assert_array_equal(got, expected)
    size = local.stat().st_size
    # One 256 x 256 tile of a 4 x 4 tiled file: about 1/16 of it, never the whole file.
    assert 0 < served < size / 8, (served, size)


def test_info_on_a_url(http_root: tuple[Path, str, type], capsys: pytest.CaptureFixture) -> None:
    root, url, _ = http_root
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
    http_root: tuple[Path, str, type], capsys: pytest.CaptureFixture, name: str, problem: str
) -> None:
    _, url, _ = http_root
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


def test_stack_of_remote_bands_from_a_stac_item(
    http_root: tuple[Path, str, type], tmp_path: Path
) -> None:
    """A STAC Item whose assets are remote single-band COGs at 10 m and 20 m: one scene on
    the 10 m grid, equal to the local files."""
    root, url, _ = http_root
    (root / 's2').mkdir()
    for band in ('B04', 'B8A'):
        shutil.copy(S2 / f'{S2.name}_{band}.tif', root / 's2' / f'{band}.tif')
    item = pystac.Item('s2-remote', None, None, datetime(2017, 6, 17), {})
    for band, common in (('B04', 'red'), ('B8A', 'nir08')):
        asset = pystac.Asset(f'{url}/s2/{band}.tif', media_type=pystac.MediaType.COG, roles=['data'])
        item.add_asset(band, asset)
        EOExtension.ext(asset, add_if_missing=True).bands = [Band.create(name=band, common_name=common)]
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


def test_embed_a_remote_scene(http_root: tuple[Path, str, type], tmp_path: Path) -> None:
    root, url, _ = http_root
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


def test_info_on_a_private_s3_object(s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With credentials in the environment, requests are signed (the CLI once forced
    AWS_NO_SIGN_REQUEST=YES, which made every private bucket answer 403)."""
    s3.upload_file(str(cog(tmp_path / 'p.tif', size=256)), 'scenes', 'private/p.tif')
    assert run(['info', 's3://scenes/private/p.tif']) == 0
    assert '256 x 256 px' in capsys.readouterr().out


def test_patch_sampler_reads_remote_validity_from_overviews(
    http_root: tuple[Path, str, type],
) -> None:
    """The sampler's validity grid of a remote file comes from one coarse read (served by the
    overviews), not from reading the file whole; patches then avoid its nodata half."""
    from geocmid.datasets.geo_raster import GeoRasterDataset
    from geocmid.samplers.valid_patch import ValidityGrid, ValidPatchSampler

    root, url, handler = http_root
    data = np.random.default_rng(1).integers(1, 4000, (1, 1024, 1024), dtype=np.uint16)
    data[:, :, :512] = 0
    path = write_geotiff(root / 'half.tif', data, nodata=0, tiled=True)
    with rasterio.open(path, 'r+') as dst:
        dst.build_overviews([2, 4, 8, 16], rasterio.enums.Resampling.nearest)
    dataset = GeoRasterDataset(f'{url}/half.tif')
    handler.served = 0
    grid = ValidityGrid.of(dataset, 0)
    assert handler.served < path.stat().st_size / 8, (handler.served, path.stat().st_size)
    assert grid.counts[:, : grid.counts.shape[1] // 2].sum() == 0
    assert grid.total == 512 * 1024
    sampler = ValidPatchSampler(dataset, size=64, length=16, seed=0, max_nodata_fraction=0.0)
    left = dataset.bounds[0].start + 512  # metres: 1 m pixels
    for x, _ in sampler:
        assert x.start >= left
