"""Scene classification: fine-tuning on labelled chip folders, and prediction of chip folders.

A classification run folder has the layout of every fine-tuning run (see
:mod:`geocmid.runs.segmentation`, whose run-folder machinery it shares): ``config.yaml``, ``logs/``
(loss and overall, average and per-class accuracy per epoch), ``model.ckpt`` and
``model_card.json`` (bands, normalisation, patch size, classes, encoder provenance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from torch import nn

from geocmid.datamodules.classification import (
    ChipClassificationDataModule,
    LabelledChips,
    chip_normalisation,
    labelled_chips,
    select_bands,
)
from geocmid.datasets.chips import ChipFolder
from geocmid.errors import InputError
from geocmid.evaluation.evaluate import DEFAULT_SIZE, extract_features
from geocmid.io.atomic import atomic_output, check_writable
from geocmid.io.cards import ClassInfo, ModelCard, default_band_names
from geocmid.io.cog import default_classes
from geocmid.runs.config import to_plain
from geocmid.runs.folders import Precision, build_trainer, check_run_dir
from geocmid.runs.segmentation import (
    EncoderInit,
    RunResult,
    encoder_init,
    export_run,
    load_trained,
    start_run,
)
from geocmid.tasks.finetune.classification import SceneClassification
from geocmid.types import PathLike


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
        freeze_encoder: Train the classifier only.
        epochs: Training epochs (20 when neither ``epochs`` nor ``max_steps`` is set).
        max_steps: Optimiser steps; training stops at whichever limit comes first.
        batch_size: Chips per step.
        lr: Learning rate (AdamW).
        loss: 'ce' or 'focal'.
        accelerator: Lightning accelerator ('auto', 'cpu', 'gpu', ...).
        precision: Numeric precision passed to Lightning.
        workers: Data-loading worker processes.
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
    accelerator: str = 'auto'
    precision: Precision = 'auto'
    workers: int = 0
    seed: int = 0
    log_every_n_steps: int = 10


def train_classification(
    config: ClassifyConfig, *, overwrite: bool = False, progress: bool = True
) -> RunResult:
    """Fine-tune a scene classifier on labelled chips and write the run folder.

    Args:
        config: Resolved settings (e.g. ``geocmid.runs.config.resolve(ClassifyConfig, yaml, cli)``).
        overwrite: Allow an existing non-empty run folder; its previous outputs are removed.
        progress: Show Lightning's progress bar.

    Returns:
        The paths written, the steps taken and the final metrics (``val_OverallAccuracy``
        is the top-1 accuracy on the held-out chips).

    Raises:
        InputError: Missing settings, an unusable encoder, a folder with one class, images
            of mixed band counts, bands that do not match the encoder, or an existing run
            folder without ``overwrite``.
    """
    if config.output is None:
        raise InputError('--output', 'is required')
    run_dir = Path(config.output)
    check_run_dir(run_dir, overwrite=overwrite)
    encoder = encoder_init(config.encoder, config.backbone)
    size = config.patch_size or (encoder.card and encoder.card.patch_size) or DEFAULT_SIZE
    chips = labelled_chips(
        config.images,
        train=config.train,
        test=config.test,
        split=config.split,
        seed=config.seed,
        size=size,
        bands=config.bands,
    )
    weights = encoder.weights(chips.in_channels, 'the images')
    mean, std, _ = chip_normalisation(chips, encoder.mean, encoder.std, config.seed)
    data = ChipClassificationDataModule(
        chips, mean, std, batch_size=config.batch_size, num_workers=config.workers
    )
    start_run(run_dir, config, overwrite=overwrite)
    task = SceneClassification(
        model=encoder.backbone,
        backbone_kwargs=encoder.backbone_kwargs,
        weights=weights,
        in_channels=chips.in_channels,
        num_classes=len(chips.classes),
        labels=list(chips.classes),
        loss=config.loss,
        lr=config.lr,
        freeze_backbone=config.freeze_encoder,
    )
    trainer = build_trainer(
        run_dir,
        epochs=config.epochs,
        max_steps=config.max_steps,
        accelerator=config.accelerator,
        precision=config.precision,
        log_every_n_steps=config.log_every_n_steps,
        progress=progress,
    )
    trainer.fit(task, datamodule=data)
    card = _classification_card(config, chips, encoder, mean, std, size)
    return export_run(trainer, run_dir, card)


def _classification_card(
    config: ClassifyConfig,
    chips: LabelledChips,
    encoder: EncoderInit,
    mean: list[float],
    std: list[float],
    size: int,
) -> ModelCard:
    """The card of a trained classifier: its chip bands, normalisation, size and classes."""
    palette = default_classes(len(chips.classes))
    return ModelCard(
        method='supervised',
        backbone=encoder.backbone,
        backbone_kwargs=dict(encoder.backbone_kwargs),
        bands=list(encoder.card.bands) if encoder.card else default_band_names(chips.in_channels),
        band_indices=list(chips.bands),
        mean=mean,
        std=std,
        patch_size=size,
        data={**chips.source, 'train_chips': len(chips.train), 'val_chips': len(chips.test)},
        config=to_plain(config),
        task='classification',
        classes=[ClassInfo(name, palette[i].color) for i, name in enumerate(chips.classes)],
        provenance=encoder.provenance(),
    )


def load_classifier(run_dir: PathLike) -> tuple[nn.Module, ModelCard]:
    """The trained network of a classification run.

    Args:
        run_dir: A run folder written by :func:`train_classification`.

    Returns:
        The network in eval mode, mapping normalised ``(B, C, h, w)`` chips (the card's
        ``band_indices``, ``mean`` and ``std``, resized to ``patch_size``) to logits ``(B, K)``,
        and the card.

    Raises:
        InputError: No card or checkpoint, a card of another task, or an unreadable checkpoint.
    """
    task, card = load_trained(run_dir, SceneClassification, 'classification')
    return task.model.eval(), card


def classify_folder(
    model_dir: PathLike,
    images: PathLike,
    output: PathLike | None = None,
    *,
    batch_size: int = 32,
    workers: int = 0,
    device: torch.device | str = 'auto',
    overwrite: bool = False,
) -> pd.DataFrame:
    """Predict the class of every chip in a folder (searched recursively).

    Args:
        model_dir: A classification run folder.
        images: The chips; they need the bands the card's ``band_indices`` name.
        output: CSV file to write; None only returns the table.
        batch_size: Chips per forward pass.
        workers: Data-loading worker processes.
        device: Where the model runs; ``'auto'`` picks CUDA when available.
        overwrite: Replace an existing ``output``.

    Returns:
        One row per chip, in sorted path order: ``path`` (relative to ``images``), ``class``
        (the predicted name), ``probability`` (its softmax probability), then the probability
        of every class in columns named ``p_<class>``.

    Raises:
        InputError: A bad run folder, an unreadable chip, mixed band counts, chips lacking
            the model's bands, or an existing ``output`` without ``overwrite``.
    """
    if output is not None:
        check_writable(output, overwrite)
    model, card = load_classifier(model_dir)
    assert card.classes is not None and card.mean is not None and card.std is not None
    chips = ChipFolder(images, size=card.patch_size)
    select_bands(chips, card.band_indices)
    # The classifier's outputs are its logits; extract_features runs any model on normalised chips.
    logits = extract_features(
        model, chips, card.mean, card.std, batch_size=batch_size, workers=workers, device=device
    )
    probabilities = logits.double().softmax(dim=1)
    best, index = probabilities.max(dim=1)
    names = [c.name for c in card.classes]
    table = pd.DataFrame(
        {
            'path': [path.relative_to(chips.root).as_posix() for path in chips.files],
            'class': [names[i] for i in index.tolist()],
            'probability': best.tolist(),
            **{f'p_{name}': probabilities[:, i].tolist() for i, name in enumerate(names)},
        }
    )
    if output is not None:
        with atomic_output(output, overwrite=overwrite) as tmp:
            table.to_csv(tmp, index=False, float_format='%.6f')
    return table
