"""Frozen-encoder evaluation on labelled chips: weighted k-NN and a linear probe.

Both protocols share one path: the encoder (``encoder.pt`` with its card, a run folder, or
``random:<backbone>`` for the random-initialisation baseline) maps every chip, resized to the
card's patch size and normalised as the card says, to its global-average-pooled features
(:mod:`geocmid.inference.features`); the features of the training chips then classify the
test chips, by DINO's weighted k-NN (:mod:`geocmid.evaluation.knn`) or by a logistic-regression
probe (:mod:`geocmid.evaluation.linear`). This module runs a protocol and reports its accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from geocmid.datamodules.classification import chip_normalisation, labelled_chips
from geocmid.datasets.chips import DEFAULT_SIZE
from geocmid.errors import InputError
from geocmid.evaluation.knn import KNN_K, KNN_TEMPERATURE, knn_predict
from geocmid.evaluation.linear import LINEAR_L2, fit_linear_probe
from geocmid.inference.encoders import global_average_pooled, seeded_encoder
from geocmid.inference.features import extract_features
from geocmid.io.atomic import atomic_output
from geocmid.models.weights import RANDOM_PREFIX
from geocmid.types import PathLike

__all__ = (
    'DEFAULT_SIZE',
    'EvaluationResult',
    'Protocol',
    'evaluate',
    'evaluate_knn',
    'evaluate_linear',
    'per_class_accuracy',
    'write_result',
)

Protocol = Literal['knn', 'linear']


@dataclass(frozen=True)
class EvaluationResult:
    """Accuracy of one protocol on the test chips.

    Attributes:
        protocol: ``'knn'`` or ``'linear'``.
        encoder: The encoder evaluated, as given.
        top1: Share of test chips whose predicted class is their class.
        per_class: Accuracy on the test chips of each class (None for a class without any).
        classes: Class names in label order.
        num_train: Number of training chips.
        num_test: Number of test chips.
        settings: Everything else the number depends on: image size, bands, normalisation,
            the split, and the protocol's parameters.
        predictions: Predicted class index of every test chip, in test-set order.
    """

    protocol: Protocol
    encoder: str
    top1: float
    per_class: dict[str, float | None]
    classes: list[str]
    num_train: int
    num_test: int
    settings: dict[str, Any] = field(default_factory=dict)
    predictions: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (predictions left out)."""
        body = dataclasses.asdict(self)
        del body['predictions']
        return body


def per_class_accuracy(
    predictions: Tensor, labels: Tensor, classes: Sequence[str]
) -> dict[str, float | None]:
    """Accuracy on the samples of each class; None for a class without samples."""
    accuracy: dict[str, float | None] = {}
    for index, name in enumerate(classes):
        members = labels == index
        count = int(members.sum())
        accuracy[name] = float((predictions[members] == index).sum()) / count if count else None
    return accuracy


