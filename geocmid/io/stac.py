"""STAC output: an Item beside each prediction, and a Collection over a many-scene run.

Everything an Item says is read back from the written outputs: the label COG carries its grid,
data type, nodata, class names and colours, and the model and inputs it came from (tags written
by :mod:`geocmid.inference.outputs`). Items use the ``proj`` (code, shape, transform, bbox and the
geometry of the valid footprint, not of the raster rectangle), ``raster``, ``classification``
and ``processing`` extensions, and link their inputs as ``derived_from``. Written with pystac.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
import shapely
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterBand, RasterExtension
from rasterio.features import shapes
from rasterio.transform import Affine
from rasterio.warp import transform_geom

from geocmid.io.atomic import atomic_output

#: The processing extension (not modelled by pystac): software and lineage of the outputs.
PROCESSING_SCHEMA = 'https://stac-extensions.github.io/processing/v1.2.0/schema.json'

#: Largest side, in pixels, of the mask read to trace the valid footprint.
FOOTPRINT_PIXELS = 1024

#: COG tags naming the inputs of a prediction.
INPUT_TAGS = ('SCENE', 'BEFORE', 'AFTER')


def prediction_item(
    raster: Path,
    *,
    vector: Path | None = None,
    probabilities: Path | None = None,
    card: Mapping[str, Any] | None = None,
    source_name: Callable[[str], str] = str,
) -> pystac.Item:
    """The STAC Item describing one prediction.

    Args:
        raster: the label (or change) COG; its tags and grid describe the Item.
        vector: the GeoPackage of polygons, if written.
        probabilities: the probability COG, if written.
        card: the model card; its method, backbone and task go into ``processing:lineage``.
        source_name: how an input path from the tags is shown in ``derived_from`` links.

    Returns:
        The Item (id: the COG's file stem); asset hrefs are the files' absolute paths.
    """
    with rasterio.open(raster) as src:
        tags = src.tags()
        footprint = _footprint(src)
        epsg = src.crs.to_epsg()
        geometry = transform_geom(src.crs, 'EPSG:4326', shapely.geometry.mapping(footprint))
        bbox = list(shapely.bounds(shapely.geometry.shape(geometry)))
        item = pystac.Item(
            Path(raster).stem, geometry, bbox, datetime.now(UTC), {}, stac_extensions=[]
        )
        asset = pystac.Asset(
            str(Path(raster).absolute()), media_type=pystac.MediaType.COG,
            roles=['data'], title='Class of each pixel',
        )  # fmt: skip
        item.add_asset('labels', asset)
        projection = ProjectionExtension.ext(item, add_if_missing=True)
        projection.code = f'EPSG:{epsg}' if epsg is not None else None
        if epsg is None:
            projection.wkt2 = src.crs.to_wkt()
        projection.shape = [src.height, src.width]
        projection.transform = list(src.transform)[:6]
        projection.bbox = list(src.bounds)
        projection.geometry = shapely.geometry.mapping(footprint)
        RasterExtension.ext(asset, add_if_missing=True).bands = [
            RasterBand.create(data_type=src.dtypes[0], nodata=src.nodata)
        ]
        if card is None:
            card = _card_beside(tags.get('MODEL'))
        names = json.loads(tags.get('CLASS_NAMES', '[]'))
        colours = json.loads(tags.get('CLASS_COLORS', '[]'))
    if names:
        ClassificationExtension.ext(asset, add_if_missing=True).classes = [
            Classification.create(
                value=value, name=_slug(name), description=name,
                color_hint=_hex(colours[value]) if value < len(colours) else None,
            )
            for value, name in enumerate(names)
        ]  # fmt: skip
    if vector is not None:
        item.add_asset('polygons', pystac.Asset(
            str(Path(vector).absolute()), media_type='application/geopackage+sqlite3',
            roles=['data'], title='Class polygons',
        ))  # fmt: skip
    if probabilities is not None:
        item.add_asset('probabilities', pystac.Asset(
            str(Path(probabilities).absolute()), media_type=pystac.MediaType.COG,
            roles=['data'], title='Class probabilities',
        ))  # fmt: skip
    for tag in INPUT_TAGS:
        if tag in tags:
            item.add_link(pystac.Link('derived_from', source_name(tags[tag]), title=tag.lower()))
    item.stac_extensions.append(PROCESSING_SCHEMA)
    item.properties['processing:software'] = {'geocmid': tags.get('GEOCMID_VERSION', 'unknown')}
    item.properties['processing:lineage'] = _lineage(tags, card)
    item.properties['processing:datetime'] = pystac.utils.datetime_to_str(datetime.now(UTC))
    return item


def write_item(item: pystac.Item, path: Path, overwrite: bool = False) -> Path:
    """Write ``item`` to ``path`` atomically, with asset hrefs relative to it.

    Raises:
        InputError: ``path`` exists and ``overwrite`` is False, or cannot be written.
    """
    item = item.clone()
    item.set_self_href(str(Path(path).absolute()))
    item.make_asset_hrefs_relative()
    document = item.to_dict(include_self_link=False)
    with atomic_output(path, overwrite) as temporary:
        temporary.write_text(json.dumps(document, indent=2))
    return Path(path)


def write_collection(
    items: Sequence[Path], path: Path, identifier: str, overwrite: bool = False
) -> Path:
    """Write a ``collection.json`` whose extent covers every Item in ``items`` (files).

    Raises:
        InputError: ``path`` exists and ``overwrite`` is False, or cannot be written.
    """
    loaded = [pystac.Item.from_file(str(p)) for p in items]
    boxes = np.array([item.bbox for item in loaded])
    times = [item.datetime for item in loaded if item.datetime is not None]
    extent = pystac.Extent(
        pystac.SpatialExtent([[*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0)]]),
        pystac.TemporalExtent([[min(times), max(times)]]),
    )
    collection = pystac.Collection(
        identifier, f'geocmid predictions ({len(loaded)} scenes)', extent,
        stac_extensions=[ProjectionExtension.get_schema_uri()],
    )  # fmt: skip
    collection.set_self_href(str(Path(path).absolute()))
    for item_path in items:
        relative = os.path.relpath(Path(item_path).absolute(), Path(path).absolute().parent)
        collection.add_link(pystac.Link('item', relative, media_type=pystac.MediaType.JSON))
    document = collection.to_dict(include_self_link=False)
    with atomic_output(path, overwrite) as temporary:
        temporary.write_text(json.dumps(document, indent=2))
    return Path(path)


def _footprint(src: rasterio.io.DatasetReader) -> shapely.Geometry:
    """The valid pixels' outline in the raster's CRS, traced on a mask of bounded size."""
    scale = max(1.0, max(src.width, src.height) / FOOTPRINT_PIXELS)
    shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
    mask = src.dataset_mask(out_shape=shape)
    transform = src.transform @ Affine.scale(src.width / shape[1], src.height / shape[0])
    polygons = [
        shapely.geometry.shape(geometry)
        for geometry, value in shapes(mask, mask=mask > 0, transform=transform)
        if value > 0
    ]
    if not polygons:  # nothing valid: the raster rectangle, so the Item still has a place
        return shapely.box(*src.bounds)
    return shapely.union_all(polygons)


def _card_beside(model: str | None) -> dict[str, Any] | None:
    """The model card beside the weights file ``model``, if there is one."""
    if model is None:
        return None
    card = Path(model).with_name('model_card.json')
    try:
        return json.loads(card.read_text())
    except (OSError, ValueError):
        return None


def _lineage(tags: Mapping[str, str], card: Mapping[str, Any] | None) -> str:
    """One sentence: the model (method, backbone, weights hash) that made the outputs."""
    parts = []
    if card is not None:
        parts.append(
            f'{card.get("task", "prediction")} by a {card.get("method", "?")} '
            f'{card.get("backbone", "?")} model'
        )
    parts.append(f'weights {tags.get("MODEL", "?")} (sha256 {tags.get("MODEL_SHA256", "?")})')
    return '; '.join(parts)


def _slug(name: str) -> str:
    """A class name as the classification extension wants it (no spaces)."""
    return '_'.join(name.split()) or 'class'


def _hex(colour: Sequence[int]) -> str:
    """``[230, 25, 75]`` -> ``'E6194B'``."""
    return ''.join(f'{int(c):02X}' for c in colour[:3])
