"""Labels onto image grids: vector rasterisation, raster resampling, the image + mask dataset."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
from pyproj import CRS
from rasterio.transform import Affine, from_origin
from rasterio.warp import calculate_default_transform, reproject

from geocmid.datasets.geo_raster import GeoRasterDataset
from geocmid.datasets.labels import (
    IGNORE_INDEX,
    LabelledDataset,
    RasterLabels,
    VectorLabels,
    open_labels,
)
from geocmid.errors import InputError

UTM = CRS.from_epsg(32631)
ORIGIN = (500000.0, 4000000.0)  # top-left corner of the image grids below (conftest default)
GRID = from_origin(*ORIGIN, 1.0, 1.0)


def pixel_centres(transform: Affine, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.indices(shape)
    x = transform.c + (cols + 0.5) * transform.a
    y = transform.f + (rows + 0.5) * transform.e
    return x, y


def write_vector(path: Path, geometries: list, crs: str = 'EPSG:32631', **columns: list) -> Path:
    gpd.GeoDataFrame(columns, geometry=geometries, crs=crs).to_file(path)
    return path


def test_polygon_rasterised_at_pixel_centres(tmp_path: Path) -> None:
    # A triangle with slanted edges: a pixel is labelled exactly when its centre is inside.
    x0, y0 = ORIGIN
    triangle = shapely.Polygon([(x0 + 1.2, y0 - 1.1), (x0 + 13.7, y0 - 3.3), (x0 + 4.4, y0 - 14.9)])
    path = write_vector(tmp_path / 'tri.gpkg', [triangle])
    labels = VectorLabels(path, UTM)

    mask = labels.read(GRID, (16, 16))

    x, y = pixel_centres(GRID, (16, 16))
    expected = shapely.contains_xy(triangle, x, y).astype(np.int64)
    assert mask.dtype == np.int64
    assert expected.sum() > 20  # the triangle covers a real area, not a sliver
    np.testing.assert_array_equal(mask, expected)
    assert labels.class_names == ('background', 'foreground')


def test_window_offset_uses_window_grid(tmp_path: Path) -> None:
    x0, y0 = ORIGIN
    square = shapely.box(x0 + 10, y0 - 14, x0 + 14, y0 - 10)  # columns 10-13, rows 10-13
    labels = VectorLabels(write_vector(tmp_path / 'sq.gpkg', [square]), UTM)

    window = from_origin(x0 + 8, y0 - 8, 1.0, 1.0)  # a window starting at column 8, row 8
    mask = labels.read(window, (8, 8))

    expected = np.zeros((8, 8), dtype=np.int64)
    expected[2:6, 2:6] = 1
    np.testing.assert_array_equal(mask, expected)
    # A window away from every polygon is all background.
    assert labels.read(from_origin(x0 + 100, y0, 1.0, 1.0), (4, 4)).sum() == 0


def test_vectors_in_another_crs_are_reprojected(tmp_path: Path) -> None:
    x0, y0 = ORIGIN
    # Edges on whole metres stay half a pixel away from every pixel centre, so the tiny
    # curvature of a reprojected box cannot move a pixel in or out.
    square = shapely.box(x0 + 3, y0 - 9, x0 + 9, y0 - 2)
    geographic = gpd.GeoSeries([square], crs=UTM).to_crs('EPSG:4326')
    path = write_vector(tmp_path / 'wgs84.geojson', list(geographic), crs='EPSG:4326')

    mask = VectorLabels(path, UTM).read(GRID, (12, 12))

    expected = np.zeros((12, 12), dtype=np.int64)
    expected[2:9, 3:9] = 1
    np.testing.assert_array_equal(mask, expected)


def test_string_classes_map_by_sorted_name(tmp_path: Path) -> None:
    x0, y0 = ORIGIN
    shapes = [shapely.box(x0, y0 - 2, x0 + 2, y0), shapely.box(x0 + 4, y0 - 2, x0 + 6, y0)]
    path = write_vector(tmp_path / 'cls.gpkg', shapes, kind=['water', 'crop'])

    labels = VectorLabels(path, UTM, label_field='kind')
    mask = labels.read(GRID, (2, 8))

    assert labels.class_names == ('background', 'crop', 'water')
    np.testing.assert_array_equal(mask[0], [2, 2, 0, 0, 1, 1, 0, 0])

    # With explicit names, a string maps to its position in the list.
    named = VectorLabels(path, UTM, label_field='kind', class_names=['bg', 'water', 'crop'])
    np.testing.assert_array_equal(named.read(GRID, (2, 8))[0], [1, 1, 0, 0, 2, 2, 0, 0])


def test_integer_classes_are_ids(tmp_path: Path) -> None:
    x0, y0 = ORIGIN
    shapes = [shapely.box(x0, y0 - 2, x0 + 2, y0), shapely.box(x0 + 4, y0 - 2, x0 + 6, y0)]
    path = write_vector(tmp_path / 'ids.gpkg', shapes, code=[3, 1])

    labels = VectorLabels(path, UTM, label_field='code')

    assert labels.class_names == ('background', 'class_1', 'class_2', 'class_3')
    np.testing.assert_array_equal(labels.read(GRID, (2, 8))[0], [3, 3, 0, 0, 1, 1, 0, 0])


@pytest.mark.parametrize(
    ('columns', 'kwargs', 'problem'),
    [
        ({'kind': ['a']}, {'label_field': 'class'}, "no field 'class'"),
        ({'kind': [None]}, {'label_field': 'kind'}, "have no 'kind' value"),
        ({'kind': ['a']}, {'label_field': 'kind', 'class_names': ['bg', 'b']}, 'a'),
        ({'code': [7]}, {'label_field': 'code', 'class_names': ['bg', 'x']}, 'class id 7'),
        ({'code': [300]}, {'label_field': 'code'}, 'ids must lie in 0..254'),
        ({}, {'class_names': ['a', 'b', 'c']}, '2 classes, not 3'),
    ],
)
def test_bad_vector_labels(tmp_path: Path, columns: dict, kwargs: dict, problem: str) -> None:
    x0, y0 = ORIGIN
    path = write_vector(tmp_path / 'bad.gpkg', [shapely.box(x0, y0 - 2, x0 + 2, y0)], **columns)
    with pytest.raises(InputError, match=problem) as error:
        VectorLabels(path, UTM, **kwargs)
    assert str(path) in str(error.value)


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_vector_without_crs(tmp_path: Path) -> None:
    path = tmp_path / 'nocrs.shp'  # a Shapefile without .prj has no CRS
    gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1, 1)]).to_file(path)
    with pytest.raises(InputError, match='vector labels have no CRS'):
        VectorLabels(path, UTM)


def test_raster_labels_resampled_onto_image_grid(make_geotiff, tmp_path: Path) -> None:
    # Labels at 2 m whose grid is shifted by 1 m from the 1 m image grid and covers only
    # part of it; id 9 is the label raster's nodata.
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, size=(6, 5)).astype(np.uint8)
    ids[0, 0] = 9
    label_grid = from_origin(ORIGIN[0] + 1, ORIGIN[1] - 1, 2.0, 2.0)
    path = make_geotiff('labels.tif', ids, transform=label_grid, nodata=9)

    labels = RasterLabels(path, UTM)
    mask = labels.read(GRID, (16, 16))

    # Reference: for each image pixel centre, the label pixel that contains it.
    x, y = pixel_centres(GRID, (16, 16))
    col = np.floor((x - label_grid.c) / label_grid.a).astype(int)
    row = np.floor((y - label_grid.f) / label_grid.e).astype(int)
    inside = (row >= 0) & (row < 6) & (col >= 0) & (col < 5)
    expected = np.full((16, 16), IGNORE_INDEX, dtype=np.int64)
    expected[inside] = ids[row[inside], col[inside]]
    expected[expected == 9] = IGNORE_INDEX
    np.testing.assert_array_equal(mask, expected)
    assert labels.class_names == ('class_0', 'class_1', 'class_2', 'class_3')


def test_raster_labels_in_another_crs(make_geotiff) -> None:
    # A class-1 block in EPSG:32631 stored in EPSG:3857: warped back onto the UTM grid it
    # covers the same ground (its border may move by a pixel, so only the interior and the
    # far background are checked).
    ids = np.zeros((40, 40), dtype=np.uint8)
    ids[10:30, 10:30] = 1
    utm = make_geotiff('utm.tif', ids)
    with rasterio.open(utm) as src:
        transform, width, height = calculate_default_transform(
            src.crs, 'EPSG:3857', src.width, src.height, *src.bounds
        )
        warped = np.zeros((height, width), dtype=np.uint8)
        reproject(
            ids,
            warped,
            src_transform=src.transform,
            src_crs=src.crs,
            dst_transform=transform,
            dst_crs='EPSG:3857',
        )
    mercator = make_geotiff('merc.tif', warped, crs='EPSG:3857', transform=transform)

    mask = RasterLabels(mercator, UTM).read(GRID, (40, 40))

    interior = np.zeros((40, 40), dtype=bool)
    interior[12:28, 12:28] = True
    assert (mask[interior] == 1).all()
    assert (mask[:8] == 0).all() and (mask[:, :8] == 0).all()


@pytest.mark.parametrize(
    ('data', 'kwargs', 'problem'),
    [
        (np.zeros((2, 4, 4), np.uint8), {}, '1 band of class ids, not 2'),
        (np.zeros((4, 4), np.float32), {}, 'integer class ids'),
        (np.full((4, 4), 3, np.uint8), {'class_names': ['a', 'b']}, 'label id 3'),
        (np.full((4, 4), 255, np.uint8), {}, 'below 255'),
    ],
)
def test_bad_raster_labels(make_geotiff, data: np.ndarray, kwargs: dict, problem: str) -> None:
    path = make_geotiff('bad.tif', data)
    with pytest.raises(InputError, match=problem):
        RasterLabels(path, UTM, **kwargs)


def test_raster_labels_without_crs(make_geotiff) -> None:
    path = make_geotiff('nocrs.tif', np.zeros((4, 4), np.uint8), crs=None)
    with pytest.raises(InputError, match='no CRS'):
        RasterLabels(path, UTM)


def test_open_labels_dispatch(make_geotiff, tmp_path: Path) -> None:
    x0, y0 = ORIGIN
    vector = write_vector(tmp_path / 'v.geojson', [shapely.box(x0, y0 - 2, x0 + 2, y0)])
    raster = make_geotiff('r.tif', np.ones((4, 4), np.uint8))
    assert isinstance(open_labels(vector, UTM), VectorLabels)
    assert isinstance(open_labels(raster, UTM), RasterLabels)
    with pytest.raises(InputError, match='vector labels only'):
        open_labels(raster, UTM, label_field='class')
    with pytest.raises(InputError, match='not found'):
        open_labels(tmp_path / 'missing.gpkg', UTM)


def test_dataset_mask_matches_image_window(make_geotiff, tmp_path: Path) -> None:
    x0, y0 = ORIGIN
    image = np.full((2, 32, 32), 100, dtype=np.uint16)
    image[:, 20:, :4] = 0  # nodata in the lower left
    raster = make_geotiff('scene.tif', image, nodata=0)
    corners = [(x0 + 2.2, y0 - 10.4), (x0 + 20.9, y0 - 12.6), (x0 + 6.1, y0 - 30.3)]
    triangle = shapely.Polygon(corners)
    labels = VectorLabels(write_vector(tmp_path / 'tri.gpkg', [triangle]), UTM)
    images = GeoRasterDataset(raster)
    dataset = LabelledDataset(images, labels)

    # A 16 x 16 window at column 1, row 8 of the scene.
    sample = dataset[x0 + 1 : x0 + 17, y0 - 24 : y0 - 8]

    window = from_origin(x0 + 1, y0 - 8, 1.0, 1.0)
    x, y = pixel_centres(window, (16, 16))
    expected = shapely.contains_xy(triangle, x, y).astype(np.int64)
    expected[12:, :3] = IGNORE_INDEX  # scene rows 20-23, columns 1-3 are nodata
    assert sample['mask'].dtype == torch.int64
    assert sample['image'].shape == (2, 16, 16)
    np.testing.assert_array_equal(sample['mask'].numpy(), expected)
    assert (expected == 1).sum() > 30 and (expected == IGNORE_INDEX).sum() == 12
    # One copy of the georeferencing, float64, not TorchGeo's 18-long concatenation.
    assert sample['transform'].shape == (9,) and sample['transform'].dtype == torch.float64
    assert dataset.class_names == ('background', 'foreground')


def test_scene_without_labels_is_named(make_geotiff, tmp_path: Path) -> None:
    x0, y0 = ORIGIN
    make_geotiff('scenes/a.tif', np.ones((1, 16, 16), np.uint8))
    far = make_geotiff(
        'scenes/b.tif', np.ones((1, 16, 16), np.uint8), transform=from_origin(x0 + 1000, y0, 1, 1)
    )
    square = shapely.box(x0, y0 - 4, x0 + 4, y0)
    labels = VectorLabels(write_vector(tmp_path / 'l.gpkg', [square]), UTM)
    with pytest.raises(InputError, match='scene does not intersect any label') as error:
        LabelledDataset(GeoRasterDataset(tmp_path / 'scenes'), labels)
    assert str(far) in str(error.value)
