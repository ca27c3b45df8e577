"""CMID: contrastive mask image distillation, as a TorchGeo task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch.utilities.types
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from geocmid.errors import InputError
from geocmid.models.backbones import MaskedEncoder
from geocmid.models.heads import LocalHead, MIMDecoder, Projector
from geocmid.models.losses import DINOLoss, infonce, mim_loss, teacher_temperature
from geocmid.models.masking import block_mask, mean_fill, resize_mask
from geocmid.models.matching import cell_centres, gather_tokens, match_tokens
from geocmid.models.momentum import KeyQueue, copy_as_teacher, cosine_momentum
from geocmid.models.optim import build_adan, scale_lr, warmup_cosine_scheduler
from geocmid.tasks.ssl.base import PretrainTask, is_rgb
from geocmid.transforms.augment import TwoViewAugmentation, View

#: Total batch size the peak learning rate ``lr`` refers to (``docs/cmid.md#optimisation``).
REFERENCE_BATCH = 256

#: Device types on which torch's SyncBatchNorm can train.
SYNC_BN_DEVICES = ('cuda', 'hpu', 'xpu')

#: Settings that must be positive, and settings that must not be negative.
POSITIVE = (
    'lr', 'queue_size', 'temperature', 'projection_hidden_dim', 'projection_dim', 'num_matches',
    'num_prototypes', 'local_hidden_dim', 'local_bottleneck_dim', 'student_temperature',
    'teacher_temperature', 'warmup_teacher_temperature',
)  # fmt: skip
NON_NEGATIVE = (
    'min_lr', 'warmup_epochs', 'weight_decay', 'fft_weight', 'warmup_teacher_temperature_epochs',
    'mim_weight', 'global_weight', 'local_weight',
)  # fmt: skip


def check_settings(values: Mapping[str, Any]) -> None:
    """Reject CMID settings that cannot train, before anything is built or run.

    Args:
        values: The task's arguments by name.

    Raises:
        InputError: Naming the ``task.*`` key of the first bad setting.
    """

    def bad(key: str, problem: str) -> InputError:
        return InputError(f'task.{key}', f'{problem}, got {values[key]!r}')

    if not 0 < values['mask_ratio'] < 1:
        raise bad('mask_ratio', 'must be between 0 and 1 (exclusive)')
    if values['mask_patch_size'] < 1 or values['patch_size'] % values['mask_patch_size']:
        size = values['patch_size']
        raise bad('mask_patch_size', f'must be positive and divide the patch size {size}')
    if values['lr_scaling'] not in ('none', 'linear', 'sqrt'):
        raise bad('lr_scaling', "must be 'none', 'linear' or 'sqrt'")
    for key in POSITIVE:
        if not values[key] > 0:
            raise bad(key, 'must be positive')
    for key in NON_NEGATIVE:
        if not values[key] >= 0:
            raise bad(key, 'must not be negative')
    for key in ('center_momentum', 'base_momentum', 'final_momentum'):
        if not 0 <= values[key] <= 1:
            raise bad(key, 'must be between 0 and 1')


class CMID(PretrainTask):
    """CMID self-supervised pretraining of a timm ResNet or Swin encoder.

    One training step (``docs/cmid.md#one-training-step``), on a normalised batch of square patches:

    1. Two crops per patch, A (geometry only) and B (geometry and photometric), with their boxes
       and flips recorded (:class:`~geocmid.transforms.augment.TwoViewAugmentation`), without grad.
    2. Each crop gets its own block mask (exact count of 32 px cells) and is mean-filled; the
       student encodes both masked crops with the mask token added after the stem. The student
       never sees an unmasked crop (the official code fed crop B unmasked,
       ``docs/cmid.md#deviations``).
    3. MIM: a linear decoder reconstructs each crop; focal-L1 on masked pixels plus the focal
       frequency loss, averaged over both crops.
    4. The EMA teacher encodes both unmasked crops. Global: InfoNCE of student(masked A) against
       teacher(B) and of student(masked B) against teacher(A), both against the queue as it was
       before the step; then the teacher keys of B, then of A, are gathered once across devices
       and enqueued (once, not once per device).
    5. Local: tokens are matched by the true overlap of the two crops and distilled through
       the DINO head with one centre per step, updated once afterwards; the teacher
       temperature follows the 0-based epoch-indexed schedule.

    Total loss = MIM + global + local, each with weight 1. After every optimiser step the teacher
    (encoder, projector and local head; parameters only, never the mask token) moves towards the
    student with a cosine momentum from 0.996 to 1. Adan with weight-decay groups, linear
    warm-up then per-step cosine. The queue is capped at the keys enqueued per epoch.
    Departures from the official code: ``docs/cmid.md#deviations``.

    Pixels flagged invalid (nodata) in ``batch['valid']`` are left out of the mean fill and the
    reconstruction loss.
    """

    ignore = ('augmentation',)

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
        backbone_kwargs: dict[str, Any] | None = None,
        lr: float = 0.004,
        lr_scaling: Literal['none', 'linear', 'sqrt'] = 'linear',
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        weight_decay: float = 0.02,
        mask_ratio: float = 0.6,
        mask_patch_size: int = 32,
        fft_weight: float = 1.0,
        queue_size: int = 65536,
        samples_per_epoch: int | None = None,
        temperature: float = 0.2,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 256,
        num_matches: int = 20,
        num_prototypes: int = 2048,
        local_hidden_dim: int = 2048,
        local_bottleneck_dim: int = 256,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        warmup_teacher_temperature_epochs: int = 50,
        center_momentum: float = 0.9,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        mim_weight: float = 1.0,
        global_weight: float = 1.0,
        local_weight: float = 1.0,
        sync_batchnorm: bool = True,
        augmentation: nn.Module | None = None,
    ) -> None:
        """Initialise a new CMID task.

        Args:
            backbone: timm model name (ResNet or Swin).
            in_channels: Number of input bands.
            patch_size: Side of the sampled patches and of both crops, in pixels.
            band_names: Name of every band (recorded so the run describes itself).
            mean: Per-band mean the data were normalised with, in raw units; 0 when unset.
            std: Per-band standard deviation, in raw units; ``max_value`` when unset (TorchGeo's
                default division by 255).
            max_value: Raw value of full scale (255 for 8-bit data), which relates the
                official uint8 augmentation constants to the data.
            rgb: Whether the bands are red, green, blue (enables hue, saturation, grayscale and
                solarisation); by default True for three bands named R, G, B or unnamed.
            backbone_kwargs: Extra ``timm.create_model`` arguments (e.g. a small Swin for tests).
            lr: Peak learning rate for a total batch of 256 (0.001 x 4 GPUs in the paper).
            lr_scaling: How ``lr`` scales with the total batch: 'none', 'linear', 'sqrt'.
            min_lr: Learning rate at the end of the cosine.
            warmup_epochs: Epochs of linear warm-up from 0.01 x peak.
            weight_decay: Adan weight decay of every weight that is not a norm, bias, mask token
                or position table.
            mask_ratio: Share of mask cells masked per crop.
            mask_patch_size: Side of a mask cell in pixels.
            fft_weight: Weight of the focal frequency loss in the MIM loss.
            queue_size: Configured number of negative keys.
            samples_per_epoch: Patches per epoch over all devices; caps the queue.
            temperature: InfoNCE temperature of the global branch.
            projection_hidden_dim: Hidden width of the global projector.
            projection_dim: Key dimension of the global projector.
            num_matches: Token pairs kept per image and direction in the local branch.
            num_prototypes: Prototypes of the local DINO head.
            local_hidden_dim: Hidden width of the local head.
            local_bottleneck_dim: Bottleneck width of the local head.
            student_temperature: DINO student temperature.
            teacher_temperature: DINO teacher temperature after warm-up.
            warmup_teacher_temperature: DINO teacher temperature at epoch 0.
            warmup_teacher_temperature_epochs: Epochs of the teacher-temperature warm-up.
            center_momentum: EMA momentum of the DINO centre.
            base_momentum: Teacher EMA momentum at step 0.
            final_momentum: Teacher EMA momentum at the last step.
            mim_weight: Weight of the MIM loss.
            global_weight: Weight of the global InfoNCE loss.
            local_weight: Weight of the local DINO loss.
            sync_batchnorm: Convert every BatchNorm (student, teacher and local heads) to
                SyncBatchNorm when training on more than one device, as the official code does.
            augmentation: Replaces the two-view augmentation; it must map ``(image, valid)``
                to two :class:`~geocmid.transforms.augment.View` objects.

        Raises:
            InputError: For a setting that cannot train, naming its ``task.*`` key.
        """
        self.check_settings(locals())
        super().__init__()
        self.augmentation = augmentation or self._default_augmentation()
        #: Optimiser steps of the run (LR and EMA schedules), set by configure_optimizers.
        self.total_steps = 0

    @staticmethod
    def check_settings(values: Mapping[str, Any]) -> None:
        """Reject settings that cannot train (see :func:`check_settings`)."""
        check_settings(values)

    def configure_models(self) -> None:
        """Build the student, its decoder and heads, the EMA teacher and the key queue."""
        hparams = self.hparams
        channels = hparams['in_channels']
        timm_kwargs = hparams['backbone_kwargs'] or {}
        self.student = MaskedEncoder(
            hparams['backbone'], channels, hparams['patch_size'], **timm_kwargs
        )
        features = self.student.num_features
        self.decoder = MIMDecoder(features, channels, self.student.reduction)
        self.projector = Projector(
            features, hparams['projection_hidden_dim'], hparams['projection_dim']
        )
        # BatchNorm in the local head for ResNet, not for Swin (``docs/cmid.md#local-branch``).
        self.local_head = LocalHead(
            features,
            hparams['num_prototypes'],
            hparams['local_hidden_dim'],
            hparams['local_bottleneck_dim'],
            use_bn=not self.student.is_swin,
        )
        # An exact copy at start (docs/cmid.md#teacher). The copied mask token is never used: the
        # teacher always sees unmasked crops.
        student = nn.ModuleDict(
            {'encoder': self.student, 'projector': self.projector, 'local_head': self.local_head}
        )
        self.teacher = copy_as_teacher(student)
        # Each patch adds two keys per step, one per crop.
        size = self.queue_size(hparams['queue_size'], hparams['samples_per_epoch'], 2)
        self.queue = KeyQueue(hparams['projection_dim'], size)

    def configure_losses(self) -> None:
        """Build the DINO loss, which holds the centre."""
        self.local_loss = DINOLoss(
            self.hparams['num_prototypes'],
            self.hparams['student_temperature'],
            self.hparams['center_momentum'],
        )

    def setup(self, stage: str) -> None:
        """Seed this rank's random stream; under DDP, synchronise BatchNorm if asked to.

        The whole model is converted, EMA teacher and local heads included, as the official
        code converts it (NJU-LHRS/official-CMID at 6e1de74, Pretrain/Exploring/trainer.py).
        torch's SyncBatchNorm only trains on accelerators: on CPU BatchNorm stays per device.
        """
        super().setup(stage)
        if not self.hparams['sync_batchnorm'] or self.trainer.world_size == 1:
            return
        device = self.trainer.strategy.root_device.type
        if device in SYNC_BN_DEVICES:
            nn.SyncBatchNorm.convert_sync_batchnorm(self)
        else:
            rank_zero_warn(
                f'task.sync_batchnorm: torch cannot synchronise BatchNorm on {device}; '
                'statistics stay per device'
            )

    def configure_optimizers(self) -> lightning.pytorch.utilities.types.OptimizerLRScheduler:
        """Adan on the student's weight-decay groups, with per-step warm-up and cosine.

        The peak learning rate is ``lr`` scaled from the reference batch of 256 to the total
        batch (per-device batch x devices x gradient accumulation) by ``lr_scaling``.
        """
        hparams = self.hparams
        run = self.batch_geometry()
        self.total_steps = run.total_steps  # of the EMA schedule too
        peak = scale_lr(hparams['lr'], run.total_batch, hparams['lr_scaling'], REFERENCE_BATCH)
        optimizer = build_adan(self.trainable_modules(), peak, hparams['weight_decay'])
        scheduler = warmup_cosine_scheduler(
            optimizer,
            total_steps=run.total_steps,
            warmup_steps=round(hparams['warmup_epochs'] * run.steps_per_epoch),
            min_lr=hparams['min_lr'],
        )
        return {
            'optimizer': optimizer,
            'lr_scheduler': {'scheduler': scheduler, 'interval': 'step'},
        }

    def trainable_modules(self) -> nn.ModuleDict:
        """The modules the optimiser updates: student encoder, decoder and both heads."""
        return nn.ModuleDict(
            {
                'student': self.student,
                'decoder': self.decoder,
                'projector': self.projector,
                'local_head': self.local_head,
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        """Encode a normalised batch with the student: the last-stage feature map."""
        return self.student(x)

    def timm_encoder(self) -> nn.Module:
        """The student's timm encoder, which a run exports (the official extract.py does too)."""
        return self.student.encoder

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """Encoder, projector and local head: parameters only, never the mask token."""
        teacher_encoder = self.teacher['encoder']
        assert isinstance(teacher_encoder, MaskedEncoder)  # a copy of self.student
        return [
            (teacher_encoder.encoder, self.student.encoder),
            (self.teacher['projector'], self.projector),
            (self.teacher['local_head'], self.local_head),
        ]

    def momentum(self, step: int) -> float:
        """Cosine EMA momentum, ``base_momentum`` to ``final_momentum`` (docs/cmid.md#teacher)."""
        return cosine_momentum(
            step,
            self.total_steps,
            self.hparams['base_momentum'],
            self.hparams['final_momentum'],
        )

    def training_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> Tensor:
        """Compute the CMID loss of one normalised batch and update the queue and the centre.

        Args:
            batch: ``image`` (B, C, S, S) normalised by the data module, optionally ``valid``
                (B, S, S) marking pixels that are not nodata.
            batch_idx: Index of the batch in the epoch.
            dataloader_idx: Index of the data loader.

        Returns:
            The total loss.
        """
        image = batch['image']
        valid = batch.get('valid')
        # This rank's own stream, so that ranks draw different crops, flips, noise and masks.
        with torch.no_grad(), self.streams(image.device):
            view_a, view_b = self.augmentation(image, None if valid is None else valid.bool())
            cells = block_mask(
                2 * len(image),
                self.hparams['patch_size'],
                ratio=self.hparams['mask_ratio'],
                mask_patch_size=self.hparams['mask_patch_size'],
                device=image.device,
            )
        cells_a, cells_b = cells.chunk(2)

        student_a, loss_mim_a = self._student_pass(view_a, cells_a)
        student_b, loss_mim_b = self._student_pass(view_b, cells_b)
        loss_mim = (loss_mim_a + loss_mim_b) / 2

        with torch.no_grad():
            teacher_a = self.teacher['encoder'](self.layout(view_a.image))
            teacher_b = self.teacher['encoder'](self.layout(view_b.image))
            # Teacher keys of crop B, then of crop A: the positives of students A and B, and
            # the order in which they are enqueued (docs/cmid.md#global-branch).
            keys = self.teacher['projector'](torch.cat([teacher_b, teacher_a]))
        # Both directions in one call: the mean over two halves of equal size is the mean of
        # the two directions' losses.
        queries = self.projector(torch.cat([student_a, student_b]))
        loss_global = infonce(queries, keys, self.queue.keys, self.hparams['temperature'])

        student_logits, teacher_logits = self._local_logits(
            view_a, view_b, (student_a, student_b), (teacher_a, teacher_b)
        )
        temperature = teacher_temperature(
            self.current_epoch,
            self.hparams['warmup_teacher_temperature'],
            self.hparams['teacher_temperature'],
            self.hparams['warmup_teacher_temperature_epochs'],
        )
        # Both directions have the same number of tokens, so the mean over all of them is the
        # mean of the two directions' losses.
        loss_local = self.local_loss(student_logits, teacher_logits, temperature)

        loss = (
            self.hparams['mim_weight'] * loss_mim
            + self.hparams['global_weight'] * loss_global
            + self.hparams['local_weight'] * loss_local
        )
        # After the losses, which used the queue and centre as they were before the step.
        self.queue.enqueue(keys)
        self.local_loss.update_center(teacher_logits)

        terms = {
            'loss_mim': loss_mim,
            'loss_global': loss_global,
            'loss_local': loss_local,
            'teacher_temp': temperature,
        }
        self.log_losses(loss, terms, batch_size=len(image))
        return loss

    def _student_pass(self, view: View, cells: Tensor) -> tuple[Tensor, Tensor]:
        """Encode a mean-filled masked crop and return its features and reconstruction loss."""
        with torch.no_grad():
            masked = mean_fill(view.image, cells, view.valid)
        features = self.student(self.layout(masked), cells)
        reconstruction = self.decoder(features)
        pixels = resize_mask(cells, view.image.shape[-2:])
        if view.valid is not None:
            pixels = pixels & view.valid
        return features, mim_loss(
            reconstruction, view.image, pixels, fft_weight=self.hparams['fft_weight']
        )

    def _local_logits(
        self,
        view_a: View,
        view_b: View,
        student: tuple[Tensor, Tensor],
        teacher: tuple[Tensor, Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Prototype logits of matched tokens: student A vs teacher B, student B vs teacher A.

        Args:
            view_a: Crop A and its geometry.
            view_b: Crop B and its geometry.
            student: Student feature maps of the masked crops A and B.
            teacher: Teacher feature maps of the unmasked crops A and B.

        Returns:
            Student and teacher logits of shape (2 B, n, K), direction A->B first.
        """
        grid = student[0].shape[-1]
        centres = [
            cell_centres(view.geometry.boxes, view.geometry.flipped, grid)
            for view in (view_a, view_b)
        ]
        student_logits, teacher_logits = [], []
        for s, t in ((0, 1), (1, 0)):
            idx_s, idx_t = match_tokens(centres[s], centres[t], self.hparams['num_matches'])
            # Each direction through the heads on its own, as the official code does, so that
            # their BatchNorm normalises each direction with its own statistics.
            student_logits.append(self.local_head(gather_tokens(student[s], idx_s)))
            with torch.no_grad():
                teacher_tokens = gather_tokens(teacher[t], idx_t)
                teacher_logits.append(self.teacher['local_head'](teacher_tokens))
        return torch.cat(student_logits), torch.cat(teacher_logits)

    def _default_augmentation(self) -> TwoViewAugmentation:
        hparams = self.hparams
        channels = hparams['in_channels']
        mean = hparams['mean'] if hparams['mean'] is not None else [0.0] * channels
        std = hparams['std'] if hparams['std'] is not None else [hparams['max_value']] * channels
        rgb = is_rgb(hparams['rgb'], hparams['band_names'], channels)
        return TwoViewAugmentation(
            hparams['patch_size'], mean, std, max_value=hparams['max_value'], rgb=rgb
        )
