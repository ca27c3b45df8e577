"""Pre-training losses: InfoNCE with a queue, focal-L1 and focal frequency MIM losses, DINO loss.

Formulas and constants follow ``docs/cmid.md`` (reconstruction loss, global and local branches),
with the fixes listed in its deviations table.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = (
    'DINOLoss',
    'focal_frequency_loss',
    'focal_l1_masked',
    'infonce',
    'mim_loss',
    'teacher_temperature',
)


def infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo InfoNCE: ``CE([q . k, q . Q] / tau, label 0)``, averaged over the batch.

    Hand-written: lightly's ``NTXentLoss`` keeps its queue in a ``MemoryBankModule`` (see
    :class:`~geocmid.models.momentum.KeyQueue`) and fills it inside the loss.

    Args:
        q: L2-normalised queries (student), shape (N, D).
        k: L2-normalised positive keys (teacher), shape (N, D); gradients are stopped.
        queue: L2-normalised negative keys, shape (D, K).
        temperature: Softmax temperature tau (CMID 0.2, GeRSP 0.07).

    Returns:
        Scalar loss.
    """
    # A private copy of the queue: the matmul keeps it for the backward pass, and the caller
    # enqueues new keys in place before calling backward.
    negatives = queue.detach().clone()
    positive = (q * k.detach()).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, q @ negatives.to(q.dtype)], dim=1) / temperature
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def _pixel_mask(mask: Tensor, like: Tensor) -> Tensor:
    """(B, H, W) or (B, 1, H, W) mask as a (B, 1, H, W) tensor of ``like``'s dtype."""
    if mask.ndim == 3:
        mask = mask[:, None]
    return mask.to(like.dtype)


def focal_l1_masked(
    pred: Tensor, target: Tensor, mask: Tensor, alpha: float = 0.2, gamma: float = 1.0
) -> Tensor:
    """A2MIM focal-L1 loss on masked pixels (``docs/cmid.md#reconstruction-loss``).

    ``d = |y - x|``, ``l = d * (2 * sigmoid(alpha * d) - 1) ** gamma``, and
    ``L = sum_{b,c,h,w} l * M / (sum_{b,h,w} M + 1e-5) / C``: the mean over masked pixels and
    channels; visible pixels do not contribute.

    Args:
        pred: Reconstruction y, shape (B, C, H, W).
        target: Normalised unmasked crop x, shape (B, C, H, W).
        mask: Pixel-level mask M, shape (B, H, W) or (B, 1, H, W), 1 = masked.
        alpha: Focal scale.
        gamma: Focal exponent.

    Returns:
        Scalar loss.
    """
    mask = _pixel_mask(mask, pred)
    distance = (pred - target).abs()
    loss = distance * (2 * torch.sigmoid(alpha * distance) - 1) ** gamma
    return (loss * mask).sum() / (mask.sum() + 1e-5) / pred.shape[1]


def focal_frequency_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor,
    alpha: float = 1.0,
    unmask_weight: float = 0.001,
) -> Tensor:
    """Focal frequency loss on the blended reconstruction (``docs/cmid.md#reconstruction-loss``).

    Blend: ``M_f = M + w (1 - M)``, ``x_rep = (stopgrad(y) + x) / 2``,
    ``y' = y M_f + x_rep (1 - M_f)``. Spectra: orthonormal 2-D FFT per channel, averaged over
    the batch. With ``D = F(y') - F(x)``: weight ``W = log(|D| ** alpha + 1)`` divided by its
    global maximum, NaN set to 0, clamped to [0, 1], gradient stopped; loss ``mean(W |D|^2)``.

    Args:
        pred: Reconstruction y, shape (B, C, H, W).
        target: Normalised unmasked crop x, shape (B, C, H, W).
        mask: Pixel-level mask M, shape (B, H, W) or (B, 1, H, W), 1 = masked.
        alpha: Focal exponent of the spectrum weight.
        unmask_weight: Share w of the prediction kept at visible pixels.

    Returns:
        Scalar loss.
    """
    # FFT in at least float32: cuFFT has no bfloat16 and takes float16 only for power-of-two sizes.
    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred, target = pred.to(dtype), target.to(dtype)
    blend = _pixel_mask(mask, pred)
    blend = blend + unmask_weight * (1 - blend)
    replacement = 0.5 * pred.detach() + 0.5 * target
    blended = pred * blend + replacement * (1 - blend)
    pred_spectrum = torch.fft.fft2(blended, norm='ortho').mean(dim=0, keepdim=True)
    target_spectrum = torch.fft.fft2(target, norm='ortho').mean(dim=0, keepdim=True)
    difference = pred_spectrum - target_spectrum
    distance = difference.real**2 + difference.imag**2
    with torch.no_grad():
        weight = torch.log(distance.sqrt() ** alpha + 1)
        weight = (weight / weight.max()).nan_to_num(nan=0.0).clamp(0, 1)
    return (weight * distance).mean()


