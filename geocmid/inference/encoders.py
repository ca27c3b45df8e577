"""Frozen encoders as feature extractors: seeded random baselines and global average pooling.

Shared by tile embeddings (:mod:`geocmid.inference.products.embed`) and the frozen-encoder
evaluation (:mod:`geocmid.evaluation.evaluate`), so that both see the same features.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from geocmid.errors import InputError
from geocmid.io.cards import ModelCard
from geocmid.models.weights import RANDOM_PREFIX, load_encoder
from geocmid.types import PathLike


def global_average_pooled(encoder: nn.Module) -> nn.Module:
    """Make a timm encoder (no classifier) return globally average-pooled features.

    timm pools differently per architecture (ViTs take the class token); the protocols are
    defined on the average-pooled feature map, so the pooling is set explicitly.
    """
    encoder.reset_classifier(0, 'avg')  # type: ignore[operator]  # timm method, untyped on nn.Module
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
