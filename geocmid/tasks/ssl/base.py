"""What the self-supervised pretraining tasks share: EMA teacher, key queue, batch geometry.

CMID and GeRSP both train a student against an EMA copy of it with a queue of negative keys
(spec cmid.md 6, 8; gersp.md 2.4-2.6). :class:`PretrainTask` holds the Lightning bookkeeping
around those building blocks (:mod:`geocmid.models.momentum`), so each method only says which
modules its teacher averages and with which momentum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchgeo.tasks import BaseTask

from geocmid.models.backbones import is_swin
from geocmid.models.momentum import effective_queue_size, ema_update

__all__ = ('RGB_NAMES', 'BatchGeometry', 'PretrainTask', 'is_rgb')

#: Band names (case-insensitive) that make a three-band input RGB for the photometric set.
RGB_NAMES = (('r', 'g', 'b'), ('red', 'green', 'blue'))


@dataclass(frozen=True)
class BatchGeometry:
    """How a run's optimiser steps relate to batches and epochs, read from the trainer.

    Attributes:
        total_steps: Optimiser steps of the whole run.
        steps_per_epoch: Optimiser steps per epoch (1 when the epoch length is unknown).
        total_batch: Samples per optimiser step over all devices and accumulated batches.
    """

    total_steps: int
    steps_per_epoch: int
    total_batch: int


def is_rgb(rgb: bool | None, band_names: Sequence[str] | None, channels: int) -> bool:
    """Whether the bands are red, green, blue, which enables hue, saturation and grayscale.

    Args:
        rgb: An explicit answer, returned as is; None decides from the bands.
        band_names: Name of every band, or None.
        channels: Number of bands.

    Returns:
        ``rgb`` if given, else True for three bands named R, G, B (or unnamed).
    """
    if rgb is not None:
        return rgb
    names = tuple(name.lower() for name in band_names or ())
    return channels == 3 and (not names or names in RGB_NAMES)


class PretrainTask(BaseTask):
    """A student trained against an EMA teacher with a queue of keys (base of CMID and GeRSP).

    After every optimiser step the teacher moves towards the student, parameters only
    (:func:`~geocmid.models.momentum.ema_update`), for each pair :meth:`teacher_pairs` names,
    with the momentum :meth:`momentum` gives for the step. Subclasses also name the timm
    encoder that is exported (:meth:`timm_encoder`).
    """

    monitor = 'train_loss'

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The (teacher, student) module pairs averaged after every optimiser step."""
        raise NotImplementedError

    def momentum(self, step: int) -> float:
        """EMA momentum of the 0-based optimiser step ``step``."""
        raise NotImplementedError

    def timm_encoder(self) -> nn.Module:
        """The student's timm encoder, the network a run exports."""
        raise NotImplementedError

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The student's timm encoder weights, loadable strictly into ``timm.create_model``."""
        state = self.timm_encoder().state_dict()
        return {key: value.detach().cpu() for key, value in state.items()}

    def encoder_kwargs(self) -> dict[str, Any]:
        """``timm.create_model`` arguments (besides name, bands and classes) the encoder needs.

        A Swin is built for its patch size, so ``img_size`` travels with its weights.
        """
        kwargs = dict(self.hparams['backbone_kwargs'] or {})
        if is_swin(self.timm_encoder()):
            kwargs['img_size'] = self.hparams['patch_size']
        return kwargs

    def on_fit_start(self) -> None:
        """Use channels-last memory on CUDA, where convolutions run faster in that layout."""
        if self.device.type == 'cuda':
            self.to(memory_format=torch.channels_last)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Move the teacher towards the student after the optimiser step."""
        # global_step already counts the step just taken; schedules start at step 0.
        momentum = self.momentum(max(self.global_step - 1, 0))
        for teacher, student in self.teacher_pairs():
            ema_update(teacher, student, momentum)

    def log_losses(self, loss: Tensor, terms: dict[str, Tensor | float], batch_size: int) -> None:
        """Log the total loss (on the progress bar), its terms, the learning rate and momentum.

        Args:
            loss: The total loss of the step, logged as ``train_loss``.
            terms: Loss terms and other per-step values, logged under their keys.
            batch_size: Patches in the batch.
        """
        self.log('train_loss', loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(
            terms
            | {
                'lr': self.trainer.optimizers[0].param_groups[0]['lr'],
                'momentum': self.momentum(self.global_step),
            },
            batch_size=batch_size,
        )

    def layout(self, x: Tensor) -> Tensor:
        """``x`` in the memory layout of the model: channels-last on CUDA (see on_fit_start)."""
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x

    def queue_size(
        self, configured: int, samples_per_epoch: int | None, keys_per_sample: int
    ) -> int:
        """The configured queue size, capped at the keys enqueued per epoch (cmid.md D7).

        Args:
            configured: Requested number of keys.
            samples_per_epoch: Samples per epoch over all devices; None leaves the size as is.
            keys_per_sample: Keys one sample adds to the queue (CMID 2, GeRSP 1).

        Returns:
            The size to build the queue with; a warning is logged when the cap applies.
        """
        if samples_per_epoch is None:
            return configured
        size, capped = effective_queue_size(configured, keys_per_sample * samples_per_epoch)
        if capped:
            rank_zero_warn(
                f'queue size capped from {configured} (configured) to {size} (effective): an '
                f'epoch enqueues only {keys_per_sample} x {samples_per_epoch} keys (cmid.md D7)'
            )
        return size

    def batch_geometry(self) -> BatchGeometry:
        """Steps, epoch length and total batch of the run (for LR scaling and schedules).

        Raises:
            ValueError: If the run has no finite length.
        """
        trainer = self.trainer
        total_steps = trainer.estimated_stepping_batches
        if total_steps == float('inf'):
            name = type(self).__name__
            raise ValueError(f'{name} needs a finite run: set max_epochs or max_steps')
        # The epoch length and the batch size come from the training loader; with only max_steps
        # set Lightning has not loaded it yet.
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
        if isinstance(loader, Mapping):
            # Several loaders (GeRSP: patches and natural images): the first sets the batch.
            loader = next(iter(loader.values()))
        accumulate = trainer.accumulate_grad_batches
        batches = trainer.num_training_batches
        steps_per_epoch = max(1, math.ceil(batches / accumulate)) if math.isfinite(batches) else 1
        total_batch = loader.batch_size * trainer.world_size * accumulate
        return BatchGeometry(int(total_steps), steps_per_epoch, total_batch)
