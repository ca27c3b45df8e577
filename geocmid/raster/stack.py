"""One multi-band scene, as a GDAL VRT on one grid, from the bands of several files.

The files are a folder of band files (``--stack``) or the assets of a STAC Item
(:mod:`geocmid.raster.stac`).

The VRT is XML written with :mod:`xml.etree`: GDAL's Python bindings (whose ``BuildVRT`` would
do it) do not install from wheels here, and rasterio has no ``BuildVRT``. Each band is one
``VRTRasterBand`` with one ``ComplexSource`` (source and destination rectangles, resampling,
nodata, and the scale/offset a STAC Item declares), so every command reads the scene as an
ordinary raster, window by window, and GDAL reads only the source blocks a window needs.

The grid is the finest one among the selected bands (or ``resolution``), in their common CRS,
over the union of their extents; coarser bands are resampled with nearest neighbour by
default, which keeps their values exact (``docs/data.md#band-stacks-and-stac-items``).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.dtypes import _gdal_typename
from rasterio.errors import RasterioError
from rasterio.transform import Affine

from geocmid.errors import InputError
from geocmid.raster.files import RASTER_SUFFIXES, crs_name
from geocmid.raster.locations import (
    gdal_path,
    is_location,
    is_remote,
    location_name,
    remote_env,
    remote_reason,
)
from geocmid.types import PathLike

#: Where scene VRTs are written: content-addressed, so the same scene is one file that every
#: process (DataLoader workers included) can open.
VRT_FOLDER = Path(tempfile.gettempdir()) / 'geocmid-scenes'

#: Resampling of the bands coarser (or finer) than the scene grid.
RESAMPLING = 'nearest'


@dataclass(frozen=True)
class BandFile:
    """One band of one file, as it goes into a scene.

    Attributes:
        path: the file's GDAL path.
        band: the band index in the file (1-based).
        name: the scene band's name (its description in the VRT).
        scale: multiplier applied to the stored values (STAC ``raster:scale``), if any.
        offset: added after scaling (STAC ``raster:offset``), if any.
        nodata: the source's nodata value, overriding the file's.
    """

    path: str
    band: int
    name: str
    scale: float | None = None
    offset: float | None = None
    nodata: float | None = None


@dataclass(frozen=True)
class FileGrid:
    """What the VRT needs to know about one source file, read from its header."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int
    dtypes: tuple[str, ...]
    nodata: float | None
    descriptions: tuple[str | None, ...]
    block: tuple[int, int]


def probe(path: str, shown: PathLike | None = None) -> FileGrid:
    """Read the header of the raster ``path`` (no pixels).

    Raises:
        InputError: naming ``shown`` (default the path): unreadable or not georeferenced.
    """
    name = shown if shown is not None else location_name(path)
    try:
        with remote_env(path), rasterio.open(path) as src:
            grid = FileGrid(
                src.crs, src.transform, src.width, src.height, tuple(src.dtypes), src.nodata,
                tuple(src.descriptions), src.block_shapes[0],
            )  # fmt: skip
    except RasterioError as exc:
        reason = remote_reason(str(exc)) if is_remote(path) else ' '.join(str(exc).split())
        raise InputError(name, reason) from None
    if grid.crs is None or grid.transform == Affine.identity():
        raise InputError(name, 'raster has no CRS or geotransform; a stacked band needs both')
    t = grid.transform
    if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
        raise InputError(name, 'rotated or flipped grid; warp it north-up before stacking')
    return grid


