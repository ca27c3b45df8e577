"""Semantic segmentation fine-tuning of a pretrained timm encoder with an smp decoder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor, nn
from torchgeo.tasks import SemanticSegmentation

from geocmid.datasets.labels import IGNORE_INDEX
from geocmid.models.networks import segmentation_network
from geocmid.tasks.finetune.encoder import EncoderSetup


class Segmentation(EncoderSetup, SemanticSegmentation):
    """Semantic segmentation with a timm encoder (``tu-<backbone>``) and an smp decoder.

    TorchGeo's :class:`~torchgeo.tasks.SemanticSegmentation` provides the training, validation
    and prediction steps, the loss and the metrics (overall, average and per-class IoU named by
    ``labels``). This subclass adds what TorchGeo cannot do for geocmid's encoders:

    * the FPN decoder next to U-Net and UPerNet;
    * loading a plain timm state dict (``encoder.pt`` from ``geocmid pretrain`` or
      ``import-weights``) into smp's timm universal encoder, strictly. TorchGeo only loads
      weight enums or Lightning checkpoints whose keys already match the smp encoder;
    * a frozen encoder that keeps BatchNorm in eval mode (:mod:`geocmid.tasks.finetune.encoder`).

    The model maps normalised ``(B, C, H, W)`` images to logits ``(B, K, H, W)``; normalisation
    is the data module's job, as everywhere in TorchGeo.
    """

    ignore = ('weights',)

    def __init__(
        self,
        model: Literal['unet', 'fpn', 'upernet'] = 'unet',
        backbone: str = 'resnet50',
        backbone_kwargs: dict[str, Any] | None = None,
        weights: Mapping[str, Tensor] | None = None,
        in_channels: int = 3,
        num_classes: int = 2,
        labels: list[str] | None = None,
        loss: Literal['ce', 'focal', 'dice', 'jaccard'] = 'ce',
        class_weights: Sequence[float] | None = None,
        ignore_index: int | None = IGNORE_INDEX,
        lr: float = 1e-3,
        patience: int = 10,
        freeze_backbone: bool = False,
    ) -> None:
        """Initialize a new Segmentation instance.

        Args:
            model: Decoder architecture: 'unet', 'fpn' or 'upernet'.
            backbone: timm model name of the encoder, e.g. 'resnet50' (without 'tu-').
            backbone_kwargs: Extra ``timm.create_model`` arguments the encoder weights need
                (the encoder card's ``backbone_kwargs``, e.g. ``{'img_size': 64}`` for Swin).
            weights: Encoder weights as a plain timm state dict (the keys of
                ``timm.create_model(backbone, in_chans=in_channels, num_classes=0)``), or None
                for a random initialisation. Not saved as a hyperparameter: a checkpoint carries
                the trained weights in its state dict.
            in_channels: Number of image bands.
            num_classes: Number of classes, background included.
            labels: Class names in class-id order, used to name the per-class metrics.
            loss: Loss function.
            class_weights: Optional per-class weights of the cross-entropy loss.
            ignore_index: Label value excluded from the loss and the metrics.
            lr: Learning rate.
            patience: Patience of the learning-rate scheduler, in epochs.
            freeze_backbone: Train the decoder only; the encoder keeps its weights and its
                BatchNorm statistics (:mod:`geocmid.tasks.finetune.encoder`).
        """
        self.encoder_weights = weights
        super().__init__(
            model=model,  # type: ignore[arg-type]  # 'fpn' is built by configure_models below
            backbone=backbone,
            in_channels=in_channels,
            task='multiclass',
            num_classes=num_classes,
            labels=labels,
            loss=loss,
            class_weights=class_weights,
            ignore_index=ignore_index,
            lr=lr,
            patience=patience,
            freeze_backbone=freeze_backbone,
        )

    def configure_models(self) -> None:
        """Build the network (:func:`~geocmid.models.networks.segmentation_network`)."""
        self.model = segmentation_network(
            self.hparams['model'],
            self.hparams['backbone'],
            self.hparams['in_channels'],
            self.hparams['num_classes'],
            self.hparams['backbone_kwargs'],
            self.encoder_weights,
        )
        self.freeze_if_asked()

    def encoder_parts(self) -> tuple[nn.Module, nn.Module | None]:
        """The smp encoder; the decoder and head lie outside it."""
        return self.model.encoder, None
