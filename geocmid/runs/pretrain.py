"""Self-supervised pretraining runs: settings, run folder, Lightning trainer, exported encoder.

A run folder holds everything one pretraining run produces::

    RUN_DIR/config.yaml              the resolved settings (defaults < YAML < command line)
    RUN_DIR/checkpoints/last.ckpt    the full Lightning checkpoint, for ``--resume``
    RUN_DIR/logs/version_N/          CSV logs of every loss term (one version per invocation)
    RUN_DIR/encoder.pt               the student encoder as a plain timm state dict
    RUN_DIR/model_card.json          what the encoder expects: bands, normalisation, patch size...

Methods plug in through :data:`METHODS`: a method names its task class and how the run's settings
and data become that task's keyword arguments; everything else (data, trainer, outputs) is shared.
The run folder and trainer are those of every run (:mod:`geocmid.runs.folders`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
from lightning.pytorch.utilities import rank_zero_only

from geocmid import __version__
from geocmid.datamodules.gersp import GeRSPDataModule
from geocmid.datamodules.pretrain import PretrainDataModule
from geocmid.errors import InputError
from geocmid.io.cards import CARD_NAME, ModelCard, write_card
from geocmid.models.backbones import check_patch_size
from geocmid.models.weights import ENCODER_NAME, read_checkpoint, save_encoder
from geocmid.runs.config import parse_values, resolve, signature_hints, to_plain
from geocmid.runs.folders import (
    LAST_CHECKPOINT,
    Precision,
    build_trainer,
    check_positive,
    check_run_dir,
    checkpoint_interval,
    fit,
    prepare_run_dir,
    resume_checkpoint,
    write_run_config,
)
from geocmid.runs.result import RunResult
from geocmid.samplers.valid_patch import ValidPatchSampler
from geocmid.tasks.ssl.base import PretrainTask
from geocmid.tasks.ssl.cmid import CMID
from geocmid.tasks.ssl.gersp import GeRSP
from geocmid.transforms.streams import SEED_RULE

#: What a run writes into its folder; ``--overwrite`` removes exactly these, nothing else.
RUN_OUTPUTS = ('checkpoints', 'logs', ENCODER_NAME, CARD_NAME, 'config.yaml')


@dataclass(frozen=True)
class PretrainConfig:
    """Every setting of a pretraining run; each can come from YAML or the command line.

    Attributes:
        method: Pretraining method, a key of :data:`METHODS`.
        rasters: Folder (or file) of GeoTIFFs to sample patches from.
        images: Folder of non-georeferenced image chips, instead of ``rasters``.
        natural_images: GeRSP's labelled natural images, one sub-folder per class.
        output: The run folder.
        backbone: timm model name, e.g. ``resnet50`` or ``swin_base_patch4_window7_224``.
        bands: Bands to use, 1-based indices or band names; all bands when unset.
        patch_size: Side of the square patches sampled and of the two crops (pixels).
        batch_size: Patches per device per step.
        epochs: Training epochs (200 when neither ``epochs`` nor ``max_steps`` is set, the
            MillionAID schedule of the CMID paper, ``docs/cmid.md#optimisation``).
        max_steps: Optimiser steps; training stops at whichever limit comes first.
        samples_per_epoch: Patches per epoch over all devices; the data layer's default when unset.
        max_nodata_fraction: Largest share of nodata pixels a raster patch may have.
        nodata: Nodata value overriding (or supplying) the rasters' own.
        devices: Number of devices per node; more than one in all trains with DDP.
        num_nodes: Number of machines (Lightning finds them through SLURM or torchrun).
        accelerator: Lightning accelerator ('auto', 'cpu', 'gpu', ...).
        precision: Numeric precision passed to Lightning.
        sync_batchnorm: Synchronise BatchNorm statistics across devices.
        checkpoint_every: How often ``last.ckpt`` is replaced: steps (``500``) or a duration
            (``10min``); by default every 10 minutes of training or each epoch, whichever first.
        workers: Data-loading worker processes per device.
        seed: Random seed; each rank's augmentation and mask draws use seed + global rank,
            and the patch sampler splits one sequence seeded by it.
        log_every_n_steps: How often losses are written to the CSV log.
        task: Method hyperparameters: keyword arguments of the method's task class.
    """

    method: str = 'cmid'
    rasters: Path | None = None
    images: Path | None = None
    natural_images: Path | None = None
    output: Path | None = None
    backbone: str = 'resnet50'
    bands: list[int | str] | None = None
    patch_size: int = 224
    batch_size: int = 64
    epochs: int | None = None
    max_steps: int | None = None
    samples_per_epoch: int | None = None
    max_nodata_fraction: float = 0.5
    nodata: float | None = None
    devices: int = 1
    num_nodes: int = 1
    accelerator: str = 'auto'
    precision: Precision = 'auto'
    sync_batchnorm: bool = False
    checkpoint_every: int | str | None = None
    workers: int = 4
    seed: int = 322
    log_every_n_steps: int = 10
    task: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A pretraining method: its task class and the task arguments a run derives for it.

    Attributes:
        task_class: The Lightning task, a :class:`~geocmid.tasks.ssl.base.PretrainTask`.
        run_keys: Task arguments the run sets from its settings and data (backbone, bands,
            normalisation...), so the ``task`` section of a config may not contain them.
        run_arguments: Maps the run settings and the data to those arguments.
        data_class: The data module; GeRSP's adds natural images to the patches.
        data_arguments: Maps the run settings to the data module's extra arguments.
    """

    task_class: type[PretrainTask]
    run_keys: tuple[str, ...]
    run_arguments: Callable[[PretrainConfig, PretrainDataModule], dict[str, Any]]
    data_class: type[PretrainDataModule] = PretrainDataModule
    data_arguments: Callable[[PretrainConfig], dict[str, Any]] = lambda config: {}


def _patch_arguments(config: PretrainConfig, data: PretrainDataModule) -> dict[str, Any]:
    """The task arguments every method takes from the run and its patches."""
    return {
        'backbone': config.backbone,
        'in_channels': data.in_channels,
        'patch_size': config.patch_size,
        'band_names': data.band_names,
        'mean': data.mean.tolist(),
        'std': data.std.tolist(),
        'max_value': data.max_value,
        'samples_per_epoch': data.samples_per_epoch,
    }


def _gersp_arguments(config: PretrainConfig, data: PretrainDataModule) -> dict[str, Any]:
    """GeRSP also takes the rasters' full scale and the natural images' classes and statistics."""
    assert isinstance(data, GeRSPDataModule)  # METHODS pairs GeRSP with its data module
    return _patch_arguments(config, data) | {
        'num_classes': data.num_classes,
        'natural_mean': data.natural_mean.tolist(),
        'natural_std': data.natural_std.tolist(),
    }


#: Task arguments :func:`_patch_arguments` sets.
_PATCH_KEYS = (
    'backbone',
    'in_channels',
    'patch_size',
    'band_names',
    'mean',
    'std',
    'max_value',
    'samples_per_epoch',
)

#: Registered methods.
METHODS: dict[str, Method] = {
    'cmid': Method(CMID, _PATCH_KEYS, _patch_arguments),
    'gersp': Method(
        GeRSP,
        (*_PATCH_KEYS, 'num_classes', 'natural_mean', 'natural_std'),
        _gersp_arguments,
        GeRSPDataModule,
        lambda config: {'natural_images': config.natural_images},
    ),
}


def load_pretrain_config(
    config_file: str | os.PathLike[str] | None = None, **overrides: Any
) -> PretrainConfig:
    """Resolve pretraining settings: defaults < YAML file < ``overrides`` (``None`` = not given).

    The ``task`` section is checked against the keyword arguments of the method's task class.

    Raises:
        InputError: For an unknown key, a badly typed value or an unknown method.
    """
    config = resolve(PretrainConfig, config_file, overrides)
    method = _method(config.method, config_file)
    ignored = method.task_class.ignore or ()
    ignored = (ignored,) if isinstance(ignored, str) else tuple(ignored)
    hints = signature_hints(method.task_class.__init__, exclude=method.run_keys + ignored)
    task = parse_values(config.task, hints, config_file or 'command line', section='task')
    # Every setting is checked here, before a run folder or any data is touched.
    method.task_class.validate_settings({'patch_size': config.patch_size, **task})
    return dataclasses.replace(config, task=task)


def run_pretraining(
    config: PretrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> RunResult:
    """Pretrain an encoder and write the run folder.

    Args:
        config: Resolved settings (see :func:`load_pretrain_config`).
        resume: Continue from ``RUN_DIR/checkpoints/last.ckpt`` at its global step.
        overwrite: Allow an existing non-empty run folder to be replaced.
        progress: Show Lightning's progress bar.

    Returns:
        The paths written and the final step and losses.

    Raises:
        InputError: For bad input: missing or unusable data, bands not in the data, a patch size
            the data or backbone cannot take, a missing or unreadable checkpoint to resume from,
            or an existing run folder without ``resume``/``overwrite``.
    """
    if config.output is None:
        raise InputError('--output', 'a run folder is required')
    if (config.rasters is None) == (config.images is None):
        raise InputError('--rasters/--images', 'give exactly one of them')
    check_positive(config.max_steps, '--max-steps')
    check_positive(config.epochs, '--epochs')
    check_positive(config.num_nodes, '--num-nodes')
    check_positive(config.devices, '--devices')
    check_positive(config.batch_size, '--batch-size')
    checkpoint_interval(config.checkpoint_every)
    method = _method(config.method, None)
    data_arguments = method.data_arguments(config)
    if config.natural_images is not None and 'natural_images' not in data_arguments:
        raise InputError('--natural-images', f'only --method gersp uses it, not {config.method}')
    run_dir = Path(config.output)
    checkpoint = run_dir / 'checkpoints' / LAST_CHECKPOINT
    resume_from = resume_checkpoint(run_dir, resume)
    # Other DDP ranks run this function again once rank 0 has filled the folder.
    first_rank = getattr(rank_zero_only, 'rank', 0) == 0
    if first_rank:
        check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    check_patch_size(
        config.backbone, config.patch_size, **(config.task.get('backbone_kwargs') or {})
    )

    data = method.data_class(
        rasters=config.rasters,
        images=config.images,
        bands=config.bands,
        patch_size=config.patch_size,
        batch_size=config.batch_size,
        num_workers=config.workers,
        samples_per_epoch=config.samples_per_epoch,
        max_nodata_fraction=config.max_nodata_fraction,
        nodata=config.nodata,
        seed=config.seed,
        **data_arguments,
    )
    lightning.seed_everything(config.seed, workers=True, verbose=False)
    task = method.task_class(**method.run_arguments(config, data), **config.task)
    if first_rank:
        # Only now that the data and the task are known to be usable are earlier outputs
        # removed (GeRSP checks its RGB bands against the data when the task is built).
        prepare_run_dir(run_dir, RUN_OUTPUTS, overwrite=overwrite, resume=resume)
        write_run_config(run_dir, config)
    trainer = build_trainer(
        run_dir,
        epochs=config.epochs,
        max_steps=config.max_steps,
        # The MillionAID schedule of the CMID paper (docs/cmid.md#optimisation).
        default_epochs=200,
        devices=config.devices,
        num_nodes=config.num_nodes,
        accelerator=config.accelerator,
        precision=config.precision,
        sync_batchnorm=config.sync_batchnorm,
        log_every_n_steps=config.log_every_n_steps,
        validate=False,
        checkpoint_dir=run_dir / 'checkpoints',
        checkpoint_every=config.checkpoint_every,
        progress=progress,
        extra_callbacks=[CardInCheckpoint(_model_card(config, data, task))],
    )
    with warnings.catch_warnings():
        if isinstance(data.sampler, ValidPatchSampler):
            # Lightning warns that a mid-epoch checkpoint restarts the epoch's data; raster
            # patches do not (PretrainDataModule.state_dict continues them).
            warnings.filterwarnings('ignore', "You're resuming from a checkpoint that ended before")
        fit(trainer, task, datamodule=data, ckpt_path=resume_from)

    encoder, card = run_dir / ENCODER_NAME, run_dir / CARD_NAME
    if trainer.is_global_zero:
        _export(task, _model_card(config, data, task), encoder, card)
    metrics = {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith(('train_loss', 'loss_'))
    }
    return RunResult(
        run_dir, card, trainer.global_step, metrics, encoder=encoder, checkpoint=checkpoint
    )


class CardInCheckpoint(lightning.Callback):
    """Stores the model card in every checkpoint, so any checkpoint can be exported."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card

    def on_save_checkpoint(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, checkpoint: dict
    ) -> None:
        """Add the card (as plain JSON values) under :data:`CARD_KEY`."""
        checkpoint[CARD_KEY] = self.card.to_dict()


#: Where checkpoints of a pretraining run hold the model card of the encoder.
CARD_KEY = 'geocmid_model_card'


def export_encoder(run: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``encoder.pt`` and ``model_card.json`` from a pretraining checkpoint.

    Args:
        run: A pretraining run folder (its ``checkpoints/last.ckpt`` is read) or a checkpoint.
        overwrite: Replace an existing encoder and card.

    Returns:
        The encoder and card written, beside the run folder's other outputs (or the checkpoint).

    Raises:
        InputError: No checkpoint, not a pretraining checkpoint, or outputs exist without
            ``overwrite``.
    """
    path = Path(run)
    checkpoint = path / 'checkpoints' / LAST_CHECKPOINT if path.is_dir() else path
    run_dir = path if path.is_dir() else path.parent.parent
    if not checkpoint.is_file():
        raise InputError(checkpoint, 'no checkpoint to export from')
    encoder, card_file = run_dir / ENCODER_NAME, run_dir / CARD_NAME
    if not overwrite:
        for output in (encoder, card_file):
            if output.exists():
                raise InputError(output, 'exists; use --overwrite')
    contents = read_checkpoint(checkpoint)
    if CARD_KEY not in contents:
        raise InputError(checkpoint, 'not a checkpoint of a geocmid pretraining run')
    card = ModelCard.from_dict(contents[CARD_KEY], checkpoint)
    method = _method(card.method, checkpoint)
    task = method.task_class(**contents['hyper_parameters'])
    task.load_state_dict(contents['state_dict'])
    _export(task, card, encoder, card_file)
    return encoder, card_file


def _export(task: PretrainTask, card: ModelCard, encoder: Path, card_file: Path) -> None:
    # The student, not the EMA teacher, is exported: it is the network the losses trained and
    # the one the official extract.py releases.
    save_encoder(encoder, task.encoder_state_dict(), overwrite=True)
    write_card(card_file, card, overwrite=True)


def _method(name: str, source: str | os.PathLike[str] | None) -> Method:
    if name not in METHODS:
        known = ', '.join(sorted(METHODS))
        raise InputError(source or '--method', f"unknown method '{name}' (known: {known})")
    return METHODS[name]


def _model_card(config: PretrainConfig, data: PretrainDataModule, task: PretrainTask) -> ModelCard:
    return ModelCard(
        method=config.method,
        backbone=config.backbone,
        backbone_kwargs=task.encoder_kwargs(),
        bands=data.band_names,
        band_indices=data.band_indices,
        mean=data.mean.tolist(),
        std=data.std.tolist(),
        patch_size=config.patch_size,
        resolution=data.resolution,
        data=data.summary(),
        geocmid_version=__version__,
        # Every rank draws its own crops and masks (geocmid.transforms.streams).
        config=to_plain(config) | {'seed_rule': SEED_RULE},
    )
