"""`geocmid change` (change polygons and rasters from image pairs) and `geocmid train change`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from geocmid.errors import InputError
from geocmid.inference.change_methods import CHANGE_METHODS
from geocmid.inference.thresholds import THRESHOLD_RULES

from .options import (
    BANDS,
    NON_NEGATIVE,
    POSITIVE,
    ItemReport,
    check_output,
    cluster_options,
    echo_fine_tuning,
    freeze_encoder_option,
    hardware_options,
    remote_output,
    resolve_cluster,
    resume_option,
    run_folder_options,
    scene_inputs,
    stac_option,
    training_options,
    tta_option,
    write_stac,
)

if TYPE_CHECKING:
    from geocmid.inference.products.change import ChangeResult
    from geocmid.inference.spool import Threshold

#: What click gives ``--raster`` / ``--probabilities`` when they come without a path.
_BESIDE = '<beside the output>'


def _beside(value: str | None, output: Path, suffix: str) -> str | Path | None:
    """``--raster`` / ``--probabilities`` of one pair: a path, or ``<output>_<suffix>.tif``."""
    return output.with_name(f'{output.stem}_{suffix}.tif') if value == _BESIDE else value


def _threshold(value: str | None) -> Threshold | None:
    """``--threshold``: a number, or a rule (checked further by the API)."""
    if value is None:
        return None
    rule = value.lower()
    if rule in THRESHOLD_RULES:
        return rule
    try:
        return float(value)
    except ValueError:
        problem = f'must be a number or one of {", ".join(THRESHOLD_RULES)}, not {value!r}'
        raise InputError('--threshold', problem) from None


def _summary(name: str, result: ChangeResult) -> str:
    """One line per pair: polygons, changed area, threshold and the files written."""
    paths = [str(p) for p in result.paths]
    how = f'label-free {result.method}, ' if result.method else ''
    rule = f' ({result.threshold_rule})' if result.threshold_rule else ''
    return (
        f'{name}: {len(result.polygons)} change polygon(s), {result.changed_area_m2 / 1e4:.2f} ha, '
        f'{how}threshold {result.threshold:.4g}{rule}'
        + (f' -> {", ".join(paths)}' if paths else '')
    )


@click.command()
@scene_inputs('before', 'after')
@remote_output('output')
@click.argument('before', required=False, type=click.Path(path_type=Path))
@click.argument('after', required=False, type=click.Path(path_type=Path))
@click.option(
    '-o', '--output', required=True, type=click.Path(path_type=Path),
    help='GeoPackage of change polygons; with --pairs, the folder receiving <name>.gpkg per pair.',
)  # fmt: skip
@click.option(
    '--pairs', type=click.Path(path_type=Path),
    help='CSV with before,after columns (optionally name), or a LEVIR-CD / SZTAKI folder.',
)  # fmt: skip
@click.option(
    '--model', type=click.Path(path_type=Path),
    help='Run folder of `geocmid train change`, or its .onnx export (`geocmid export`).',
)  # fmt: skip
@click.option(
    '--encoder', type=click.Path(path_type=Path),
    help='Encoder (encoder.pt, run folder or random:NAME) for label-free detection: its card '
    'gives the bands; see --method.',
)  # fmt: skip
@click.option(
    '--method', type=click.Choice(CHANGE_METHODS),
    help='Label-free score (with --encoder): fusion (default: IR-MAD plus the encoder\'s '
    'fine-stage feature distance), irmad (radiometry only), features (encoder only), cva '
    '(change vector analysis). See docs/change.md.',
)  # fmt: skip
@click.option(
    '--raster', is_flag=False, flag_value=_BESIDE, default=None,
    help='Also write the binary change COG (0/1, nodata 255) here; without a path (and with '
    '--pairs) as <name>_change.tif beside the GeoPackage.',
)  # fmt: skip
@click.option(
    '--probabilities', is_flag=False, flag_value=_BESIDE, default=None,
    help='Also write the change-score COG here; without a path as <name>_score.tif.',
)  # fmt: skip
@click.option(
    '--threshold',
    help="Change-score threshold (a probability in [0, 1] with --model, the score's own units "
    "label-free), or a rule found from the scene's scores: 'ki' (Kittler-Illingworth minimum "
    "error), 'otsu'. Default 0.5 with --model, ki with --encoder.",
)
@click.option(
    '--change-fraction', type=float,
    help='Expected share of changed pixels, in (0, 1): the threshold leaves that share above it.',
)  # fmt: skip
@click.option(
    '--min-area', type=float, default=0.0, show_default=True, help='Smallest polygon kept (m²).'
)
@click.option(
    '--simplify', type=float, default=0.0, show_default=True, help='Simplification tolerance (m).'
)
@click.option('--tile', type=POSITIVE, help="Window size in pixels (default the model card's).")
@click.option('--overlap', type=NON_NEGATIVE, help='Window overlap in pixels (default tile / 4).')
@click.option(
    '--batch-size', type=POSITIVE, default=4, show_default=True, help='Windows per forward pass.'
)
@click.option(
    '--blend', type=click.Choice(['cosine', 'linear', 'gaussian', 'none']), default='cosine',
    show_default=True, help='How overlapping windows are combined.',
)  # fmt: skip
@tta_option
@click.option('--nodata', type=float, help="Override or supply both images' nodata value.")
@click.option(
    '--bands',
    type=BANDS,
    help="Image bands to feed the model, 1-based ('1,2,3'); default the model card's.",
)
@click.option(
    '--probability-dtype', type=click.Choice(['uint8', 'float32']), default='uint8',
    show_default=True, help='Storage of the change scores.',
)  # fmt: skip
@click.option(
    '--device', default='auto', show_default=True, help="'auto', 'cpu', 'cuda', 'cuda:1'..."
)
@click.option(
    '--devices', default='1', show_default=True,
    help='With --pairs, the workers of --cluster local: N GPUs (one worker each, pinned to its '
    "GPU), or a list of devices ('cuda:0,cuda:2'; 'cpu,cpu' for two CPU workers).",
)  # fmt: skip
@cluster_options
@click.option('--overwrite', is_flag=True, help='Replace existing outputs.')
@click.option(
    '--skip-existing', is_flag=True,
    help='With --pairs, resume: skip the pairs whose outputs are complete, redo the others.',
)  # fmt: skip
@click.option('--fail-fast', is_flag=True, help='With --pairs, stop at the first bad pair.')
@click.option('--quiet', is_flag=True, help='No progress bar.')
@stac_option
def change(
    before: Path | None,
    after: Path | None,
    output: Path,
    pairs: Path | None,
    model: Path | None,
    encoder: Path | None,
    raster: str | None,
    probabilities: str | None,
    threshold: str | None,
    devices: str,
    inputs: Path | None,
    shard: str | None,
    cluster: str | None,
    cluster_workers: int | None,
    skip_existing: bool,
    fail_fast: bool,
    quiet: bool,
    stac: bool,
    **options: Any,
) -> None:
    """Detect changes between BEFORE and AFTER, or in every pair of --pairs.

    AFTER is warped onto BEFORE's grid over their overlap, and the outputs lie on BEFORE's
    grid. Give a trained change model (--model) or, label-free, an encoder (--encoder). With
    --pairs, a bad pair is reported and the others still run (unless --fail-fast); the exit
    status is then 2. The pairs run on a Dask cluster (--cluster); the pair CSV is the
    manifest (--inputs is the same as --pairs), and the output folder receives the run table
    run.parquet.
    """
    check_output(output, folder=pairs is not None or inputs is not None)
    for extra in (raster, probabilities):
        check_output(None if extra in (None, _BESIDE) else Path(extra))
    from geocmid.api import change_model, detect_change, detect_changes
    from geocmid.inference.cluster import check_cluster
    from geocmid.inference.devices import parse_devices
    from geocmid.inference.manifest import parse_shard
    from geocmid.inference.onnx_model import is_onnx, load_model
    from geocmid.inference.products.change import (
        ChangeModel,
        StackedPair,
        pair_records,
        random_channels,
    )

    if inputs is not None:
        if pairs is not None:
            raise click.UsageError('give --pairs or --inputs (the same pair list), not both')
        pairs = inputs
    part = parse_shard(shard)
    if cluster is not None:
        check_cluster(cluster)
    given = (before is not None, after is not None, pairs is not None)
    if given not in ((True, True, False), (False, False, True)):
        raise click.UsageError('give BEFORE and AFTER, or --pairs (not both)')
    if skip_existing and pairs is None:
        raise click.UsageError('--skip-existing resumes a run over --pairs')
    if stac and raster is None:
        raise click.UsageError('--stac describes the change COG: add --raster')
    workers = parse_devices(devices)
    if model is not None and encoder is None and is_onnx(model):
        # its card, or one from --bands when it has none
        onnx = load_model(model, 'change', bands=options.get('bands'))
        loaded = ChangeModel(StackedPair(onnx.network).eval(), onnx.card, onnx.weights, False)
    else:
        bands = options.get('bands')
        loaded = change_model(model, encoder=encoder, in_chans=random_channels(encoder, bands))
    if before is not None and after is not None:
        if part is not None:
            raise click.UsageError('--shard splits the pairs of --pairs')
        if workers != 1:
            raise InputError('--devices', 'spreads many pairs over devices; give one --device')
        result = detect_change(
            before, after, loaded, vector=output, threshold=_threshold(threshold),
            raster=_beside(raster, output, 'change'),
            probabilities=_beside(probabilities, output, 'score'),
            progress=not quiet, **options,
        )  # fmt: skip
        click.echo(_summary(output.stem, result))
        if stac:
            write_stac([result], None, options.get('overwrite', False))
        return
    for name, value in (('--raster', raster), ('--probabilities', probabilities)):
        if value not in (None, _BESIDE):
            raise click.UsageError(
                f'with --pairs, {name} takes no path: files are named after the pairs'
            )
    report = ItemReport('pair')
    assert pairs is not None
    count = -(-len(pair_records(pairs)) // (part[1] if part else 1))
    results = detect_changes(
        pairs, model=loaded, out_dir=output, raster=raster is not None, shard=part,
        client=resolve_cluster(cluster, count, workers, cluster_workers), workers=cluster_workers,
        probabilities=probabilities is not None, threshold=_threshold(threshold), devices=workers,
        fail_fast=fail_fast, on_error=report.error, on_skip=report.skip, progress=not quiet,
        skip_existing=skip_existing, **options,
    )  # fmt: skip
    if stac:
        write_stac(results.values(), output, options.get('overwrite', False))
    report.finish(pairs, [_summary(name, result) for name, result in results.items()])


@click.command('change')
@click.option(
    '--pairs',
    type=click.Path(path_type=Path),
    help='CSV with before,after,label columns, or a folder in the LEVIR-CD (A/, B/, label/) or '
    'SZTAKI AirChange (*/im1, im2, gt) layout. PNG/JPEG pairs without georeferencing are '
    'used pixel for pixel.',
)
@click.option('-o', '--output', type=click.Path(path_type=Path), help='Run folder to write.')
@click.option(
    '--encoder',
    type=click.Path(path_type=Path),
    help='encoder.pt (with model_card.json beside it) or a pretraining run folder, shared by '
    'both dates; default: random initialisation of --backbone.',
)
@click.option('--backbone', help="timm encoder without --encoder (default 'resnet50').")
@click.option('--decoder', help="Siamese decoder: 'fcsiamdiff' (default) or 'fcsiamconc'.")
@click.option('--bands', help="Bands of both images, 1-based ('1,2,3'); default all.")
@freeze_encoder_option('decoder')
@click.option('--epochs', type=POSITIVE, help='Training epochs (default 20 unless --max-steps).')
@click.option(
    '--max-steps', type=POSITIVE, help='Optimiser steps; stops at the first limit that is reached.'
)
@click.option('--batch-size', type=POSITIVE, help='Patches per device per step (default 8).')
@click.option('--patch-size', type=POSITIVE, help='Training patch side in pixels (default 256).')
@click.option(
    '--val-fraction', type=float, help='Share of the pairs held out for validation (0.2).'
)
@click.option('--workers', type=NON_NEGATIVE, help='Data-loading processes per device (default 0).')
@hardware_options
@training_options
@click.option('--seed', type=int, help='Random seed (default 0).')
@click.option(
    '--config',
    'config_file',
    type=click.Path(path_type=Path),
    help='YAML file with any of these settings and more (lr, loss, pos_weight, nodata, '
    'samples_per_epoch, ...); command-line options win.',
)
@resume_option
@run_folder_options
def train_change(
    config_file: Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    bands: str | None,
    output: Path | None,
    **options: object,
) -> None:
    """Fine-tune a change model on labelled --pairs, writing -o RUN_DIR.

    Whole pairs are held out for validation (the bottom rows when there is one pair); the F1
    score and IoU of the change class are logged per epoch. RUN_DIR receives model.ckpt,
    model_card.json, config.yaml and logs/.
    """
    check_output(output, folder=True)
    from geocmid.runs import change as change_training
    from geocmid.runs.config import resolve

    indexes = None
    if bands is not None:
        try:
            indexes = [int(item) for item in bands.split(',') if item.strip()]
        except ValueError:
            problem = f'expected 1-based band numbers like 1,2,3, got {bands!r}'
            raise InputError('--bands', problem) from None
    config = resolve(
        change_training.ChangeConfig, config_file, {'bands': indexes, 'output': output, **options}
    )
    result = change_training.train_change(
        config, resume=resume, overwrite=overwrite, progress=not quiet
    )
    shown = {
        'train_loss': 'train loss',
        'val_OverallF1Score': 'val F1 (change)',
        'val_OverallJaccardIndex': 'val IoU (change)',
    }
    echo_fine_tuning(result, shown)
