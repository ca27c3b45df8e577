"""Patch loading over HTTP: the same COG read from a local HTTP server and from local disk.

Writes one tiled (256 px), deflate-compressed 4-band uint8 GeoTIFF with overviews
(``--size`` px square), serves its folder with the tests' Range-capable HTTP server
(``tests/range_server.py``, on 127.0.0.1, in its own process), and reads ``--patches`` random
``--patch`` px patches with geocmid's ``GeoRasterDataset`` + ``ValidPatchSampler`` from the URL
and from the file, in interleaved rounds, with GDAL's cache and network settings as shipped
(``geocmid/raster/locations.py``). Reports patches per second for both, the bytes the server
sent per remote patch, and last ``remote_over_local=<x>`` (remote patches/s over local).

Usage::

    python bench/remote.py [--patches 200] [--rounds 10] [--size 4096] [--patch 224]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin

from geocmid.datasets.geo_raster import GeoRasterDataset
from geocmid.samplers.valid_patch import ValidPatchSampler

SERVER = Path(__file__).resolve().parents[1] / 'tests' / 'range_server.py'


def write_cog(path: Path, size: int, seed: int = 0) -> Path:
    """A tiled 4-band uint8 GeoTIFF of smooth fields plus noise (compressible like imagery)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, 256, (4, size // 64, size // 64)).astype(np.float32)
    smooth = np.kron(coarse, np.ones((64, 64), dtype=np.float32))
    data = np.clip(smooth + rng.normal(0, 8, smooth.shape), 1, 255).astype(np.uint8)
    profile = {
        'driver': 'GTiff', 'width': size, 'height': size, 'count': 4, 'dtype': 'uint8',
        'crs': 'EPSG:32631', 'transform': from_origin(500000.0, 4000000.0, 1.0, 1.0),
        'nodata': 0, 'tiled': True, 'blockxsize': 256, 'blockysize': 256, 'compress': 'deflate',
    }  # fmt: skip
    with rasterio.open(path, 'w', **profile) as dst:
        dst.write(data)
        dst.build_overviews([2, 4, 8, 16], Resampling.average)
    return path


def served(url: str) -> int:
    """Bytes the server sent since the last call."""
    with urllib.request.urlopen(f'{url}/__served__', timeout=10) as answer:
        return int(answer.read())


def read_patches(dataset: GeoRasterDataset, boxes: list) -> float:
    """Seconds to read every patch of ``boxes``."""
    start = time.perf_counter()
    for box in boxes:
        dataset[box]
    return time.perf_counter() - start


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--patches', type=int, default=200)
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--size', type=int, default=4096)
    parser.add_argument('--patch', type=int, default=224)
    args = parser.parse_args()
    per_round = args.patches // args.rounds
    with tempfile.TemporaryDirectory() as folder:
        path = write_cog(Path(folder) / 'scene.tif', args.size)
        megabytes = path.stat().st_size / 1e6
        server = subprocess.Popen(
            [sys.executable, str(SERVER), folder], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            url = f'http://127.0.0.1:{server.stdout.readline().strip()}'
            local = GeoRasterDataset(path, **{'dtype': 'native'})
            remote = GeoRasterDataset(f'{url}/scene.tif', **{'dtype': 'native'})
            served(url)
            sampler = ValidPatchSampler(remote, size=args.patch, length=args.patches, seed=0)
            boxes = list(sampler)
            setup = served(url)
            # Interleaved rounds: a change of machine load hits both alike. Each round reads new
            # patches, so the remote cache helps only where patches share tiles.
            seconds = {'local': 0.0, 'remote': 0.0}
            for k in range(args.rounds):
                chunk = boxes[k * per_round : (k + 1) * per_round]
                seconds['remote'] += read_patches(remote, chunk)
                seconds['local'] += read_patches(local, chunk)
            sent = served(url)
        finally:
            server.terminate()
            server.wait(timeout=10)
    count = per_round * args.rounds
    rates = {name: count / value for name, value in seconds.items()}
    print(f'file: {megabytes:.1f} MB, {args.size} px, 4 bands, 256 px tiles')
    print(f'validity grid and sampler setup over HTTP: {setup / 1e3:.0f} kB')
    print(f'patches: {count} of {args.patch} px')
    print(f'local: {rates["local"]:.1f} patches/s')
    print(f'remote: {rates["remote"]:.1f} patches/s, {sent / count / 1e3:.0f} kB per patch')
    print(f'remote_over_local={rates["remote"] / rates["local"]:.3f}')


if __name__ == '__main__':
    main()
