"""Tests for geocmid.tasks.ssl.base: the EMA teacher moves once per optimiser step."""

from __future__ import annotations

import lightning
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from geocmid.models.momentum import copy_as_teacher
from geocmid.tasks.ssl.base import PretrainTask


class ToyTask(PretrainTask):
    """A one-weight student whose momentum calls record the step and the student after it."""

    def configure_models(self) -> None:
        self.student = nn.Linear(2, 1, bias=False)
        self.teacher = copy_as_teacher(self.student)
        self.calls: list[tuple[int, Tensor]] = []

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.teacher, self.student)]

    def momentum(self, step: int) -> float:
        self.calls.append((step, self.student.weight.detach().clone()))
        return 0.5

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.student(batch).square().sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:  # type: ignore[override]
        return torch.optim.SGD(self.student.parameters(), lr=0.1)


@pytest.mark.parametrize('accumulate', [1, 2])
def test_teacher_moves_once_per_optimiser_step(accumulate: int) -> None:
    torch.manual_seed(0)
    task = ToyTask()
    start = task.teacher.weight.detach().clone()
    trainer = lightning.Trainer(
        max_steps=2,
        accumulate_grad_batches=accumulate,
        accelerator='cpu',
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, DataLoader(torch.randn(2 * accumulate, 2), batch_size=1))
    assert trainer.global_step == 2
    # One update per optimiser step (not per batch), with the 0-based step's momentum, each
    # averaging in the student as that step left it.
    assert [step for step, _ in task.calls] == [0, 1]
    expected = start
    for _, student in task.calls:
        expected = 0.5 * expected + 0.5 * student
    torch.testing.assert_close(task.teacher.weight.detach(), expected)
