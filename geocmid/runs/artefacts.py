"""Artefacts of a run folder: the only place that knows the checkpoint, encoder and card files.

Inference loads trained networks from here with torch alone: ``model.ckpt`` is read with
``torch.load(weights_only=True)`` (tensors and plain values only, never arbitrary objects), and
the network is rebuilt from the checkpoint's hyperparameters with the builder the Lightning task
itself uses (:mod:`geocmid.models.networks`). This module must not import Lightning.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geocmid.errors import InputError
from geocmid.io.cards import CARD_NAME, ModelCard, read_card
from geocmid.models.networks import change_network, classification_network, segmentation_network
from geocmid.models.weights import ENCODER_NAME
from geocmid.types import PathLike

__all__ = (
    'CARD_NAME',
    'ENCODER_NAME',
    'MODEL_NAME',
    'load_change_model',
    'load_classifier',
    'load_segmentation_model',
)

#: Name of a fine-tuned model (a Lightning checkpoint, weights only) inside a run folder.
MODEL_NAME = 'model.ckpt'

#: Prefix of the network's parameters in a fine-tuning task's state dict (``task.model``).
_PREFIX = 'model.'

#: Builders of each task's network from its Lightning hyperparameters.
_BUILDERS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    'segmentation': lambda h: segmentation_network(
        h['model'], h['backbone'], h['in_channels'], h['num_classes'], h.get('backbone_kwargs')
    ),
    'change': lambda h: change_network(
        h['model'], h['backbone'], h['in_channels'], h.get('backbone_kwargs')
    ),
    'classification': lambda h: classification_network(
        h['model'], h['in_channels'], h['num_classes'], h.get('backbone_kwargs')
    ),
}


def load_segmentation_model(run_dir: PathLike) -> tuple[nn.Module, ModelCard]:
    """The trained network of a segmentation run, ready for whole-scene inference.

    Args:
        run_dir: A run folder written by ``geocmid train segment``.

    Returns:
        The network in eval mode, mapping normalised ``(B, C, h, w)`` images to logits
        ``(B, K, h, w)`` (normalise with the card's ``mean`` and ``std``), and the card.

    Raises:
        InputError: No card or checkpoint, a card of another task, or an unreadable checkpoint.
    """
    return _load(run_dir, 'segmentation')


def load_change_model(run_dir: PathLike) -> tuple[nn.Module, ModelCard]:
    """The trained network of a change run, ready for whole-scene inference.

    Args:
        run_dir: A run folder written by ``geocmid train change``.

    Returns:
        The network in eval mode, mapping normalised ``(B, 2, C, h, w)`` pairs to change
        logits ``(B, 1, h, w)`` (normalise with the card's ``mean`` and ``std``), and the card.

    Raises:
        InputError: No card or checkpoint, a card of another task, or an unreadable checkpoint.
    """
    return _load(run_dir, 'change', '; pass an encoder with --encoder')


def load_classifier(run_dir: PathLike) -> tuple[nn.Module, ModelCard]:
    """The trained network of a classification run.

    Args:
        run_dir: A run folder written by ``geocmid train classify``.

    Returns:
        The network in eval mode, mapping normalised ``(B, C, h, w)`` chips (the card's
        ``band_indices``, ``mean`` and ``std``, resized to ``patch_size``) to logits ``(B, K)``,
        and the card.

    Raises:
        InputError: No card or checkpoint, a card of another task, or an unreadable checkpoint.
    """
    return _load(run_dir, 'classification')


def _load(run_dir: PathLike, task: str, hint: str = '') -> tuple[nn.Module, ModelCard]:
    """Read the card and ``model.ckpt`` of a ``task`` run folder and rebuild its network."""
    card = read_card(run_dir)
    if card.task != task:
        raise InputError(run_dir, f'not a {task} model (task: {card.task}){hint}')
    checkpoint = Path(run_dir) / MODEL_NAME
    if not checkpoint.is_file():
        raise InputError(run_dir, f'no {MODEL_NAME} in this folder')
    hparams, state = _read_checkpoint(checkpoint, task)
    try:
        network = _BUILDERS[task](hparams)
        network.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(checkpoint, f'does not hold a {task} model ({problem})') from None
    return network.eval(), card


def _read_checkpoint(path: Path, task: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The hyperparameters and the network weights (prefix removed) of a fine-tuned model."""
    try:
        content = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(path, _load_problem(exc)) from None
    hparams = content.get('hyper_parameters') if isinstance(content, dict) else None
    state = content.get('state_dict') if isinstance(content, dict) else None
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise InputError(path, f'is not a geocmid {task} model (no hyper_parameters/state_dict)')
    weights = {
        key.removeprefix(_PREFIX): value
        for key, value in state.items()
        if isinstance(key, str) and key.startswith(_PREFIX)
    }
    return hparams, weights


def _load_problem(exc: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` failed, without torch's advice.

    torch suggests ``weights_only=False``, which is never right for a file of unknown origin.
    """
    text = str(exc)
    if text.startswith('Weights only load failed'):
        if 'GLOBAL' in text or 'Unsupported global' in text:
            return 'holds objects other than tensors and plain values; refused (not loaded)'
        text = text.partition('WeightsUnpickler error:')[2] or 'not a PyTorch checkpoint'
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f'is not a readable checkpoint ({lines[0] if lines else type(exc).__name__})'
