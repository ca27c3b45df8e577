"""Weighted k-NN classification of frozen features, as in DINO's evaluation.

Similarity is the cosine of the angle between features; each of the ``k`` most similar
training features votes for its class with weight ``exp(similarity / T)`` and the class with
the largest summed vote wins. The vote itself is lightly's ``knn_predict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict as lightly_knn_predict
from torch import Tensor

from geocmid.errors import InputError

__all__ = ('KNN_K', 'KNN_TEMPERATURE', 'knn_predict')

#: Neighbours and temperature of the k-NN vote (DINO's and the CMID hook's values).
KNN_K = 20
KNN_TEMPERATURE = 0.07


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 1024,
) -> Tensor:
    """Classify test features by a temperature-weighted vote of their k nearest neighbours.

    Args:
        train_features: (N, D) features of the training chips.
        train_labels: (N,) their class indices.
        test_features: (M, D) features to classify.
        num_classes: Number of classes.
        k: Number of neighbours (at most N are used).
        temperature: Temperature of the vote weights.
        chunk_size: Test features compared at once, bounding memory to chunk x N.

    Returns:
        (M,) int64 predicted class indices.

    Raises:
        InputError: ``k`` or ``temperature`` is not positive.
    """
    if k < 1:
        raise InputError('--k', f'must be a positive number of neighbours, got {k}')
    if not temperature > 0:
        raise InputError('--temperature', f'must be positive, got {temperature}')
    # float64: the sums of exp(similarity / T) do not flip a vote on float32 rounding.
    bank = F.normalize(train_features.double(), dim=1).T
    labels = train_labels.long()
    k = min(k, bank.shape[1])
    ranked = [
        lightly_knn_predict(test, bank, labels, num_classes, knn_k=k, knn_t=temperature)
        for test in F.normalize(test_features.double(), dim=1).split(chunk_size)
    ]
    return torch.cat([classes[:, 0] for classes in ranked])
