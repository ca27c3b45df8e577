"""Scene classification fine-tuning of a pretrained timm encoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor, nn
from torchgeo.tasks import Classification

from geocmid.models.networks import classification_network
from geocmid.tasks.finetune.encoder import EncoderSetup


class SceneClassification(EncoderSetup, Classification):
    """Multiclass scene classification: a timm encoder with a linear classifier.

    TorchGeo's :class:`~torchgeo.tasks.Classification` provides the training, validation and
    prediction steps, the loss and the metrics (overall, average and per-class accuracy named
    by ``labels``). This subclass adds what TorchGeo cannot do for geocmid's encoders: loading
    a plain timm state dict (``encoder.pt`` from ``geocmid pretrain`` or ``import-weights``)
    strictly into every layer but the new classifier, and the encoder's ``backbone_kwargs``
    (e.g. a Swin's ``img_size``). TorchGeo loads only weight enums and Lightning checkpoints,
    non-strictly, so a mismatch would pass silently. A frozen encoder keeps BatchNorm in eval
    mode (:mod:`geocmid.tasks.finetune.encoder`).

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
            freeze_backbone: Train the classifier only (a linear probe, trained with AdamW as
                the whole network otherwise is); the encoder keeps its weights and its
                BatchNorm statistics (:mod:`geocmid.tasks.finetune.encoder`).
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
        """Build the network (:func:`~geocmid.models.networks.classification_network`)."""
        self.model = classification_network(
            self.hparams['model'],
            self.hparams['in_channels'],
            self.hparams['num_classes'],
            self.hparams['backbone_kwargs'],
            self.encoder_weights,
        )
        self.freeze_if_asked()

    def encoder_parts(self) -> tuple[nn.Module, nn.Module | None]:
        """The whole timm network, and its classifier, which trains."""
        return self.model, self.model.get_classifier()
