"""EMA teachers and the key queue of negatives, shared by CMID and GeRSP.

CMID: cosine momentum schedule 0.996 -> 1 and a 65,536-key queue (``docs/cmid.md#teacher``).
GeRSP: constant momentum 0.999 (``cosine_momentum`` with ``base == final``) and its own queue.
The EMA step itself is lightly's ``update_momentum`` (parameters only), called by the tasks.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from geocmid.errors import InputError

__all__ = (
    'KeyQueue',
    'copy_as_teacher',
    'cosine_momentum',
    'effective_queue_size',
)


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """EMA momentum of a step: ``final - (final - base) * (cos(pi k / K) + 1) / 2``.

    Hand-written: lightly's ``cosine_schedule`` divides by K - 1, not K, so it misses this curve.

    Args:
        step: Global step k, from 0.
        total_steps: Total steps K of the run.
        base: Momentum at step 0.
        final: Momentum at step K (``final == base`` gives a constant momentum).

    Returns:
        The momentum tau_k.
    """
    progress = min(step / total_steps, 1.0) if total_steps > 0 else 1.0
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def copy_as_teacher[M: nn.Module](student: M) -> M:
    """Return an exact copy of ``student`` whose parameters receive no gradient.

    Make the copy after all initialisation and weight loading (``docs/gersp.md#deviations``). The
    copy keeps the student's train/eval mode: the CMID teacher runs BatchNorm on batch statistics.
    """
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


def _gather(keys: Tensor) -> Tensor:
    """Concatenate ``keys`` from every device (rank order); a no-op without distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    gathered = keys.new_empty(dist.get_world_size() * len(keys), *keys.shape[1:])
    dist.all_gather_into_tensor(gathered, keys.contiguous())
    return gathered


class KeyQueue(nn.Module):
    """FIFO queue of negative keys, stored as a (D, K) buffer for ``q @ keys``.

    Hand-written: lightly's ``MemoryBankModule`` drops the keys that overrun the end of the bank
    instead of wrapping around, and does not save the bank in checkpoints.

    Initial keys are standard normal, each normalised to unit length (MoCo convention,
    ``docs/cmid.md#deviations``). :meth:`enqueue` gathers the new keys once across devices and
    writes them with wrap-around, so the size need not be a multiple of the keys per step. All
    devices hold the same queue as long as they start from the same one (DDP broadcasts buffers from
    rank 0).
    """

    keys: Tensor
    ptr: Tensor

    def __init__(self, dim: int, size: int) -> None:
        """Initialise a new KeyQueue.

        Args:
            dim: Key dimension D.
            size: Number of keys K.
        """
        super().__init__()
        self.register_buffer('keys', F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer('ptr', torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, new_keys: Tensor) -> None:
        """Replace the oldest keys by ``new_keys`` from every device.

        Call once per step with all keys of the step on this device (e.g. the teacher keys of
        both crops concatenated), after the step's losses were computed with the old queue.
        Every device must pass the same number of keys.

        Args:
            new_keys: L2-normalised keys of shape (N, D).
        """
        new_keys = _gather(new_keys.detach()).to(self.keys.dtype)
        size = self.keys.shape[1]
        new_keys = new_keys[-size:]  # more keys than slots: only the newest survive
        slots = (self.ptr + torch.arange(len(new_keys), device=self.keys.device)) % size
        self.keys[:, slots] = new_keys.T
        self.ptr.copy_((self.ptr + len(new_keys)) % size)


def effective_queue_size(configured: int, keys_per_epoch: int) -> tuple[int, bool]:
    """Cap the queue size at the keys enqueued per epoch (``docs/cmid.md#deviations``).

    A larger queue would hold keys computed by teachers from earlier epochs, including each
    image's own earlier keys as negatives. No rounding to the keys per step is needed because
    :class:`KeyQueue` wraps around.

    Args:
        configured: Requested queue size.
        keys_per_epoch: Keys enqueued per epoch (CMID: 2 x samples per epoch).

    Returns:
        ``(size, capped)``: the size to use and whether the cap applied (the caller warns).

    Raises:
        InputError: If ``configured`` is not positive.
        ValueError: If ``keys_per_epoch`` is not positive.
    """
    if configured <= 0:
        raise InputError('task.queue_size', f'must be positive, got {configured}')
    if keys_per_epoch <= 0:
        raise ValueError(f'keys_per_epoch must be positive, got {keys_per_epoch}')
    size = min(configured, keys_per_epoch)
    return size, size < configured
