"""Many scenes on the embedded Dask cluster: 1 against 2 CPU workers, and the cluster's overhead.

The same 8 scenes (crops of the SpaceNet sample tile, each flipped differently) are segmented
with the same model three ways: in this process (torch on one thread), on an embedded cluster
of one CPU worker, and on one of two CPU workers (one torch thread each). A run is timed from
the call to its return, model loading on the workers included; the clusters are started (and
their workers warmed up) before the clock starts. The configurations alternate in rounds so
that changes in machine load affect them alike; the fastest round of each is kept. The label
rasters of the three runs must be identical.

The last two lines read ``cluster_overhead=<y>`` (per-scene time on a 1-worker cluster over the
in-process time; target <= 1.10) and ``speedup_2_workers=<x>`` (1-worker time over 2-worker
time; target >= 1.7 on a machine with 2 free cores). The load average is printed first: on a
shared machine the speedup is bounded by the cores that are actually free.

    python bench/scale.py                        # 8 scenes of 512 px, 2 rounds
    python bench/scale.py --size 256 --rounds 1  # quicker
    python bench/scale.py --model runs/seg       # a model of your own (1-band scenes)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
import torch
from rasterio.windows import Window

from geocmid.inference.cluster import close, start_local_cluster
from geocmid.inference.products.segment import segment_scenes
from geocmid.runs.segmentation import SegmentConfig, train_segmentation

SAMPLE = Path(__file__).resolve().parents[1] / 'sample_data' / 'spacenet'
SPACENET = SAMPLE / 'buildings.tif'


def make_model(folder: Path) -> Path:
    """A resnet18 U-Net trained for 2 steps on the sample tile: its speed is what counts."""
    config = SegmentConfig(
        rasters=SPACENET, labels=SAMPLE / 'buildings.geojson', output=folder / 'run',
        backbone='resnet18', patch_size=64, batch_size=2, max_steps=2, val_fraction=0.0, seed=0,
    )  # fmt: skip
    return train_segmentation(config, progress=False).run_dir


def make_scenes(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` crops of the sample tile on its grid, each flipped in its own way."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with rasterio.open(SPACENET) as src:
        size = min(size, src.height, src.width)
        window = Window(0, 0, size, size)
        data = src.read(window=window)
        profile = {**src.profile, 'height': size, 'width': size,
                   'transform': src.window_transform(window)}  # fmt: skip
    for i in range(count):
        variant = np.rot90(data, k=i % 4, axes=(1, 2))
        variant = variant[:, ::-1] if i >= 4 else variant
        path = folder / f'scene{i}.tif'
        with rasterio.open(path, 'w', **profile) as dst:
            dst.write(np.ascontiguousarray(variant))
        paths.append(path)
    return paths


def timed(
    scenes: list[Path], model: Path, out: Path, tile: int, client: object
) -> tuple[float, float]:
    """Seconds to segment every scene into ``out``, and how many scenes ran at once on average.

    The second figure is the sum of the scenes' own seconds (from the run table) over the wall
    time: about the number of workers when they run side by side, whatever their speed.
    """
    start = time.perf_counter()
    results = segment_scenes(
        scenes, model, out, tile=tile, client=client, progress=False, overwrite=True
    )
    seconds = time.perf_counter() - start
    assert len(results) == len(scenes), 'a scene failed'
    return seconds, float(pd.read_parquet(out / 'run.parquet')['seconds'].sum()) / seconds


def labels(out: Path) -> dict[str, np.ndarray]:
    """The label raster of every scene in ``out``."""
    arrays = {}
    for path in sorted(out.glob('scene*.tif')):
        with rasterio.open(path) as src:
            arrays[path.name] = src.read()
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--scenes', type=int, default=8)
    parser.add_argument('--size', type=int, default=512, help='scene side in pixels')
    parser.add_argument('--tile', type=int, default=128)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--model', type=Path, help='a segmentation run folder (1-band)')
    args = parser.parse_args()

    torch.set_num_threads(1)  # the in-process run uses one core, as each worker does
    print(f'load_average_before={os.getloadavg()[0]:.2f} cores={os.cpu_count()}')
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = args.model or make_model(folder)
        scenes = make_scenes(folder / 'scenes', args.scenes, args.size)
        one, two = start_local_cluster(['cpu']), start_local_cluster(['cpu', 'cpu'])
        try:
            for client in (one, two):  # the workers import torch and geocmid before timing
                client.run(lambda: __import__('geocmid.inference.products.segment'))
            runs = {'in_process': 'none', 'one_worker': one, 'two_workers': two}
            best = dict.fromkeys(runs, float('inf'))
            for round_ in range(args.rounds):
                for name, client in runs.items():
                    seconds, at_once = timed(scenes, model, folder / name, args.tile, client)
                    best[name] = min(best[name], seconds)
                    per_scene = seconds / len(scenes)
                    print(
                        f'round {round_}: {name} {seconds:.2f} s ({per_scene:.2f} s/scene, '
                        f'{at_once:.2f} at once)'
                    )
        finally:
            close(one)
            close(two)
        reference = labels(folder / 'in_process')
        same = all(
            labels(folder / name).keys() == reference.keys()
            and all(np.array_equal(a, reference[k]) for k, a in labels(folder / name).items())
            for name in ('one_worker', 'two_workers')
        )
    print(f'same_outputs={same}')
    print(f'load_average_after={os.getloadavg()[0]:.2f}')
    print(f'cluster_overhead={best["one_worker"] / best["in_process"]:.3f}')
    print(f'speedup_2_workers={best["one_worker"] / best["two_workers"]:.3f}')


if __name__ == '__main__':
    main()
