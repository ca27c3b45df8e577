"""`geocmid embed`: one encoder embedding per window of a grid over each raster, as GeoParquet."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import click

from .options import BANDS, POSITIVE, check_output, cluster_options, remote_output, scene_inputs


@click.command()
@scene_inputs('rasters')
@remote_output('output')
@click.option(
    '--rasters',
    required=True,
    type=click.Path(path_type=Path),
    help='A raster or a folder of rasters (one CRS).',
)
@click.option(
    '--encoder',
    required=True,
    help='encoder.pt (with model_card.json beside it), a run folder, or random:<backbone>.',
)
@click.option(
    '-o',
    '--output',
    required=True,
    type=click.Path(path_type=Path),
    help='GeoParquet file to write (e.g. embeddings.parquet).',
)
@click.option('--tile', type=POSITIVE, help="Window side in pixels; default the card's patch size.")
@click.option('--stride', type=POSITIVE, help='Step between windows in pixels; default --tile.')
@click.option(
    '--bands',
    type=BANDS,
    help="Raster bands, 1-based, in the encoder's order; default the card's band_indices.",
)
@click.option('--batch-size', type=POSITIVE, help='Windows per forward pass (default 32).')
@click.option('--device', help="Torch device, e.g. 'cpu' or 'cuda'; default CUDA if any.")
@click.option('--overwrite', is_flag=True, help='Replace an existing output file.')
@functools.partial(cluster_options, manifest=False)
@click.option('--quiet', is_flag=True, help='No progress bar.')
def embed(
    rasters: Path,
    encoder: str,
    output: Path,
    quiet: bool,
    cluster: str | None,
    cluster_workers: int | None,
    **options: Any,
) -> None:
    """Embed each window of a grid over --rasters with a frozen encoder, writing -o FILE.

    Each row holds the window's footprint polygon in the raster's CRS, the source file, the
    window's pixel offsets, its share of valid pixels and the average-pooled feature vector
    (column 'embedding'). Windows holding only nodata are skipped. Several rasters are
    embedded on a Dask cluster (--cluster; the run table goes beside -o as <stem>.run.parquet).
    """
    check_output(output)
    from geocmid.inference.cluster import check_cluster
    from geocmid.inference.products.embed import embed as embed_rasters
    from geocmid.raster.files import find_rasters

    if cluster is not None:
        check_cluster(cluster)
    files = find_rasters(rasters)
    several = len(files) > 1 or cluster_workers is not None
    where = cluster or ('local' if several else 'none')
    given = {key: value for key, value in options.items() if value is not None}
    table = embed_rasters(
        files, encoder, output, progress=not quiet, client=where, workers=cluster_workers, **given
    )
    sources = table['source'].nunique() if len(table) else 0
    width = len(table['embedding'].iloc[0]) if len(table) else 0
    click.echo(f'{len(table)} embeddings of {width} values from {sources} raster(s): {output}')
