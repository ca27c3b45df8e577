"""Distances in metres versus CRS units: one conversion for ground resolution and tolerances.

A projected CRS converts with its axis unit (metres, US survey feet, ...). A geographic CRS has
no fixed scale, so a degree is taken at the length of a degree of latitude at the centre of the
data (what a pixel spans north-south; a degree of longitude is never longer).
"""

from __future__ import annotations

from pyproj import CRS as ProjCRS
from rasterio.crs import CRS

type Bounds = tuple[float, float, float, float]


def metres_per_unit(crs: CRS | ProjCRS | str, bounds: Bounds) -> float:
    """Metres in one unit of ``crs`` (a metre, a foot, a degree) around the centre of ``bounds``.

    Args:
        crs: the CRS.
        bounds: (left, bottom, right, top) of the data in ``crs``; used for geographic CRSs.
    """
    crs = ProjCRS.from_user_input(crs.to_wkt() if isinstance(crs, CRS) else crs)
    if not crs.is_geographic:
        return crs.axis_info[0].unit_conversion_factor
    lon = (bounds[0] + bounds[2]) / 2
    lat = min(max((bounds[1] + bounds[3]) / 2, -89.0), 89.0)
    geod = crs.get_geod()
    if geod is None:  # pyproj types it optional; a geographic CRS always has an ellipsoid
        raise ValueError(f'geographic CRS without an ellipsoid: {crs.name}')
    _, _, metres_per_degree = geod.inv(lon, lat - 0.5, lon, lat + 0.5)
    return metres_per_degree


def metres_to_crs_units(metres: float, crs: CRS | ProjCRS | str, bounds: Bounds) -> float:
    """A distance in metres as CRS units around the centre of ``bounds``."""
    return metres / metres_per_unit(crs, bounds)


def crs_units_to_metres(value: float, crs: CRS | ProjCRS | str, bounds: Bounds) -> float:
    """A distance in CRS units (a pixel size) in metres around the centre of ``bounds``."""
    return value * metres_per_unit(crs, bounds)
