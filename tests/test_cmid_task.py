"""Tests for the CMID Lightning task and the pretraining data module."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import Tensor, nn

from geocmid.datamodules.pretrain import PretrainDataModule
from geocmid.errors import InputError
from geocmid.tasks import CMID

#: Small heads so that a step takes well under a second on one CPU core.
TINY = {
    'queue_size': 64,
    'projection_hidden_dim': 32,
    'projection_dim': 16,
    'num_prototypes': 32,
    'local_hidden_dim': 32,
    'local_bottleneck_dim': 16,
    'num_matches': 3,
    'warmup_epochs': 0,
}

#: A Swin small enough for tests: at 64 px its token grids (16, 8, 4, 2) tile into 2 x 2 windows.
TINY_SWIN = {
    'embed_dim': 16,
    'depths': (1, 1, 1, 1),
    'num_heads': (1, 1, 1, 1),
    'window_size': 2,
}

LOGGED = ('train_loss', 'loss_mim', 'loss_global', 'loss_local', 'lr', 'momentum', 'teacher_temp')


@pytest.fixture
def rasters(make_geotiff: Callable[..., Path], tmp_path: Path) -> Path:
    """Two 4-band uint8 rasters of 96 x 96 px, the second with a nodata block."""
    rng = np.random.default_rng(0)
    for name in ('a.tif', 'b.tif'):
        data = rng.integers(1, 255, (4, 96, 96), dtype=np.uint8)
        if name == 'b.tif':
            data[:, :20, :20] = 0
        make_geotiff(f'rasters/{name}', data, nodata=0)
    return tmp_path / 'rasters'


def data_module(rasters: Path, **kwargs: Any) -> PretrainDataModule:
    options: dict[str, Any] = {'patch_size': 64, 'batch_size': 4, 'samples_per_epoch': 8}
    return PretrainDataModule(rasters=rasters, **(options | kwargs))


def tiny_task(data: PretrainDataModule, **kwargs: Any) -> CMID:
    arguments: dict[str, Any] = {
        'backbone': 'resnet18',
        'in_channels': data.in_channels,
        'patch_size': 64,
        'band_names': data.band_names,
        'mean': data.mean.tolist(),
        'std': data.std.tolist(),
        'samples_per_epoch': data.samples_per_epoch,
        **TINY,
    }
    return CMID(**(arguments | kwargs))


def trainer(**kwargs: Any) -> lightning.Trainer:
    options: dict[str, Any] = {
        'accelerator': 'cpu',
        'max_steps': 1,
        'logger': False,
        'enable_checkpointing': False,
        'enable_progress_bar': False,
        'enable_model_summary': False,
        'use_distributed_sampler': False,
    }
    return lightning.Trainer(**(options | kwargs))


def parameters(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.named_parameters()}


def ema_pairs(task: CMID) -> list[tuple[nn.Module, nn.Module]]:
    """(teacher, student) module pairs that the EMA must average, written out independently."""
    return [
        (task.teacher['encoder'].encoder, task.student.encoder),
        (task.teacher['projector'], task.projector),
        (task.teacher['local_head'], task.local_head),
    ]


def test_teacher_is_exact_frozen_copy_at_init(rasters: Path) -> None:
    task = tiny_task(data_module(rasters))
    for teacher, student in ema_pairs(task):
        student_params = parameters(student)
        for name, value in teacher.named_parameters():
            assert torch.equal(value, student_params[name]), name
            assert not value.requires_grad, name
    # The local head has BatchNorm for ResNet (docs/cmid.md#local-branch).
    assert any(isinstance(m, nn.BatchNorm1d) for m in task.local_head.modules())


def test_training_step_logs_finite_losses_and_ema_moves_teacher(rasters: Path) -> None:
    lightning.seed_everything(0, verbose=False)
    data = data_module(rasters)
    task = tiny_task(data)
    before = {i: parameters(student) for i, (_, student) in enumerate(ema_pairs(task))}
    mask_token = task.teacher['encoder'].mask_token.detach().clone()
    centre_updates = []
    update_center = task.local_loss.update_center
    task.local_loss.update_center = lambda logits: (centre_updates.append(1), update_center(logits))
    run = trainer()
    run.fit(task, datamodule=data)

    metrics = run.callback_metrics
    assert set(LOGGED) <= set(metrics)
    assert all(math.isfinite(float(metrics[key])) for key in LOGGED)
    total = metrics['loss_mim'] + metrics['loss_global'] + metrics['loss_local']
    assert float(metrics['train_loss']) == pytest.approx(float(total), rel=1e-5)
    assert float(metrics['momentum']) == pytest.approx(0.996)
    assert float(metrics['teacher_temp']) == pytest.approx(0.04)
    assert centre_updates == [1]  # once per step (docs/cmid.md#deviations)

    # After one step with momentum 0.996 (cosine schedule at step 0), every teacher parameter
    # is 0.996 x (its value at init = the student's) + 0.004 x the updated student value.
    for i, (teacher, student) in enumerate(ema_pairs(task)):
        updated = parameters(student)
        moved = False
        for name, value in teacher.named_parameters():
            expected = 0.996 * before[i][name] + 0.004 * updated[name]
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
            moved |= not torch.equal(updated[name], before[i][name])
            if not torch.equal(updated[name], before[i][name]):
                assert not torch.equal(value, updated[name]), name
        assert moved
    # The mask token is trained but never averaged into the teacher.
    assert not torch.equal(task.student.mask_token, torch.zeros_like(task.student.mask_token))
    assert torch.equal(task.teacher['encoder'].mask_token, mask_token)
    # Teacher keys of both crops were enqueued once: 2 x 4 new keys.
    assert int(task.queue.ptr) == 8


def test_global_loss_uses_the_queue_before_the_step(
    rasters: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import geocmid.tasks.ssl.cmid as cmid_module

    lightning.seed_everything(0, verbose=False)
    data = data_module(rasters)
    task = tiny_task(data, samples_per_epoch=None, temperature=0.2)
    queue_before = task.queue.keys.clone()
    calls = []
    infonce = cmid_module.infonce

    def recording_infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
        calls.append((q.detach().clone(), k.detach().clone(), queue.clone(), temperature))
        return infonce(q, k, queue, temperature)

    monkeypatch.setattr(cmid_module, 'infonce', recording_infonce)
    run = trainer()
    run.fit(task, datamodule=data)

    [(queries, keys, queue, temperature)] = calls
    assert torch.equal(queue, queue_before)  # the queue as it was before the step
    assert temperature == 0.2 and queries.shape == keys.shape == (8, 16)
    # The positives (teacher keys of B for student A, then of A for student B) are what was
    # enqueued after the loss, in that order.
    torch.testing.assert_close(task.queue.keys[:, :8], keys.T)
    assert torch.equal(task.queue.keys[:, 8:], queue_before[:, 8:])
    # InfoNCE written out with numpy, one query at a time.
    q, k, negatives = (x.double().numpy() for x in (queries, keys, queue))
    losses = []
    for i in range(len(q)):
        logits = np.concatenate([[q[i] @ k[i]], q[i] @ negatives]) / 0.2
        losses.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[0])
    assert float(run.callback_metrics['loss_global']) == pytest.approx(np.mean(losses), rel=1e-4)


def test_queue_is_capped_with_a_warning(rasters: Path) -> None:
    data = data_module(rasters)
    with pytest.warns(UserWarning, match=r'from 64 \(configured\) to 16 \(effective\)'):
        task = tiny_task(data)
    assert task.queue.keys.shape == (16, 16)
    uncapped = tiny_task(data, samples_per_epoch=None)
    assert uncapped.queue.keys.shape == (16, 64)


def test_optimiser_scales_lr_and_spares_mask_token(rasters: Path) -> None:
    data = data_module(rasters)
    task = tiny_task(data, lr=0.004, lr_scaling='linear', weight_decay=0.02)
    run = trainer()
    run.fit(task, datamodule=data)
    optimiser = run.optimizers[0]
    assert type(optimiser).__name__ == 'Adan'
    # Peak = 0.004 x total batch 4 / 256.
    peaks = [group['initial_lr'] for group in optimiser.param_groups]
    assert peaks == pytest.approx([6.25e-5] * len(peaks))
    decay = {
        id(p): group['weight_decay'] for group in optimiser.param_groups for p in group['params']
    }
    assert decay[id(task.student.mask_token)] == 0
    assert decay[id(task.student.encoder.bn1.weight)] == 0
    assert decay[id(task.student.encoder.conv1.weight)] == 0.02
    teacher_ids = {id(p) for p in task.teacher.parameters()}
    assert not teacher_ids & set(decay)  # the teacher is not optimised


def test_teacher_temperature_follows_epochs(rasters: Path) -> None:
    data = data_module(rasters, samples_per_epoch=4)  # one batch per epoch
    task = tiny_task(data, warmup_teacher_temperature_epochs=3)
    run = trainer(max_steps=-1, max_epochs=3)
    temperatures = []

    class Record(lightning.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            temperatures.append(float(trainer.callback_metrics['teacher_temp']))

    run.callbacks.append(Record())
    run.fit(task, datamodule=data)
    # linspace(0.04, 0.07, 3) indexed by the 0-based epoch.
    assert temperatures == pytest.approx([0.04, 0.055, 0.07])


def test_encoder_state_dict_loads_strictly_into_timm(rasters: Path) -> None:
    task = tiny_task(data_module(rasters))
    model = timm.create_model('resnet18', in_chans=4, num_classes=0, **task.encoder_kwargs())
    model.load_state_dict(task.encoder_state_dict(), strict=True)


def test_tiny_swin_step(rasters: Path) -> None:
    lightning.seed_everything(0, verbose=False)
    data = data_module(rasters)
    task = tiny_task(data, backbone='swin_tiny_patch4_window7_224', backbone_kwargs=TINY_SWIN)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in task.local_head.modules())
    run = trainer()
    run.fit(task, datamodule=data)
    assert math.isfinite(float(run.callback_metrics['train_loss']))
    kwargs = task.encoder_kwargs()
    assert kwargs['img_size'] == 64
    model = timm.create_model('swin_tiny_patch4_window7_224', in_chans=4, num_classes=0, **kwargs)
    model.load_state_dict(task.encoder_state_dict(), strict=True)


def test_data_module_normalises_and_zeroes_nodata(rasters: Path) -> None:
    data = data_module(rasters)
    # GDAL's colour interpretation names the first three bands (GTiff writes RGB by default)
    assert data.band_names == ['red', 'green', 'blue', 'band_4']
    assert data.max_value == 255.0
    assert data.resolution == 1.0
    image = torch.full((1, 4, 2, 2), 100.0)
    valid = torch.tensor([[[True, False], [True, True]]])
    batch = data.on_after_batch_transfer({'image': image, 'valid': valid}, 0)
    expected = (100.0 - data.mean) / data.std
    torch.testing.assert_close(batch['image'][0, :, 0, 0], expected)
    assert torch.equal(batch['image'][0, :, 0, 1], torch.zeros(4))
    assert torch.equal(batch['valid'], valid)


def test_data_module_patches_avoid_nodata(rasters: Path) -> None:
    data = data_module(rasters)
    data.setup('fit')
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
    assert batch['image'].shape == (4, 4, 64, 64)
    assert batch['valid'].float().mean(dim=(1, 2)).min() >= 0.5


def test_data_module_from_chips(tmp_path: Path) -> None:
    folder = tmp_path / 'chips'
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(folder / 'a.png')
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / 'b.png')
    data = PretrainDataModule(images=folder, patch_size=64, batch_size=2, bands=[3, 1])
    assert data.band_names == ['blue', 'red']
    assert data.samples_per_epoch == 2 and data.resolution is None
    data.setup('fit')
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
    assert batch['image'].shape == (2, 2, 64, 64)


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'bands': [7]}, 'band'),
        ({'patch_size': 128}, 'larger than every raster'),
    ],
)
def test_data_module_bad_input(rasters: Path, kwargs: dict[str, Any], message: str) -> None:
    options = {'patch_size': 64, 'batch_size': 4} | kwargs
    with pytest.raises(InputError, match=message):
        PretrainDataModule(rasters=rasters, **options)


def test_data_module_needs_exactly_one_source(rasters: Path) -> None:
    with pytest.raises(InputError, match='exactly one'):
        PretrainDataModule(rasters=rasters, images=rasters)


DDP_SCRIPT = """
import os, sys
from geocmid.runs.pretrain import load_pretrain_config, run_pretraining

