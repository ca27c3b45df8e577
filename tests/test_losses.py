"""Tests for geocmid.models.losses against independent numpy computations on fixed tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightly.loss import DINOLoss as LightlyDINOLoss

from geocmid.models.losses import (
    DINOLoss,
    focal_frequency_loss,
    focal_l1_masked,
    infonce,
    mim_loss,
    teacher_temperature,
)


def _unit(rows: np.ndarray, axis: int) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=axis, keepdims=True)


def _fixed(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float64)


# InfoNCE ---------------------------------------------------------------------------------------


def test_infonce_matches_loop_reference() -> None:
    q, k = _unit(_fixed(3, 4), axis=1), _unit(_fixed(3, 4, seed=1), axis=1)
    queue = _unit(_fixed(4, 5, seed=2), axis=0)
    expected = 0.0
    for i in range(3):
        logits = [sum(q[i, d] * k[i, d] for d in range(4)) / 0.2]
        logits += [sum(q[i, d] * queue[d, j] for d in range(4)) / 0.2 for j in range(5)]
        expected += -(logits[0] - math.log(sum(math.exp(v) for v in logits)))
    loss = infonce(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(queue), 0.2)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-9)


def test_infonce_gradient_reaches_only_query_and_survives_enqueue() -> None:
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    queue = torch.nn.functional.normalize(torch.randn(8, 16), dim=0)
    loss = infonce(q, k, queue)
    queue[:, :4] = 0  # the caller enqueues in place before backward
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


# Focal L1 --------------------------------------------------------------------------------------


def _mask(batch: int, size: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, size, size)) < 0.5


def test_focal_l1_masked_matches_loop_reference() -> None:
    pred, target, mask = _fixed(2, 3, 4, 4), _fixed(2, 3, 4, 4, seed=1), _mask(2, 4)
    total, count = 0.0, 0
    for b in range(2):
        for h in range(4):
            for w in range(4):
                if not mask[b, h, w]:
                    continue
                count += 1
                for c in range(3):
                    d = abs(pred[b, c, h, w] - target[b, c, h, w])
                    total += d * (2 / (1 + math.exp(-0.2 * d)) - 1)
    expected = total / (count + 1e-5) / 3
    for torch_mask in (torch.from_numpy(mask), torch.from_numpy(mask)[:, None]):
        loss = focal_l1_masked(torch.from_numpy(pred), torch.from_numpy(target), torch_mask)
        assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_focal_l1_ignores_visible_pixels() -> None:
    target = torch.zeros(1, 2, 4, 4)
    pred = torch.zeros(1, 2, 4, 4)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = True
    pred[0, :, 1:, 1:] = 100.0  # huge error, but only at visible pixels
    assert focal_l1_masked(pred, target, mask).item() == 0.0


# Focal frequency loss --------------------------------------------------------------------------


def _ffl_reference(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray
) -> tuple[float, np.ndarray]:
    """FFL with numpy.fft; also returns the (constant) spectrum weight."""
    m = mask[:, None].astype(np.float64)
    blend = m + 0.001 * (1 - m)
    blended = pred * blend + (0.5 * pred + 0.5 * target) * (1 - blend)
    spectrum_pred = np.fft.fft2(blended, norm='ortho').mean(axis=0, keepdims=True)
    spectrum_target = np.fft.fft2(target, norm='ortho').mean(axis=0, keepdims=True)
    difference = spectrum_pred - spectrum_target
    squared = difference.real**2 + difference.imag**2
    weight = np.log(np.sqrt(squared) + 1)
    weight = np.clip(np.nan_to_num(weight / weight.max()), 0, 1)
    return float((weight * squared).mean()), weight


def test_focal_frequency_loss_matches_numpy_fft() -> None:
    pred, target, mask = _fixed(3, 2, 8, 8), _fixed(3, 2, 8, 8, seed=1), _mask(3, 8)
    expected, _ = _ffl_reference(pred, target, mask)
    loss = focal_frequency_loss(
        torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(mask)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_focal_frequency_loss_gradient_stops_at_weight_and_replacement() -> None:
    pred, target, mask = _fixed(2, 1, 8, 8), _fixed(2, 1, 8, 8, seed=1), _mask(2, 8)
    _, weight = _ffl_reference(pred, target, mask)
    # Reference gradient: the weight and the 0.5 * y in the visible-pixel replacement are
    # constants; only y * M_f carries the gradient.
    y = torch.from_numpy(pred).requires_grad_()
    m = torch.from_numpy(mask[:, None].astype(np.float64))
    blend = m + 0.001 * (1 - m)
    constant = (0.5 * torch.from_numpy(pred) + 0.5 * torch.from_numpy(target)) * (1 - blend)
    spectrum = torch.fft.fft2(y * blend + constant, norm='ortho').mean(dim=0, keepdim=True)
    difference = spectrum - torch.fft.fft2(torch.from_numpy(target), norm='ortho').mean(0, True)
    (torch.from_numpy(weight) * difference.abs() ** 2).mean().backward()

    prediction = torch.from_numpy(pred).requires_grad_()
    focal_frequency_loss(prediction, torch.from_numpy(target), torch.from_numpy(mask)).backward()
    assert torch.allclose(prediction.grad, y.grad, rtol=1e-9, atol=1e-12)


def test_mim_loss_sums_spatial_and_frequency_terms() -> None:
    pred, target = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 32, 32) < 0.6
    expected = focal_l1_masked(pred, target, mask) + 0.5 * focal_frequency_loss(pred, target, mask)
    assert torch.allclose(mim_loss(pred, target, mask, fft_weight=0.5), expected)


# DINO ------------------------------------------------------------------------------------------


def _softmax(row: np.ndarray) -> np.ndarray:
    exp = np.exp(row - row.max())
    return exp / exp.sum()


def test_dino_loss_matches_reference_and_keeps_center() -> None:
    student, teacher = _fixed(2, 3, 6), _fixed(2, 3, 6, seed=1)
    center = _fixed(1, 6, seed=2) * 0.1
    loss_fn = DINOLoss(out_features=6, student_temp=0.1)
    loss_fn.center.copy_(torch.from_numpy(center))
    expected = []
    for b in range(2):
        for t in range(3):
            p_teacher = _softmax((teacher[b, t] - center[0]) / 0.05)
            log_student = np.log(_softmax(student[b, t] / 0.1))
            expected.append(-(p_teacher * log_student).sum())
    s = torch.from_numpy(student).float().requires_grad_()
    t = torch.from_numpy(teacher).float().requires_grad_()
    loss = loss_fn(s, t, teacher_temp=0.05)
    assert loss.item() == pytest.approx(np.mean(expected), rel=1e-5)
    assert torch.allclose(loss_fn.center.double(), torch.from_numpy(center))
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_dino_update_center_is_one_ema_step_over_all_tokens() -> None:
    loss_fn = DINOLoss(out_features=4, center_momentum=0.9)
    loss_fn.center.fill_(1.0)
    teacher = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    loss_fn.update_center(teacher)
    rows = teacher.numpy().reshape(-1, 4)
    expected = 0.9 * 1.0 + 0.1 * rows.mean(axis=0)
    np.testing.assert_allclose(loss_fn.center.numpy()[0], expected, rtol=1e-6)


def test_teacher_temperature_schedule() -> None:
    linspace = np.linspace(0.04, 0.07, 50)
    for epoch in (0, 1, 25, 49):
        assert teacher_temperature(epoch) == pytest.approx(linspace[epoch])
    assert teacher_temperature(50) == 0.07
    assert teacher_temperature(300) == 0.07
    assert teacher_temperature(0, warmup_epochs=0) == 0.07
    assert teacher_temperature(0, warmup_epochs=1) == 0.04


def test_lightly_dino_loss_moves_the_centre_inside_the_loss() -> None:
    # Why DINOLoss is hand-written: lightly's updates the centre on every call (the official
    # defect fixed here), so a step's second direction would see another centre.
    teacher = torch.from_numpy(_fixed(6, 8)).float()
    student = torch.from_numpy(_fixed(6, 8, seed=1)).float()
    lightly_loss = LightlyDINOLoss(output_dim=8, teacher_temp=0.04, center_momentum=0.9)
    lightly_loss([teacher], [student, student])
    assert lightly_loss.center.abs().sum() > 0
    ours = DINOLoss(out_features=8, center_momentum=0.9)
    first = ours(student, teacher, 0.04)
    assert ours(student, teacher, 0.04) == first
    assert torch.equal(ours.center, torch.zeros(1, 8))
