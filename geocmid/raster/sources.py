"""What the user gives as rasters, resolved once into paths every command opens as rasters.

* a STAC Item, ItemCollection or STAC-GeoParquet file (path or URL): one scene per Item
  (:mod:`geocmid.raster.stac`);
* with ``stack``, a folder: one scene whose files are its bands (:mod:`geocmid.raster.stack`);
* a URL or GDAL path (``https://``, ``s3://``, ``/vsizip/``...): its GDAL path
  (:mod:`geocmid.raster.locations`);
* anything else (a local file or folder): kept as given, for
  :func:`~geocmid.raster.files.find_rasters` to search.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from geocmid.errors import InputError
from geocmid.raster.locations import gdal_path, is_location
from geocmid.raster.stac import is_stac, stac_scenes
from geocmid.raster.stack import stack_folder
from geocmid.types import PathLike


def resolve_scenes(
    source: PathLike,
    *,
    stack: bool = False,
    bands: Sequence[str | int] | None = None,
    resolution: float | None = None,
) -> list[Path]:
    """The rasters ``source`` stands for (see the module docstring).

    Args:
        source: a raster, folder, URL or STAC document.
        stack: read a folder as the band files of one scene.
        bands: for stacks and STAC Items, the bands to keep (names, asset keys, common names
            or 1-based indexes for stacks); default all (the data assets of an Item).
        resolution: pixel size of a stacked scene's grid; default its finest band's.

    Returns:
        Paths GDAL opens (a VRT per stacked scene); a local folder without ``stack`` stays a
        folder.

    Raises:
        InputError: a bad STAC document, stack folder or location.
    """
    if is_stac(source):
        return stac_scenes(source, bands, resolution)
    if stack:
        return [stack_folder(source, bands, resolution)]
    if is_location(source):
        return [Path(gdal_path(source))]
    return [Path(source)]


def resolve_scene(
    source: PathLike,
    *,
    stack: bool = False,
    bands: Sequence[str | int] | None = None,
    resolution: float | None = None,
) -> Path:
    """The one raster ``source`` stands for (see :func:`resolve_scenes`).

    Raises:
        InputError: as :func:`resolve_scenes`, or ``source`` holds more than one scene.
    """
    scenes = resolve_scenes(source, stack=stack, bands=bands, resolution=resolution)
    if len(scenes) != 1:
        raise InputError(source, f'holds {len(scenes)} scenes where one is expected')
    return scenes[0]


def resolve_all(
    sources: Iterable[PathLike],
    *,
    stack: bool = False,
    bands: Sequence[str | int] | None = None,
    resolution: float | None = None,
) -> list[Path]:
    """:func:`resolve_scenes` of every source, concatenated."""
    return [
        scene
        for source in sources
        for scene in resolve_scenes(source, stack=stack, bands=bands, resolution=resolution)
    ]
