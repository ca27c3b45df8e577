"""Polygons from a finished label raster: filtered, simplified, scored, as a GeoPackage layer."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import rasterio
import shapely
from pyproj import CRS
from rasterio.features import rasterize, shapes
from rasterio.windows import Window

from geocmid.errors import InputError
from geocmid.io.atomic import atomic_output, check_writable
from geocmid.io.cog import GDAL_CACHE_BYTES, gdal_cache_limit
from geocmid.raster.units import metres_to_crs_units

#: Columns of every polygon layer, in order, with their dtypes.
SCHEMA = {
    'class_id': 'int32',
    'class_name': 'object',
    'area_m2': 'float64',
    'mean_score': 'float64',
}

#: Rows of the probability raster read at once when scoring polygons.
_SCORE_ROWS = 512


def areas_m2(geometries: gpd.GeoSeries) -> np.ndarray:
    """Areas in square metres.

    Geographic CRSs are projected to the local UTM zone first (GeoPandas'
    ``estimate_utm_crs``); projected CRSs use their planar area in their linear unit converted
    to metres, so strongly distorted projections such as Web Mercator report planar areas.
    """
    if geometries.empty:
        return np.zeros(0)
    crs = CRS.from_user_input(geometries.crs)
    if crs.is_geographic:
        return geometries.to_crs(geometries.estimate_utm_crs()).area.to_numpy()
    factor = crs.axis_info[0].unit_conversion_factor
    return geometries.area.to_numpy() * factor**2


def _class_names(src: rasterio.io.DatasetReader, names: Sequence[str] | None) -> list[str]:
    """Class names given, or those stored by :class:`~geocmid.io.cog.PredictionWriter`."""
    if names is not None:
        return list(names)
    stored = src.tags().get('CLASS_NAMES')
    return list(json.loads(stored)) if stored else []


def _mean_scores(
    probabilities_path: Path,
    geometries: np.ndarray,
    geojson: Sequence[dict],
    class_ids: np.ndarray,
    labels: rasterio.io.DatasetReader,
) -> np.ndarray:
    """Mean probability of each polygon's class over its pixels, streamed by row blocks.

    The polygons follow pixel edges and do not overlap, so burning their indexes block by
    block gives each pixel to exactly one polygon; sums and counts are then one ``bincount``.
    ``geometries`` index the blocks; their GeoJSON twins are burnt, which rasterio converts
    several times faster than shapely objects.

    Args:
        probabilities_path: probability raster (one band per class, or P(class 1) alone).
        geometries: the pixel-exact polygons.
        geojson: the same polygons as GeoJSON mappings.
        class_ids: class of each polygon.
        labels: the open label raster, whose grid the probabilities must share.

    Returns:
        Mean probability per polygon.
    """
    with rasterio.open(probabilities_path) as src:
        if (src.crs, src.transform, src.shape) != (labels.crs, labels.transform, labels.shape):
            raise InputError(probabilities_path, 'is not on the grid of the label raster')
        scale = src.scales[0] if src.dtypes[0] == 'uint8' else 1.0
        tree = shapely.STRtree(geometries)
        sums = np.zeros(len(geometries))
        counts = np.zeros(len(geometries))
        for row in range(0, src.height, _SCORE_ROWS):
            window = Window(0, row, src.width, min(_SCORE_ROWS, src.height - row))
            transform = src.window_transform(window)
            box = shapely.box(*rasterio.windows.bounds(window, src.transform))
            hits = tree.query(box, predicate='intersects')
            if hits.size == 0:
                continue
            owner = rasterize(
                ((geojson[i], i + 1) for i in hits),
                out_shape=(int(window.height), int(window.width)),
                transform=transform, fill=0, dtype='int32',
            )  # fmt: skip
            rows, cols = np.nonzero(owner)
            polygon = owner[rows, cols] - 1
            values = src.read(window=window).astype(np.float64) * scale
            if src.count == 1:  # a binary model stores P(class 1) only
                score = values[0, rows, cols]
                score = np.where(class_ids[polygon] == 1, score, 1.0 - score)
            else:
                score = values[class_ids[polygon], rows, cols]
            sums += np.bincount(polygon, weights=score, minlength=len(geometries))
            counts += np.bincount(polygon, minlength=len(geometries))
    with np.errstate(invalid='ignore', divide='ignore'):
        return sums / counts


def _polygonal_parts(geometries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Repair with ``make_valid`` and split into non-empty polygons; also return their sources."""
    parts, source = shapely.make_valid(geometries), np.arange(len(geometries))
    while (multi := shapely.get_type_id(parts) >= 4).any():  # Multi* and GeometryCollection
        sub, index = shapely.get_parts(parts[multi], return_index=True)
        parts = np.concatenate([parts[~multi], sub])
        source = np.concatenate([source[~multi], source[multi][index]])
    keep = (shapely.get_type_id(parts) == 3) & ~shapely.is_empty(parts)  # 3: Polygon
    order = np.argsort(source[keep], kind='stable')
    return parts[keep][order], source[keep][order]


