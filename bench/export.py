"""Benchmark ONNX Runtime against torch on the CPU: forward passes and whole-scene `segment`.

A randomly initialised segmentation run (smp ``Unet('resnet18')``, 4 bands, 4 classes, as in
``bench/segment.py``) is written as a run folder and exported with ``geocmid export``. Then, with
the same threads for both (``torch.set_num_threads`` equals ONNX Runtime's intra-op threads):

* **forward**: seconds per window of the network alone on the same normalised batch of
  ``--batch-size`` windows of ``--tile`` pixels, torch and ONNX Runtime alternating;
* **segment**: wall time of ``geocmid.segment`` on a generated ``--size`` px scene (label COG
  written), from the run folder and from the ``.onnx`` file, alternating.

Each figure is the fastest of ``--repeats`` runs (the machine may be shared). Usage:
``OMP_NUM_THREADS=1 python bench/export.py [--size 1024] [--tile 256] [--batch-size 4]
[--threads 1] [--repeats 3]``. The last line reads ``onnx_over_torch=<x>``: ONNX Runtime's
forward time per window over torch's (below 1: ONNX Runtime is faster).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segment import BANDS, CLASSES, MEAN, STD, write_scene  # noqa: E402

from geocmid.inference.onnx_model import OnnxNetwork  # noqa: E402
from geocmid.inference.products.segment import segment_scene  # noqa: E402
from geocmid.io.cards import ClassInfo, ModelCard, write_card  # noqa: E402
from geocmid.models.networks import segmentation_network  # noqa: E402
from geocmid.runs.artefacts import load_segmentation_model  # noqa: E402
from geocmid.runs.export import export_onnx  # noqa: E402


def write_run(folder: Path, tile: int) -> Path:
    """A segmentation run folder with random weights, as ``geocmid train segment`` writes it."""
    torch.manual_seed(0)
    hparams = {'model': 'unet', 'backbone': 'resnet18', 'in_channels': BANDS}
    network = segmentation_network('unet', 'resnet18', BANDS, CLASSES)
    folder.mkdir(parents=True)
    state = {f'model.{key}': value for key, value in network.state_dict().items()}
    checkpoint = {'hyper_parameters': {**hparams, 'num_classes': CLASSES}, 'state_dict': state}
    torch.save(checkpoint, folder / 'model.ckpt')
    classes = [ClassInfo(f'class_{i}', (40 * i, 60, 200 - 40 * i)) for i in range(CLASSES)]
    card = ModelCard(
        method='random', backbone='resnet18', bands=[f'b{i}' for i in range(1, BANDS + 1)],
        band_indices=list(range(1, BANDS + 1)), mean=MEAN, std=STD, patch_size=tile,
        task='segmentation', classes=classes, tile_size=tile,
    )  # fmt: skip
    write_card(folder, card)
    return folder


def per_window(network: torch.nn.Module, batch: torch.Tensor, repeats: int) -> list[float]:
    """Seconds per window of each of ``repeats`` forward passes (after one warm-up pass)."""
    times = []
    with torch.inference_mode():
        network(batch)
        for _ in range(repeats):
            start = time.perf_counter()
            network(batch)
            times.append((time.perf_counter() - start) / len(batch))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--tile', type=int, default=256)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        run = write_run(root / 'run', args.tile)
        onnx_file = export_onnx(run, root / 'model.onnx')
        torch_network, _ = load_segmentation_model(run)
        onnx_network = OnnxNetwork(
            onnx_file, threads=args.threads, providers=['CPUExecutionProvider']
        )
        batch = torch.randn(args.batch_size, BANDS, args.tile, args.tile)
        forward: dict[str, list[float]] = {'torch': [], 'onnx': []}
        for _ in range(args.repeats):
            forward['torch'] += per_window(torch_network, batch, 1)
            forward['onnx'] += per_window(onnx_network, batch, 1)
        scene = root / 'scene.tif'
        write_scene(scene, args.size)
        wall: dict[str, list[float]] = {'torch': [], 'onnx': []}
        for index in range(args.repeats):
            for name, model in (('torch', run), ('onnx', onnx_file)):
                start = time.perf_counter()
                segment_scene(
                    scene, model, raster=root / f'{name}{index}.tif', batch_size=args.batch_size,
                    tile=args.tile, device='cpu', progress=False,
                )  # fmt: skip
                wall[name].append(time.perf_counter() - start)
    for name in ('torch', 'onnx'):
        print(
            f'{name}: forward {", ".join(f"{t:.3f}" for t in forward[name])} s/window; '
            f'segment {", ".join(f"{t:.1f}" for t in wall[name])} s'
        )
    print(f'segment_onnx_over_torch={min(wall["onnx"]) / min(wall["torch"]):.3f}')
    print(f'onnx_over_torch={min(forward["onnx"]) / min(forward["torch"]):.3f}')


if __name__ == '__main__':
    main()
