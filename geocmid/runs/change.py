"""Change-detection fine-tuning: what change adds to the shared runner.

The run folder, trainer, final validation and export are :mod:`geocmid.runs.finetune`'s; this
module supplies the settings (:class:`ChangeConfig`), the data module of labelled pairs
(:class:`~geocmid.datamodules.change.ChangeDataModule`), the siamese task
(:class:`~geocmid.tasks.finetune.change.Change`) and the card of a change model.
:func:`geocmid.runs.artefacts.load_change_model` loads the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from geocmid.datamodules.change import ChangeDataModule
from geocmid.datasets.change_patches import PairRegion
from geocmid.datasets.pairs import align_pair
from geocmid.io.cards import CHANGE_CLASSES, ModelCard
from geocmid.runs.config import to_plain
from geocmid.runs.finetune import EncoderInit, FineTune, run_finetune
from geocmid.runs.folders import Precision
from geocmid.runs.result import RunResult
from geocmid.tasks.finetune.change import Change


@dataclass(frozen=True)
class ChangeConfig:
    """Every setting of a change-detection fine-tuning run; each can come from YAML or the CLI.

    Attributes:
        pairs: A CSV with ``before,after,label`` columns, or a folder in the LEVIR-CD
            (``A/``, ``B/``, ``label/``) or SZTAKI AirChange (``*/im1, im2, gt``) layout. Pairs
            without georeferencing (PNG, JPEG) are used pixel for pixel.
        output: The run folder.
        encoder: ``encoder.pt`` (with its ``model_card.json``) or a pretraining run folder,
            shared by both dates; unset trains from a random initialisation of ``backbone``.
        backbone: timm encoder of a random initialisation (an encoder's card names its own).
        decoder: 'fcsiamdiff' or 'fcsiamconc'.
        bands: 1-based bands to read from both images; default all. Their number must match
            the encoder's.
        freeze_encoder: Train the decoder only; the encoder keeps its weights and its BatchNorm
            statistics (see :mod:`geocmid.tasks.finetune.encoder`).
        epochs: Training epochs (20 when neither limit is set).
        max_steps: Optimiser steps; training stops at whichever limit comes first.
        batch_size: Patches per device per step.
        patch_size: Side of the square training patches in pixels; the default tile size.
        samples_per_epoch: Training patches per epoch; default about the number of
            non-overlapping patches in the training pairs.
        val_fraction: Share of the pairs (of the rows, for a single pair) held out (0: none).
        nodata: Overrides or supplies the images' nodata value.
        lr: Learning rate (AdamW).
        loss: 'bce' (ignoring nodata), 'focal', 'dice' or 'jaccard'.
        pos_weight: Weight of change pixels in the 'bce' loss (changes are usually rare).
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

    pairs: Path | None = None
    output: Path | None = None
    encoder: Path | None = None
    backbone: str = 'resnet50'
    decoder: Literal['fcsiamdiff', 'fcsiamconc'] = 'fcsiamdiff'
    bands: list[int] | None = None
    freeze_encoder: bool = False
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 8
    patch_size: int = 256
    samples_per_epoch: int | None = None
    val_fraction: float = 0.2
    nodata: float | None = None
    lr: float = 1e-3
    loss: Literal['bce', 'focal', 'dice', 'jaccard'] = 'bce'
    pos_weight: float | None = None
    devices: int = 1
    num_nodes: int = 1
    checkpoint_every: int | str | None = None
    accelerator: str = 'auto'
    precision: Precision = 'auto'
    workers: int = 0
    seed: int = 0
    log_every_n_steps: int = 10


def train_change(
    config: ChangeConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> RunResult:
    """Fine-tune a siamese change model on labelled pairs and write the run folder.

    The F1 score and IoU of the change class on the held-out pairs are logged per epoch
    (``val_OverallF1Score``, ``val_OverallJaccardIndex``) and returned in the metrics.

    Args:
        config: Resolved settings (e.g. ``geocmid.runs.config.resolve(ChangeConfig, yaml, cli)``).
        resume: Continue from ``RUN_DIR/checkpoints/last.ckpt`` (same step, optimiser and
            scheduler).
        overwrite: Allow an existing non-empty run folder; its previous outputs are removed.
        progress: Show Lightning's progress bar.

    Returns:
        The paths written, the steps taken and the final metrics.

    Raises:
        InputError: Missing settings, a bad pair list or pair (missing file, no overlap, band
            or data-type mismatch, unusable label), encoder bands that differ from the images'
            bands, or an existing run folder without ``overwrite``.
    """
    return run_finetune(ChangeRun(), config, resume=resume, overwrite=overwrite, progress=progress)


class ChangeRun(FineTune[ChangeConfig, ChangeDataModule]):
    """Change's part of a fine-tuning run (see :class:`~geocmid.runs.finetune.FineTune`)."""

    required = ('pairs', 'output')
    source = 'the pairs'

    def datamodule(self, config: ChangeConfig, encoder: EncoderInit) -> ChangeDataModule:
        """Patches of the labelled pairs, split by pair (by rows, for a single pair)."""
        assert config.pairs is not None  # required (checked before the run starts)
        return ChangeDataModule(
            config.pairs,
            bands=config.bands,
            mean=encoder.mean,
            std=encoder.std,
            patch_size=config.patch_size,
            batch_size=config.batch_size,
            length=config.samples_per_epoch,
            num_workers=config.workers,
            val_fraction=config.val_fraction,
            nodata=config.nodata,
            seed=config.seed,
        )

    def in_channels(self, data: ChangeDataModule) -> int:
        """Bands per image."""
        return data.in_channels

    def validates(self, data: ChangeDataModule) -> bool:
        """Whether pairs (or rows) are held out."""
        return bool(data.val_regions)

    def task(
        self,
        config: ChangeConfig,
        encoder: EncoderInit,
        weights: dict[str, Any] | None,
        data: ChangeDataModule,
    ) -> Change:
        """The siamese change task."""
        return Change(
            model=config.decoder,
            backbone=encoder.backbone,
            backbone_kwargs=encoder.backbone_kwargs,
            weights=weights,
            in_channels=data.in_channels,
            loss=config.loss,
            pos_weight=config.pos_weight,
            lr=config.lr,
            freeze_backbone=config.freeze_encoder,
        )

    def card(self, config: ChangeConfig, data: ChangeDataModule, encoder: EncoderInit) -> ModelCard:
        """The card: bands, normalisation, classes, tile, provenance."""
        return _change_card(config, data, encoder)


def _change_card(config: ChangeConfig, data: ChangeDataModule, encoder: EncoderInit) -> ModelCard:
    """The card of a trained change model: bands, normalisation, classes, tile, provenance."""
    first = data.regions[0].record
    with align_pair(first.before, first.after, allow_ungeoreferenced=True) as pair:
        resolution = pair.ground_resolution
    if encoder.card is not None:
        bands = list(encoder.card.bands)
    else:  # placeholder names that say which source band each channel is
        bands = [f'band_{index}' for index in data.band_indexes]
    return ModelCard(
        method='supervised',
        backbone=encoder.backbone,
        backbone_kwargs=dict(encoder.backbone_kwargs),
        bands=bands,
        band_indices=list(data.band_indexes),
        mean=data.mean.tolist(),
        std=data.std.tolist(),
        patch_size=config.patch_size,
        resolution=resolution,
        data={
            'pairs': [_summary(region) for region in data.regions],
            'split': {
                'train': [_summary(region) for region in data.train_regions],
                'val': [_summary(region) for region in data.val_regions],
                'val_fraction': data.val_fraction,
                'seed': data.seed,
            },
        },
        config=to_plain(config),
        task='change',
        classes=list(CHANGE_CLASSES),
        tile_size=config.patch_size,
        provenance={'decoder': config.decoder, **encoder.provenance()},
    )


def _summary(region: PairRegion) -> dict[str, Any]:
    """A pair (or the rows of it) in a card: its name, files and rows."""
    record = region.record
    return {
        'name': record.name,
        'before': str(record.before),
        'after': str(record.after),
        'label': str(record.label),
        'rows': list(region.rows),
    }
