"""GeRSP: generic-knowledge boosted remote-sensing pretraining, as a TorchGeo task.

Paper arXiv:2401.04614 (IEEE TGRS 2024); official code floatingstarZ/GeRSP at commit
4ea0bd32c83089bcacdf9f12e54e1b980b760753; see ``docs/gersp.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch.utilities.types
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.models.utils import batch_shuffle_distributed, batch_unshuffle_distributed
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import SGD
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts

from geocmid.datamodules.gersp import NATURAL_MEAN, NATURAL_STD
from geocmid.errors import InputError
from geocmid.models.backbones import create_encoder
from geocmid.models.heads import Projector
from geocmid.models.losses import infonce
from geocmid.models.momentum import KeyQueue, copy_as_teacher
from geocmid.models.optim import scale_lr
from geocmid.tasks.ssl.base import PretrainTask, is_rgb
from geocmid.transforms.augment import moco_view

__all__ = ('GeRSP', 'natural_band_mixing')

#: Total batch size the learning rates refer to: 8 GPUs x 32 RS pairs (docs/gersp.md#optimisation).
REFERENCE_BATCH = 256

#: Band names (case-insensitive) recognised as the red, green and blue band of a raster.
COLOUR_NAMES = (('red', 'r'), ('green', 'g'), ('blue', 'b'))


def _rgb_positions(band_names: Sequence[str], rgb_bands: Sequence[int | str] | None) -> list[int]:
    """0-based input bands receiving the natural red, green and blue (see natural_band_mixing)."""
    lowered = [name.lower() for name in band_names]
    listed = ', '.join(band_names)
    if rgb_bands is None:
        found = [
            next((i for i, name in enumerate(lowered) if name in aliases), None)
            for aliases in COLOUR_NAMES
        ]
        positions = [position for position in found if position is not None]
        if len(positions) == len(found):
            return positions
        if len(band_names) == 3:
            rank_zero_warn(
                f'no bands named red, green, blue (bands: {listed}); natural images are mapped '
                'onto bands 1, 2, 3 in that order (set task.rgb_bands otherwise)'
            )
            return [0, 1, 2]
        raise InputError(
            'task.rgb_bands',
            f'cannot tell which bands receive the natural images (bands: {listed}); '
            'give three band names or 1-based positions for red, green, blue '
            '(pretrain --rgb-bands 1,2,3)',
        )
    if len(rgb_bands) != 3:
        raise InputError('task.rgb_bands', f'needs 3 entries (red, green, blue), got {rgb_bands}')
    positions = []
    for band in rgb_bands:
        if isinstance(band, str) and band.lower() in lowered:
            positions.append(lowered.index(band.lower()))
        elif isinstance(band, int) and 1 <= band <= len(band_names):
            positions.append(band - 1)
        else:
            raise InputError(
                'task.rgb_bands',
                f'{band!r} is neither a band name nor 1 to {len(band_names)} (bands: {listed})',
            )
    return positions


def check_settings(values: Mapping[str, Any]) -> None:
    """Reject GeRSP settings that cannot train, before anything is built or run.

    Args:
        values: The task's arguments by name.

    Raises:
        InputError: Naming the ``task.*`` key of the first bad setting.
    """

    def bad(key: str, problem: str) -> InputError:
        return InputError(f'task.{key}', f'{problem}, got {values[key]!r}')

    if values['lr_scaling'] not in ('none', 'linear', 'sqrt'):
        raise bad('lr_scaling', "must be 'none', 'linear' or 'sqrt'")
    for key in ('lr', 'queue_size', 'temperature', 'projection_hidden_dim', 'projection_dim',
                'restart_epochs', 'num_classes'):  # fmt: skip
        if not values[key] > 0:
            raise bad(key, 'must be positive')
    for key in ('min_lr', 'weight_decay', 'supervised_weight'):
        if not values[key] >= 0:
            raise bad(key, 'must not be negative')
    for key in ('momentum', 'moco_momentum'):
        if not 0 <= values[key] <= 1:
            raise bad(key, 'must be between 0 and 1')
    low, high = values['crop_scale']
    if not 0 < low <= high <= 1:
        raise bad('crop_scale', 'must be two area fractions 0 < low <= high <= 1')


def natural_band_mixing(
    channels: int,
    band_names: Sequence[str] | None = None,
    rgb_bands: Sequence[int | str] | None = None,
) -> Tensor:
    """The (C, 3) matrix that maps normalised natural RGB onto the rasters' C bands.

    The student encodes remote-sensing and natural images in one pass (``docs/gersp.md#data``), so
    both need the rasters' bands. Natural red, green and blue go to the bands ``rgb_bands`` names;
    by
    default the bands named red/r, green/g, blue/b, or the three bands in order of a three-band
    input (with a warning when they are named otherwise). Every other band is zero, which in
    normalised units is the band's mean: no signal. The first convolution stays shared: its RGB
    kernels learn from both sources, the kernels of the other bands only from the rasters. A band
    given for several colours receives their mean (``[1, 1, 1]`` gives a panchromatic band the
    natural images' gray level).

    Args:
        channels: Number of raster bands C.
        band_names: Name of every raster band, in input order; unnamed when None.
        rgb_bands: Bands receiving red, green and blue: band names or 1-based positions.

    Returns:
        float32 (C, 3) matrix M; natural images enter the encoder as ``M @ rgb`` per pixel.

    Raises:
        InputError: If the red, green and blue bands cannot be determined.
    """
    if band_names is None and channels == 3 and rgb_bands is None:
        return torch.eye(3)
    names = band_names or [f'band_{index}' for index in range(1, channels + 1)]
    mixing = torch.zeros(channels, 3)
    for colour, band in enumerate(_rgb_positions(names, rgb_bands)):
        mixing[band, colour] = 1.0
    # Rows given for several colours average them.
    return mixing / mixing.sum(dim=1, keepdim=True).clamp(min=1)


class GeRSP(PretrainTask):
    """GeRSP self-supervised pretraining of a timm encoder, with a natural-image classifier.

    One training step (``docs/gersp.md#architecture``), on a normalised batch of raster patches
    and a normalised batch of labelled natural images:

    1. Two MoCo v1 views of every patch (:func:`~geocmid.transforms.augment.moco_view`) and one of
       every natural image, without grad; natural RGB is mapped onto the raster bands
       (:func:`natural_band_mixing`).
    2. One student pass over [query views ; natural images], so BatchNorm statistics are shared
       by both sources; global average pooling gives one vector per image.
    3. Contrastive: the projector (Linear, ReLU, Linear, no BatchNorm) and L2 normalisation give
       q; the EMA teacher encodes the key views with shuffle-BN across devices and projects them
       to k; InfoNCE ``CE([q . k, q . Q] / tau, 0)`` against the queue as it was before the step,
       after which the keys are gathered once across devices and enqueued.
    4. Supervised: a linear classifier on the pooled natural-image features, cross-entropy.

    Total loss = contrastive + ``supervised_weight`` x supervised. After every optimiser step
    the key encoder AND the key projector move towards the student with a constant momentum
    (the official code never updated the key projector, ``docs/gersp.md#deviations``); the teacher
    starts as an exact copy of the student. The classifier has one output per natural-image class
    sub-folder. SGD with weight decay on every parameter, cosine annealing with warm
    restarts by epoch. Nodata pixels of the patches hold the band mean (the data module's
    normalisation) and need no masking, as GeRSP has no pixel loss.
    """

    ignore = ('augmentation', 'natural_augmentation')

    def __init__(
        self,
        backbone: str = 'resnet50',
        in_channels: int = 3,
        patch_size: int = 224,
        band_names: Sequence[str] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        max_value: float = 255.0,
        rgb: bool | None = None,
        rgb_bands: Sequence[int | str] | None = None,
        num_classes: int = 1000,
        natural_mean: Sequence[float] | None = None,
        natural_std: Sequence[float] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        lr: float = 0.007,
        lr_scaling: Literal['none', 'linear', 'sqrt'] = 'linear',
        min_lr: float = 0.001,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        restart_epochs: int = 20,
        queue_size: int = 65536,
        samples_per_epoch: int | None = None,
        temperature: float = 0.07,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        moco_momentum: float = 0.999,
        supervised_weight: float = 1.0,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        augmentation: nn.Module | None = None,
        natural_augmentation: nn.Module | None = None,
    ) -> None:
        """Initialise a new GeRSP task.

        Args:
            backbone: timm model name (ResNet or Swin; the paper trains a ResNet-50).
            in_channels: Number of raster bands.
            patch_size: Side of the patches, the natural images and every view, in pixels.
            band_names: Name of every raster band (selects the RGB bands, see rgb_bands).
            mean: Per-band mean the patches were normalised with, in raw units; 0 when unset.
            std: Per-band standard deviation, in raw units; ``max_value`` when unset.
            max_value: Raw value of full scale of the rasters (255 for 8-bit data).
            rgb: Whether the raster bands are red, green, blue (enables hue, saturation and
                grayscale on the patches); by default True for three bands named R, G, B.
            rgb_bands: Raster bands that receive the natural images' red, green and blue, as
                band names or 1-based positions (see :func:`natural_band_mixing`).
            num_classes: Classes of the natural images (class sub-folders).
            natural_mean: Per-channel mean the natural images were normalised with, 8-bit
                units; ImageNet's by default.
            natural_std: Per-channel standard deviation, 8-bit units; ImageNet's by default.
            backbone_kwargs: Extra ``timm.create_model`` arguments.
            lr: Learning rate for a total batch of 256 patches (the paper's 0.007).
            lr_scaling: How ``lr`` and ``min_lr`` scale with the total batch: 'none', 'linear',
                'sqrt'.
            min_lr: Learning rate at the end of each cosine cycle, for a total batch of 256.
            momentum: SGD momentum.
            weight_decay: SGD weight decay, on every parameter as in the official code.
            restart_epochs: Epochs per cosine cycle (the paper: 5 cycles of 20 epochs).
            queue_size: Configured number of negative keys.
            samples_per_epoch: Patches per epoch over all devices; caps the queue
                (docs/cmid.md#deviations).
            temperature: InfoNCE temperature.
            projection_hidden_dim: Hidden width of the projector.
            projection_dim: Key dimension.
            moco_momentum: Constant EMA momentum of the key encoder and key projector.
            supervised_weight: Weight alpha of the natural-image cross-entropy.
            crop_scale: Area range of the random resized crops, as a fraction of the input.
            augmentation: Replaces the view of the patches (applied twice per step); it maps a
                normalised (B, C, S, S) batch to normalised views of the same shape.
            natural_augmentation: Replaces the view of the natural images, (B, 3, S, S) to
                (B, 3, S, S).

        Raises:
            InputError: If the bands receiving the natural images cannot be determined, or for
                a setting that cannot train (naming its ``task.*`` key).
        """
        self.check_settings(locals())
        super().__init__()
        self.augmentation = augmentation or self._default_augmentation()
        self.natural_augmentation = natural_augmentation or moco_view(
            patch_size,
            self.hparams['natural_mean'] or NATURAL_MEAN,
            self.hparams['natural_std'] or NATURAL_STD,
            rgb=True,
            scale=crop_scale,
        )

    @staticmethod
    def check_settings(values: Mapping[str, Any]) -> None:
        """Reject settings that cannot train (see :func:`check_settings`)."""
        check_settings(values)

    def configure_models(self) -> None:
        """Build the student encoder, projector and classifier, the EMA teacher and the queue."""
        hparams = self.hparams
        channels = hparams['in_channels']
        # Derived from the hyperparameters, so not saved in checkpoints.
        mixing = natural_band_mixing(channels, hparams['band_names'], hparams['rgb_bands'])
        self.register_buffer('natural_mixing', mixing, persistent=False)
        backbone_kwargs = hparams['backbone_kwargs'] or {}
        self.student = create_encoder(
            hparams['backbone'], channels, hparams['patch_size'], **backbone_kwargs
        )
        features = self.student.num_features
        self.projector = Projector(
            features, hparams['projection_hidden_dim'], hparams['projection_dim']
        )
        self.classifier = nn.Linear(features, hparams['num_classes'])
        # After all initialisation, so that the teacher starts as an exact copy
        # (docs/gersp.md#deviations).
        self.teacher = copy_as_teacher(
            nn.ModuleDict({'encoder': self.student, 'projector': self.projector})
        )
        self.queue = KeyQueue(
            hparams['projection_dim'],
            self.queue_size(hparams['queue_size'], hparams['samples_per_epoch'], keys_per_sample=1),
        )

    def configure_optimizers(self) -> lightning.pytorch.utilities.types.OptimizerLRScheduler:
        """SGD on the student, projector and classifier; cosine with warm restarts by epoch.

        Both learning rates are scaled from the reference batch of 256 to the total batch
        (per-device batch x devices x accumulation) by ``lr_scaling``, which keeps their ratio.
        """
        hparams = self.hparams
        total_batch = self.batch_geometry().total_batch
        factor = scale_lr(1.0, total_batch, hparams['lr_scaling'], REFERENCE_BATCH)
        optimizer = SGD(
            self.trainable_modules().parameters(),
            lr=hparams['lr'] * factor,
            momentum=hparams['momentum'],
            weight_decay=hparams['weight_decay'],
        )
        # mmcv's CosineRestart, equal periods and restart weights 1 (docs/gersp.md#optimisation).
        scheduler = CosineAnnealingWarmRestarts(
            optimizer, T_0=hparams['restart_epochs'], eta_min=hparams['min_lr'] * factor
        )
        return {
            'optimizer': optimizer,
            'lr_scheduler': {'scheduler': scheduler, 'interval': 'epoch'},
        }

    def trainable_modules(self) -> nn.ModuleDict:
        """The modules the optimiser updates: student encoder, projector and classifier."""
        return nn.ModuleDict(
            {'student': self.student, 'projector': self.projector, 'classifier': self.classifier}
        )

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """Key encoder and key projector, both averaged (the official code froze the projector)."""
        return [
            (self.teacher['encoder'], self.student),
            (self.teacher['projector'], self.projector),
        ]

    def momentum(self, step: int) -> float:
        """The constant EMA momentum (docs/gersp.md#architecture)."""
        return self.hparams['moco_momentum']

    def timm_encoder(self) -> nn.Module:
        """The student encoder."""
        return self.student

    def forward(self, x: Tensor) -> Tensor:
        """Encode a normalised batch with the student: the last-stage feature map."""
        return self.student.forward_features(x)

    def natural_to_bands(self, natural: Tensor) -> Tensor:
        """Map normalised natural RGB (B, 3, H, W) onto the raster bands (B, C, H, W)."""
        return torch.einsum('cj,bjhw->bchw', self.natural_mixing.to(natural), natural)

    def losses(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """Compute the loss terms of a batch; the queue is not changed.

        Args:
            batch: See :meth:`training_step`.

        Returns:
            ``loss_contrastive``, ``loss_supervised`` and ``natural_accuracy``, and the teacher
            keys (B, D) to enqueue after the step.
        """
        image, natural, labels = batch['image'], batch['natural_image'], batch['natural_label']
        # This rank's own stream, so that ranks draw different views.
        with torch.no_grad(), self.streams(image.device):
            query_view = self.augmentation(image)
            key_view = self.augmentation(image)
            natural_view = self.natural_to_bands(self.natural_augmentation(natural))
        # One pass over both sources: BatchNorm statistics over the mixed batch
        # (docs/gersp.md#architecture).
        pooled = self.student(self.layout(torch.cat([query_view, natural_view])))
        pooled_rs, pooled_natural = pooled.split([len(image), len(natural)])
        query = self.projector(pooled_rs)
        keys = self.teacher_keys(key_view)
        logits = self.classifier(pooled_natural)
        terms = {
            'loss_contrastive': infonce(query, keys, self.queue.keys, self.hparams['temperature']),
            'loss_supervised': F.cross_entropy(logits, labels),
            'natural_accuracy': (logits.argmax(dim=1) == labels).float().mean(),
        }
        return terms, keys

    @torch.no_grad()
    def teacher_keys(self, view: Tensor) -> Tensor:
        """L2-normalised teacher keys of the key views, with shuffle-BN across devices.

        Under DDP without SyncBatchNorm the views are shuffled across devices before the teacher
        and unshuffled after it, so that BatchNorm statistics do not leak which key belongs to
        which query (MoCo's shuffle-BN). With SyncBatchNorm, or on one device, statistics are
        not per device and the views are encoded as they are.
        """
        encoder, projector = self.teacher['encoder'], self.teacher['projector']
        if not self._shuffles_bn():
            return projector(encoder(self.layout(view)))
        shuffled, restore = batch_shuffle_distributed(view)
        return batch_unshuffle_distributed(projector(encoder(self.layout(shuffled))), restore)

    def training_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> Tensor:
        """Compute the GeRSP loss of one batch and enqueue the teacher keys.

        Args:
            batch: ``image`` (B, C, S, S) normalised raster patches, ``natural_image``
                (N, 3, S, S) normalised natural RGB images and ``natural_label`` (N,) their
                class indices.
            batch_idx: Index of the batch in the epoch.
            dataloader_idx: Index of the data loader.

        Returns:
            The total loss.
        """
        terms, keys = self.losses(batch)
        supervised_weight = self.hparams['supervised_weight']
        loss = terms['loss_contrastive'] + supervised_weight * terms['loss_supervised']
        # After the loss, which used the queue as it was before the step.
        self.queue.enqueue(keys)

        self.log_losses(loss, terms, batch_size=len(batch['image']))
        return loss

    def _shuffles_bn(self) -> bool:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return False
        return not any(isinstance(module, nn.SyncBatchNorm) for module in self.teacher.modules())

    def _default_augmentation(self) -> nn.Module:
        hparams = self.hparams
        channels = hparams['in_channels']
        return moco_view(
            hparams['patch_size'],
            hparams['mean'] if hparams['mean'] is not None else [0.0] * channels,
            hparams['std'] if hparams['std'] is not None else [hparams['max_value']] * channels,
            max_value=hparams['max_value'],
            rgb=is_rgb(hparams['rgb'], hparams['band_names'], channels),
            scale=hparams['crop_scale'],
        )
