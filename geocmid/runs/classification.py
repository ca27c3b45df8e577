"""Scene-classification fine-tuning: what classification adds to the shared runner.

The run folder, trainer, final validation and export are :mod:`geocmid.runs.finetune`'s; this
module supplies the settings (:class:`ClassifyConfig`), the data module of labelled chip folders
(:class:`~geocmid.datamodules.classification.ChipClassificationDataModule`), the task
(:class:`~geocmid.tasks.finetune.classification.SceneClassification`) and the card (chip bands,
normalisation, patch size, classes). Run folders are predicted with
:func:`geocmid.inference.products.classify.classify_folder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from geocmid.datamodules.classification import (
    ChipClassificationDataModule,
    chip_normalisation,
    labelled_chips,
)
from geocmid.datasets.chips import DEFAULT_SIZE
from geocmid.io.cards import ClassInfo, ModelCard, default_band_names
from geocmid.io.cog import default_classes
from geocmid.runs.config import to_plain
from geocmid.runs.finetune import EncoderInit, FineTune, run_finetune
from geocmid.runs.folders import Precision
from geocmid.runs.result import RunResult
from geocmid.tasks.finetune.classification import SceneClassification


@dataclass(frozen=True)
class ClassifyConfig:
    """Every setting of a classification fine-tuning run; each can come from YAML or the CLI.

    Attributes:
        images: A labelled chip folder (one sub-folder per class), split with ``split``.
        train: A labelled training folder, instead of ``images``.
        test: The labelled validation folder that goes with ``train``.
        output: The run folder.
        encoder: ``encoder.pt`` (with its ``model_card.json``) or a pretraining run folder;
            unset trains from a random initialisation of ``backbone``.
        backbone: timm encoder of a random initialisation (an encoder's card names its own).
        bands: 1-based bands of the chips, in the encoder's channel order; default all.
        split: Share of each class used for training when ``images`` is split.
        patch_size: Side the chips are resized to; default the encoder card's patch size,
            else 224.
        freeze_encoder: Train the classifier only; the encoder keeps its weights and its
            BatchNorm statistics (see :mod:`geocmid.tasks.finetune.encoder`).
        epochs: Training epochs (20 when neither ``epochs`` nor ``max_steps`` is set).
        max_steps: Optimiser steps; training stops at whichever limit comes first.
        batch_size: Chips per device per step.
        lr: Learning rate (AdamW).
        loss: 'ce' or 'focal'.
        devices: Number of devices per node; more than one in all trains with DDP.
        num_nodes: Number of machines (Lightning finds them through SLURM or torchrun).
        checkpoint_every: How often ``checkpoints/last.ckpt`` is replaced: steps (``500``)
            or a duration (``10min``); by default 10 minutes of training or each epoch.
        accelerator: Lightning accelerator ('auto', 'cpu', 'gpu', ...).
        precision: Numeric precision passed to Lightning.
        workers: Data-loading worker processes per device.
        seed: Random seed of the split, the initialisation and the augmentation.
        log_every_n_steps: How often the training loss is written to the CSV log.
    """

    images: Path | None = None
    train: Path | None = None
    test: Path | None = None
    output: Path | None = None
    encoder: Path | None = None
    backbone: str = 'resnet50'
    bands: list[int] | None = None
    split: float = 0.8
    patch_size: int | None = None
    freeze_encoder: bool = False
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    loss: Literal['ce', 'focal'] = 'ce'
    devices: int = 1
    num_nodes: int = 1
    checkpoint_every: int | str | None = None
    accelerator: str = 'auto'
    precision: Precision = 'auto'
    workers: int = 0
    seed: int = 0
    log_every_n_steps: int = 10


def train_classification(
    config: ClassifyConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> RunResult:
    """Fine-tune a scene classifier on labelled chips and write the run folder.

    Args:
        config: Resolved settings (e.g. ``geocmid.runs.config.resolve(ClassifyConfig, yaml, cli)``).
        resume: Continue from ``RUN_DIR/checkpoints/last.ckpt`` (same step, optimiser and
            scheduler).
        overwrite: Allow an existing non-empty run folder; its previous outputs are removed.
        progress: Show Lightning's progress bar.

    Returns:
        The paths written, the steps taken and the final metrics (``val_OverallAccuracy``
        is the top-1 accuracy of the final model on the held-out chips).

    Raises:
        InputError: Missing settings, an unusable encoder, a folder with one class, images
            of mixed band counts, bands that do not match the encoder, or an existing run
            folder without ``overwrite``.
    """
    return run_finetune(
        ClassificationRun(), config, resume=resume, overwrite=overwrite, progress=progress
    )


class ClassificationRun(FineTune[ClassifyConfig, ChipClassificationDataModule]):
    """Classification's part of a fine-tuning run (see :class:`~geocmid.runs.finetune.FineTune`)."""

    source = 'the images'

    def datamodule(
        self, config: ClassifyConfig, encoder: EncoderInit
    ) -> ChipClassificationDataModule:
        """The labelled chips, resized; normalised as the encoder was (else by the chips)."""
        chips = labelled_chips(
            config.images,
            train=config.train,
            test=config.test,
            split=config.split,
            seed=config.seed,
            size=_size(config, encoder),
            bands=config.bands,
        )
        mean, std, _ = chip_normalisation(chips, encoder.mean, encoder.std, config.seed)
        return ChipClassificationDataModule(
            chips, mean, std, batch_size=config.batch_size, num_workers=config.workers
        )

    def in_channels(self, data: ChipClassificationDataModule) -> int:
        """Bands of the chips."""
        return data.chips.in_channels

    def validates(self, data: ChipClassificationDataModule) -> bool:
        """Whether there are held-out chips."""
        return len(data.chips.test_labels) > 0

    def task(
        self,
        config: ClassifyConfig,
        encoder: EncoderInit,
        weights: dict[str, Any] | None,
        data: ChipClassificationDataModule,
    ) -> SceneClassification:
        """The classification task: the encoder and a new linear classifier."""
        return SceneClassification(
            model=encoder.backbone,
            backbone_kwargs=encoder.backbone_kwargs,
            weights=weights,
            in_channels=data.chips.in_channels,
            num_classes=len(data.chips.classes),
            labels=list(data.chips.classes),
            loss=config.loss,
            lr=config.lr,
            freeze_backbone=config.freeze_encoder,
        )

    def card(
        self, config: ClassifyConfig, data: ChipClassificationDataModule, encoder: EncoderInit
    ) -> ModelCard:
        """The card of a trained classifier: its chip bands, normalisation, size and classes."""
        chips = data.chips
        palette = default_classes(len(chips.classes))
        return ModelCard(
            method='supervised',
            backbone=encoder.backbone,
            backbone_kwargs=dict(encoder.backbone_kwargs),
            bands=(
                list(encoder.card.bands) if encoder.card else default_band_names(chips.in_channels)
            ),
            band_indices=list(chips.bands),
            mean=data.mean.tolist(),
            std=data.std.tolist(),
            patch_size=_size(config, encoder),
            data={
                **chips.source,
                'train_chips': len(chips.train_labels),
                'val_chips': len(chips.test_labels),
            },
            config=to_plain(config),
            task='classification',
            classes=[ClassInfo(name, palette[i].color) for i, name in enumerate(chips.classes)],
            provenance=encoder.provenance(),
        )


def _size(config: ClassifyConfig, encoder: EncoderInit) -> int:
    """The chip side: the setting, else the encoder card's patch size, else the default."""
    return config.patch_size or (encoder.card and encoder.card.patch_size) or DEFAULT_SIZE
