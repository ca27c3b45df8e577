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

#: Band names that say what a band measures: STAC's ``eo:common_name`` vocabulary and the
#: one-letter RGB spellings. Two bands so named measure different things when the names differ;
#: other descriptions (file names, sensor metadata) say nothing comparable.
COMMON_NAMES = frozenset(
    {
        'coastal', 'blue', 'green', 'red', 'yellow', 'pan', 'rededge', 'nir', 'nir08', 'nir09',
        'cirrus', 'swir16', 'swir22', 'lwir', 'lwir11', 'lwir12', 'r', 'g', 'b',
    }
)  # fmt: skip
