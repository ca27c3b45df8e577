"""Scene classification fine-tuning of a pretrained timm encoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import timm
from torch import Tensor, nn
from torchgeo.tasks import Classification


class SceneClassification(Classification):
    """Multiclass scene classification: a timm encoder with a linear classifier.

    TorchGeo's :class:`~torchgeo.tasks.Classification` provides the training, validation and
    prediction steps, the loss and the metrics (overall, average and per-class accuracy named
    by ``labels``). This subclass adds what TorchGeo cannot do for geocmid's encoders: loading
    a plain timm state dict (``encoder.pt`` from ``geocmid pretrain`` or ``import-weights``)
    strictly into every layer but the new classifier, and the encoder's ``backbone_kwargs``
    (e.g. a Swin's ``img_size``). TorchGeo loads only weight enums and Lightning checkpoints,
    non-strictly, so a mismatch would pass silently.

    The model maps normalised ``(B, C, H, W)`` images to logits ``(B, K)``.
    """

    ignore = ('weights',)

    def __init__(
        self,
        model: str = 'resnet50',
        backbone_kwargs: dict[str, Any] | None = None,
        weights: Mapping[str, Tensor] | None = None,
        in_channels: int = 3,
        num_classes: int = 2,
        labels: list[str] | None = None,
        loss: Literal['ce', 'focal'] = 'ce',
        lr: float = 1e-3,
        patience: int = 10,
        freeze_backbone: bool = False,
    ) -> None:
        """Initialize a new SceneClassification instance.

        Args:
            model: timm model name of the encoder, e.g. 'resnet50'.
            backbone_kwargs: Extra ``timm.create_model`` arguments the encoder weights need.
            weights: Encoder weights as a plain timm state dict (the keys of
                ``timm.create_model(model, in_chans=in_channels, num_classes=0)``), or None for
                a random initialisation. Not saved as a hyperparameter: a checkpoint carries
                the trained weights in its state dict.
            in_channels: Number of image bands.
            num_classes: Number of classes.
            labels: Class names in class-index order, used to name the per-class metrics.
            loss: 'ce' (cross-entropy) or 'focal'.
            lr: Learning rate.
            patience: Patience of the learning-rate scheduler, in epochs.
            freeze_backbone: Train the classifier only (a linear probe trained by SGD).
        """
        self.encoder_weights = weights
        super().__init__(
            model=model,
            in_channels=in_channels,
            task='multiclass',
            num_classes=num_classes,
            labels=labels,
            loss=loss,
            lr=lr,
            patience=patience,
            freeze_backbone=freeze_backbone,
        )

    def configure_models(self) -> None:
        """Build the timm model, load the encoder weights and freeze the encoder if asked."""
        self.model = timm.create_model(
            self.hparams['model'],
            pretrained=False,  # geocmid never downloads weights at run time
            num_classes=self.hparams['num_classes'],
            in_chans=self.hparams['in_channels'],
            **(self.hparams['backbone_kwargs'] or {}),
        )
        if self.encoder_weights is not None:
            load_encoder_weights(self.model, self.encoder_weights)
        if self.hparams['freeze_backbone']:
            self.model.requires_grad_(False)
            self.model.get_classifier().requires_grad_(True)


def load_encoder_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load encoder weights into a timm classifier: everything must match but the classifier.

    Args:
        model: ``timm.create_model(backbone, num_classes=K)``.
        state_dict: The weights of ``timm.create_model(backbone, num_classes=0)``.

    Raises:
        RuntimeError: A parameter outside the classifier is missing, or a key is unexpected,
            or a shape differs.
    """
    head = model.get_classifier()
    prefixes = tuple(f'{name}.' for name, module in model.named_modules() if module is head)
    result = model.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if not key.startswith(prefixes)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f'encoder weights do not fit {type(model).__name__}: missing {missing[:3]}, '
            f'unexpected {result.unexpected_keys[:3]}'
        )
