"""`geocmid info PATH`: describe a raster, or every raster in a folder."""

from __future__ import annotations

import click

from geocmid.raster.files import describe_rasters, format_info


@click.command()
@click.argument('path', type=click.Path(path_type=str))
@click.option('--stats', is_flag=True, help='Also compute per-band statistics (sampled blocks).')
def info(path: str, stats: bool) -> None:
    """Describe each raster under PATH (a file, or a folder searched recursively).

    Prints the driver, size, bands and dtypes, CRS, resolution, bounds, nodata and band
    descriptions. Rasters without a CRS are described (crs: none), not rejected.
    """
    for k, item in enumerate(describe_rasters(path, stats=stats)):
        if k:
            click.echo()
        click.echo(format_info(item))
