"""Tests for geocmid.models.momentum: EMA schedule and update, teacher copy, key queue."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from geocmid.errors import InputError
from geocmid.models.losses import DINOLoss
from geocmid.models.momentum import (
    KeyQueue,
    copy_as_teacher,
    cosine_momentum,
    effective_queue_size,
)


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0, 1000) == pytest.approx(0.996)
    assert cosine_momentum(500, 1000) == pytest.approx(0.998)
    assert cosine_momentum(1000, 1000) == pytest.approx(1.0)
    assert cosine_momentum(250, 1000) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(123, 1000, base=0.999, final=0.999) == pytest.approx(0.999)


def test_lightly_cosine_schedule_is_not_the_cmid_momentum() -> None:
    # Why cosine_momentum is hand-written: lightly runs the cosine over K - 1 steps.
    total = 10
    ours = [cosine_momentum(k, total) for k in range(total)]
    lightly = [cosine_schedule(k, total, 0.996, 1.0) for k in range(total)]
    spec = [1 - 0.004 * (math.cos(math.pi * k / total) + 1) / 2 for k in range(total)]
    assert ours == pytest.approx(spec, abs=1e-12)
    assert lightly[0] == pytest.approx(spec[0])
    assert lightly[5] != pytest.approx(spec[5], abs=1e-6)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_copy_as_teacher_is_exact_frozen_and_independent() -> None:
    student = _net()
    teacher = copy_as_teacher(student)
    teacher_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, teacher_state[name]), name
        assert tensor.data_ptr() != teacher_state[name].data_ptr()
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())


def test_lightly_update_momentum_is_the_ema_on_parameters_only() -> None:
    # The tasks average with lightly's update_momentum: t <- tau t + (1 - tau) s, buffers kept.
    torch.manual_seed(0)
    student, teacher = _net(), _net()
    teacher.requires_grad_(False)
    student[1].running_mean.fill_(5.0)
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_momentum(student, teacher, 0.9)
    for name, param in teacher.named_parameters():
        expected = 0.9 * before_teacher[name] + 0.1 * dict(student.named_parameters())[name]
        torch.testing.assert_close(param, expected, rtol=0, atol=1e-7)
    for name, buffer in teacher.named_buffers():
        assert torch.equal(buffer, before_teacher[name]), name


def test_key_queue_initial_keys_are_unit_length() -> None:
    queue = KeyQueue(dim=16, size=50)
    assert queue.keys.shape == (16, 50)
    assert torch.allclose(queue.keys.norm(dim=0), torch.ones(50), atol=1e-6)
    assert queue.ptr.item() == 0
    assert set(dict(queue.named_buffers())) == {'keys', 'ptr'}


def test_key_queue_wraps_around() -> None:
    queue = KeyQueue(dim=2, size=5)
    original = queue.keys.clone()
    first = torch.arange(6, dtype=torch.float32).view(3, 2)
    second = 10 + torch.arange(6, dtype=torch.bfloat16).view(3, 2)
    queue.enqueue(first)
    assert torch.equal(queue.keys[:, :3], first.T)
    assert torch.equal(queue.keys[:, 3:], original[:, 3:])
    queue.enqueue(second)  # slots 3, 4, then wraps to slot 0
    assert queue.keys.dtype == torch.float32
    assert torch.equal(queue.keys[:, [3, 4, 0]], second.float().T)
    assert torch.equal(queue.keys[:, 1:3], first[1:].T)
    assert queue.ptr.item() == 1


def test_lightly_memory_bank_drops_keys_where_key_queue_wraps() -> None:
    # Why KeyQueue is hand-written: at the end of lightly's bank the overrunning keys are lost.
    keys = torch.arange(10, dtype=torch.float32).view(5, 2)
    queue = KeyQueue(dim=2, size=4)
    bank = MemoryBankModule(size=(4, 2))
    for batch in (keys[:3], keys[3:]):
        queue.enqueue(batch)
        bank(batch, update=True)
    assert sorted(queue.keys[0].tolist()) == [2.0, 4.0, 6.0, 8.0]  # the 4 newest keys
    assert 8.0 not in bank.bank[:, 0].tolist()  # the newest key was dropped
    assert 'bank' not in bank.state_dict() and 'keys' in queue.state_dict()


def test_key_queue_keeps_newest_when_overfilled() -> None:
    queue = KeyQueue(dim=1, size=3)
    queue.enqueue(torch.arange(7, dtype=torch.float32)[:, None])
    assert queue.keys[0].tolist() == [4.0, 5.0, 6.0]
    assert queue.ptr.item() == 0  # the oldest survivor (4) is replaced next


def _distributed_worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same initial queue on both ranks, as after DDP's broadcast
        queue = KeyQueue(dim=2, size=8)
        queue.enqueue(torch.full((3, 2), float(rank + 1)))
        loss = DINOLoss(out_features=2, center_momentum=0.5)
        # Rank 0 has 1 token of 4s, rank 1 has 3 tokens of 0s: the exact mean is 1.
        teacher = torch.full((1, 2), 4.0) if rank == 0 else torch.zeros(3, 2)
        loss.update_center(teacher)
        results[rank] = (queue.keys.clone(), queue.ptr.item(), loss.center.clone())
    finally:
        dist.destroy_process_group()


def test_distributed_keys_gathered_once_and_center_exact_mean(tmp_path: Path) -> None:
    results = mp.Manager().dict()
    mp.spawn(_distributed_worker, args=(str(tmp_path / 'init'), results), nprocs=2)
    for rank in (0, 1):
        keys, ptr, center = results[rank]
        assert ptr == 6  # 3 keys from each of the 2 ranks, each once (docs/cmid.md#deviations)
        assert keys[0, :6].tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
        assert torch.allclose(center, torch.full((1, 2), 0.5))
    assert torch.equal(results[0][0], results[1][0])


def test_effective_queue_size() -> None:
    assert effective_queue_size(65536, 400) == (400, True)
    assert effective_queue_size(1000, 5000) == (1000, False)
    assert effective_queue_size(400, 400) == (400, False)
    with pytest.raises(InputError, match='task.queue_size'):
        effective_queue_size(0, 400)
    with pytest.raises(ValueError, match='keys_per_epoch'):
        effective_queue_size(100, 0)
