"""Segmentation fine-tuning: what segmentation adds to the shared runner.

The run folder, trainer, final validation and export are :mod:`geocmid.runs.finetune`'s; this
module supplies the settings (:class:`SegmentConfig`), the data module of rasters and labels
(:class:`~geocmid.datamodules.segmentation.SegmentationDataModule`), the task
(:class:`~geocmid.tasks.finetune.segmentation.Segmentation`) and the card (classes and colours,
tile size, resolution). :func:`geocmid.runs.artefacts.load_segmentation_model` loads the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from geocmid.datamodules.segmentation import SegmentationDataModule
from geocmid.errors import InputError
from geocmid.io.cards import ClassInfo, ModelCard
from geocmid.io.cog import default_classes
from geocmid.runs.config import to_plain
from geocmid.runs.finetune import EncoderInit, FineTune, run_finetune
from geocmid.runs.folders import Precision
from geocmid.runs.result import RunResult
from geocmid.tasks.finetune.segmentation import Segmentation


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
        freeze_encoder: Train the decoder only; the encoder keeps its weights and its BatchNorm
            statistics (see :mod:`geocmid.tasks.finetune.encoder`).
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
        devices: Number of devices per node; more than one in all trains with DDP.
        num_nodes: Number of machines (Lightning finds them through SLURM or torchrun).
        checkpoint_every: How often ``checkpoints/last.ckpt`` is replaced: steps (``500``)
            or a duration (``10min``); by default 10 minutes of training or each epoch.
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
    num_nodes: int = 1
    checkpoint_every: int | str | None = None
    accelerator: str = 'auto'
    precision: Precision = 'auto'
    workers: int = 0
    seed: int = 0
    log_every_n_steps: int = 10


def train_segmentation(
    config: SegmentConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> RunResult:
    """Fine-tune a segmentation model and write the run folder.

    Args:
        config: Resolved settings (e.g. ``geocmid.runs.config.resolve(SegmentConfig, yaml, cli)``).
        resume: Continue from ``RUN_DIR/checkpoints/last.ckpt`` (same step, optimiser and
            scheduler).
        overwrite: Allow an existing non-empty run folder; its previous outputs are removed.
        progress: Show Lightning's progress bar.

    Returns:
        The paths written, the steps taken and the final metrics.

    Raises:
        InputError: Missing settings, rasters without CRS, bad labels, a scene without labels,
            a missing label field, encoder bands that differ from the raster bands, or an
            existing run folder without ``overwrite``.
    """
    return run_finetune(
        SegmentationRun(), config, resume=resume, overwrite=overwrite, progress=progress
    )


class SegmentationRun(FineTune[SegmentConfig, SegmentationDataModule]):
    """Segmentation's part of a fine-tuning run (see :class:`~geocmid.runs.finetune.FineTune`)."""

    required = ('rasters', 'labels', 'output')
    source = 'the rasters'

    def check(self, config: SegmentConfig) -> None:
        """Fail on a decoder that cannot train with the batch size, and on bad classes."""
        super().check(config)
        if config.decoder == 'upernet' and config.batch_size < 2:
            # UPerNet's pyramid pooling normalises 1 x 1 maps over the batch.
            raise InputError('--batch-size', 'the upernet decoder trains with batches of 2 or more')
        if config.classes is not None:
            parse_classes(config.classes)

    def datamodule(self, config: SegmentConfig, encoder: EncoderInit) -> SegmentationDataModule:
        """Patches of the rasters and their rasterised labels, split by spatial blocks."""
        classes = parse_classes(config.classes) if config.classes is not None else None
        assert config.rasters is not None and config.labels is not None  # required settings
        return SegmentationDataModule(
            config.rasters,
            config.labels,
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

    def in_channels(self, data: SegmentationDataModule) -> int:
        """Bands of the rasters."""
        return data.in_channels

    def validates(self, data: SegmentationDataModule) -> bool:
        """Whether spatial blocks are held out."""
        return data.val_roi is not None

    def task(
        self,
        config: SegmentConfig,
        encoder: EncoderInit,
        weights: dict[str, Any] | None,
        data: SegmentationDataModule,
    ) -> Segmentation:
        """The segmentation task with the chosen decoder."""
        return Segmentation(
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

    def card(
        self, config: SegmentConfig, data: SegmentationDataModule, encoder: EncoderInit
    ) -> ModelCard:
        """The card: bands, normalisation, classes and colours, tile size, resolution."""
        classes = parse_classes(config.classes) if config.classes is not None else None
        colors = [color for _, color in classes] if classes is not None else None
        return _segmentation_card(config, data, encoder, colors)


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


def _segmentation_card(
    config: SegmentConfig,
    data: SegmentationDataModule,
    encoder: EncoderInit,
    colors: list[tuple[int, int, int] | None] | None,
) -> ModelCard:
    """The card of a trained segmentation model: bands, normalisation, classes, provenance."""
    palette = default_classes(len(data.class_names))
    classes = [
        ClassInfo(name, (colors[i] if colors and colors[i] else None) or palette[i].color)
        for i, name in enumerate(data.class_names)
    ]
    images = data.images
    assert config.labels is not None  # a required setting
    return ModelCard(
        method='supervised',
        backbone=encoder.backbone,
        backbone_kwargs=dict(encoder.backbone_kwargs),
        bands=list(images.band_names),
        band_indices=list(images.band_indexes),
        mean=data.mean.tolist(),
        std=data.std.tolist(),
        patch_size=config.patch_size,
        resolution=images.ground_resolution,
        data={
            'rasters': images.files,
            'labels': str(Path(config.labels).resolve()),
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
