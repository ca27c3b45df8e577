"""`geocmid train ...`: supervised fine-tuning (segmentation now; change and classify later)."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    NON_NEGATIVE,
    POSITIVE,
    check_output,
    echo_fine_tuning,
    freeze_encoder_option,
    hardware_options,
    parse_bands,
    resume_option,
    run_folder_options,
    scene_inputs,
    split_list,
    training_options,
)


@click.group()
def train() -> None:
    """Fine-tune a pretrained encoder on labelled rasters."""


@train.command()
@scene_inputs('rasters')
@click.option('--rasters', type=click.Path(path_type=Path), help='A raster or a folder of them.')
@click.option(
    '--labels',
    type=click.Path(path_type=Path),
    help='Vector labels (GeoPackage, GeoJSON, Shapefile) or class-id raster(s).',
)
@click.option('-o', '--output', type=click.Path(path_type=Path), help='Run folder to write.')
@click.option(
    '--encoder',
    type=click.Path(path_type=Path),
    help='encoder.pt (with model_card.json beside it) or a pretraining run folder; '
    'default: random initialisation of --backbone.',
)
@click.option('--backbone', help="timm encoder without --encoder (default 'resnet50').")
@click.option('--decoder', help="Decoder: 'unet' (default), 'fpn' or 'upernet'.")
@click.option(
    '--classes',
    help='Class names in id order, comma-separated, each optionally with a colour: '
    "'background,building:#ff0000'. Default from the labels.",
)
@click.option('--label-field', help='Attribute holding the class of vector labels.')
@click.option('--bands', help="Bands to use: 1-based indices or names ('1,2,3'); default all.")
@freeze_encoder_option('decoder')
@click.option('--epochs', type=POSITIVE, help='Training epochs (default 20 unless --max-steps).')
@click.option(
    '--max-steps', type=POSITIVE, help='Optimiser steps; stops at the first limit that is reached.'
)
@click.option('--batch-size', type=POSITIVE, help='Patches per device per step (default 8).')
@click.option('--patch-size', type=POSITIVE, help='Training patch side in pixels (default 256).')
@click.option('--workers', type=NON_NEGATIVE, help='Data-loading processes per device (default 0).')
@hardware_options
@training_options
@click.option('--seed', type=int, help='Random seed (default 0).')
@click.option(
    '--config',
    'config_file',
    type=click.Path(path_type=Path),
    help='YAML file with any of these settings and more (lr, loss, val_fraction, block_size, '
    'samples_per_epoch, ...); command-line options win.',
)
@resume_option
@run_folder_options
def segment(
    config_file: Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    classes: str | None,
    bands: str | None,
    output: Path | None,
    **options: object,
) -> None:
    """Fine-tune a segmentation model on --rasters and --labels, writing -o RUN_DIR.

    Validation uses spatial blocks held out from training (never overlapping a training
    patch). RUN_DIR receives model.ckpt, model_card.json (bands, normalisation, classes and
    colours, tile size, resolution, encoder provenance), config.yaml and logs/ (loss, mIoU and
    per-class IoU per epoch).
    """
    check_output(output, folder=True)
    from geocmid.runs.config import resolve
    from geocmid.runs.segmentation import SegmentConfig, train_segmentation

    config = resolve(
        SegmentConfig,
        config_file,
        {'classes': split_list(classes), 'bands': parse_bands(bands), 'output': output, **options},
    )
    result = train_segmentation(config, resume=resume, overwrite=overwrite, progress=not quiet)
    echo_fine_tuning(result, {'train_loss': 'train loss', 'val_AverageJaccardIndex': 'val mIoU'})


# `train classify` lives in cli/classify.py beside `geocmid classify`, which predicts with it.
from .classify import train_classify  # noqa: E402

train.add_command(train_classify)

# `train change` lives in cli/change.py beside `geocmid change`, which detects with it.
from .change import train_change  # noqa: E402

train.add_command(train_change)
