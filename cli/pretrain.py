"""`geocmid pretrain`: self-supervised pretraining of an encoder on rasters or image chips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from geocmid.errors import InputError

from .options import (
    NON_NEGATIVE,
    POSITIVE,
    check_output,
    hardware_options,
    parse_bands,
    resume_option,
    run_folder_options,
    scene_inputs,
    training_options,
)


@click.command()
@scene_inputs('rasters')
@click.option('--rasters', type=click.Path(path_type=Path), help='Folder (or file) of GeoTIFFs.')
@click.option(
    '--images', type=click.Path(path_type=Path), help='Folder of image chips, instead of --rasters.'
)
@click.option(
    '--natural-images',
    type=click.Path(path_type=Path),
    help='GeRSP: folder of natural images, one sub-folder per class.',
)
@click.option('-o', '--output', type=click.Path(path_type=Path), help='Run folder to write.')
@click.option('--method', help="Pretraining method: 'cmid' (default) or 'gersp'.")
@click.option('--backbone', help="timm encoder, e.g. 'resnet50' (default) or a Swin.")
@click.option('--bands', help="Bands to use: 1-based indices or names, comma-separated ('1,2,3').")
@click.option(
    '--rgb-bands',
    help="GeRSP: the bands receiving the natural images' red, green, blue, as 1-based positions "
    "among --bands or names ('1,2,3'); default the bands named or coloured red, green, blue.",
)
@click.option('--patch-size', type=POSITIVE, help='Patch and crop side in pixels (default 224).')
@click.option('--batch-size', type=POSITIVE, help='Patches per device per step (default 64).')
@click.option('--epochs', type=POSITIVE, help='Training epochs (default 200 unless --max-steps).')
@click.option(
    '--max-steps', type=POSITIVE, help='Optimiser steps; stops at the first limit that is reached.'
)
@click.option('--samples-per-epoch', type=POSITIVE, help='Patches per epoch over all devices.')
@hardware_options
@training_options
@click.option('--workers', type=NON_NEGATIVE, help='Data-loading processes per device (default 4).')
@click.option('--seed', type=int, help='Random seed (default 322).')
@click.option('--nodata', type=float, help="Nodata value overriding (or supplying) the rasters'.")
@click.option(
    '--config',
    'config_file',
    type=click.Path(path_type=Path),
    help='YAML file with any of these settings (command-line options win) and a task: section.',
)
@resume_option
@run_folder_options
def pretrain(
    config_file: Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    bands: str | None,
    rgb_bands: str | None,
    output: Path | None,
    **options: object,
) -> None:
    """Pretrain an encoder (CMID, GeRSP) on --rasters DIR or --images DIR, writing -o RUN_DIR.

    GeRSP (--method gersp) also learns from labelled --natural-images DIR.

    RUN_DIR receives checkpoints/last.ckpt, logs/, encoder.pt (a plain timm state dict of the
    student encoder) and model_card.json (bands, normalisation, patch size, data, settings).
    """
    check_output(output, folder=True)
    from geocmid.runs.pretrain import load_pretrain_config, run_pretraining

    config = load_pretrain_config(config_file, bands=parse_bands(bands), output=output, **options)
    if rgb_bands is not None:
        if config.method != 'gersp':
            raise InputError('--rgb-bands', f'is for --method gersp, not {config.method}')
        task = {**config.task, 'rgb_bands': parse_bands(rgb_bands)}
        config = dataclasses.replace(config, task=task)
    result = run_pretraining(config, resume=resume, overwrite=overwrite, progress=not quiet)
    losses = ', '.join(f'{key} {value:.4f}' for key, value in sorted(result.metrics.items()))
    click.echo(f'step {result.global_step}: {losses}')
    click.echo(f'encoder: {result.encoder}')
    click.echo(f'model card: {result.model_card}')
    click.echo(f'checkpoint: {result.checkpoint}')