def polygonize(
    labels_path: str | os.PathLike[str],
    path: str | os.PathLike[str] | None = None,
    *,
    probabilities_path: str | os.PathLike[str] | None = None,
    class_names: Sequence[str] | None = None,
    background: int | None = 0,
    min_area: float = 0.0,
    simplify: float = 0.0,
    layer: str = 'predictions',
    overwrite: bool = False,
) -> gpd.GeoDataFrame:
    """Polygonise a finished label raster into class polygons, optionally written as a GeoPackage.

    The stitched raster is polygonised as a whole through GDAL (never tile by tile, which would
    split objects at tile borders), reading the band block by block. Pixels equal to the
    raster's nodata value are never polygonised, nor is the ``background`` class: by default
    class 0, which for geocmid's segmentation models is the background, so the layer holds the
    objects found rather than one polygon covering the rest of the scene.

    Polygons smaller than ``min_area`` (computed on the pixel-exact polygons) are dropped.
    ``simplify`` simplifies all valid polygons, background included, as one coverage with
    shapely's ``coverage_simplify``: shared edges move together, so neighbours stay gap- and
    overlap-free and holes are kept, while the coverage's outer boundary (scene edge and
    nodata) stays on the pixel edges, so no polygon moves onto nodata. Geometries are repaired
    with ``make_valid`` and split into single polygons.

    Args:
        labels_path: label raster (e.g. from :class:`~geocmid.io.cog.PredictionWriter`).
        path: GeoPackage to write (atomically, in the raster's CRS); None writes nothing.
        probabilities_path: probability raster on the same grid, for ``mean_score``.
        class_names: names by class id; default the raster's ``CLASS_NAMES`` tag.
        background: class id left out of the polygons; None keeps every class.
        min_area: smallest polygon kept, in square metres.
        simplify: simplification tolerance in metres; 0 keeps the pixel edges.
        layer: GeoPackage layer name.
        overwrite: replace an existing GeoPackage.

    Returns:
        Polygons with ``class_id``, ``class_name``, ``area_m2`` (square metres, in the local
        UTM zone for geographic CRSs) and ``mean_score`` (mean probability of the polygon's
        class over its pixels; NaN without probabilities), in the raster's CRS.
    """
    if path is not None:
        check_writable(path, overwrite)
    if min_area < 0 or simplify < 0:
        raise InputError(
            None, f'min_area and simplify must not be negative, got {min_area} and {simplify}'
        )
    with gdal_cache_limit(GDAL_CACHE_BYTES), rasterio.open(labels_path) as src:
        if src.crs is None:
            raise InputError(labels_path, 'raster has no CRS')
        names = _class_names(src, class_names)
        nodata = src.nodata
        crs = CRS.from_user_input(src.crs)
        # With simplification the whole valid coverage is needed, background included.
        features = [
            (geometry, int(value))
            for geometry, value in shapes(rasterio.band(src, 1), transform=src.transform)
            if value != nodata and (simplify > 0 or value != background)
        ]
        geometries = np.array([shapely.geometry.shape(g) for g, _ in features], dtype=object)
        class_ids = np.array([v for _, v in features], dtype=np.int32)
        keep = areas_m2(gpd.GeoSeries(geometries, crs=crs)) >= min_area
        if background is not None:
            keep &= class_ids != background
        scores = np.full(len(geometries), np.nan)
        if probabilities_path is not None and keep.any():
            kept = np.flatnonzero(keep)
            raw = [features[i][0] for i in kept]
            scores[kept] = _mean_scores(
                Path(probabilities_path), geometries[kept], raw, class_ids[kept], src
            )
        if simplify > 0 and geometries.size:
            # The outer boundary of the valid coverage (scene edge, nodata) stays fixed, so no
            # polygon can move onto nodata; inner edges move together, so no gap or overlap.
            tolerance = metres_to_crs_units(simplify, crs, tuple(src.bounds))
            geometries = shapely.coverage_simplify(geometries, tolerance, simplify_boundary=False)
        geometries, class_ids, scores = geometries[keep], class_ids[keep], scores[keep]
    parts, source = _polygonal_parts(geometries)
    frame = gpd.GeoDataFrame(
        {
            'class_id': class_ids[source].astype(SCHEMA['class_id']),
            'class_name': [names[c] if c < len(names) else f'class_{c}' for c in class_ids[source]],
            'area_m2': np.zeros(len(parts)),
            'mean_score': scores[source],
        },
        geometry=gpd.GeoSeries(parts, crs=crs),
    )
    frame['area_m2'] = areas_m2(frame.geometry)
    frame = frame.astype(SCHEMA)
    if path is not None:
        with atomic_output(path, overwrite) as temporary:
            pyogrio.write_dataframe(
                frame, temporary, layer=layer, driver='GPKG', geometry_type='Polygon'
            )
    return frame
