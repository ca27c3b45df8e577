"""Time one pretraining step of geocmid's CMID and GeRSP against TorchGeo's MoCo, same inputs.

Every task trains the same timm backbone on the same in-memory batches (batch and patch size,
bands, device) through a Lightning Trainer: a step is forward, backward and optimiser step, plus
each method's EMA and queue updates. The methods alternate in rounds (warm-up steps, then timed
steps) so that changes in machine load affect them alike; the median step time is reported.

Two MoCo baselines are timed:

* ``moco``: ``torchgeo.tasks.MoCo`` with its defaults (v3). Like CMID it runs the student and the
  teacher on both views with a symmetric loss, so the ratio measures what CMID adds (masking,
  the MIM decoder and its losses, the local DINO branch, Adan instead of AdamW).
* ``moco_v2``: MoCo v2 (one student and one teacher pass, one loss direction, SGD), which does
  half of CMID's backbone passes: its ratio cannot go below about 2.

The last line reads ``cmid_over_moco=<x> cmid_over_moco_v2=<y>`` (target: x <= 2.2).

    python bench/pretrain.py                                  # resnet18, 128 px, CPU
    python bench/pretrain.py --backbone resnet50 --patch-size 224 --batch-size 4
    python bench/pretrain.py --gpu-throughput     # on CUDA: CMID images/s, resnet50 224 bf16

GeRSP is timed too: a step also encodes one natural image per patch (ImageNet-sized 1000-class
head) in the student pass, so it runs three backbone passes per patch where MoCo v2 runs two.
Its ratios follow CMID's on the last line: ``... gersp_over_moco=<z> gersp_over_moco_v2=<w>``.
Methods plug in through BENCHED.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import lightning
import torch
from lightning.pytorch import Callback, LightningModule
from torch.utils.data import DataLoader, Dataset
from torchgeo.tasks import MoCo

from geocmid.tasks import CMID, GeRSP

#: Queue of negative keys of CMID, GeRSP and MoCo v2 (every method's default).
QUEUE_SIZE = 65536

#: Classes of GeRSP's natural images (ImageNet-1k, as in the paper).
NATURAL_CLASSES = 1000


class StepTimer(Callback):
    """Wall time of every training step after ``warmup`` steps (device synchronised)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        """Start the clock once the device has finished its queued work."""
        _synchronise(module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Record the step's wall time once the device has finished it."""
        _synchronise(module.device)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)