def folder_bands(folder: PathLike) -> list[BandFile]:
    """The bands of the scene ``folder``: every band of every raster in it (sorted by name).

    Each band is named by its description, else by the file name (its last ``_``-separated
    part when all files share the rest, as ``S2A_..._B02.tif`` -> ``B02``).

    Raises:
        InputError: not a folder, or no raster in it.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(folder, '--stack takes a folder of band files (one scene)')
    files = sorted(
        p for p in root.iterdir()
        if p.suffix.lower() in RASTER_SUFFIXES and p.is_file() and not p.name.startswith('.')
    )  # fmt: skip
    if not files:
        raise InputError(
            folder, f'no band files in folder (searched for {", ".join(RASTER_SUFFIXES)})'
        )
    names = _short_names([p.stem for p in files])
    bands: list[BandFile] = []
    for path, name in zip(files, names, strict=True):
        grid = probe(str(path.absolute()), path)
        for index, description in enumerate(grid.descriptions, 1):
            label = description or (name if len(grid.descriptions) == 1 else f'{name}_{index}')
            bands.append(BandFile(str(path.absolute()), index, label))
    return bands


def stack_vrt(
    bands: Sequence[BandFile],
    name: str,
    source: PathLike,
    resolution: float | None = None,
    resampling: str = RESAMPLING,
) -> Path:
    """Write (once) the VRT of ``bands`` as one scene and return its path.

    Args:
        bands: the scene's bands, in order.
        name: the scene's name: the VRT's file stem, which names the outputs.
        source: the input as the user gave it, for error messages.
        resolution: pixel size of the scene grid in CRS units; default the finest band's.
        resampling: GDAL resampling of the bands not on the scene grid.

    Returns:
        The VRT's path (``VRT_FOLDER/<hash>/<name>.vrt``).

    Raises:
        InputError: no bands, bands in different CRSs, or a non-positive resolution.
    """
    if not bands:
        raise InputError(source, 'no bands to stack')
    grids = {band.path: probe(band.path) for band in bands}
    crss = {crs_name(grid.crs) for grid in grids.values()}
    if len(crss) > 1:
        raise InputError(
            source, f'bands in different CRSs ({", ".join(sorted(crss))}) cannot share one grid'
        )
    finest = min(grids.values(), key=lambda g: g.transform.a * -g.transform.e)
    assert finest.crs is not None  # probe() refuses rasters without one
    if resolution is not None and not resolution > 0:
        raise InputError(source, f'resolution must be positive, got {resolution}')
    xres = resolution or finest.transform.a
    yres = resolution or -finest.transform.e
    left = min(g.transform.c for g in grids.values())
    top = max(g.transform.f for g in grids.values())
    right = max(g.transform.c + g.width * g.transform.a for g in grids.values())
    bottom = min(g.transform.f + g.height * g.transform.e for g in grids.values())
    width = max(1, math.ceil(round((right - left) / xres, 6)))
    height = max(1, math.ceil(round((top - bottom) / yres, 6)))
    transform = Affine(xres, 0.0, left, 0.0, -yres, top)
    dtype = _scene_dtype(bands, grids)

    root = ET.Element('VRTDataset', rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, 'SRS', dataAxisToSRSAxisMapping='1,2').text = finest.crs.to_wkt()
    ET.SubElement(root, 'GeoTransform').text = ', '.join(repr(v) for v in transform.to_gdal())
    for index, band in enumerate(bands, 1):
        grid = grids[band.path]
        nodata = band.nodata if band.nodata is not None else grid.nodata
        element = ET.SubElement(
            root, 'VRTRasterBand', dataType=_gdal_typename(dtype.name), band=str(index)
        )
        ET.SubElement(element, 'Description').text = band.name
        if nodata is not None:
            # Scaled bands mark nodata with NaN: a scaled value could equal a real one.
            scene_nodata = math.nan if _is_scaled(band) else nodata
            ET.SubElement(element, 'NoDataValue').text = _number(scene_nodata)
        complex_source = ET.SubElement(element, 'ComplexSource', resampling=resampling)
        ET.SubElement(complex_source, 'SourceFilename', relativeToVRT='0').text = band.path
        ET.SubElement(complex_source, 'SourceBand').text = str(band.band)
        ET.SubElement(
            complex_source, 'SourceProperties', RasterXSize=str(grid.width),
            RasterYSize=str(grid.height), DataType=_gdal_typename(grid.dtypes[band.band - 1]),
            BlockXSize=str(grid.block[1]), BlockYSize=str(grid.block[0]),
        )  # fmt: skip
        t = grid.transform
        ET.SubElement(complex_source, 'SrcRect', xOff='0', yOff='0',
                      xSize=str(grid.width), ySize=str(grid.height))  # fmt: skip
        ET.SubElement(
            complex_source, 'DstRect', xOff=_number((t.c - left) / xres),
            yOff=_number((top - t.f) / yres), xSize=_number(grid.width * t.a / xres),
            ySize=_number(grid.height * -t.e / yres),
        )  # fmt: skip
        if nodata is not None:
            ET.SubElement(complex_source, 'NODATA').text = _number(nodata)
        if band.scale is not None or band.offset is not None:
            ET.SubElement(complex_source, 'ScaleOffset').text = _number(band.offset or 0.0)
            ET.SubElement(complex_source, 'ScaleRatio').text = _number(
                1.0 if band.scale is None else band.scale
            )
    ET.indent(root)
    text = ET.tostring(root, encoding='unicode')
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = VRT_FOLDER / digest / f'{_safe(name)}.vrt'
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f'.{path.name}.{os.getpid()}')
        partial.write_text(text)
        partial.replace(path)  # atomic: concurrent processes write the same bytes
    return path


def stack_folder(
    folder: PathLike,
    bands: Sequence[str | int] | None = None,
    resolution: float | None = None,
) -> Path:
    """The VRT of the scene whose band files are in ``folder`` (see :func:`folder_bands`).

    Args:
        folder: one scene's folder.
        bands: scene bands to keep, by name (case-insensitive) or 1-based index; default all.
        resolution: pixel size of the scene grid; default the finest band's.

    Raises:
        InputError: a bad folder or file, an unknown band, or bands in different CRSs.
    """
    if is_location(folder):
        raise InputError(location_name(gdal_path(folder)), '--stack takes a local folder')
    available = folder_bands(folder)
    chosen = available if bands is None else select_bands(folder, available, bands)
    return stack_vrt(chosen, Path(folder).absolute().name, folder, resolution)


def select_bands(
    source: PathLike, available: Sequence[BandFile], wanted: Sequence[str | int]
) -> list[BandFile]:
    """The bands named (case-insensitive) or numbered (1-based) in ``wanted``, in that order.

    Raises:
        InputError: an unknown name or an index out of range, listing the band names.
    """
    lowered = [band.name.lower() for band in available]
    chosen = []
    for item in wanted:
        text = str(item).strip()
        if text.isdigit() and 1 <= int(text) <= len(available):
            chosen.append(available[int(text) - 1])
        elif text.lower() in lowered:
            chosen.append(available[lowered.index(text.lower())])
        else:
            names = ', '.join(band.name for band in available)
            raise InputError(source, f'no band {text!r} (bands: {names})')
    return chosen


def _scene_dtype(bands: Sequence[BandFile], grids: dict[str, FileGrid]) -> np.dtype:
    """One data type holding every band: the common type, float32 once a band is scaled."""
    dtypes = [np.dtype(grids[band.path].dtypes[band.band - 1]) for band in bands]
    if any(_is_scaled(band) for band in bands):
        dtypes.append(np.dtype('float32'))
    return np.result_type(*dtypes)


def _is_scaled(band: BandFile) -> bool:
    """Whether the band's stored values are scaled or offset."""
    return band.scale not in (None, 1) or band.offset not in (None, 0)


def _number(value: float) -> str:
    """A float in XML without float noise."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _short_names(stems: Sequence[str]) -> list[str]:
    """File stems without the prefix they all share up to a '_' (``S2A_x_B02`` -> ``B02``)."""
    if len(stems) < 2:
        return list(stems)
    prefix = os.path.commonprefix(list(stems))
    cut = prefix.rfind('_') + 1
    short = [stem[cut:] for stem in stems]
    return short if all(short) and len(set(short)) == len(short) else list(stems)


def _safe(name: str) -> str:
    """A file-name-safe version of a scene name."""
    return re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('._') or 'scene'
