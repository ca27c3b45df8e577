"""Polygonising finished label rasters into GeoPackages."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.features import shapes
from rasterio.transform import from_origin

from geocmid.errors import InputError
from geocmid.io.cog import PROBABILITY_SCALE
from geocmid.io.vectors import SCHEMA, polygonize

NAMES = ['background', 'building', 'tree']
UTM = from_origin(500000.0, 4000000.0, 2.0, 2.0)


def label_raster(
    make_geotiff: Callable[..., Path], name: str = 'labels.tif', **kwargs: object
) -> Path:
    """40 x 50 labels at 2 m: a building square, a tree block beside it, a nodata strip."""
    labels = np.zeros((40, 50), 'uint8')
    labels[5:15, 5:15] = 1  # 10 x 10 px = 400 m2
    labels[5:15, 15:25] = 2  # shares an edge with the building
    labels[30:32, 40:42] = 1  # 2 x 2 px = 16 m2
    labels[20:40, 0:10] = 255  # nodata
    labels[25:28, 10:20] = 2  # touches the nodata strip
    kwargs.setdefault('transform', UTM)
    path = make_geotiff(name, labels, nodata=255, **kwargs)
    with rasterio.open(path, 'r+') as dst:
        dst.update_tags(CLASS_NAMES='["background", "building", "tree"]')
    return path


def nodata_area(path: Path) -> shapely.Geometry:
    with rasterio.open(path) as src:
        polygons = shapes(src.read(1), transform=src.transform)
        return shapely.union_all([shapely.geometry.shape(g) for g, v in polygons if v == 255])


def test_polygons_attributes_and_geopackage(
    make_geotiff: Callable[..., Path], tmp_path: Path
) -> None:
    labels = label_raster(make_geotiff)
    gpkg = tmp_path / 'out.gpkg'
    frame = polygonize(labels, gpkg, layer='segments')
    expected = [(1, 16.0), (1, 400.0), (2, 120.0), (2, 400.0)]
    assert sorted(zip(frame.class_id, frame.area_m2, strict=True)) == expected
    assert set(frame.class_name) == {'building', 'tree'}
    assert frame.geometry.is_valid.all() and (frame.geom_type == 'Polygon').all()
    assert frame.mean_score.isna().all()  # no probability raster given
    assert pyogrio.list_layers(gpkg).tolist() == [['segments', 'Polygon']]
    written = pyogrio.read_dataframe(gpkg, layer='segments')
    with rasterio.open(labels) as src:
        assert written.crs == src.crs
    assert list(written.columns) == [*SCHEMA, 'geometry']
    assert sorted(written.area_m2) == sorted(frame.area_m2)
    assert not any(p.name.startswith('.') for p in tmp_path.iterdir())


def test_no_polygon_over_nodata_or_background(make_geotiff: Callable[..., Path]) -> None:
    labels = label_raster(make_geotiff)
    frame = polygonize(labels)
    assert frame.geometry.intersection(nodata_area(labels)).area.max() == 0
    everything = polygonize(labels, background=None)
    assert sorted(set(everything.class_id)) == [0, 1, 2]
    assert everything.geometry.intersection(nodata_area(labels)).area.max() == 0
    # Labels and nodata tile the scene: 40 x 50 px of 4 m2 minus the 20 x 10 px nodata strip.
    assert everything.area_m2.sum() == pytest.approx((40 * 50 - 200) * 4)


def test_min_area_drops_small_polygons(make_geotiff: Callable[..., Path]) -> None:
    frame = polygonize(label_raster(make_geotiff), min_area=100)
    assert sorted(frame.area_m2) == [120.0, 400.0, 400.0]


def test_mean_score_is_the_mean_class_probability(make_geotiff: Callable[..., Path]) -> None:
    labels = label_raster(make_geotiff)
    rng = np.random.default_rng(0)
    quantised = rng.integers(0, 255, (3, 40, 50)).astype('uint8')
    quantised[:, 20:40, 0:10] = 255
    probabilities = make_geotiff('p.tif', quantised, transform=UTM, nodata=255)
    with rasterio.open(probabilities, 'r+') as dst:
        dst.scales = (PROBABILITY_SCALE,) * 3
    frame = polygonize(labels, probabilities_path=probabilities)
    with rasterio.open(labels) as src:
        ids = src.read(1)
    building = frame[(frame.class_id == 1) & (frame.area_m2 == 400)].mean_score.item()
    total = sum(int(quantised[1, r, c]) for r in range(5, 15) for c in range(5, 15))
    assert building == pytest.approx(total / 100 / 254)
    tree = frame[(frame.class_id == 2) & (frame.area_m2 == 120)].mean_score.item()
    assert tree == pytest.approx(quantised[2, 25:28, 10:20].mean() / 254)
    assert (ids[25:28, 10:20] == 2).all()


def test_binary_probabilities_score_both_classes(make_geotiff: Callable[..., Path]) -> None:
    labels = np.zeros((10, 10), 'uint8')
    labels[:, 5:] = 1
    path = make_geotiff('labels.tif', labels, transform=UTM, nodata=255)
    p = np.full((1, 10, 10), 0.8, 'float32')
    p[:, :, :5] = 0.1
    probabilities = make_geotiff('p.tif', p, transform=UTM)
    frame = polygonize(path, probabilities_path=probabilities, background=None)
    frame = frame.sort_values('class_id')
    np.testing.assert_allclose(frame.mean_score, [0.9, 0.8], rtol=1e-6)


def test_simplify_keeps_coverage_inside_valid_data(make_geotiff: Callable[..., Path]) -> None:
    yy, xx = np.mgrid[0:60, 0:60]
    disc = (xx - 30) ** 2 + (yy - 30) ** 2 < 400
    labels = np.where(disc, 1, 2).astype('uint8')  # a disc in a field
    labels[(xx + yy) < 25] = 255  # a diagonal nodata corner: a staircase edge
    path = make_geotiff('labels.tif', labels, transform=UTM, nodata=255)
    raw = polygonize(path, background=None).sort_values('class_id')
    simple = polygonize(path, background=None, simplify=3.0).sort_values('class_id')
    raw_counts = shapely.get_num_coordinates(raw.geometry.values)
    simple_counts = shapely.get_num_coordinates(simple.geometry.values)
    assert simple_counts[0] < raw_counts[0] / 3  # the disc, all inner edges, is simplified
    assert simple_counts[1] < raw_counts[1]
    assert simple.geometry.is_valid.all()
    # The edge with nodata stays on the pixel edges: not even a sliver over nodata.
    assert simple.geometry.intersection(nodata_area(path)).area.max() == 0
    assert simple.geometry.union_all().area == pytest.approx(raw.geometry.union_all().area)
    disc, field = (simple[simple.class_id == c].geometry.union_all() for c in (1, 2))
    assert disc.intersection(field).area < 1e-6  # neighbours do not overlap
    assert disc.area == pytest.approx(math.pi * 20**2 * 4, rel=0.05)  # ~ a circle of 20 px at 2 m


def test_geographic_areas_in_square_metres(make_geotiff: Callable[..., Path]) -> None:
    labels = np.zeros((20, 20), 'uint8')
    labels[5:15, 5:15] = 1
    utm = polygonize(make_geotiff('utm.tif', labels, transform=UTM, crs='EPSG:32631'))
    # The same 20 m x 20 m pixels near 36.1 N, 3 E in degrees.
    lat = 36.13
    dlat, dlon = 20 / 110_950, 20 / (111_320 * math.cos(math.radians(lat)))
    transform = from_origin(3.0, lat, dlon, dlat)
    geo = polygonize(make_geotiff('geo.tif', labels, transform=transform, crs='EPSG:4326'))
    assert utm.area_m2.item() == 100 * 4
    assert geo.area_m2.item() == pytest.approx(100 * 400, rel=0.01)
    assert geo.crs.to_epsg() == 4326


def test_empty_result_writes_an_empty_layer(
    make_geotiff: Callable[..., Path], tmp_path: Path
) -> None:
    path = make_geotiff('labels.tif', np.zeros((8, 8), 'uint8'), transform=UTM, nodata=255)
    gpkg = tmp_path / 'empty.gpkg'
    frame = polygonize(path, gpkg)
    assert frame.empty and list(frame.columns) == [*SCHEMA, 'geometry']
    written = pyogrio.read_dataframe(gpkg)
    assert written.empty and list(written.columns) == [*SCHEMA, 'geometry']
    assert pyogrio.read_info(gpkg)['geometry_type'] == 'Polygon'


def test_existing_geopackage_is_refused(make_geotiff: Callable[..., Path], tmp_path: Path) -> None:
    gpkg = tmp_path / 'out.gpkg'
    gpkg.write_bytes(b'old')
    labels = label_raster(make_geotiff)
    with pytest.raises(InputError, match='out.gpkg: exists; use --overwrite'):
        polygonize(labels, gpkg)
    assert gpkg.read_bytes() == b'old'
    assert len(polygonize(labels, gpkg, overwrite=True)) == 4
