"""Semantic segmentation fine-tuning of a pretrained timm encoder with an smp decoder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Self

import segmentation_models_pytorch as smp
from torch import Tensor, nn
from torchgeo.tasks import SemanticSegmentation

from geocmid.datasets.labels import IGNORE_INDEX


class Segmentation(SemanticSegmentation):
    """Semantic segmentation with a timm encoder (``tu-<backbone>``) and an smp decoder.

    TorchGeo's :class:`~torchgeo.tasks.SemanticSegmentation` provides the training, validation
    and prediction steps, the loss and the metrics (overall, average and per-class IoU named by
    ``labels``). This subclass adds what TorchGeo cannot do for geocmid's encoders:

    * the FPN decoder next to U-Net and UPerNet;
    * loading a plain timm state dict (``encoder.pt`` from ``geocmid pretrain`` or
      ``import-weights``) into smp's timm universal encoder, strictly. TorchGeo only loads
      weight enums or Lightning checkpoints whose keys already match the smp encoder.

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
            freeze_backbone: Keep the encoder weights fixed and train the decoder only.
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
        """Build the smp model, load the encoder weights and freeze the encoder if asked."""
        self.model = smp.create_model(
            self.hparams['model'],
            encoder_name=f'tu-{self.hparams["backbone"]}',
            encoder_weights=None,  # geocmid never downloads weights at run time
            in_channels=self.hparams['in_channels'],
            classes=self.hparams['num_classes'],
            **(self.hparams['backbone_kwargs'] or {}),
        )
        if self.encoder_weights is not None:
            load_timm_state_dict(self.model.encoder, self.encoder_weights)
        if self.hparams['freeze_backbone']:
            # Eval mode too (see train()); Lightning keeps each submodule's mode across fit.
            self.model.encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Self:
        """Set training mode, keeping a frozen encoder in eval mode.

        Freezing the weights alone would still let BatchNorm update its running statistics
        on the new data; in eval mode a frozen encoder computes exactly its pretrained
        features.

        Args:
            mode: Training (True) or evaluation (False) mode.

        Returns:
            The task.
        """
        super().train(mode)
        if mode and self.hparams['freeze_backbone']:
            self.model.encoder.eval()
        return self


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