def mim_loss(pred: Tensor, target: Tensor, mask: Tensor, fft_weight: float = 1.0) -> Tensor:
    """Reconstruction loss of one view: focal-L1 on masked pixels plus weighted FFL (docs/cmid.md).

    Args:
        pred: Reconstruction, shape (B, C, H, W).
        target: Normalised unmasked crop, shape (B, C, H, W).
        mask: Pixel-level mask, shape (B, H, W) or (B, 1, H, W), 1 = masked.
        fft_weight: Weight of the focal frequency loss.

    Returns:
        Scalar loss.
    """
    return focal_l1_masked(pred, target, mask) + fft_weight * focal_frequency_loss(
        pred, target, mask
    )


def teacher_temperature(
    epoch: int, warmup_temp: float = 0.04, final_temp: float = 0.07, warmup_epochs: int = 50
) -> float:
    """DINO teacher temperature of a 0-based epoch (``docs/cmid.md#local-branch``).

    ``linspace(warmup_temp, final_temp, warmup_epochs)[epoch]`` during warm-up, then
    ``final_temp``. Indexed by the current epoch (the official ResNet config ran one epoch
    ahead).

    Args:
        epoch: Current 0-based epoch.
        warmup_temp: Temperature at epoch 0.
        final_temp: Temperature at the last warm-up epoch and after.
        warmup_epochs: Length of the linear warm-up in epochs.

    Returns:
        The teacher temperature.
    """
    if epoch >= warmup_epochs:
        return final_temp
    if warmup_epochs == 1:  # linspace of a single value
        return warmup_temp
    return warmup_temp + (final_temp - warmup_temp) * epoch / (warmup_epochs - 1)


class DINOLoss(nn.Module):
    """DINO cross-entropy between teacher and student prototype logits, with centering.

    ``L = mean_tokens sum_k -softmax((t - c) / tau_t)_k * log_softmax(s / tau_s)_k``, teacher
    probabilities without gradient. The centre ``c`` is an EMA of the mean teacher logits,
    updated only by :meth:`update_center`, once per step after all loss terms of the step
    (the official code updated it inside each of the two loss calls, ``docs/cmid.md#deviations``).

    Hand-written: lightly's ``DINOLoss`` repeats that defect (it updates the centre in
    ``forward``) and skips same-index view pairs, which are the matched pairs here.
    """

    center: Tensor

    def __init__(
        self, out_features: int = 2048, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        """Initialise a new DINOLoss.

        Args:
            out_features: Number of prototypes.
            student_temp: Student temperature tau_s.
            center_momentum: EMA momentum of the centre.
        """
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer('center', torch.zeros(1, out_features))

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, teacher_temp: float
    ) -> Tensor:
        """Compute the loss with the current centre; the centre is not changed.

        Args:
            student_logits: Student logits, shape (..., K).
            teacher_logits: Teacher logits of the matched tokens, same shape.
            teacher_temp: Teacher temperature tau_t (see :func:`teacher_temperature`).

        Returns:
            Scalar loss, the mean over tokens.
        """
        teacher = F.softmax((teacher_logits.detach().float() - self.center) / teacher_temp, dim=-1)
        student = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        return -(teacher * student).sum(dim=-1).mean()

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """Move the centre towards the mean teacher logits of this step, across all devices.

        Call once per step with all teacher logits of the step (both directions, all matched
        tokens concatenated): ``c <- m c + (1 - m) mean(t)``.

        Args:
            teacher_logits: Teacher logits, shape (..., K).
        """
        rows = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
        total = torch.cat([rows.sum(dim=0), rows.new_tensor([len(rows)])])
        if dist.is_available() and dist.is_initialized():
            # Sum and count reduced together give the exact mean over all tokens of all devices.
            dist.all_reduce(total)
        mean = total[:-1] / total[-1]
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)
