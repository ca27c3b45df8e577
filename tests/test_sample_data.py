"""Checks on the real data shipped in sample_data/ and on its provenance."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import SAMPLE_DATA
from shapely.geometry import box

from geocmid.raster.stats import SIDECAR_NAME

NAIP = sorted((SAMPLE_DATA / 'naip').glob('naip_*.tif'))
LANDSAT = SAMPLE_DATA / 'landsat' / 'RGB.byte.tif'
S2_PATCH = SAMPLE_DATA / 'sentinel2' / 'S2A_MSIL2A_20170617T113321_36_85'
SPACENET = SAMPLE_DATA / 'spacenet'
S2_RESOLUTIONS = {
    'B01': 60, 'B02': 10, 'B03': 10, 'B04': 10, 'B05': 20, 'B06': 20,
    'B07': 20, 'B08': 10, 'B8A': 20, 'B09': 60, 'B11': 20, 'B12': 20,
}  # fmt: skip


def shipped_files() -> list[Path]:
    """Every file in sample_data/, caches excluded."""
    return sorted(
        path
        for path in SAMPLE_DATA.rglob('*')
        if path.is_file() and '__pycache__' not in path.parts and path.name != SIDECAR_NAME
    )


def test_total_size_at_most_5_mb() -> None:
    assert sum(path.stat().st_size for path in shipped_files()) <= 5 * 1024 * 1024


def test_sources_mentions_every_file() -> None:
    sources = (SAMPLE_DATA / 'SOURCES.md').read_text()
    others = [path.name for path in shipped_files() if path.name != 'SOURCES.md']
    assert [name for name in others if name not in sources] == []
    for licence in ('Public domain', 'CC0', 'CDLA-Permissive-1.0', 'CC BY-SA 4.0'):
        assert licence in sources


def test_naip_dates_share_a_footprint_on_their_own_grids() -> None:
    assert len(NAIP) >= 2
    footprints = []
    transforms = []
    for path in NAIP:
        with rasterio.open(path) as src:
            assert src.crs.to_epsg() == 26914
            assert src.count == 4
            assert src.dtypes == ('uint8',) * 4
            assert src.nodata == 0
            assert src.res == (5.0, 5.0)
            assert src.read_masks(1).all()
            footprints.append(box(*src.bounds))
            transforms.append(src.transform)
    assert len(set(transforms)) == len(transforms)  # each date keeps its own grid
    for first, second in pairwise(footprints):
        assert first.intersection(second).area / first.area > 0.9


def test_naip_dates_differ_on_the_ground() -> None:
    # A real change pair: the first and last dates are not the same image.
    with rasterio.open(NAIP[0]) as first, rasterio.open(NAIP[-1]) as last:
        difference = np.abs(first.read().astype(int) - last.read().astype(int))
    assert difference.mean() > 10


def test_landsat_corner_keeps_nodata_collar_and_valid_pixels() -> None:
    with rasterio.open(LANDSAT) as src:
        assert src.crs.to_epsg() == 32618
        assert src.count == 3
        assert src.nodata == 0
        valid = src.dataset_mask() > 0
    assert 0.05 < valid.mean() < 0.95


def test_sentinel2_patch_keeps_bands_at_native_resolutions() -> None:
    bands = sorted(S2_PATCH.glob('*.tif'))
    assert {path.stem.rsplit('_', 1)[1] for path in bands} == set(S2_RESOLUTIONS)
    extents = set()
    for path in bands:
        with rasterio.open(path) as src:
            resolution = S2_RESOLUTIONS[path.stem.rsplit('_', 1)[1]]
            assert src.crs.to_epsg() == 32629
            assert src.count == 1
            assert src.dtypes == ('uint16',)
            assert src.res == (resolution, resolution)
            assert src.width == 1200 // resolution
            extents.add(tuple(src.bounds))
    assert len(extents) == 1
    labels = json.loads(next(S2_PATCH.glob('*_labels_metadata.json')).read_text())
    assert labels['labels'] == ['Non-irrigated arable land', 'Pastures']


def test_spacenet_footprints_lie_on_the_tile_with_attributes() -> None:
    with rasterio.open(SPACENET / 'buildings.tif') as src:
        assert src.crs.to_epsg() == 32616
        assert (src.count, src.dtypes[0], src.res) == (1, 'uint16', (0.5, 0.5))
        tile = box(*src.bounds)
    footprints = gpd.read_file(SPACENET / 'buildings.geojson')
    assert footprints.crs.to_epsg() == 32616
    assert len(footprints) > 10
    assert set(footprints.geom_type) <= {'Polygon', 'MultiPolygon'}
    assert footprints.within(tile.buffer(1e-6)).all()
    assert {'building', 'osm_id'} <= set(footprints.columns)
    assert 'CC BY-SA 4.0' in (SPACENET / 'LICENSE.md').read_text()


def test_make_samples_recreates_sample_data(shared_data: Path, tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(SAMPLE_DATA / 'make_samples.py'), '--source', str(shared_data),
         '--out', str(tmp_path)],
        check=True,
    )  # fmt: skip
    for path in shipped_files():
        relative = path.relative_to(SAMPLE_DATA)
        if relative.name == 'make_samples.py':
            continue
        made = tmp_path / relative
        if path.suffix == '.tif':
            with rasterio.open(path) as shipped, rasterio.open(made) as remade:
                assert shipped.profile == remade.profile
                np.testing.assert_array_equal(shipped.read(), remade.read())
        elif path.suffix == '.geojson':
            shipped_frame, remade_frame = gpd.read_file(path), gpd.read_file(made)
            assert shipped_frame.geom_equals(remade_frame).all()
            assert shipped_frame.drop(columns='geometry').equals(
                remade_frame.drop(columns='geometry')
            )
        else:
            assert path.read_bytes() == made.read_bytes(), relative


def test_naip_crops_start_on_a_node_of_their_source_grid(shared_data: Path) -> None:
    sources = {path.stem[-8:-4]: path for path in (shared_data / 'naip').glob('*.tif')}
    for path in NAIP:
        with rasterio.open(path) as crop, rasterio.open(sources[path.stem[-4:]]) as source:
            col, row = ~source.transform @ (crop.bounds.left, crop.bounds.top)
            assert (col, row) == pytest.approx((round(col), round(row)), abs=1e-6)
            assert crop.res == source.res
