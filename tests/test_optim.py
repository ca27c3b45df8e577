"""Tests for geocmid.models.optim: weight-decay groups, Adan, LR schedule and scaling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightly.utils.scheduler import cosine_warmup_schedule
from timm.optim import Adan
from timm.scheduler import CosineLRScheduler
from torch import nn

from geocmid.errors import InputError
from geocmid.models.backbones import MaskedEncoder
from geocmid.models.heads import LocalHead
from geocmid.models.momentum import copy_as_teacher
from geocmid.models.optim import (
    build_adan,
    param_groups,
    scale_lr,
    warmup_cosine,
    warmup_cosine_scheduler,
)


def _decay_by_name(model: nn.Module) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g['weight_decay'] for g in param_groups(model, 0.02) for p in g['params']}


def test_resnet_groups_exempt_token_norms_biases() -> None:
    model = nn.ModuleDict({'encoder': MaskedEncoder('resnet18', 3, 64), 'head': LocalHead(512)})
    decay = _decay_by_name(model)
    assert decay['encoder.mask_token'] == 0.0
    assert decay['encoder.encoder.bn1.weight'] == 0.0
    assert decay['encoder.encoder.layer1.0.bn2.bias'] == 0.0
    assert decay['head.mlp.0.bias'] == 0.0
    assert decay['head.mlp.1.weight'] == 0.0  # BatchNorm1d
    assert decay['encoder.encoder.conv1.weight'] == 0.02
    assert decay['head.mlp.0.weight'] == 0.02
    assert decay['head.prototypes.parametrizations.weight.original1'] == 0.02
    assert 'head.prototypes.parametrizations.weight.original0' not in decay  # frozen magnitude
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == trainable


def test_swin_groups_exempt_position_bias_tables() -> None:
    tiny = {'embed_dim': 16, 'depths': (2, 2, 2, 2), 'num_heads': (1, 1, 2, 2), 'window_size': 2}
    model = MaskedEncoder('swin_tiny_patch4_window7_224', 3, 64, **tiny)
    decay = _decay_by_name(model)
    tables = [n for n in decay if n.endswith('relative_position_bias_table')]
    assert len(tables) == 8
    assert all(decay[n] == 0.0 for n in tables)
    assert decay['mask_token'] == 0.0
    assert decay['encoder.patch_embed.norm.weight'] == 0.0
    assert decay['encoder.layers.0.blocks.0.attn.qkv.weight'] == 0.02
    assert decay['encoder.layers.0.blocks.0.attn.qkv.bias'] == 0.0


def test_frozen_teacher_is_left_out() -> None:
    student = nn.Linear(3, 4)
    model = nn.ModuleDict({'student': student, 'teacher': copy_as_teacher(student)})
    assert set(_decay_by_name(model)) == {'student.weight', 'student.bias'}


def test_build_adan_settings_and_step() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    optimizer = build_adan(model, lr=0.004)
    assert isinstance(optimizer, Adan)
    assert {g['weight_decay'] for g in optimizer.param_groups} == {0.0, 0.02}
    for group in optimizer.param_groups:
        assert group['betas'] == (0.98, 0.92, 0.99)
        assert group['eps'] == 1e-8
    before = model[0].weight.clone()
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model[0].weight)


def _reference_lr(k: int, total: int, warmup: int, peak: float, floor: float) -> float:
    cosine = floor + 0.5 * (peak - floor) * (1 + np.cos(np.pi * k / total))
    return cosine * (0.01 + 0.99 * k / warmup) if k < warmup else cosine


def test_warmup_cosine_values() -> None:
    total, warmup, peak = 100, 10, 0.004
    assert warmup_cosine(0, total, warmup, peak) == pytest.approx(0.01 * peak)
    assert warmup_cosine(total, total, warmup, peak) == pytest.approx(1e-6)
    assert warmup_cosine(total + 5, total, warmup, peak) == pytest.approx(1e-6)
    lrs = [warmup_cosine(k, total, warmup, peak) for k in range(total + 1)]
    expected = [_reference_lr(k, total, warmup, peak, 1e-6) for k in range(total + 1)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert np.all(np.diff(lrs[: warmup + 1]) > 0)
    assert np.all(np.diff(lrs[warmup:]) < 0)


def test_library_schedules_differ_during_warmup() -> None:
    # Why warmup_cosine is hand-written: timm's and lightly's warm-ups end on the peak, not on
    # the cosine; after warm-up timm's cosine (over all steps) is the same curve.
    total, warmup, peak = 100, 10, 1e-3
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    timm_schedule = CosineLRScheduler(
        optimizer,
        t_initial=total,
        lr_min=1e-6,
        warmup_t=warmup,
        warmup_lr_init=0.01 * peak,
        warmup_prefix=False,
        t_in_epochs=False,
    )
    for k in (0, 10, 50, 100):
        assert timm_schedule._get_lr(k)[0] == pytest.approx(warmup_cosine(k, total, warmup, peak))
    assert timm_schedule._get_lr(9)[0] != pytest.approx(warmup_cosine(9, total, warmup, peak))
    lightly_lr = peak * cosine_warmup_schedule(9, total, 1.0, 1e-3, warmup, 0.01)
    assert lightly_lr != pytest.approx(warmup_cosine(9, total, warmup, peak))
    assert warmup_cosine(9, total, warmup, peak) == pytest.approx(
        _reference_lr(9, total, warmup, peak, 1e-6)
    )


def test_scheduler_follows_warmup_cosine_for_each_group() -> None:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{'params': [a], 'lr': 0.004}, {'params': [b], 'lr': 0.001}])
    scheduler = warmup_cosine_scheduler(optimizer, total_steps=50, warmup_steps=5)
    for k in range(51):
        for group, peak in zip(optimizer.param_groups, (0.004, 0.001), strict=True):
            assert group['lr'] == pytest.approx(_reference_lr(k, 50, 5, peak, 1e-6), rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_scale_lr_rules() -> None:
    assert scale_lr(0.001, 1024, 'none') == 0.001
    assert scale_lr(0.001, 512, 'linear') == pytest.approx(0.002)
    assert scale_lr(0.001, 1024, 'sqrt') == pytest.approx(0.002)
    assert scale_lr(0.001, 64, 'sqrt', reference=256) == pytest.approx(0.001 * math.sqrt(0.25))
    with pytest.raises(InputError, match="task.lr_scaling: .*'cubic'"):
        scale_lr(0.001, 256, 'cubic')