config = load_pretrain_config(sys.argv[1], rasters=sys.argv[2], output=sys.argv[3], devices=2,
                              max_steps=2)
result = run_pretraining(config, progress=False)
print('RESULT', os.environ.get('LOCAL_RANK', '0'), result.global_step)
"""


@pytest.mark.slow
def test_two_process_ddp_run(rasters: Path, tmp_path: Path) -> None:
    """Lightning DDP on 2 CPU processes (gloo): both ranks step together, rank 0 writes."""
    script = tmp_path / 'ddp.py'
    script.write_text(DDP_SCRIPT)
    config = Path(__file__).resolve().parents[1] / 'configs' / 'cmid_tiny_test.yaml'
    run_dir = tmp_path / 'run'
    done = subprocess.run(
        [sys.executable, script, config, rasters, run_dir],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env=os.environ | {'OMP_NUM_THREADS': '1'},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(line for line in done.stdout.splitlines() if line.startswith('RESULT')) == [
        'RESULT 0 2',
        'RESULT 1 2',
    ]
    checkpoint = torch.load(run_dir / 'checkpoints' / 'last.ckpt', weights_only=False)
    # 2 steps x 2 ranks x 2 crops x 4 keys, gathered once, wrap around the 16-key queue.
    assert int(checkpoint['state_dict']['queue.ptr']) == (2 * 2 * 2 * 4) % 16
    assert (run_dir / 'encoder.pt').is_file() and (run_dir / 'model_card.json').is_file()
