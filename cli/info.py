"""`geocmid info PATH`: describe rasters (placeholder until the data layer lands)."""

from __future__ import annotations

import click


@click.command()
@click.argument('path', type=click.Path(path_type=str))
@click.option('--stats', is_flag=True, help='Also compute per-band statistics (sampled).')
def info(path: str, stats: bool) -> None:
    """Describe each raster under PATH (file or folder)."""
    from geocmid.data.rasters import describe_rasters, format_info

    for item in describe_rasters(path, stats=stats):
        click.echo(format_info(item))
