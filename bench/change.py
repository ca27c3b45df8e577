"""Label-free change against change vector analysis, F1 on labelled pixels.

For each labelled pair that ``geocmid change`` can read (the Landsat pairs of Taizhou and
Nanjing in ``../shared/data/change/landsat_taizhou_nanjing``: ``change.bmp`` marks changed,
``unchanged.bmp`` unchanged pixels), as a user would:

1. pretrain an encoder briefly on the pair's own two images (``geocmid pretrain``, seeded);
2. run ``geocmid change A B --encoder RUN --method M`` for every label-free method, and the
   default method with a randomly initialised encoder (what pretraining adds);
3. compute change vector analysis independently here (per-band difference standardised over the
   scene, magnitude, Otsu threshold): the anchor.

F1 counts labelled pixels only. The last line is ``labelfree_over_cva=<x>``: the pooled F1
(over both pairs' labelled pixels) of the default method over that of CVA.

The SZTAKI AirChange pairs are PNGs without georeferencing, which ``geocmid change`` refuses, so
they are not used.

Usage::

    OMP_NUM_THREADS=2 python bench/change.py [--steps 60] [--data ../shared/data/change]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image

HERE = Path(__file__).resolve().parent
GEOCMID = [str(Path(sys.executable).with_name('geocmid'))]
LANDSAT = {
    'Taizhou': ('Taizhou/2000TM', 'Taizhou/2003TM'),
    'Nanjing': (
        'Nanjing/LT51200382000124BJC00_Nanjing',
        'Nanjing/LT51200382002193BJC00_Nanjing',
    ),
}


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``, computed independently of geocmid."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)
    above = below[-1] - below
    mean_below = np.cumsum(counts * centres) / np.maximum(below, 1)
    mean_above = (np.sum(counts * centres) - np.cumsum(counts * centres)) / np.maximum(above, 1)
    between = below * above * (mean_below - mean_above) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def cva_map(before: Path, after: Path) -> np.ndarray:
    """Change vector analysis: standardised per-band differences, magnitude, Otsu."""
    with rasterio.open(before) as a, rasterio.open(after) as b:
        difference = b.read().astype(np.float64) - a.read().astype(np.float64)
    mean = difference.mean(axis=(1, 2), keepdims=True)
    std = difference.std(axis=(1, 2), keepdims=True)
    magnitude = np.sqrt((((difference - mean) / std) ** 2).sum(axis=0))
    return magnitude >= otsu(magnitude)


def counts(predicted: np.ndarray, changed: np.ndarray, unchanged: np.ndarray) -> np.ndarray:
    """True positives, false positives, false negatives on labelled pixels."""
    return np.array(
        [(predicted & changed).sum(), (predicted & unchanged).sum(), (~predicted & changed).sum()]
    )


def f1(tp_fp_fn: np.ndarray) -> float:
    """F1 of summed counts."""
    tp, fp, fn = tp_fp_fn
    return float(2 * tp / max(2 * tp + fp + fn, 1))


def run(command: list[str]) -> None:
    """Run a geocmid command, failing loudly."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f'failed ({done.returncode}): {" ".join(command)}\n{done.stderr[-2000:]}')


def main() -> None:
    """Measure and print the table and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', type=Path, default=HERE.parent.parent / 'shared/data/change')
    parser.add_argument('--steps', type=int, default=60, help='pretraining steps per pair')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    from geocmid.inference.change_scores import CHANGE_METHODS

    root = args.data / 'landsat_taizhou_nanjing'
    totals: dict[str, np.ndarray] = {}
    print(f'{"pair":10s} {"method":34s} F1', flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, (first, second) in LANDSAT.items():
            before, after = root / first, root / second
            changed = np.asarray(Image.open(root / name / 'change.bmp').convert('L')) > 127
            unchanged = np.asarray(Image.open(root / name / 'unchanged.bmp').convert('L')) > 127
            images = work / name / 'images'
            images.mkdir(parents=True)
            for source in (before, after):  # the pretraining set: the pair's own images
                with rasterio.open(source) as src:
                    profile = src.profile | {'driver': 'GTiff'}
                    with rasterio.open(images / f'{source.name}.tif', 'w', **profile) as dst:
                        dst.write(src.read())
            encoder = work / name / 'run'
            run(
                [*GEOCMID, 'pretrain', '--rasters', str(images), '-o', str(encoder),
                 '--backbone', 'resnet18', '--patch-size', '64', '--batch-size', '16',
                 '--max-steps', str(args.steps), '--workers', '0', '--seed', str(args.seed),
                 '--accelerator', 'cpu', '--quiet']
            )  # fmt: skip
            results = {'cva (anchor, in this script)': counts(cva_map(before, after), changed,
                                                              unchanged)}  # fmt: skip
            variants = [(m, str(encoder)) for m in CHANGE_METHODS]
            variants.append((f'{CHANGE_METHODS[0]}, random encoder', 'random:resnet18'))
            for label, spec in variants:
                method = label.split(',')[0]
                labels = work / name / f'{method}-{spec.replace(":", "_").replace("/", "_")}.tif'
                # A random encoder has no card to say the bands: all six, as pretrained.
                bands = ['--bands', '1,2,3,4,5,6'] if spec.startswith('random:') else []
                run(
                    [*GEOCMID, 'change', str(before), str(after), '--encoder', spec,
                     '--method', method, '-o', str(labels.with_suffix('.gpkg')),
                     '--raster', str(labels), '--device', 'cpu', '--quiet', *bands]
                )  # fmt: skip
                with rasterio.open(labels) as src:
                    predicted = src.read(1) == 1
                results[label] = counts(predicted, changed, unchanged)
                print(f'{name:10s} {label:34s} {f1(results[label]):.3f}', flush=True)
            anchor_label = 'cva (anchor, in this script)'
            print(f'{name:10s} {anchor_label:34s} {f1(results[anchor_label]):.3f}', flush=True)
            for label, value in results.items():
                totals[label] = totals.get(label, 0) + value
    for label, value in totals.items():
        print(f'{"pooled":10s} {label:34s} {f1(value):.3f}')
    anchor = f1(totals['cva (anchor, in this script)'])
    print(f'labelfree_over_cva={f1(totals[CHANGE_METHODS[0]]) / anchor:.3f}')


if __name__ == '__main__':
    os.environ.setdefault('OMP_NUM_THREADS', '2')
    main()