class Patches(Dataset[dict[str, torch.Tensor]]):
    """Random patches held in memory, so the timing excludes I/O; values in [0, 1].

    Each sample also carries a labelled natural RGB image for GeRSP, which the other methods
    ignore.
    """

    def __init__(self, count: int, bands: int, size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(count, bands, size, size, generator=generator)
        self.natural = torch.rand(count, 3, size, size, generator=generator)
        self.labels = torch.randint(NATURAL_CLASSES, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            'image': self.images[index],
            'natural_image': self.natural[index],
            'natural_label': self.labels[index],
        }


def build_cmid(backbone: str, bands: int, size: int) -> LightningModule:
    """CMID as geocmid builds it, with the paper's heads and queue (inputs already in [0, 1])."""
    return CMID(
        backbone=backbone,
        in_channels=bands,
        patch_size=size,
        mean=[0.0] * bands,
        std=[255.0] * bands,  # raw units: /255 maps [0, 255] to [0, 1], i.e. data in [0, 1]
        queue_size=QUEUE_SIZE,
        warmup_epochs=0,
    )


def build_gersp(backbone: str, bands: int, size: int) -> LightningModule:
    """GeRSP as geocmid builds it, with the paper's heads and queue.

    Each step also encodes a natural image per patch, so its student pass is twice MoCo v2's.
    """
    return GeRSP(
        backbone=backbone,
        in_channels=bands,
        patch_size=size,
        mean=[0.0] * bands,
        std=[255.0] * bands,  # as for CMID: data in [0, 1]
        num_classes=NATURAL_CLASSES,
        natural_mean=[0.0] * 3,
        natural_std=[255.0] * 3,
        queue_size=QUEUE_SIZE,
    )


def build_moco(backbone: str, bands: int, size: int) -> LightningModule:
    """TorchGeo's MoCo with its defaults (v3: symmetric loss, no memory bank, AdamW)."""
    return MoCo(model=backbone, in_channels=bands, size=size)


def build_moco_v2(backbone: str, bands: int, size: int) -> LightningModule:
    """TorchGeo's MoCo v2: 2-layer 2048-128 projector, 65,536-key memory bank, SGD."""
    return MoCo(
        model=backbone,
        in_channels=bands,
        version=2,
        layers=2,
        hidden_dim=2048,
        output_dim=128,
        lr=0.03,
        weight_decay=1e-4,
        temperature=0.07,
        memory_bank_size=QUEUE_SIZE,
        moco_momentum=0.999,
        size=size,
    )


#: The baselines every method is compared with.
BASELINES: dict[str, Callable[[str, int, int], LightningModule]] = {
    'moco': build_moco,
    'moco_v2': build_moco_v2,
}

#: Methods timed against the baselines.
BENCHED: dict[str, Callable[[str, int, int], LightningModule]] = {
    'cmid': build_cmid,
    'gersp': build_gersp,
}


def time_steps(
    module: LightningModule, data: Dataset[Any], args: argparse.Namespace, precision: str
) -> list[float]:
    """Wall times of ``args.steps`` training steps of ``module``, after ``args.warmup`` steps."""
    timer = StepTimer(args.warmup)
    trainer = lightning.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=precision,
        # One epoch of exactly warm-up + timed steps (TorchGeo's MoCo v3 needs max_epochs).
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    trainer.fit(module, loader)
    return timer.times


def median(values: list[float]) -> float:
    """The median of ``values``."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _synchronise(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def main() -> None:
    """Parse options, time every method and the baselines, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--backbone', default='resnet18', choices=['resnet18', 'resnet50'])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--patch-size', type=int, default=128)
    parser.add_argument('--bands', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per round')
    parser.add_argument('--steps', type=int, default=4, help='timed steps per round')
    parser.add_argument('--rounds', type=int, default=3, help='rounds, methods alternating')
    parser.add_argument('--accelerator', default='auto')
    parser.add_argument('--precision', default='32')
    parser.add_argument(
        '--gpu-throughput',
        action='store_true',
        help='on CUDA also measure CMID images/s for resnet50 at 224 px in bf16',
    )
    args = parser.parse_args()
    lightning.seed_everything(0, verbose=False)
    data = Patches(args.batch_size * (args.warmup + args.steps), args.bands, args.patch_size)

    builders = BASELINES | BENCHED
    modules = {
        name: build(args.backbone, args.bands, args.patch_size) for name, build in builders.items()
    }
    times: dict[str, list[float]] = {name: [] for name in modules}
    # Methods alternate round by round, so that a change in machine load affects them alike.
    for _ in range(args.rounds):
        for name, module in modules.items():
            times[name] += time_steps(module, data, args, args.precision)
    seconds = {name: median(values) for name, values in times.items()}
    setting = f'{args.backbone} {args.patch_size}px, batch {args.batch_size}, {args.precision}'
    for name, value in seconds.items():
        print(f'{name:8} {setting}: {value * 1e3:.1f} ms/step (median of {len(times[name])})')
    ratios = [
        f'{name}_over_{baseline}={seconds[name] / seconds[baseline]:.2f}'
        for name in BENCHED
        for baseline in BASELINES
    ]

    if args.gpu_throughput:
        if not torch.cuda.is_available():
            print('gpu throughput: skipped (no CUDA device)')
        else:
            args.batch_size = 64  # the paper's batch per GPU (docs/cmid.md#optimisation)
            data = Patches(args.batch_size * (args.warmup + args.steps), 3, 224)
            step = median(time_steps(build_cmid('resnet50', 3, 224), data, args, 'bf16-mixed'))
            rate = args.batch_size / step
            print(f'cmid resnet50 224px bf16 batch {args.batch_size}: {rate:.1f} images/s')
    print(' '.join(ratios))


if __name__ == '__main__':
    main()
