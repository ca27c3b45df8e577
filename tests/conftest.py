"""Shared fixtures: tiny GeoTIFFs written with rasterio in tmp_path, and paths to real data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / 'sample_data'
SHARED_DATA = REPO.parent / 'shared' / 'data'


def write_geotiff(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = 'EPSG:32631',
    transform: rasterio.Affine | None = None,
    nodata: float | None = None,
    tiled: bool = False,
    blocksize: int = 256,
) -> Path:
    """Write ``data`` (C, H, W) as a GeoTIFF; ``crs=None`` writes one without a CRS."""
    if data.ndim == 2:
        data = data[None]
    count, height, width = data.shape
    profile = {
        'driver': 'GTiff',
        'height': height,
        'width': width,
        'count': count,
        'dtype': data.dtype,
        'transform': transform or from_origin(500000.0, 4000000.0, 1.0, 1.0),
    }
    if crs is not None:
        profile['crs'] = CRS.from_user_input(crs)
    if nodata is not None:
        profile['nodata'] = nodata
    if tiled:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, 'w', **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture(autouse=True, scope='session')
def _stats_outside_the_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Band-statistics sidecars go to a temporary folder, never into sample_data/."""
    mp = pytest.MonkeyPatch()
    mp.setenv('GEOCMID_STATS_DIR', str(tmp_path_factory.mktemp('stats')))
    yield
    mp.undo()


@pytest.fixture
def make_geotiff(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_geotiff('a.tif', array, crs=..., transform=..., nodata=...)``."""

    def make(name: str, data: np.ndarray, **kwargs: object) -> Path:
        return write_geotiff(tmp_path / name, data, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def shared_data() -> Path:
    """The project's real development data (../shared/data); skipped when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real development data not found at {SHARED_DATA} (../shared/data)')
    return SHARED_DATA
