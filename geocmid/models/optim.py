"""Optimiser for pre-training: weight-decay groups, Adan, warm-up + cosine LR, LR scaling.

Follows ``docs/cmid.md#optimisation``, with the weight-decay groups and the explicit scaling rule
listed in ``docs/cmid.md#deviations``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

from timm.optim import Adan, param_groups_weight_decay
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from geocmid.errors import InputError

__all__ = (
    'NO_WEIGHT_DECAY',
    'LRScaling',
    'build_adan',
    'param_groups',
    'scale_lr',
    'warmup_cosine',
    'warmup_cosine_scheduler',
)

#: Parameter-name patterns without weight decay besides biases and 1-D (normalisation) tensors.
#: The official code decayed the first two (docs/cmid.md#deviations); the absolute position
#: embedding of a Swin is excluded for the same reason timm excludes it.
NO_WEIGHT_DECAY = ('*mask_token', '*relative_position_bias_table', '*absolute_pos_embed')

LRScaling = Literal['none', 'linear', 'sqrt']


def param_groups(model: nn.Module, weight_decay: float = 0.02) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed and a non-decayed group.

    No weight decay on biases, normalisation-layer parameters (all 1-D), mask tokens and
    position tables (:data:`NO_WEIGHT_DECAY`); ``weight_decay`` on every other trainable tensor,
    including the prototype directions of the local head. Frozen parameters (the teacher, the
    prototype magnitudes) are left out.

    Args:
        model: Module holding the student networks.
        weight_decay: Weight decay of the decayed group.

    Returns:
        Parameter groups for a torch optimiser.
    """
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)


def build_adan(model: nn.Module, lr: float, weight_decay: float = 0.02) -> Adan:
    """Adan (timm) with the CMID settings: betas (0.98, 0.92, 0.99), eps 1e-8.

    Args:
        model: Module holding the student networks.
        lr: Peak learning rate (after :func:`scale_lr`).
        weight_decay: Weight decay of the decayed group (see :func:`param_groups`).

    Returns:
        The optimiser.
    """
    return Adan(param_groups(model, weight_decay), lr=lr, betas=(0.98, 0.92, 0.99), eps=1e-8)


def scale_lr(base_lr: float, batch_size: int, rule: LRScaling, reference: int = 256) -> float:
    """Scale a learning rate given for a ``reference`` total batch to ``batch_size``.

    ``none``: unchanged; ``linear``: ``base_lr * B / 256``; ``sqrt``: ``base_lr * sqrt(B / 256)``
    (the rule the CMID author advised for large batches, issue #12).

    Args:
        base_lr: Learning rate at the reference batch size.
        batch_size: Total batch size (per device x devices x gradient accumulation).
        rule: ``'none'``, ``'linear'`` or ``'sqrt'``.
        reference: Reference batch size.

    Returns:
        The scaled learning rate.

    Raises:
        InputError: If ``rule`` is unknown.
    """
    ratio = batch_size / reference
    match rule:
        case 'none':
            return base_lr
        case 'linear':
            return base_lr * ratio
        case 'sqrt':
            return base_lr * math.sqrt(ratio)
    raise InputError('task.lr_scaling', f"must be 'none', 'linear' or 'sqrt', got {rule!r}")


def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int,
    peak_lr: float,
    min_lr: float = 1e-6,
    warmup_factor: float = 0.01,
) -> float:
    """Learning rate of a step: per-step cosine to ``min_lr`` with a linear warm-up.

    As the official mmcv schedule (docs/cmid.md#optimisation): the cosine runs over all steps,
    warm-up included,
    ``cos_k = min + (peak - min) (1 + cos(pi k / K)) / 2``, and during the first ``warmup_steps``
    it is multiplied by a factor rising linearly from ``warmup_factor`` to 1.

    Hand-written: timm's ``CosineLRScheduler`` and lightly's ``CosineWarmupScheduler`` ramp
    linearly to the peak, not to the decaying cosine, so they differ during warm-up.

    Args:
        step: Global step k, from 0.
        total_steps: Total steps K.
        warmup_steps: Steps of linear warm-up.
        peak_lr: Learning rate at the end of warm-up (before cosine decay).
        min_lr: Learning rate at step K.
        warmup_factor: Warm-up factor at step 0.

    Returns:
        The learning rate of step k.
    """
    progress = min(step / total_steps, 1.0) if total_steps > 0 else 1.0
    lr = min_lr + (peak_lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2
    if step < warmup_steps:
        lr *= warmup_factor + (1 - warmup_factor) * step / warmup_steps
    return lr


def warmup_cosine_scheduler(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    min_lr: float = 1e-6,
    warmup_factor: float = 0.01,
) -> LambdaLR:
    """A per-step :class:`LambdaLR` following :func:`warmup_cosine`.

    The optimiser's learning rate is the peak; step the scheduler after every optimiser step.

    Args:
        optimizer: Optimiser whose groups hold the peak learning rate.
        total_steps: Total steps K.
        warmup_steps: Steps of linear warm-up.
        min_lr: Learning rate at step K.
        warmup_factor: Warm-up factor at step 0.

    Returns:
        The scheduler.
    """
    # LambdaLR multiplies each group's peak by a factor: the schedule of a peak of 1 with the
    # minimum expressed relative to that group's peak.
    lambdas: list[Callable[[int], float]] = [
        partial(
            warmup_cosine,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            peak_lr=1.0,
            min_lr=min_lr / group['lr'],
            warmup_factor=warmup_factor,
        )
        for group in optimizer.param_groups
    ]
    return LambdaLR(optimizer, lambdas)
