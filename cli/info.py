"""`geocmid info PATH`: describe a raster, every raster in a folder, a band stack or STAC Items."""

from __future__ import annotations

import click

from .options import parse_bands


@click.command()
@click.argument('path', type=click.Path(path_type=str))
@click.option('--stats', is_flag=True, help='Also compute per-band statistics (sampled blocks).')
@click.option(
    '--stack', is_flag=True,
    help='PATH is a folder of band files of ONE scene: describe the stacked scene.',
)  # fmt: skip
@click.option(
    '--bands',
    help='With --stack or a STAC Item: the bands to keep, by name, asset key or common name '
    "('red,green,blue,nir').",
)
@click.option(
    '--resolution', type=float,
    help='With --stack or a STAC Item: pixel size of the scene grid (default the finest band).',
)  # fmt: skip
def info(path: str, stats: bool, stack: bool, bands: str | None, resolution: float | None) -> None:
    """Describe each raster under PATH, or the scenes of a STAC document or a --stack folder.

    PATH is a file, a folder searched recursively, a URL (https://..., s3://...), a STAC Item,
    ItemCollection or STAC-GeoParquet file, or with --stack the folder of one scene's bands.

    Prints the driver, size, bands and dtypes, CRS, resolution, bounds, nodata and band
    descriptions. Rasters without a CRS are described (crs: none), not rejected.
    """
    from geocmid.raster.files import describe_raster, describe_rasters, format_info
    from geocmid.raster.sources import resolve_scenes
    from geocmid.raster.stac import is_stac

    if stack or is_stac(path):
        scenes = resolve_scenes(path, stack=stack, bands=parse_bands(bands), resolution=resolution)
        described = [describe_raster(scene, stats=stats) for scene in scenes]
        header = f'{path}: {len(scenes)} scene(s) ({"band stack" if stack else "STAC"})'
        click.echo(header)
    else:
        if bands is not None or resolution is not None:
            raise click.UsageError('--bands and --resolution apply to --stack and STAC Items')
        described = describe_rasters(path, stats=stats)
    for k, item in enumerate(described):
        if k:
            click.echo()
        click.echo(format_info(item))
