"""`geocmid segment`: class polygons (GeoPackage) and label COGs of one or many scenes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from geocmid.errors import InputError

from .options import (
    NON_NEGATIVE,
    POSITIVE,
    ItemReport,
    check_output,
    cluster_options,
    parse_bands,
    remote_output,
    resolve_cluster,
    scene_inputs,
    split_list,
    stac_option,
    tta_option,
    write_stac,
)

if TYPE_CHECKING:
    from geocmid.inference.products.segment import SegmentResult

#: What click gives ``--raster`` / ``--probabilities`` when they come without a path.
_BESIDE = '<beside the output>'


def _resolution(value: str) -> float | str:
    """``--resolution``: 'scene', 'model' or metres."""
    if value in ('scene', 'model'):
        return value
    try:
        return float(value)
    except ValueError:
        problem = f"must be 'scene', 'model' or a number of metres, not {value!r}"
        raise InputError('--resolution', problem) from None


def _summary(name: str, result: SegmentResult) -> str:
    """One line per scene: polygons by class, their area and the files written."""
    polygons = result.polygons
    counts = ', '.join(f'{n} {c}' for c, n in polygons['class_name'].value_counts().items())
    line = f'{name}: {len(polygons)} polygon(s)' + (f' ({counts})' if counts else '')
    line += f', {polygons["area_m2"].sum() / 1e4:.2f} ha'
    if result.paths:
        line += f' -> {", ".join(map(str, result.paths))}'
    return line


@click.command()
@scene_inputs('scenes')
@remote_output('output')
@click.argument(
    'scenes', nargs=-1, required=False, metavar='SCENE...', type=click.Path(path_type=Path)
)
@click.option(
    '-o', '--output', required=True, type=click.Path(path_type=Path),
    help='A .gpkg for one scene; otherwise a folder receiving <name>.gpkg and <name>.tif per '
    'scene.',
)  # fmt: skip
@click.option(
    '--model', required=True, type=click.Path(path_type=Path),
    help='Run folder of `geocmid train segment` (model.ckpt and model_card.json), or its '
    '.onnx export (`geocmid export`), run by ONNX Runtime.',
)  # fmt: skip
@click.option(
    '--raster', is_flag=False, flag_value=_BESIDE, default=None,
    help='One scene: also write the label COG here (without a path: beside the .gpkg). A '
    'folder output always gets <name>.tif.',
)  # fmt: skip
@click.option(
    '--probabilities', is_flag=False, flag_value=_BESIDE, default=None,
    help='Also write the class probabilities as a COG here; without a path (and with a '
    'folder output) as <name>_probabilities.tif.',
)  # fmt: skip
@click.option('--tile', type=POSITIVE, help="Window size in pixels (default the model card's).")
@click.option('--overlap', type=NON_NEGATIVE, help='Window overlap in pixels (default tile / 4).')
@click.option(
    '--blend', type=click.Choice(['cosine', 'linear', 'gaussian', 'none']), default='cosine',
    show_default=True, help="How overlapping windows are combined ('none': crop-centre).",
)  # fmt: skip
@tta_option
@click.option(
    '--batch-size', type=POSITIVE, default=4, show_default=True, help='Windows per forward pass.'
)
@click.option(
    '--min-area', type=float, default=0.0, show_default=True, help='Smallest polygon kept (m²).'
)
@click.option(
    '--simplify', type=float, default=0.0, show_default=True,
    help='Simplification tolerance (m); neighbouring polygons stay gap-free.',
)  # fmt: skip
@click.option(
    '--resolution', default='scene', show_default=True,
    help="Grid the model sees: 'scene' (its own), 'model' (the card's ground resolution) or "
    'metres. Outputs are always on the scene grid.',
)  # fmt: skip
@click.option(
    '--bands', help="Scene bands to feed the model, 1-based or names ('1,2,3'); default the "
    "card's.",
)  # fmt: skip
@click.option(
    '--classes', help="Only for a .onnx file without model card: its class names, class 0 first "
    "('background,building'), with --bands.",
)  # fmt: skip
@click.option('--nodata', type=float, help="Override or supply the scenes' nodata value.")
@click.option(
    '--probability-dtype', type=click.Choice(['uint8', 'float32']), default='uint8',
    show_default=True, help='Storage of the probabilities.',
)  # fmt: skip
@click.option(
    '--device', default='auto', show_default=True, help="'auto', 'cpu', 'cuda', 'cuda:1'..."
)
@click.option(
    '--devices', default='1', show_default=True,
    help='The workers of --cluster local: N GPUs (one worker each, pinned to its GPU), or a '
    "list of devices ('cuda:0,cuda:2'; 'cpu,cpu' for two CPU workers).",
)  # fmt: skip
@cluster_options
@click.option('--overwrite', is_flag=True, help='Replace existing outputs.')
@click.option(
    '--skip-existing', is_flag=True,
    help='With an output folder, resume: skip the scenes whose outputs are complete, redo the '
    'others.',
)  # fmt: skip
@click.option('--fail-fast', is_flag=True, help='With many scenes, stop at the first bad one.')
@click.option('--quiet', is_flag=True, help='No progress bar.')
@stac_option
def segment(
    scenes: tuple[Path, ...],
    output: Path,
    model: Path,
    raster: str | None,
    probabilities: str | None,
    resolution: str,
    bands: str | None,
    classes: str | None,
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
    """Segment SCENE... with a trained model: class polygons, label and probability COGs.

    SCENE may be files, folders (searched for rasters) or quoted glob patterns ('tiles/*.tif').
    Scenes are read with the bands and normalisation of the model card; outputs lie on each
    scene's grid and CRS, with nodata where the scene has none. Class 0 (background) is not
    polygonised. With many scenes, a bad scene is reported and the others still run (unless
    --fail-fast); the exit status is then 2. Many scenes run on a Dask cluster (--cluster),
    and the output folder receives the run table run.parquet.
    """
    check_output(output, folder=output.suffix.lower() != '.gpkg')
    for extra in (raster, probabilities):
        check_output(None if extra in (None, _BESIDE) else Path(extra))
    from geocmid.api import segment as segment_scene
    from geocmid.api import segment_scenes
    from geocmid.inference.cluster import check_cluster
    from geocmid.inference.devices import parse_devices
    from geocmid.inference.manifest import parse_shard
    from geocmid.inference.onnx_model import is_onnx, load_model
    from geocmid.inference.products.segment import SegmentationModel, find_scenes

    part = parse_shard(shard)
    if cluster is not None:
        check_cluster(cluster)
    loaded: Path | SegmentationModel = model
    if is_onnx(model):  # its card, or one from --bands and --classes when it has none
        onnx = load_model(
            model, 'segmentation', bands=parse_bands(bands), classes=split_list(classes)
        )
        loaded = SegmentationModel(onnx.network, onnx.card, onnx.weights)
    elif classes is not None:
        raise click.UsageError('--classes names the classes of a .onnx file without model card')
    settings = dict(resolution=_resolution(resolution), bands=parse_bands(bands), **options)
    workers = parse_devices(devices)
    if not scenes and inputs is None:
        raise click.UsageError('give SCENE... or --inputs')
    if output.suffix.lower() == '.gpkg':
        if skip_existing:
            raise click.UsageError('--skip-existing resumes a run into an output folder')
        if inputs is not None or shard is not None:
            raise click.UsageError('--inputs and --shard need an output folder, not a .gpkg')
        paths = find_scenes(scenes)
        if len(paths) > 1:
            raise InputError(output, f'{len(paths)} scenes need an output folder, not a .gpkg')
        if workers != 1:
            raise InputError('--devices', 'spreads many scenes over devices; give one --device')
        if stac and raster is None:
            raise click.UsageError('--stac describes the label COG: add --raster')
        beside = output.with_name(f'{output.stem}_probabilities.tif')
        result = segment_scene(
            paths[0],
            loaded,
            vector=output,
            raster=output.with_suffix('.tif') if raster == _BESIDE else raster,
            probabilities=beside if probabilities == _BESIDE else probabilities,
            progress=not quiet,
            **settings,
        )
        click.echo(_summary(paths[0].stem, result))
        if stac:
            write_stac([result], None, options.get('overwrite', False))
        return
    for name, value in (('--raster', raster), ('--probabilities', probabilities)):
        if value not in (None, _BESIDE):
            raise click.UsageError(
                f'with an output folder, {name} takes no path: files are named after the scenes'
            )
    from geocmid.inference.manifest import read_manifest

    report = ItemReport('scene')
    listed = read_manifest(inputs) if inputs is not None else []
    count = (len(find_scenes(scenes)) if scenes else 0) + len(listed)
    results = segment_scenes(
        scenes or None, loaded, output, inputs=inputs, shard=part,
        client=resolve_cluster(cluster, -(-count // (part[1] if part else 1)), workers,
                               cluster_workers),
        workers=cluster_workers, probabilities=probabilities is not None, devices=workers,
        fail_fast=fail_fast, on_error=report.error, on_skip=report.skip, progress=not quiet,
        skip_existing=skip_existing, **settings,
    )  # fmt: skip
    if stac:
        write_stac(results.values(), output, options.get('overwrite', False))
    report.finish(output, [_summary(name, result) for name, result in results.items()])
