"""Binary change detection with a siamese pretrained timm encoder (FC-Siam-diff / -conc)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor, nn
from torchgeo.tasks import ChangeDetection

from geocmid.datasets.change_patches import IGNORE_INDEX
from geocmid.models.networks import change_network
from geocmid.tasks.finetune.encoder import EncoderSetup


class MaskedBCEWithLogitsLoss(nn.Module):
    """Binary cross-entropy on logits over the pixels whose target is not ``ignore_index``.

    PyTorch's ``BCEWithLogitsLoss`` has no ignore index, and nodata pixels must not teach the
    model anything.

    Args:
        ignore_index: Target value left out of the mean.
        pos_weight: Weight of the positive (change) class, for rare changes.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, pos_weight: float | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.pos_weight = pos_weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean loss over the kept pixels (0, with a gradient, when none is kept)."""
        keep = target != self.ignore_index
        if not keep.any():
            return logits.sum() * 0.0
        weight = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)
        return nn.functional.binary_cross_entropy_with_logits(
            logits[keep], target[keep].to(logits.dtype), pos_weight=weight
        )


class Change(EncoderSetup, ChangeDetection):
    """Binary change detection: a shared timm encoder applied to both dates, a U-Net decoder.

    TorchGeo's :class:`~torchgeo.tasks.ChangeDetection` provides the training and validation
    steps and the metrics (F1 and IoU of the change class among them, logged as
    ``val_OverallF1Score`` and ``val_OverallJaccardIndex``). This subclass adds what TorchGeo
    cannot do for geocmid's encoders:

    * the encoder is smp's timm universal encoder (``tu-<backbone>``), loaded strictly from a
      plain timm state dict (``encoder.pt`` of ``geocmid pretrain`` or ``import-weights``);
      TorchGeo loads only weight enums or Lightning checkpoints with smp keys;
    * nodata pixels (target 255) are ignored by the loss as well as the metrics: TorchGeo's
      'bce' loss has no ignore index;
    * a frozen encoder that keeps BatchNorm in eval mode (:mod:`geocmid.tasks.finetune.encoder`).

    The model maps normalised ``(B, 2, C, H, W)`` pairs (before, after) to change logits
    ``(B, 1, H, W)``.
    """

    ignore = ('weights',)

    def __init__(
        self,
        model: Literal['fcsiamdiff', 'fcsiamconc'] = 'fcsiamdiff',
        backbone: str = 'resnet50',
        backbone_kwargs: dict[str, Any] | None = None,
        weights: Mapping[str, Tensor] | None = None,
        in_channels: int = 3,
        loss: Literal['bce', 'focal', 'dice', 'jaccard'] = 'bce',
        pos_weight: float | None = None,
        lr: float = 1e-3,
        patience: int = 10,
        freeze_backbone: bool = False,
    ) -> None:
        """Initialize a new Change instance.

        Args:
            model: Siamese architecture: 'fcsiamdiff' (decodes feature differences) or
                'fcsiamconc' (decodes both dates' features).
            backbone: timm model name of the encoder, e.g. 'resnet50' (without 'tu-').
            backbone_kwargs: Extra ``timm.create_model`` arguments the encoder weights need.
            weights: Encoder weights as a plain timm state dict (the keys of
                ``timm.create_model(backbone, in_chans=in_channels, num_classes=0)``), or None
                for a random initialisation. Not saved as a hyperparameter: a checkpoint
                carries the trained weights in its state dict.
            in_channels: Bands per image.
            loss: 'bce' (masked), or smp's 'focal', 'dice' or 'jaccard' losses.
            pos_weight: Weight of change pixels in the 'bce' loss.
            lr: Learning rate.
            patience: Patience of the learning-rate scheduler, in epochs.
            freeze_backbone: Train the decoder only; the encoder keeps its weights and its
                BatchNorm statistics (:mod:`geocmid.tasks.finetune.encoder`).
        """
        self.encoder_weights = weights
        super().__init__(
            model=model,
            backbone=backbone,
            in_channels=in_channels,
            task='binary',
            labels=['no_change', 'change'],
            loss=loss,
            ignore_index=IGNORE_INDEX,
            lr=lr,
            patience=patience,
            freeze_backbone=freeze_backbone,
        )

    def configure_models(self) -> None:
        """Build the siamese network (:func:`~geocmid.models.networks.change_network`)."""
        self.model = change_network(
            self.hparams['model'],
            self.hparams['backbone'],
            self.hparams['in_channels'],
            self.hparams['backbone_kwargs'],
            self.encoder_weights,
        )
        self.freeze_if_asked()

    def encoder_parts(self) -> tuple[nn.Module, nn.Module | None]:
        """The encoder both dates share; the decoder lies outside it."""
        return self.model.encoder, None

    def configure_losses(self) -> None:
        """Masked BCE for 'bce'; TorchGeo's losses (which honour the ignore index) otherwise."""
        if self.hparams['loss'] == 'bce':
            self.criterion = MaskedBCEWithLogitsLoss(IGNORE_INDEX, self.hparams['pos_weight'])
        else:
            super().configure_losses()
