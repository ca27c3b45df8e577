"""Frozen-encoder evaluation on labelled chips: weighted k-NN and a linear probe.

Both protocols share one path: the encoder (``encoder.pt`` with its card, a run folder, or
``random:<backbone>`` for the random-initialisation baseline) maps every chip, resized to the
card's patch size and normalised as the card says, to its global-average-pooled features; the
features of the training chips then classify the test chips.

* k-NN follows DINO's evaluation: cosine similarity, the ``k`` most similar training chips
  vote for their class with weight ``exp(similarity / T)``; the class with the largest summed
  vote wins.
* The linear probe is multinomial logistic regression with an L2 penalty on standardised
  features, fitted full-batch with L-BFGS in float64 from a zero start, so it is deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchgeo.datasets.utils import Sample

from geocmid.datamodules.classification import chip_normalisation, labelled_chips
from geocmid.errors import InputError
from geocmid.io.atomic import atomic_output
from geocmid.io.cards import ModelCard
from geocmid.models.weights import RANDOM_PREFIX, load_encoder
from geocmid.types import PathLike

#: Image side used when the encoder's card fixes no patch size (random encoders).
DEFAULT_SIZE = 224

#: Neighbours and temperature of the k-NN vote (DINO's and the CMID hook's values).
KNN_K = 20
KNN_TEMPERATURE = 0.07

#: L2 penalty of the linear probe, on the mean cross-entropy over training chips.
LINEAR_L2 = 1e-3

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


def resolve_device(device: torch.device | str = 'auto') -> torch.device:
    """``'auto'``: the first CUDA device when there is one, else the CPU; others as given."""
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(device)


def global_average_pooled(encoder: nn.Module) -> nn.Module:
    """Make a timm encoder (no classifier) return globally average-pooled features.

    timm pools differently per architecture (ViTs take the class token); the protocols are
    defined on the average-pooled feature map, so the pooling is set explicitly.
    """
    encoder.reset_classifier(0, 'avg')  # type: ignore[operator]
    return encoder


def seeded_encoder(
    encoder: PathLike, bands: Sequence[int] | None, seed: int = 0
) -> tuple[nn.Module, ModelCard]:
    """Load an encoder; a random one (``random:<backbone>``) is initialised from ``seed``.

    Seeding makes the random-initialisation baseline reproducible: the same seed gives the
    same weights, hence the same accuracy. The global random state is left untouched.

    Args:
        encoder: ``encoder.pt``, a run folder, or ``'random:<backbone>'``.
        bands: The bands that will be fed, if chosen; their number must match a saved
            encoder's and gives a random encoder's input channels.
        seed: Seed of a random initialisation.

    Raises:
        InputError: See :func:`~geocmid.models.weights.load_encoder`; a random encoder
            without ``bands`` has no card to say its input bands.
    """
    if os.fspath(encoder).startswith(RANDOM_PREFIX) and not bands:
        raise InputError(
            encoder, 'a random encoder has no model card to name its input bands; give --bands'
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_encoder(encoder, in_chans=len(bands) if bands else None)


@torch.inference_mode()
def extract_features(
    encoder: nn.Module,
    dataset: Dataset[Sample],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: torch.device | str = 'auto',
) -> Tensor:
    """Features of every image of ``dataset``, in dataset order.

    Args:
        encoder: The network, e.g. from :func:`global_average_pooled`; put in eval mode.
        dataset: Samples holding ``'image'`` (C, H, W) in raw pixel units, all the same size.
        mean: Per-channel mean subtracted before dividing by ``std``.
        std: Per-channel standard deviation.
        batch_size: Images per forward pass.
        workers: Data-loading worker processes.
        device: Where the encoder runs; ``'auto'`` picks CUDA when available.

    Returns:
        float32 (N, D) features on the CPU.
    """
    device = resolve_device(device)
    encoder = encoder.eval().to(device)
    shift = torch.tensor(list(mean), dtype=torch.float32, device=device)[:, None, None]
    scale = torch.tensor(list(std), dtype=torch.float32, device=device)[:, None, None]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    features = []
    for batch in loader:
        images = (batch['image'].to(device) - shift) / scale
        features.append(encoder(images).float().cpu())
    return torch.cat(features)


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

    Similarity is the cosine of the angle between features. Each of the ``k`` most similar
    training features votes for its class with weight ``exp(similarity / temperature)``
    (DINO's weighted k-NN); ties between classes go to the lower class index.

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
    train = F.normalize(train_features.double(), dim=1)
    labels = train_labels.long()
    k = min(k, len(train))
    predictions = []
    for test in F.normalize(test_features.double(), dim=1).split(chunk_size):
        similarity, neighbours = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(test), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, labels[neighbours], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


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
            ``'random:<backbone>'`` (then ``bands`` is required: there is no card to say them).
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
    model, card = seeded_encoder(encoder, bands, seed)
    size = size or card.patch_size or DEFAULT_SIZE
    chips = labelled_chips(
        images, train=train, test=test, split=split, seed=seed, size=size, bands=bands
    )
    if chips.in_channels != card.in_chans:
        raise InputError(
            images or train,
            f'images have {chips.in_channels} band(s) but the encoder takes {card.in_chans} '
            f'({", ".join(card.bands)}); choose {card.in_chans} with --bands',
        )
    mean, std, normalisation = chip_normalisation(chips, card.mean, card.std, seed)

    model = global_average_pooled(model)
    options = {'batch_size': batch_size, 'workers': workers, 'device': device}
    train_features = extract_features(model, chips.train, mean, std, **options)
    test_features = extract_features(model, chips.test, mean, std, **options)
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
