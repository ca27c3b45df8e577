"""Supervised fine-tuning runs: settings, run folder, Lightning trainer, exported model and card.

A run folder holds everything one fine-tuning run produces::

    RUN_DIR/config.yaml          the resolved settings (defaults < YAML < command line)
    RUN_DIR/logs/version_N/      CSV logs: losses, mIoU and per-class IoU per epoch
    RUN_DIR/model.ckpt           the trained model (Lightning checkpoint, weights only)
    RUN_DIR/model_card.json      bands, normalisation, classes and colours, tile size,
                                 resolution, encoder provenance

The run folder machinery (:mod:`geocmid.runs.folders`, and here :func:`encoder_init`,
:func:`start_run`, :func:`fit`, :func:`export_run`, :func:`load_trained`) is shared by every
fine-tuning task; :func:`train_segmentation` and :func:`load_segmentation_model` are what
segmentation adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torchgeo.tasks import BaseTask

from geocmid.datamodules.segmentation import SegmentationDataModule
from geocmid.errors import InputError
from geocmid.io.cards import ClassInfo, ModelCard, read_card, write_card
from geocmid.io.cog import default_classes
from geocmid.models.weights import ENCODER_NAME, load_encoder, sha256_file
from geocmid.runs import folders as runs
from geocmid.runs.config import to_plain
from geocmid.runs.folders import (
    Precision,
    build_trainer,
    check_run_dir,
    metres_per_pixel,
    write_run_config,
)
from geocmid.tasks.finetune.segmentation import Segmentation
from geocmid.types import PathLike

#: Name of the trained model inside a run folder.
MODEL_NAME = 'model.ckpt'

#: What a run writes into its folder; ``--overwrite`` removes exactly these, nothing else.
RUN_OUTPUTS = ('config.yaml', 'logs', MODEL_NAME, 'model_card.json')


@dataclass(frozen=True)
class SegmentConfig:
    """Every setting of a segmentation fine-tuning run; each can come from YAML or the CLI.

    Attributes:
        rasters: A raster or a folder of rasters.
        labels: Vector labels (GeoPackage, GeoJSON, Shapefile...) or label raster(s).
        output: The run folder.
        encoder: ``encoder.pt`` (with its ``model_card.json``) or a pretraining run folder;
            unset trains from a random initialisation of ``backbone``.
        backbone: timm encoder of a random initialisation (an encoder's card names its own).
        decoder: 'unet', 'fpn' or 'upernet'.
        classes: Class names in id order, each optionally ``name:#rrggbb``; default from the
            labels (``background, foreground`` for vectors without ``label_field``).
        label_field: Class attribute of vector labels.
        bands: Bands to read (1-based indices or names); default all. Their number must
            match the encoder's.
        freeze_encoder: Train the decoder only.
        epochs: Training epochs (20 when neither limit is set).
        max_steps: Optimiser steps; training stops at whichever limit comes first.
        batch_size: Patches per device per step.
        patch_size: Side of the square training patches in pixels; the default tile size.
        samples_per_epoch: Training patches per epoch; default about the number of
            non-overlapping patches in the training area.
        val_fraction: Share of the spatial blocks held out for validation (0: none).
        block_size: Side of the spatial split blocks in pixels; default 4 patches.
        max_nodata_fraction: Largest share of nodata pixels in a training patch.
        lr: Learning rate (AdamW).
        loss: 'ce', 'focal', 'dice' or 'jaccard'.
        devices: Number of devices; more than one trains with DDP.
        accelerator: Lightning accelerator ('auto', 'cpu', 'gpu', ...).
        precision: Numeric precision passed to Lightning.
        workers: Data-loading worker processes per device.
        seed: Random seed of the split, the patches and the initialisation.
        log_every_n_steps: How often the training loss is written to the CSV log.
    """

    rasters: Path | None = None
    labels: Path | None = None
    output: Path | None = None
    encoder: Path | None = None
    backbone: str = 'resnet50'
    decoder: Literal['unet', 'fpn', 'upernet'] = 'unet'
    classes: list[str] | None = None
    label_field: str | None = None
    bands: list[int | str] | None = None
    freeze_encoder: bool = False
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 8
    patch_size: int = 256
    samples_per_epoch: int | None = None
    val_fraction: float = 0.2
    block_size: int | None = None
    max_nodata_fraction: float = 0.5
    lr: float = 1e-3
    loss: Literal['ce', 'focal', 'dice', 'jaccard'] = 'ce'
    devices: int = 1
    accelerator: str = 'auto'
    precision: Precision = 'auto'
    workers: int = 0
    seed: int = 0
    log_every_n_steps: int = 10


@dataclass(frozen=True)
class RunResult:
    """What a fine-tuning run wrote.

    Attributes:
        run_dir: The run folder.
        model: The trained model checkpoint.
        model_card: Its model card.
        global_step: Optimiser steps taken.
        metrics: The last logged value of each metric (losses, IoUs).
    """

    run_dir: Path
    model: Path
    model_card: Path
    global_step: int
    metrics: dict[str, float]


def train_segmentation(
    config: SegmentConfig, *, overwrite: bool = False, progress: bool = True
) -> RunResult:
    """Fine-tune a segmentation model and write the run folder.

    Args:
        config: Resolved settings (e.g. ``geocmid.runs.config.resolve(SegmentConfig, yaml, cli)``).
        overwrite: Allow an existing non-empty run folder; its previous outputs are removed.
        progress: Show Lightning's progress bar.

    Returns:
        The paths written, the steps taken and the final metrics.

    Raises:
        InputError: Missing settings, rasters without CRS, bad labels, a scene without labels,
            a missing label field, encoder bands that differ from the raster bands, or an
            existing run folder without ``overwrite``.
    """
    for name in ('rasters', 'labels', 'output'):
        if getattr(config, name) is None:
            raise InputError(f'--{name}', 'is required')
    if config.decoder == 'upernet' and config.batch_size < 2:
        # UPerNet's pyramid pooling normalises 1 x 1 maps over the batch.
        raise InputError('--batch-size', 'the upernet decoder trains with batches of 2 or more')
    run_dir = Path(config.output)  # type: ignore[arg-type]
    if rank_zero_only.rank == 0:  # other DDP ranks start after rank 0 has filled the folder
        check_run_dir(run_dir, overwrite=overwrite)
    classes = parse_classes(config.classes) if config.classes is not None else None

    encoder = encoder_init(config.encoder, config.backbone)
    data = SegmentationDataModule(
        config.rasters,  # type: ignore[arg-type]
        config.labels,  # type: ignore[arg-type]
        label_field=config.label_field,
        class_names=[name for name, _ in classes] if classes is not None else None,
        bands=config.bands,
        mean=encoder.mean,
        std=encoder.std,
        patch_size=config.patch_size,
        batch_size=config.batch_size,
        length=config.samples_per_epoch,
        num_workers=config.workers,
        val_fraction=config.val_fraction,
        block_size=config.block_size,
        max_nodata_fraction=config.max_nodata_fraction,
        seed=config.seed,
    )
    weights = encoder.weights(data.in_channels, 'the rasters')
    start_run(run_dir, config, overwrite=overwrite)
    task = Segmentation(
        model=config.decoder,
        backbone=encoder.backbone,
        backbone_kwargs=encoder.backbone_kwargs,
        weights=weights,
        in_channels=data.in_channels,
        num_classes=len(data.class_names),
        labels=list(data.class_names),
        loss=config.loss,
        lr=config.lr,
        freeze_backbone=config.freeze_encoder,
    )
    trainer = fit(run_dir, config, task, data, validate=data.val_roi is not None, progress=progress)
    colors = [color for _, color in classes] if classes is not None else None
    card = _segmentation_card(config, data, encoder, colors)
    return export_run(trainer, run_dir, card)


def load_segmentation_model(run_dir: PathLike) -> tuple[nn.Module, ModelCard]:
    """The trained network of a segmentation run, ready for whole-scene inference.

    Args:
        run_dir: A run folder written by :func:`train_segmentation`.

    Returns:
        The network in eval mode, mapping normalised ``(B, C, h, w)`` images to logits
        ``(B, K, h, w)`` (normalise with the card's ``mean`` and ``std``), and the card.

    Raises:
        InputError: No card or checkpoint, a card of another task, or an unreadable checkpoint.
    """
    task, card = load_trained(run_dir, Segmentation, 'segmentation')
    return task.model.eval(), card


def parse_classes(specs: list[str]) -> list[tuple[str, tuple[int, int, int] | None]]:
    """Split ``name`` / ``name:#rrggbb`` entries into names and optional RGB colours.

    Args:
        specs: One entry per class, in id order, e.g. ``['background', 'building:#ff0000']``.

    Returns:
        ``(name, colour or None)`` per class.

    Raises:
        InputError: An empty or duplicate name, fewer than two classes, or a bad colour.
    """
    parsed: list[tuple[str, tuple[int, int, int] | None]] = []
    for spec in specs:
        name, _, color = spec.strip().partition(':')
        name, color = name.strip(), color.strip()
        if not name:
            raise InputError('--classes', f'empty class name in {spec!r}')
        rgb = None
        if color:
            digits = color.removeprefix('#')
            if len(digits) != 6 or any(c not in '0123456789abcdefABCDEF' for c in digits):
                raise InputError('--classes', f'colour of {name!r} must be #rrggbb, not {color!r}')
            rgb = (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))
        parsed.append((name, rgb))
    names = [name for name, _ in parsed]
    if len(names) < 2:
        raise InputError('--classes', f'at least 2 classes are needed, got {len(names)}')
    if len(set(names)) != len(names):
        raise InputError('--classes', f'duplicate class names in {", ".join(names)}')
    return parsed


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create a fine-tuning run folder; with ``overwrite``, remove its :data:`RUN_OUTPUTS` first.

    Raises:
        InputError: See :func:`geocmid.runs.folders.check_run_dir`, or the folder cannot be created.
    """
    runs.prepare_run_dir(run_dir, RUN_OUTPUTS, overwrite=overwrite)


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


def start_run(run_dir: Path, config: Any, *, overwrite: bool) -> None:
    """Fill the run folder on rank 0 (see :func:`prepare_run_dir`), then seed every rank.

    Args:
        run_dir: The run folder.
        config: The run's resolved settings (a config dataclass with a ``seed``), written to
            ``config.yaml``.
        overwrite: Remove a previous run's outputs first.
    """
    if rank_zero_only.rank == 0:  # other DDP ranks start after rank 0 has filled the folder
        prepare_run_dir(run_dir, overwrite)
        write_run_config(run_dir, config)
    lightning.seed_everything(config.seed, workers=True, verbose=False)


def fit(
    run_dir: Path,
    config: Any,
    task: lightning.LightningModule,
    data: lightning.LightningDataModule,
    *,
    validate: bool,
    progress: bool,
) -> lightning.Trainer:
    """Train ``task`` with the run's trainer; with ``validate``, validate the final model once more.

    Epoch-end validation misses the steps after the last full epoch (always, with
    ``--max-steps``), so the exported model itself is validated at the end.

    Args:
        run_dir: The run folder, which receives the CSV logs.
        config: The run's settings: a config dataclass with ``epochs``, ``max_steps``,
            ``devices``, ``accelerator``, ``precision`` and ``log_every_n_steps``.
        task: The Lightning task to train.
        data: Its data module.
        validate: Whether the data module holds a validation split.
        progress: Show Lightning's progress bar.

    Returns:
        The trainer, to export the trained model with.
    """
    trainer = build_trainer(
        run_dir,
        epochs=config.epochs,
        max_steps=config.max_steps,
        devices=config.devices,
        accelerator=config.accelerator,
        precision=config.precision,
        log_every_n_steps=config.log_every_n_steps,
        validate=validate,
        progress=progress,
    )
    if not validate:
        # TorchGeo's ReduceLROnPlateau watches `val_loss`, which is never logged without a
        # validation split; watch the training loss instead.
        task.monitor = 'train_loss'
    trainer.fit(task, datamodule=data)
    if validate:
        trainer.validate(task, datamodule=data, verbose=False)
    return trainer


def export_run(trainer: lightning.Trainer, run_dir: Path, card: ModelCard) -> RunResult:
    """Write ``model.ckpt`` (weights and hyperparameters only) and ``model_card.json``.

    Both are written atomically; the checkpoint through the trainer so that, under DDP, only
    rank 0 writes it.
    """
    model = run_dir / MODEL_NAME
    trainer.save_checkpoint(model, weights_only=True)
    card_file = run_dir / 'model_card.json'
    if trainer.is_global_zero:
        write_card(card_file, card, overwrite=True)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    return RunResult(run_dir, model, card_file, trainer.global_step, metrics)


def load_trained[T: BaseTask](
    run_dir: PathLike, task_class: type[T], task: str, hint: str = ''
) -> tuple[T, ModelCard]:
    """The trained task of a fine-tuning run folder and its card.

    Args:
        run_dir: A run folder written by a fine-tuning run.
        task_class: The Lightning task the run trained.
        task: The card's ``task`` that run folder must have.
        hint: Added to the error of a card of another task.

    Raises:
        InputError: No card or checkpoint, a card of another task, or an unreadable checkpoint.
    """
    card = read_card(run_dir)
    if card.task != task:
        raise InputError(run_dir, f'not a {task} model (task: {card.task}){hint}')
    checkpoint = Path(run_dir) / MODEL_NAME
    if not checkpoint.is_file():
        raise InputError(run_dir, f'no {MODEL_NAME} in this folder')
    try:
        trained = task_class.load_from_checkpoint(checkpoint, map_location='cpu')
    except (KeyError, RuntimeError, EOFError, ValueError, TypeError) as exc:
        raise InputError(checkpoint, f'cannot load {task} model ({exc})') from None
    return trained, card


def _segmentation_card(
    config: SegmentConfig,
    data: SegmentationDataModule,
    encoder: EncoderInit,
    colors: list[tuple[int, int, int] | None] | None,
) -> ModelCard:
    """The card of a trained segmentation model (see the module docstring)."""
    palette = default_classes(len(data.class_names))
    classes = [
        ClassInfo(name, (colors[i] if colors and colors[i] else None) or palette[i].color)
        for i, name in enumerate(data.class_names)
    ]
    images = data.images
    return ModelCard(
        method='supervised',
        backbone=encoder.backbone,
        backbone_kwargs=dict(encoder.backbone_kwargs),
        bands=list(images.band_names),
        band_indices=list(images.band_indexes),
        mean=data.mean.tolist(),
        std=data.std.tolist(),
        patch_size=config.patch_size,
        resolution=metres_per_pixel(images.crs, images.res[0]),
        data={
            'rasters': images.files,
            'labels': str(Path(config.labels).resolve()),  # type: ignore[arg-type]
            'label_field': config.label_field,
            'crs': images.crs.to_string(),
            'split': {
                'block_size': data.block_size,
                'val_fraction': data.val_fraction,
                'seed': data.seed,
            },
        },
        config=to_plain(config),
        task='segmentation',
        classes=classes,
        tile_size=config.patch_size,
        provenance={'decoder': config.decoder, **encoder.provenance()},
    )
