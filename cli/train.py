"""`geocmid train ...`: supervised fine-tuning (segmentation now; change and classify later)."""

from __future__ import annotations

from pathlib import Path

import click


def _split_list(value: str | None) -> list[str] | None:
    """``'a, b,c'`` -> ``['a', 'b', 'c']``; None stays None (not given)."""
    if value is None:
        return None
    return [item.strip() for item in value.split(',') if item.strip()]


def _parse_bands(value: str | None) -> list[int | str] | None:
    """``'1,2,3'`` -> ``[1, 2, 3]``; band names stay strings (``'red,nir'``)."""
    items = _split_list(value)
    return None if items is None else [int(item) if item.isdigit() else item for item in items]


@click.group()
def train() -> None:
    """Fine-tune a pretrained encoder on labelled rasters."""


@train.command()
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
    help="Class names in id order, comma-separated, each optionally with a colour: "
    "'background,building:#ff0000'. Default from the labels.",
)
@click.option('--label-field', help='Attribute holding the class of vector labels.')
@click.option('--bands', help="Bands to use: 1-based indices or names ('1,2,3'); default all.")
@click.option(
    '--freeze-encoder',
    is_flag=True,
    default=None,
    help='Keep the encoder fixed; train the decoder only.',
)
@click.option('--epochs', type=int, help='Training epochs (default 20 unless --max-steps).')
@click.option('--max-steps', type=int, help='Optimiser steps; stops at the first limit reached.')
@click.option('--batch-size', type=int, help='Patches per device per step (default 8).')
@click.option('--patch-size', type=int, help='Training patch side in pixels (default 256).')
@click.option('--workers', type=int, help='Data-loading processes per device (default 0).')
@click.option('--devices', type=int, help='Number of devices; more than one trains with DDP.')
@click.option('--accelerator', help="Lightning accelerator: 'auto' (default), 'cpu', 'gpu'.")
@click.option('--precision', help="'32' (default), 'bf16-mixed' or '16-mixed'.")
@click.option('--seed', type=int, help='Random seed (default 0).')
@click.option(
    '--config',
    'config_file',
    type=click.Path(path_type=Path),
    help='YAML file with any of these settings and more (lr, loss, val_fraction, block_size, '
    'samples_per_epoch, ...); command-line options win.',
)
@click.option('--overwrite', is_flag=True, help='Replace the outputs of an existing run folder.')
@click.option('--quiet', is_flag=True, help='No progress bar.')
def segment(
    config_file: Path | None,
    overwrite: bool,
    quiet: bool,
    classes: str | None,
    bands: str | None,
    **options: object,
) -> None:
    """Fine-tune a segmentation model on --rasters and --labels, writing -o RUN_DIR.

    Validation uses spatial blocks held out from training (never overlapping a training
    patch). RUN_DIR receives model.ckpt, model_card.json (bands, normalisation, classes and
    colours, tile size, resolution, encoder provenance), config.yaml and logs/ (loss, mIoU and
    per-class IoU per epoch).
    """
    from geocmid.config import resolve
    from geocmid.training import SegmentConfig, train_segmentation

    config = resolve(
        SegmentConfig,
        config_file,
        {'classes': _split_list(classes), 'bands': _parse_bands(bands), **options},
    )
    result = train_segmentation(config, overwrite=overwrite, progress=not quiet)
    shown = {'train_loss': 'train loss', 'val_AverageJaccardIndex': 'val mIoU'}
    values = [f'{name} {result.metrics[k]:.4f}' for k, name in shown.items() if k in result.metrics]
    click.echo(f'step {result.global_step}: {", ".join(values)}')
    click.echo(f'model: {result.model}')
    click.echo(f'model card: {result.model_card}')


# `train classify` lives in cli/classify.py beside `geocmid classify`, which predicts with it.
from .classify import train_classify  # noqa: E402

train.add_command(train_classify)

# `train change` lives in cli/change.py beside `geocmid change`, which detects with it.
from .change import train_change  # noqa: E402

train.add_command(train_change)
