"""Linear probe on frozen features: multinomial logistic regression with an L2 penalty.

Features are standardised with the training statistics and the probe is fitted full-batch with
L-BFGS in float64 from a zero start, so it is deterministic. Written on torch because
scikit-learn's ``LogisticRegression`` is not a dependency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from geocmid.errors import InputError

__all__ = ('LINEAR_L2', 'LinearProbe', 'fit_linear_probe')

#: L2 penalty of the linear probe, on the mean cross-entropy over training chips.
LINEAR_L2 = 1e-3


@dataclass(frozen=True)
class LinearProbe:
    """A fitted multinomial logistic regression on standardised features.

    Attributes:
        mean: (D,) feature mean of the training set.
        std: (D,) feature standard deviation of the training set (constant features: 1).
        weight: (K, D) weights on the standardised features.
        bias: (K,) class biases.
    """

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def logits(self, features: Tensor) -> Tensor:
        """(M, K) class scores of (M, D) features."""
        standardised = (features.double() - self.mean) / self.std
        return standardised @ self.weight.T + self.bias

    def predict(self, features: Tensor) -> Tensor:
        """(M,) predicted class indices of (M, D) features."""
        return self.logits(features).argmax(dim=1)


def fit_linear_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    l2: float = LINEAR_L2,
    max_iter: int = 1000,
) -> LinearProbe:
    """Fit logistic regression: minimise mean cross-entropy + ``l2 / 2 * ||W||^2``.

    Features are standardised with the training statistics first, so one ``l2`` suits any
    encoder. The objective is convex; L-BFGS (strong Wolfe line search) from zero weights in
    float64 on the full batch makes the fit deterministic.

    Args:
        features: (N, D) training features.
        labels: (N,) class indices.
        num_classes: Number of classes.
        l2: Strength of the L2 penalty on the weights (not the biases).
        max_iter: L-BFGS iteration limit.

    Returns:
        The fitted probe.

    Raises:
        InputError: ``l2`` is negative.
    """
    if l2 < 0:
        raise InputError('--l2', f'must be 0 or more, got {l2}')
    x = features.double()
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = (x - mean) / std
    y = labels.long()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn='strong_wolfe',
    )

    def objective() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may be in inference mode
        optimizer.step(objective)
    return LinearProbe(mean, std, weight.detach(), bias.detach())
