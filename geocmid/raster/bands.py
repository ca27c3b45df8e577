"""Band names shared by every layer: the one table of RGB names."""

from __future__ import annotations

from rasterio.enums import ColorInterp

#: Names of the red, green and blue bands, in that order (what model cards record for RGB).
RGB_BAND_NAMES = ('red', 'green', 'blue')

#: Band names given by GDAL's colour interpretation, used where a band has no description.
COLOUR_NAMES = dict(
    zip((ColorInterp.red, ColorInterp.green, ColorInterp.blue), RGB_BAND_NAMES, strict=True)
)

#: Spellings (case-insensitive) of three band names that make an input RGB.
RGB_NAMES = (('r', 'g', 'b'), RGB_BAND_NAMES)

