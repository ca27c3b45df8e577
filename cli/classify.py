"""`geocmid classify` (predict a chip folder to CSV) and `geocmid train classify` (fine-tune)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .options import (
    BANDS,
    NON_NEGATIVE,
    POSITIVE,
    check_output,
    echo_fine_tuning,
    freeze_encoder_option,
    hardware_options,
    parse_bands,
    resume_option,
    run_folder_options,
    split_list,
    training_options,
    tta_option,
)


@click.command()
@click.argument('images', type=click.Path(path_type=Path))
@click.option(
    '--model',
    required=True,
    type=click.Path(path_type=Path),
    help='A run folder written by `geocmid train classify`, or its .onnx export.',
)
@click.option('-o', '--output', required=True, type=click.Path(path_type=Path), help='CSV file.')
@click.option('--batch-size', type=POSITIVE, help='Chips per forward pass (default 32).')
@click.option('--workers', type=NON_NEGATIVE, help='Data-loading processes (default 0).')
@click.option('--device', help="Torch device, e.g. 'cpu' or 'cuda'; default CUDA if any.")
@click.option('--overwrite', is_flag=True, help='Replace an existing output file.')
@tta_option
@click.option(
    '--bands', help="Only for a .onnx file without model card: the chip bands it takes, 1-based "
    "('1,2,3'), with --classes.",
)  # fmt: skip
@click.option(
    '--classes', help="Only for a .onnx file without model card: its class names, class 0 first "
    "('field,forest,urban'), with --bands.",
)  # fmt: skip
def classify(
    images: Path,
    model: Path,
    output: Path,
    bands: str | None,
    classes: str | None,
    **options: Any,
) -> None:
    """Predict the class of every chip under IMAGES, writing one CSV row per chip.

    Columns: path (relative to IMAGES), class, probability, then p_<class> for every class.
    """
    check_output(output)
    from geocmid.inference.products.classify import classify_folder

    given = {key: value for key, value in options.items() if value is not None}
    table = classify_folder(
        model, images, output, bands=parse_bands(bands), classes=split_list(classes), **given
    )
    counts = ', '.join(f'{name} {count}' for name, count in table['class'].value_counts().items())
    click.echo(f'{len(table)} chips classified ({counts}): {output}')


@click.command('classify')
@click.option(
    '--images',
    type=click.Path(path_type=Path),
    help='Labelled chip folder (one sub-folder per class), split with --split.',
)
@click.option('--train', type=click.Path(path_type=Path), help='Labelled training folder.')
@click.option('--test', type=click.Path(path_type=Path), help='Labelled validation folder.')
@click.option('-o', '--output', type=click.Path(path_type=Path), help='Run folder to write.')
@click.option(
    '--encoder',
    type=click.Path(path_type=Path),
    help='encoder.pt (with model_card.json beside it) or a pretraining run folder; '
    'default: random initialisation of --backbone.',
)
@click.option('--backbone', help="timm encoder without --encoder (default 'resnet50').")
@click.option('--bands', type=BANDS, help="Chip bands, 1-based, in the encoder's order.")
@click.option('--split', type=float, help='Share of each class used for training (default 0.8).')
@click.option(
    '--patch-size', type=POSITIVE, help="Chip side in pixels; default the card's (else 224)."
)
@freeze_encoder_option('classifier')
@click.option('--epochs', type=POSITIVE, help='Training epochs (default 20 unless --max-steps).')
@click.option(
    '--max-steps', type=POSITIVE, help='Optimiser steps; stops at the first limit that is reached.'
)
@click.option('--batch-size', type=POSITIVE, help='Chips per step (default 32).')
@click.option('--lr', type=float, help='Learning rate (default 0.001).')
@click.option('--workers', type=NON_NEGATIVE, help='Data-loading processes (default 0).')
@hardware_options
@training_options
@click.option('--seed', type=int, help='Random seed (default 0).')
@click.option(
    '--config',
    'config_file',
    type=click.Path(path_type=Path),
    help='YAML file with any of these settings (and loss, log_every_n_steps); '
    'command-line options win.',
)
@resume_option
@run_folder_options
def train_classify(
    config_file: Path | None, resume: bool, overwrite: bool, quiet: bool, **options: Any
) -> None:
    """Fine-tune a scene classifier on labelled chips, writing -o RUN_DIR.

    RUN_DIR receives model.ckpt, model_card.json (bands, normalisation, patch size, classes,
    encoder provenance), config.yaml and logs/ (loss and accuracy per epoch).
    """
    check_output(options.get('output'), folder=True)
    from geocmid.runs.classification import ClassifyConfig, train_classification
    from geocmid.runs.config import resolve

    config = resolve(ClassifyConfig, config_file, options)
    result = train_classification(config, resume=resume, overwrite=overwrite, progress=not quiet)
    echo_fine_tuning(result, {'train_loss': 'train_loss', 'val_OverallAccuracy': 'val top-1'})
