"""STAC input: an Item, an ItemCollection or a STAC-GeoParquet file as scenes.

Each Item becomes one multi-band scene (a VRT, :mod:`geocmid.raster.stack`) from its raster
assets: all of its ``data`` assets by default, or the bands chosen by asset key or by common
name (``--bands red,green,blue,nir``), resolved through the assets' ``eo:bands`` (STAC 1.0)
or ``bands`` (STAC 1.1) metadata. Scale and offset from the ``raster`` extension are applied.
Items are read with pystac (and stac-geoparquet for GeoParquet); asset hrefs go through
:func:`~geocmid.raster.locations.normalise_location`, so remote COGs are read window by window.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import pystac
from pystac.serialization import identify_stac_object_type

from geocmid.errors import InputError
from geocmid.raster.locations import gdal_path, location_name
from geocmid.raster.stack import BandFile, stack_vrt
from geocmid.types import PathLike

#: File name endings read as STAC (local paths or URLs).
STAC_SUFFIXES = ('.json', '.geojson', '.parquet', '.geoparquet')

#: Media types of assets GDAL reads as rasters (prefixes).
RASTER_MEDIA = ('image/tiff', 'image/jp2', 'image/vnd.stac.geotiff', 'application/x-hdf')

#: Roles of assets that are never scene bands.
NOT_DATA = {'thumbnail', 'overview', 'metadata', 'visual'}


@dataclass(frozen=True)
class AssetBand:
    """One band of one raster asset, with every name it can be chosen by."""

    key: str
    names: tuple[str, ...]
    band: BandFile


def is_stac(source: PathLike) -> bool:
    """Whether ``source`` names a STAC document (by its ending)."""
    text = os.fspath(source).split('?')[0].lower()
    return text.endswith(STAC_SUFFIXES)


def load_items(source: PathLike) -> list[pystac.Item]:
    """The Items of a STAC Item, ItemCollection or STAC-GeoParquet file (path or URL).

    Raises:
        InputError: missing, unreadable, malformed, or not an Item or ItemCollection.
    """
    text = os.fspath(source)
    href = _href(text)
    if text.lower().split('?')[0].endswith(('.parquet', '.geoparquet')):
        return _parquet_items(text)
    try:
        document = pystac.StacIO.default().read_json(href)
    except json.JSONDecodeError as exc:
        raise InputError(source, f'malformed JSON ({exc})') from None
    except FileNotFoundError:
        raise InputError(source, 'no such file') from None
    except (OSError, URLError) as exc:
        raise InputError(source, f'cannot read ({" ".join(str(exc).split())})') from None
    try:
        if pystac.ItemCollection.is_item_collection(document):
            items = list(pystac.ItemCollection.from_dict(document).items)
            for item in items:
                if item.get_self_href() is None:  # relative asset hrefs: beside the file
                    item.set_self_href(href)
            return items
        if identify_stac_object_type(document) == pystac.STACObjectType.ITEM:
            return [pystac.Item.from_dict(document, href=href)]
    except (AttributeError, KeyError, TypeError, ValueError, pystac.STACError) as exc:
        raise InputError(source, f'malformed STAC ({" ".join(str(exc).split())})') from None
    raise InputError(source, 'not a STAC Item or ItemCollection')


def asset_bands(item: pystac.Item) -> list[AssetBand]:
    """Every band of every raster asset of ``item`` (data assets first, in asset order)."""
    bands = []
    for key, asset in item.assets.items():
        if not _is_raster(asset):
            continue
        described = _band_metadata(asset)
        path = gdal_path(asset.get_absolute_href() or asset.href)
        for index, meta in enumerate(described or [{}], 1):
            names = [key] if len(described) <= 1 else []
            names += [meta[k] for k in ('eo:common_name', 'common_name', 'name') if meta.get(k)]
            name = next((meta[k] for k in ('eo:common_name', 'common_name') if meta.get(k)), None)
            label = name or (key if len(described) <= 1 else meta.get('name') or f'{key}_{index}')
            bands.append(
                AssetBand(
                    key,
                    tuple(dict.fromkeys(names)),
                    BandFile(
                        path, index, label, scale=_float(meta.get('raster:scale')),
                        offset=_float(meta.get('raster:offset')),
                        nodata=_float(meta.get('raster:nodata', meta.get('nodata'))),
                    ),
                )
            )  # fmt: skip
    return bands


def item_bands(
    item: pystac.Item, source: PathLike, wanted: Sequence[str | int] | None = None
) -> list[BandFile]:
    """The bands of the scene ``item``.

    ``wanted`` selects them by asset key or common name (ignoring case); without it, every
    band of the item's data assets.

    Raises:
        InputError: no raster asset, or a wanted band matching none (the keys and common names
            available are listed).
    """
    available = asset_bands(item)
    if not available:
        keys = ', '.join(item.assets) or 'none'
        raise InputError(source, f'item {item.id!r} has no raster asset (assets: {keys})')
    if wanted is None:
        data = [b for b in available if _has_data_role(item.assets[b.key])]
        return [b.band for b in data or available]
    chosen = []
    for want in wanted:
        text = str(want).strip().lower()
        match = next((b for b in available if text in (n.lower() for n in b.names)), None)
        if match is None:
            keys = ', '.join(dict.fromkeys(b.key for b in available))
            common = ', '.join(dict.fromkeys(n for b in available for n in b.names[1:])) or 'none'
            raise InputError(
                source,
                f'item {item.id!r} has no band {want!r} (asset keys: {keys}; names: {common})',
            )
        chosen.append(match.band)
    return chosen


def stac_scenes(
    source: PathLike,
    bands: Sequence[str | int] | None = None,
    resolution: float | None = None,
) -> list[Path]:
    """One VRT per Item of the STAC document ``source`` (see :func:`item_bands`).

    Raises:
        InputError: a bad document, a bad Item, or bands that cannot share one grid.
    """
    items = load_items(source)
    if not items:
        raise InputError(source, 'no STAC Items')
    shown = location_name(source)
    return [stack_vrt(item_bands(item, shown, bands), item.id, shown, resolution) for item in items]


def _href(text: str) -> str:
    """What pystac reads: a URL as given (pathlib collapses '//'), else an absolute path."""
    name = location_name(gdal_path(text))
    if '://' in name:
        return name
    return os.path.abspath(text)


def _parquet_items(source: str) -> list[pystac.Item]:
    """Items of a STAC-GeoParquet file."""
    import pyarrow.parquet as pq
    from stac_geoparquet.arrow import stac_table_to_items

    try:
        table = pq.read_table(source)
        return [pystac.Item.from_dict(d) for d in stac_table_to_items(table)]
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(source, f'not STAC-GeoParquet ({" ".join(str(exc).split())})') from None


def _band_metadata(asset: pystac.Asset) -> list[dict[str, Any]]:
    """Per-band metadata of an asset, one dict per band.

    STAC 1.1 ``bands``, else ``eo:bands`` merged with ``raster:bands`` (``raster:`` prefixed).
    """
    fields = asset.extra_fields
    if isinstance(fields.get('bands'), list):
        return [dict(band) for band in fields['bands']]
    eo = fields.get('eo:bands') or []
    raster = fields.get('raster:bands') or []
    merged: list[dict[str, Any]] = []
    for index in range(max(len(eo), len(raster))):
        band = dict(eo[index]) if index < len(eo) else {}
        if index < len(raster):
            band.update({f'raster:{k}': v for k, v in raster[index].items()})
        merged.append(band)
    return merged


def _is_raster(asset: pystac.Asset) -> bool:
    """A raster asset: a raster media type or band metadata, and not only a preview."""
    roles = set(asset.roles or [])
    if roles and roles <= NOT_DATA:
        return False
    media = (asset.media_type or '').lower()
    if media:
        return media.startswith(RASTER_MEDIA)
    return bool(_band_metadata(asset)) or asset.href.lower().endswith(('.tif', '.tiff', '.jp2'))


def _has_data_role(asset: pystac.Asset) -> bool:
    """Whether the asset has the 'data' role (or no roles at all)."""
    return not asset.roles or 'data' in asset.roles


def _float(value: Any) -> float | None:
    """A number from the metadata, or None."""
    return None if value is None else float(value)