def evaluate(
    protocol: Protocol,
    encoder: PathLike,
    images: PathLike | None = None,
    *,
    train: PathLike | None = None,
    test: PathLike | None = None,
    split: float = 0.8,
    seed: int = 0,
    bands: Sequence[int] | None = None,
    size: int | None = None,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    l2: float = LINEAR_L2,
    batch_size: int = 64,
    workers: int = 0,
    device: torch.device | str = 'auto',
) -> EvaluationResult:
    """Evaluate a frozen encoder on labelled chips with k-NN or a linear probe.

    Args:
        protocol: ``'knn'`` or ``'linear'``.
        encoder: ``encoder.pt`` (with ``model_card.json`` beside it), a run folder, or
            ``'random:<backbone>'`` (fed all bands of the images unless ``bands`` is given).
        images: A labelled folder (one sub-folder per class) split with ``split`` and ``seed``.
        train: A labelled training folder, instead of ``images``.
        test: The labelled test folder that goes with ``train``.
        split: Share of each class used for training when ``images`` is split.
        seed: Seed of the split and of a random encoder's initialisation.
        bands: 1-based bands of the images to feed, in the encoder's channel order; default
            all bands, which must then be as many as the encoder takes.
        size: Image side in pixels; default the card's patch size, else :data:`DEFAULT_SIZE`.
        k: Neighbours of the k-NN vote.
        temperature: Temperature of the k-NN vote.
        l2: L2 penalty of the linear probe.
        batch_size: Images per forward pass.
        workers: Data-loading worker processes.
        device: Where the encoder runs; ``'auto'`` picks CUDA when available.

    Returns:
        The accuracy, overall and per class, and the settings it was measured with.

    Raises:
        InputError: A missing or unreadable encoder or card, a random encoder without
            ``bands``, a folder with one class, images of mixed band counts, or images whose
            bands do not match the encoder.
    """
    if protocol not in ('knn', 'linear'):
        raise InputError('protocol', f"must be 'knn' or 'linear', got {protocol!r}")
    chosen = partial(labelled_chips, train=train, test=test, split=split, seed=seed)
    if os.fspath(encoder).startswith(RANDOM_PREFIX) and not bands:
        # No card names a random encoder's bands: feed all bands of the images, which must
        # agree (labelled_chips names two images whose band counts differ).
        chips = chosen(images, size=size or DEFAULT_SIZE, bands=None)
        model, card = seeded_encoder(encoder, range(1, chips.in_channels + 1), seed)
        size = size or DEFAULT_SIZE
    else:
        model, card = seeded_encoder(encoder, bands, seed)
        size = size or card.patch_size or DEFAULT_SIZE
        chips = chosen(images, size=size, bands=bands)
    if chips.in_channels != card.in_chans:
        raise InputError(
            images or train,
            f'images have {chips.in_channels} band(s) but the encoder takes {card.in_chans} '
            f'({", ".join(card.bands)}); choose {card.in_chans} with --bands',
        )
    mean, std, normalisation = chip_normalisation(chips, card.mean, card.std, seed)

    model = global_average_pooled(model)
    features = partial(extract_features, batch_size=batch_size, workers=workers, device=device)
    train_features = features(model, chips.train, mean, std)
    test_features = features(model, chips.test, mean, std)
    num_classes = len(chips.classes)
    if protocol == 'knn':
        predictions = knn_predict(
            train_features,
            chips.train_labels,
            test_features,
            num_classes,
            k=k,
            temperature=temperature,
        )
        parameters: dict[str, Any] = {'k': min(k, len(train_features)), 'temperature': temperature}
    else:
        probe = fit_linear_probe(train_features, chips.train_labels, num_classes, l2=l2)
        predictions = probe.predict(test_features)
        parameters = {'l2': l2}

    return EvaluationResult(
        protocol=protocol,
        encoder=os.fspath(encoder),
        top1=float((predictions == chips.test_labels).double().mean()),
        per_class=per_class_accuracy(predictions, chips.test_labels, chips.classes),
        classes=list(chips.classes),
        num_train=len(train_features),
        num_test=len(test_features),
        settings={
            **chips.source,
            'backbone': card.backbone,
            'size': size,
            'bands': chips.bands,
            'normalisation': normalisation,
            'mean': mean,
            'std': std,
            'feature_dim': int(train_features.shape[1]),
            **parameters,
        },
        predictions=predictions.tolist(),
    )


def evaluate_knn(
    encoder: PathLike, images: PathLike | None = None, **options: Any
) -> EvaluationResult:
    """Weighted k-NN accuracy of a frozen encoder; see :func:`evaluate` for the options."""
    return evaluate('knn', encoder, images, **options)


def evaluate_linear(
    encoder: PathLike, images: PathLike | None = None, **options: Any
) -> EvaluationResult:
    """Linear-probe accuracy of a frozen encoder; see :func:`evaluate` for the options."""
    return evaluate('linear', encoder, images, **options)


def write_result(result: EvaluationResult, path: PathLike, *, overwrite: bool = False) -> Path:
    """Write ``result`` as indented JSON, atomically.

    Raises:
        InputError: The file exists and ``overwrite`` is False, or its folder is not writable.
    """
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + '\n', encoding='utf-8')
    return Path(path)
