"""The fine-tuning runner every supervised task shares: segmentation, change, classification.

A run folder holds everything one fine-tuning run produces::

    RUN_DIR/config.yaml            the resolved settings (defaults < YAML < command line)
    RUN_DIR/checkpoints/last.ckpt  the full Lightning checkpoint, for ``resume``
    RUN_DIR/logs/version_N/        CSV logs: losses and the task's metrics per epoch
    RUN_DIR/model.ckpt             the trained model (Lightning checkpoint, weights only)
    RUN_DIR/model_card.json        bands, normalisation, classes, tile size, resolution,
                                   encoder provenance

:func:`run_finetune` does what every task does (run folder, encoder initialisation, training,
final validation, rank-0 export); a :class:`FineTune` spec (in :mod:`geocmid.runs.segmentation`,
:mod:`geocmid.runs.change`, :mod:`geocmid.runs.classification`) adds what is the task's own:
its data module, its Lightning task and its card. :mod:`geocmid.runs.artefacts` reads the
exported model back without Lightning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
from lightning.pytorch.utilities import rank_zero_only
from torchgeo.tasks import BaseTask

from geocmid.errors import InputError
from geocmid.io.cards import CARD_NAME, ModelCard, read_card, write_card
from geocmid.models.weights import ENCODER_NAME, load_encoder, sha256_file
from geocmid.runs import folders
from geocmid.runs.artefacts import MODEL_NAME
from geocmid.runs.folders import (
    build_trainer,
    check_positive,
    check_run_dir,
    checkpoint_interval,
    fit,
    resume_checkpoint,
    write_run_config,
)
from geocmid.runs.result import RunResult
from geocmid.types import PathLike

#: What a run writes into its folder; ``--overwrite`` removes exactly these, nothing else.
RUN_OUTPUTS = ('config.yaml', 'logs', 'checkpoints', MODEL_NAME, CARD_NAME)


@dataclass(frozen=True)
class EncoderInit:
    """Where the encoder of a fine-tuned model starts: a pretrained encoder or random weights.

    Attributes:
        path: ``encoder.pt`` or a pretraining run folder; None starts from random weights.
        card: The pretrained encoder's card; None for random weights.
        backbone: timm name of the encoder (a pretrained encoder's card names its own).
        backbone_kwargs: Extra ``timm.create_model`` arguments the weights need.
    """

    path: Path | None
    card: ModelCard | None
    backbone: str
    backbone_kwargs: dict[str, Any]

    @property
    def mean(self) -> list[float] | None:
        """The pretraining band means, which fine-tuning must keep; None for random weights."""
        return self.card.mean if self.card is not None else None

    @property
    def std(self) -> list[float] | None:
        """The pretraining band standard deviations; None for random weights."""
        return self.card.std if self.card is not None else None

    def weights(self, in_channels: int, source: str) -> dict[str, Any] | None:
        """The pretrained state dict, after checking it takes the data's bands.

        Args:
            in_channels: Number of bands the data give.
            source: What gives them, for the error message (e.g. ``'the rasters'``).

        Returns:
            The encoder's state dict; None for random weights.

        Raises:
            InputError: An unreadable encoder, or one that takes another number of bands.
        """
        if self.path is None or self.card is None:
            return None
        if self.card.in_chans != in_channels:
            raise InputError(
                self.path,
                f'encoder takes {self.card.in_chans} band(s) ({", ".join(self.card.bands)}) '
                f'but {source} give {in_channels}; select bands with --bands',
            )
        network, _ = load_encoder(self.path, in_chans=in_channels)
        return network.state_dict()

    def provenance(self) -> dict[str, Any]:
        """The ``encoder`` entry of a model card's provenance; empty for random weights."""
        if self.path is None or self.card is None:
            return {}
        weights = self.path / ENCODER_NAME if self.path.is_dir() else self.path
        return {
            'encoder': {
                'path': str(weights.resolve()),
                'sha256': sha256_file(weights),
                'card': self.card.to_dict(),
            }
        }


def encoder_init(encoder: PathLike | None, backbone: str) -> EncoderInit:
    """Read the card of a pretrained ``encoder``; without one, start ``backbone`` at random.

    Its weights are loaded later, by :meth:`EncoderInit.weights`, once the data say how many
    bands they give; the data need the card's normalisation first.

    Raises:
        InputError: The encoder has no readable card.
    """
    if encoder is None:
        return EncoderInit(None, None, backbone, {})
    card = read_card(encoder)
    return EncoderInit(Path(encoder), card, card.backbone, dict(card.backbone_kwargs))


class FineTune[C, D: lightning.LightningDataModule](ABC):
    """What one fine-tuning task adds to :func:`run_finetune`.

    ``C`` is the task's settings dataclass; it must have ``output``, ``encoder``, ``backbone``,
    ``epochs``, ``max_steps``, ``devices``, ``accelerator``, ``precision``,
    ``log_every_n_steps`` and ``seed``. ``D`` is its data module.

    Attributes:
        required: Settings that must be given (each names its ``--option``).
        source: What gives the bands, in errors (e.g. ``'the rasters'``).
    """

    required: tuple[str, ...] = ('output',)
    source: str = 'the data'

    def check(self, config: C) -> None:
        """Fail on a missing or bad setting, before any work; tasks extend it.

        Raises:
            InputError: A setting of :attr:`required` is missing, or (in a task) a bad setting.
        """
        for name in self.required:
            if getattr(config, name) is None:
                raise InputError(f'--{name}', 'is required')

    @abstractmethod
    def datamodule(self, config: C, encoder: EncoderInit) -> D:
        """The data module, normalised with the encoder's statistics when it has them."""

    @abstractmethod
    def in_channels(self, data: D) -> int:
        """Number of bands the data module gives."""

    @abstractmethod
    def validates(self, data: D) -> bool:
        """Whether the data module holds a validation split."""

    @abstractmethod
    def task(
        self, config: C, encoder: EncoderInit, weights: dict[str, Any] | None, data: D
    ) -> BaseTask:
        """The Lightning task to train, its encoder starting from ``weights``."""

    @abstractmethod
    def card(self, config: C, data: D, encoder: EncoderInit) -> ModelCard:
        """The card of the trained model."""


def run_finetune[C, D: lightning.LightningDataModule](
    spec: FineTune[C, D],
    config: C,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> RunResult:
    """Fine-tune the task ``spec`` describes and write the run folder.

    Every DDP rank runs this function; only rank 0 checks and fills the folder and writes the
    card. When the data hold a validation split, the final model is validated once more after
    training: epoch-end validation misses the steps after the last full epoch (always, with
    ``--max-steps``).

    Args:
        spec: The task.
        config: Its resolved settings.
        resume: Continue from ``RUN_DIR/checkpoints/last.ckpt``: same step, optimiser,
            scheduler and random streams; the run folder's other outputs are kept until replaced.
        overwrite: Allow an existing non-empty run folder; its previous outputs are removed.
        progress: Show Lightning's progress bar.

    Returns:
        The paths written, the steps taken and the final metrics.

    Raises:
        InputError: A missing or bad setting, unusable data, encoder bands that differ from
            the data's, a missing or unreadable checkpoint to resume from, or an existing run
            folder without ``resume``/``overwrite``.
    """
    settings: Any = config
    spec.check(config)
    check_positive(settings.num_nodes, '--num-nodes')
    checkpoint_interval(settings.checkpoint_every)
    run_dir = Path(settings.output)
    resume_from = resume_checkpoint(run_dir, resume)
    # Other DDP ranks start once rank 0 has filled the folder.
    first_rank = getattr(rank_zero_only, 'rank', 0) == 0
    if first_rank:
        check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    encoder = encoder_init(settings.encoder, settings.backbone)
    data = spec.datamodule(config, encoder)
    weights = encoder.weights(spec.in_channels(data), spec.source)
    if first_rank:
        # Only now that the data are known to be usable are earlier outputs removed.
        folders.prepare_run_dir(run_dir, RUN_OUTPUTS, overwrite=overwrite, resume=resume)
        write_run_config(run_dir, config)
    lightning.seed_everything(settings.seed, workers=True, verbose=False)
    task = spec.task(config, encoder, weights, data)
    validate = spec.validates(data)
    trainer = build_trainer(
        run_dir,
        epochs=settings.epochs,
        max_steps=settings.max_steps,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        accelerator=settings.accelerator,
        precision=settings.precision,
        log_every_n_steps=settings.log_every_n_steps,
        validate=validate,
        checkpoint_dir=run_dir / 'checkpoints',
        checkpoint_every=settings.checkpoint_every,
        progress=progress,
    )
    if not validate:
        # TorchGeo's ReduceLROnPlateau watches `val_loss`, which is never logged without a
        # validation split; watch the training loss instead.
        task.monitor = 'train_loss'
    fit(trainer, task, datamodule=data, ckpt_path=resume_from)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    if validate:
        trainer.validate(task, datamodule=data, verbose=False)
        # The training losses stay; the validation metrics are the final model's.
        metrics |= {key: float(value) for key, value in trainer.callback_metrics.items()}
    return _export(trainer, run_dir, spec.card(config, data, encoder), metrics)


def _export(
    trainer: lightning.Trainer, run_dir: Path, card: ModelCard, metrics: dict[str, float]
) -> RunResult:
    """Write ``model.ckpt`` (weights and hyperparameters only) and the card, atomically.

    The checkpoint goes through the trainer, so that under DDP only rank 0 writes it.
    """
    model = run_dir / MODEL_NAME
    trainer.save_checkpoint(model, weights_only=True)
    card_file = run_dir / CARD_NAME
    if trainer.is_global_zero:
        write_card(card_file, card, overwrite=True)
    return RunResult(run_dir, card_file, trainer.global_step, metrics, model=model)
