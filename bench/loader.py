"""Patch loading speed: raw rasterio reads vs TorchGeo's RasterDataset vs geocmid's dataset.

Writes ``--files`` tiled GeoTIFFs (4-band uint8, ``--size`` px square, nodata 0, placed apart
so that no patch spans two files), then reads the same number of ``--patch`` px patches in one
process with:

1. raw rasterio windowed reads on already-open handles (the ceiling), at the random windows
   geocmid's sampler draws, so that 1 and 3 read exactly the same pixels;
2. TorchGeo 0.10.1 ``RasterDataset`` + ``RandomPatchSampler``;
3. geocmid's ``GeoRasterDataset`` + ``ValidPatchSampler``, reading as pretraining does
   (``PretrainDataModule``'s ``RASTER_OPTIONS``: uint8 images, cast to float32 on the device,
   and, the nodata value implying it, the validity mask rebuilt there too) with float64
   georeferencing. ``--mode finetuning`` reads as the segmentation data module does
   (:data:`~geocmid.datasets.geo_raster.DEVICE_READ`, the same means); ``--mode float32``
   measures float32 images with a host-computed validity mask (the dataset's default for
   other callers; no training path reads it any more).

The three loaders run in 40 interleaved rounds of 10 patches, so a change in machine load
hits them alike. The last line printed is ``ratio_vs_raw=<x> ratio_vs_torchgeo=<y>`` (over
all rounds); the line before it gives the same ratios between each loader's fastest round,
which varies less between runs on a loaded machine.

Usage::

    python bench/loader.py [--patches 400] [--rounds 40] [--compress deflate|none]
        [--cache-mb N] [--mode pretraining|finetuning|float32]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window
from torchgeo.datasets import RasterDataset
from torchgeo.samplers import RandomPatchSampler

from geocmid.datamodules.pretrain import RASTER_OPTIONS
from geocmid.datasets.geo_raster import DEVICE_READ, GeoRasterDataset
from geocmid.samplers.valid_patch import ValidPatchSampler


def write_rasters(folder: Path, files: int, size: int, compress: str, seed: int) -> list[Path]:
    """Tiled 4-band uint8 GeoTIFFs, 1 m pixels, one raster width apart from each other."""
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(files):
        # Smooth fields plus noise: compressible like imagery, values 1..255 (0 is nodata).
        coarse = rng.integers(1, 256, (4, size // 64, size // 64)).astype(np.float32)
        smooth = np.kron(coarse, np.ones((64, 64), dtype=np.float32))
        data = np.clip(smooth + rng.normal(0, 8, smooth.shape), 1, 255).astype(np.uint8)
        path = folder / f'scene_{k}.tif'
        profile = {
            'driver': 'GTiff',
            'width': size,
            'height': size,
            'count': 4,
            'dtype': 'uint8',
            'crs': 'EPSG:32631',
            'transform': from_origin(500000.0 + 2 * k * size, 4e6, 1.0, 1.0),
            'nodata': 0,
            'tiled': True,
            'blockxsize': 256,
            'blockysize': 256,
            # MINISBLACK: otherwise GDAL declares the 4th band of a 4-band uint8 file alpha.
            'photometric': 'MINISBLACK',
        }
        if compress != 'none':
            profile['compress'] = compress
        with rasterio.open(path, 'w', **profile) as dst:
            dst.write(data)
        paths.append(path)
    return paths


def raw_loader(paths: list[Path], windows: list[tuple[int, Window]]) -> Iterator[np.ndarray]:
    """The given windows, read from handles opened once, round after round."""
    handles = [rasterio.open(path) for path in paths]
    while True:
        for i, window in windows:
            yield handles[i].read(window=window)


def pixel_windows(
    paths: list[Path], queries: list[tuple[slice, slice]]
) -> list[tuple[int, Window]]:
    """The file and pixel window of each (x, y) query (each lies inside one file)."""
    windows = []
    for x, y in queries:
        for i, path in enumerate(paths):
            with rasterio.open(path) as src:
                left, bottom, right, top = src.bounds
                if left <= x.start and x.stop <= right and bottom <= y.start and y.stop <= top:
                    w = src.window(x.start, y.start, x.stop, y.stop)
                    windows.append((i, Window(round(w.col_off), round(w.row_off),
                                              round(w.width), round(w.height))))  # fmt: skip
                    break
    return windows


def dataset_loader(dataset: object, sampler: object) -> Iterator[object]:
    """Samples of ``dataset`` at the locations drawn by ``sampler``, epoch after epoch."""
    while True:
        for query in sampler:  # type: ignore[attr-defined]
            yield dataset[query]  # type: ignore[index]


class Tiles(RasterDataset):
    """The benchmark rasters as a TorchGeo RasterDataset."""

    filename_glob = '*.tif'


def timed(make: Callable[[], object]) -> tuple[object, float]:
    """Result of ``make()`` and the seconds it took."""
    start = time.perf_counter()
    result = make()
    return result, time.perf_counter() - start


def main() -> None:
    """Run the benchmark and print the rates."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--files', type=int, default=4)
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--patch', type=int, default=256)
    parser.add_argument('--patches', type=int, default=400, help='timed patches per loader')
    parser.add_argument('--warmup', type=int, default=40, help='untimed patches per loader')
    parser.add_argument(
        '--rounds',
        type=int,
        default=40,
        help='interleaved rounds; short ones make the fastest round one that no other job '
        'interrupted',
    )
    parser.add_argument('--compress', default='deflate', choices=['none', 'deflate', 'lzw', 'zstd'])
    parser.add_argument(
        '--cache-mb',
        type=int,
        default=None,
        help="GDAL block cache in MB (default GDAL's, 5%% of RAM, which holds all the decoded "
        'data after warm-up); below the decoded size it emulates datasets larger than the cache',
    )
    parser.add_argument(
        '--mode',
        default='pretraining',
        choices=['pretraining', 'finetuning', 'float32'],
        help="geocmid's samples: as pretraining or fine-tuning reads them, or float32 images "
        'with a host-computed mask',
    )
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = {} if args.cache_mb is None else {'GDAL_CACHEMAX': args.cache_mb}

    with tempfile.TemporaryDirectory() as tmp, rasterio.Env(**options):
        folder = Path(tmp)
        paths = write_rasters(folder, args.files, args.size, args.compress, args.seed)
        count = args.warmup + args.patches
        tg_dataset, tg_init = timed(lambda: Tiles(paths=folder))
        tg_sampler = RandomPatchSampler(
            tg_dataset, size=args.patch, length=count, generator=args.seed
        )
        options = {'pretraining': RASTER_OPTIONS, 'finetuning': DEVICE_READ, 'float32': {}}[
            args.mode
        ]
        ours, our_init = timed(
            lambda: GeoRasterDataset(folder, stats_path=folder / 'stats.json', **options)
        )
        our_sampler, sampler_init = timed(
            lambda: ValidPatchSampler(ours, size=args.patch, length=count, seed=args.seed)
        )
        # The raw reads take the very windows our sampler draws (another instance, same
        # seed), so both do the same I/O and the ratio measures the dataset's overhead only.
        same = ValidPatchSampler(ours, size=args.patch, length=count, seed=args.seed)
        loaders = {
            'raw rasterio': raw_loader(paths, pixel_windows(paths, list(same))),
            'torchgeo RasterDataset': dataset_loader(tg_dataset, tg_sampler),
            'geocmid GeoRasterDataset': dataset_loader(ours, our_sampler),
        }
        for loader in loaders.values():
            for _ in range(args.warmup):
                next(loader)
        seconds = dict.fromkeys(loaders, 0.0)
        fastest = dict.fromkeys(loaders, math.inf)  # seconds per patch in the best round
        per_round = [args.patches // args.rounds] * args.rounds
        per_round[-1] += args.patches - sum(per_round)
        for k, n in enumerate(per_round):
            # Rotate the order each round so no loader always runs right after another.
            names = list(loaders)[k % 3 :] + list(loaders)[: k % 3]
            for name in names:
                start = time.perf_counter()
                for _ in range(n):
                    next(loaders[name])
                elapsed = time.perf_counter() - start
                seconds[name] += elapsed
                fastest[name] = min(fastest[name], elapsed / n)

    print(
        f'{args.files} files {args.size}x{args.size} px, 4-band uint8, tiled 256, '
        f'compress={args.compress}, GDAL cache '
        f'{"default" if args.cache_mb is None else f"{args.cache_mb} MB"}; '
        f'{args.patch} px patches, geocmid mode {args.mode}; {args.patches} timed per loader '
        f'after {args.warmup} warm-up, {args.rounds} interleaved rounds, 1 process, 1 thread'
    )
    print(
        f'construction: torchgeo dataset {tg_init:.3f} s; geocmid dataset {our_init:.3f} s '
        f'+ sampler (validity grids) {sampler_init:.3f} s'
    )
    rates = {name: args.patches / s for name, s in seconds.items()}
    for name, rate in rates.items():
        print(f'{name:26s} {rate:8.1f} patches/s')
    # Each loader's least disturbed round: steadier than the totals on a loaded machine.
    raw, torchgeo, geocmid = fastest.values()
    print(
        f'fastest rounds: ratio_vs_raw={raw / geocmid:.2f} '
        f'ratio_vs_torchgeo={torchgeo / geocmid:.2f}'
    )
    raw, torchgeo, geocmid = rates.values()
    print(f'ratio_vs_raw={geocmid / raw:.2f} ratio_vs_torchgeo={geocmid / torchgeo:.2f}')


if __name__ == '__main__':
    main()
