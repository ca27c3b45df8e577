"""Fine-tuned networks: one builder per task, shared by the Lightning tasks and artefact loading.

Each builder makes the network a fine-tuning task trains (and a run folder's ``model.ckpt``
holds under the task's ``model.`` prefix) from the task's hyperparameters alone, so a trained
network is rebuilt without Lightning (:mod:`geocmid.runs.artefacts`). Given encoder weights (a
plain timm state dict, ``encoder.pt``), a builder loads them strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import segmentation_models_pytorch as smp
import timm
from torch import Tensor, nn
from torchgeo.models import FCSiamConc, FCSiamDiff

#: Siamese architectures of change detection. Both take C-channel encoder weights; early-fusion
#: models, whose first convolution takes both dates (2C channels), cannot.
CHANGE_ARCHITECTURES: dict[str, type[nn.Module]] = {
    'fcsiamdiff': FCSiamDiff,
    'fcsiamconc': FCSiamConc,
}


def segmentation_network(
    decoder: str,
    backbone: str,
    in_channels: int,
    num_classes: int,
    backbone_kwargs: Mapping[str, Any] | None = None,
    weights: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """An smp segmentation model over a timm encoder (``tu-<backbone>``).

    Args:
        decoder: smp architecture: 'unet', 'fpn' or 'upernet'.
        backbone: timm model name of the encoder (without 'tu-').
        in_channels: Number of image bands.
        num_classes: Number of classes.
        backbone_kwargs: Extra ``timm.create_model`` arguments the encoder needs.
        weights: Encoder weights as a plain timm state dict, or None (random initialisation).

    Returns:
        A network mapping ``(B, C, H, W)`` images to logits ``(B, K, H, W)``.
    """
    return _smp_network(
        partial(smp.create_model, decoder), backbone, in_channels, num_classes,
        backbone_kwargs, weights,
    )  # fmt: skip


def change_network(
    decoder: str,
    backbone: str,
    in_channels: int,
    backbone_kwargs: Mapping[str, Any] | None = None,
    weights: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """A siamese change network (:data:`CHANGE_ARCHITECTURES`) with one shared timm encoder.

    Args:
        decoder: 'fcsiamdiff' (decodes feature differences) or 'fcsiamconc' (both dates).
        backbone: timm model name of the encoder (without 'tu-').
        in_channels: Bands per image.
        backbone_kwargs: Extra ``timm.create_model`` arguments the encoder needs.
        weights: Encoder weights as a plain timm state dict, or None (random initialisation).

    Returns:
        A network mapping ``(B, 2, C, H, W)`` pairs to change logits ``(B, 1, H, W)``.

    Raises:
        KeyError: An unknown ``decoder``.
    """
    return _smp_network(
        CHANGE_ARCHITECTURES[decoder], backbone, in_channels, 1, backbone_kwargs, weights
    )


def _smp_network(
    architecture: Callable[..., nn.Module],
    backbone: str,
    in_channels: int,
    classes: int,
    backbone_kwargs: Mapping[str, Any] | None,
    weights: Mapping[str, Tensor] | None,
) -> nn.Module:
    """An smp-style network over the timm encoder ``tu-<backbone>``, its weights loaded."""
    network = architecture(
        encoder_name=f'tu-{backbone}',
        encoder_weights=None,  # geocmid never downloads weights at run time
        in_channels=in_channels,
        classes=classes,
        **dict(backbone_kwargs or {}),
    )
    if weights is not None:
        load_timm_state_dict(network.get_submodule('encoder'), weights)
    return network


def classification_network(
    backbone: str,
    in_channels: int,
    num_classes: int,
    backbone_kwargs: Mapping[str, Any] | None = None,
    weights: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """A timm classifier: the encoder and a new linear classifier.

    Args:
        backbone: timm model name.
        in_channels: Number of image bands.
        num_classes: Number of classes.
        backbone_kwargs: Extra ``timm.create_model`` arguments the encoder needs.
        weights: Encoder weights as a plain timm state dict, or None (random initialisation).

    Returns:
        A network mapping ``(B, C, H, W)`` images to logits ``(B, K)``.
    """
    network = timm.create_model(
        backbone,
        pretrained=False,  # geocmid never downloads weights at run time
        num_classes=num_classes,
        in_chans=in_channels,
        **dict(backbone_kwargs or {}),
    )
    if weights is not None:
        load_encoder_weights(network, weights)
    return network


def load_timm_state_dict(encoder: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a plain timm state dict into smp's ``TimmUniversalEncoder``, strictly.

    smp wraps the timm network as ``encoder.model``, a ``features_only`` network. timm builds
    that network by flattening top-level ``nn.Sequential`` children (``stages.0`` becomes
    ``stages_0``) and by leaving out what follows the last feature stage (classifier, final
    norm). Each key is therefore looked up under ``model.`` as is, then with its first dot
    flattened; keys found under neither belong to the parts left out and are dropped. The
    load itself is strict, so every encoder parameter must come from ``state_dict``.

    Args:
        encoder: ``smp_model.encoder`` built with ``encoder_name='tu-<backbone>'``.
        state_dict: The weights of ``timm.create_model(backbone, num_classes=0)``.

    Raises:
        RuntimeError: If an encoder parameter or buffer is missing from ``state_dict``.
    """
    wanted = encoder.state_dict().keys()
    mapped = {}
    for key, value in state_dict.items():
        for candidate in (f'model.{key}', f'model.{key.replace(".", "_", 1)}'):
            if candidate in wanted:
                mapped[candidate] = value
                break
    encoder.load_state_dict(mapped, strict=True)


def load_encoder_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load encoder weights into a timm classifier: everything must match but the classifier.

    Args:
        model: ``timm.create_model(backbone, num_classes=K)``.
        state_dict: The weights of ``timm.create_model(backbone, num_classes=0)``.

    Raises:
        RuntimeError: A parameter outside the classifier is missing, or a key is unexpected,
            or a shape differs.
    """
    head = model.get_classifier()  # type: ignore[operator]  # timm method, untyped on nn.Module
    prefixes = tuple(f'{name}.' for name, module in model.named_modules() if module is head)
    result = model.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if not key.startswith(prefixes)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f'encoder weights do not fit {type(model).__name__}: missing {missing[:3]}, '
            f'unexpected {result.unexpected_keys[:3]}'
        )
