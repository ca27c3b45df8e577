"""What the self-supervised pretraining tasks share: EMA teacher, key queue, batch geometry.

CMID and GeRSP both train a student against an EMA copy of it with a queue of negative keys
(``docs/cmid.md#teacher``, ``docs/gersp.md#architecture``). :class:`PretrainTask` holds the
Lightning bookkeeping around those building blocks (:mod:`geocmid.models.momentum`), so each
method only says which modules its teacher averages and with which momentum.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist
from lightly.models.utils import update_momentum
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchgeo.tasks import BaseTask

from geocmid.models.backbones import is_swin
from geocmid.models.momentum import effective_queue_size
from geocmid.raster.bands import RGB_NAMES
from geocmid.transforms.streams import RandomStreams, run_seed

__all__ = ('RGB_NAMES', 'BatchGeometry', 'PretrainTask', 'is_rgb')


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
    (lightly's ``update_momentum``), for each pair :meth:`teacher_pairs` names,
    with the momentum :meth:`momentum` gives for the step. Subclasses also name the timm
    encoder that is exported (:meth:`timm_encoder`).
    """

    monitor = 'train_loss'

    @staticmethod
    def check_settings(values: Mapping[str, Any]) -> None:
        """Raise :class:`~geocmid.errors.InputError` for a setting that cannot train.

        Args:
            values: Every argument of the task's ``__init__`` by name.
        """

    @classmethod
    def validate_settings(cls, settings: Mapping[str, Any]) -> None:
        """Check ``settings`` (some task arguments; defaults fill in the rest) before a run.

        Raises:
            InputError: Naming the ``task.*`` key of the first bad setting.
        """
        parameters = inspect.signature(cls.__init__).parameters.values()
        defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
        cls.check_settings(defaults | dict(settings))

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

    @cached_property
    def streams(self) -> RandomStreams:
        """This rank's random stream of augmentation and mask draws (see :meth:`setup`)."""
        return RandomStreams()

    def setup(self, stage: str) -> None:
        """Seed this rank's stream with the run seed + global rank (unless resumed).

        Without it every DDP rank would draw the same crops, flips and masks.
        """
        self.streams.start(run_seed(), self.trainer.global_rank)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save every rank's stream (all ranks call this hook; only rank 0 writes the file)."""
        state = self.streams.state_dict(as_bytes=True)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # As bytes: gathering pickled tensors fails on some torch builds.
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint['random_streams'] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Continue this rank's stream from the checkpoint, when it was saved by as many ranks."""
        states = checkpoint.get('random_streams')
        if self._trainer is None or not states:
            return
        if len(states) == self.trainer.world_size:
            self.streams.load_state_dict(states[self.trainer.global_rank])
        else:
            rank_zero_warn(
                f'the checkpoint holds random streams of {len(states)} rank(s), this run has '
                f'{self.trainer.world_size}: streams start afresh from the seed'
            )

    def on_fit_start(self) -> None:
        """Use channels-last memory on CUDA, where convolutions run faster in that layout."""
        if self.device.type == 'cuda':
            self.to(memory_format=torch.channels_last)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimiser, then move the teacher towards the student.

        Lightning calls this hook once per optimiser step, so under ``accumulate_grad_batches``
        the teacher moves once per group of batches, as the step-counted schedules assume.
        """
        super().optimizer_step(*args, **kwargs)
        # global_step counts completed steps: inside the hook it is this step's 0-based index.
        self.update_teacher(self.global_step)

    def update_teacher(self, step: int) -> None:
        """Move every teacher towards its student with the momentum of the 0-based ``step``."""
        momentum = self.momentum(step)
        for teacher, student in self.teacher_pairs():
            update_momentum(student, teacher, momentum)

    def log_losses(
        self, loss: Tensor, terms: Mapping[str, Tensor | float], batch_size: int
    ) -> None:
        """Log the total loss (on the progress bar), its terms, the learning rate and momentum.

        Args:
            loss: The total loss of the step, logged as ``train_loss``.
            terms: Loss terms and other per-step values, logged under their keys.
            batch_size: Patches in the batch.
        """
        self.log('train_loss', loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {
                **terms,
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
        """The configured queue size, capped at the keys one epoch enqueues (docs/cmid.md).

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
                f'epoch enqueues only {keys_per_sample} x {samples_per_epoch} keys '
                '(docs/cmid.md#deviations)'
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
        assert loader is not None  # setup_data() above created it
        if isinstance(loader, Mapping):
            # Several loaders (GeRSP: patches and natural images): the first sets the batch.
            loader = next(iter(loader.values()))
        accumulate = trainer.accumulate_grad_batches
        batches = trainer.num_training_batches
        steps_per_epoch = max(1, math.ceil(batches / accumulate)) if math.isfinite(batches) else 1
        total_batch = loader.batch_size * trainer.world_size * accumulate
        return BatchGeometry(int(total_steps), steps_per_epoch, total_batch)
