"""Re-create every file in sample_data/ from the project's real development data.

Usage, from the repository root::

    .venv/bin/python sample_data/make_samples.py --overwrite     # reads ../shared/data
    .venv/bin/python sample_data/make_samples.py --source DIR --out DIR

Rasters are cut on their own native grid (never resampled) and rewritten as DEFLATE GeoTIFFs
with a horizontal-differencing predictor, tiled 256 where both sides are at least 256 px.
Windows are chosen by map coordinates, so the NAIP dates (whose grids are offset from each
other by up to a pixel) cover the same ground. SOURCES.md is written last, from the windows
actually cut, so the provenance table cannot drift from the files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import rasterio
from rasterio.windows import Window
from shapely.geometry import box

from geocmid.io.atomic import atomic_output

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent / 'shared' / 'data'

#: Sub-folders and files this script owns inside the output folder.
GENERATED = ('naip', 'landsat', 'sentinel2', 'spacenet', 'SOURCES.md')

#: NAIP dates shipped (the source holds 10), and the ground window cut from each: upper-left
#: corner in EPSG:26914 metres and size in pixels. The window holds lakes that grew between
#: 2012 and 2020 and fields that changed crop, so the dates also form a real change pair.
NAIP_DATES = ('20120731', '20160816', '20200831')
NAIP_CORNER = (488400.0, 5207745.0)
NAIP_SIZE = 400

#: Upper-left corner of RGB.byte.tif: the rotated footprint leaves a nodata collar there.
LANDSAT_WINDOW = Window(0, 0, 320, 320)

#: One BigEarthNet Sentinel-2 patch, all 12 bands at their native 10/20/60 m.
S2_PATCH = 'S2A_MSIL2A_20170617T113321_36_85'

#: Upper-left part of the SpaceNet tile: 19 of its 43 buildings, two cut by the crop edge.
SPACENET_WINDOW = Window(0, 0, 512, 512)

# The colour interpretation stays as in the source (gray, undefined x 3): marking the bands
# red, green, blue makes GDAL write the fourth (NIR) as an alpha band.
NAIP_BANDS = ('red', 'green', 'blue', 'nir')

SPACENET_ATTRIBUTION = (
    'SpaceNet sample data (SpaceNet on AWS, https://spacenet.ai), as distributed in the '
    'CosmiQ Works solaris test data (GitHub CosmiQ/solaris @ '
    '5315390942e05e919555088361bd3df42d4f5a18, solaris/data/). Cropped, and the footprints '
    'clipped to the crop, by the geocmid authors; the cropped files are shared under the same '
    'licence (CC BY-SA 4.0). The footprint attributes include OSM fields (osm_id): where '
    'footprints come from OpenStreetMap, (c) OpenStreetMap contributors.'
)

LICENCES = {
    'naip': (
        'Public domain (USDA Farm Service Agency, National Agriculture Imagery Program). '
        'Obtained through GitHub opengeos/data @ 6d9ff544d3adcf4d87bcd694068f4b510a0fdf27, '
        'naip/ (repository MIT), which resampled the 1 m NAIP quarter quad to 5 m.'
    ),
    'landsat': (
        'CC0 1.0 (rasterio test data, tests/data/RGB.byte.tif); derived from Landsat 7 '
        'imagery, public domain (USGS).'
    ),
    'sentinel2': (
        'CDLA-Permissive-1.0 (BigEarthNet, https://bigearth.net; licence text: '
        'https://cdla.dev/permissive-1-0/). Contains modified Copernicus Sentinel data 2017. '
        'Cite: G. Sumbul, M. Charfuelan, B. Demir, V. Markl, "BigEarthNet: A Large-Scale '
        'Benchmark Archive for Remote Sensing Image Understanding", IGARSS 2019.'
    ),
    'spacenet': (
        'CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). '
        f'Attribution: {SPACENET_ATTRIBUTION}'
    ),
}


@dataclass(frozen=True)
class Record:
    """Provenance of one shipped file, one row of SOURCES.md."""

    path: str
    source: str
    window: str
    bounds: str
    crs: str
    licence: str


def format_bounds(left: float, bottom: float, right: float, top: float) -> str:
    """Map bounds as ``left, bottom, right, top`` with no float noise."""
    return ', '.join(f'{value:.2f}'.rstrip('0').rstrip('.') for value in (left, bottom, right, top))


def cut_raster(
    source: Path,
    target: Path,
    window: Window | None,
    licence: str,
    source_root: Path,
    descriptions: tuple[str, ...] | None = None,
) -> Record:
    """Copy ``window`` of ``source`` (``None``: all of it) to a compressed GeoTIFF ``target``."""
    with rasterio.open(source) as src:
        window = window or Window(0, 0, src.width, src.height)
        data = src.read(window=window)
        transform = src.window_transform(window)
        profile = {
            'driver': 'GTiff',
            'width': int(window.width),
            'height': int(window.height),
            'count': src.count,
            'dtype': src.dtypes[0],
            'crs': src.crs,
            'transform': transform,
            'nodata': src.nodata,
            'compress': 'deflate',
            'predictor': 2,
            'zlevel': 9,
        }
        if window.width >= 256 and window.height >= 256:
            profile.update(tiled=True, blockxsize=256, blockysize=256)
        bounds = src.window_bounds(window)
        area_or_point = src.tags().get('AREA_OR_POINT', 'Area')
        colorinterp = src.colorinterp
        crs = src.crs.to_string()

    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target, overwrite=True) as temporary:
        with rasterio.open(temporary, 'w', **profile) as dst:
            dst.write(data)
            dst.update_tags(AREA_OR_POINT=area_or_point)
            dst.colorinterp = colorinterp
            for band, description in enumerate(descriptions or (), start=1):
                dst.set_band_description(band, description)
    return Record(
        path=target.name,
        source=source.relative_to(source_root).as_posix(),
        window=(f'col {window.col_off}, row {window.row_off}, {window.width} x {window.height} px'),
        bounds=format_bounds(*bounds),
        crs=crs,
        licence=licence,
    )


def naip_window(path: Path) -> Window:
    """The NAIP_SIZE window whose upper-left corner is the grid node nearest NAIP_CORNER.

    Each date keeps its own grid: the corner snaps to that grid, so the dates differ on the
    ground by less than half a pixel instead of by the grids' one-row offset.
    """
    with rasterio.open(path) as src:
        col, row = ~src.transform @ NAIP_CORNER
    return Window(round(col), round(row), NAIP_SIZE, NAIP_SIZE)


def make_naip(source_root: Path, out: Path) -> list[Record]:
    """Cut the same ground window from each shipped NAIP date."""
    records = []
    for date in NAIP_DATES:
        source = source_root / 'naip' / f'm_4709963_se_14_1_{date}.tif'
        target = out / 'naip' / f'naip_{date[:4]}.tif'
        window = naip_window(source)
        records.append(cut_raster(source, target, window, 'naip', source_root, NAIP_BANDS))
    return records


def make_landsat(source_root: Path, out: Path) -> list[Record]:
    """Cut the upper-left corner of RGB.byte.tif, nodata collar included."""
    source = source_root / 'landsat' / 'RGB.byte.tif'
    target = out / 'landsat' / 'RGB.byte.tif'
    return [cut_raster(source, target, LANDSAT_WINDOW, 'landsat', source_root)]


def make_sentinel2(source_root: Path, out: Path) -> list[Record]:
    """Copy one BigEarthNet patch: every band file at its native resolution, and its labels."""
    patch = source_root / 'sentinel' / 'bigearthnet-s2' / S2_PATCH
    target_dir = out / 'sentinel2' / S2_PATCH
    records = []
    for source in sorted(patch.glob('*.tif')):
        band = source.stem.rsplit('_', 1)[1]
        records.append(
            cut_raster(source, target_dir / source.name, None, 'sentinel2', source_root, (band,))
        )
    labels = patch / f'{S2_PATCH}_labels_metadata.json'
    metadata = json.loads(labels.read_text())
    with atomic_output(target_dir / labels.name, overwrite=True) as temporary:
        shutil.copyfile(labels, temporary)
    records.append(
        Record(
            path=labels.name,
            source=labels.relative_to(source_root).as_posix(),
            window='copied unchanged (labels: ' + '; '.join(metadata['labels']) + ')',
            bounds=format_bounds(
                metadata['coordinates']['ulx'],
                metadata['coordinates']['lry'],
                metadata['coordinates']['lrx'],
                metadata['coordinates']['uly'],
            ),
            crs=records[0].crs,
            licence='sentinel2',
        )
    )
    return records


def make_spacenet(source_root: Path, out: Path) -> list[Record]:
    """Cut the SpaceNet tile and clip its building footprints to the cut, keeping attributes."""
    folder = source_root / 'spacenet' / 'buildings'
    target_dir = out / 'spacenet'
    image = cut_raster(
        folder / 'sample_geotiff.tif',
        target_dir / 'buildings.tif',
        SPACENET_WINDOW,
        'spacenet',
        source_root,
    )
    labels_source = folder / 'geotiff_labels.geojson'
    footprints = gpd.read_file(labels_source)
    with rasterio.open(target_dir / 'buildings.tif') as cut:
        extent = box(*cut.bounds)
    # keep_geom_type drops the points and lines left where a footprint only touches the edge.
    clipped = gpd.clip(footprints, extent, keep_geom_type=True).sort_index()
    target = target_dir / 'buildings.geojson'
    with atomic_output(target, overwrite=True) as temporary:
        clipped.to_file(temporary, driver='GeoJSON', engine='pyogrio')
    labels = Record(
        path=target.name,
        source=labels_source.relative_to(source_root).as_posix(),
        window=f'{len(clipped)} of {len(footprints)} footprints, clipped to the image crop',
        bounds=image.bounds,
        crs=clipped.crs.to_string(),
        licence='spacenet',
    )
    with atomic_output(target_dir / 'LICENSE.md', overwrite=True) as temporary:
        temporary.write_text(spacenet_notice())
    return [image, labels]


def spacenet_notice() -> str:
    """The licence note that travels next to the SpaceNet files."""
    return (
        '# Licence of the files in this folder\n\n'
        'buildings.tif and buildings.geojson are licensed under the Creative Commons '
        'Attribution-ShareAlike 4.0 International licence (CC BY-SA 4.0), '
        'https://creativecommons.org/licenses/by-sa/4.0/. They are NOT covered by the '
        "project's MIT licence.\n\n"
        f'Attribution: {SPACENET_ATTRIBUTION}\n\n'
        'Changes: the 900 x 900 px tile sample_geotiff.tif was cropped to its upper-left '
        f'{SPACENET_WINDOW.width} x {SPACENET_WINDOW.height} px and recompressed; '
        'geotiff_labels.geojson was clipped to that crop. '
        'See ../SOURCES.md for the exact window.\n'
    )


def render_sources(groups: dict[str, list[Record]]) -> str:
    """SOURCES.md: one table per folder, then the licence and attribution of each."""
    lines = [
        '# Sources of sample_data/',
        '',
        "Every file here is a crop (or an unchanged copy) of real imagery from the project's",
        'development data, re-created exactly by `python sample_data/make_samples.py --overwrite`.',
        "Crops are cut on each file's native grid, never resampled, and rewritten as DEFLATE",
        'GeoTIFFs (predictor 2, tiled 256 where both sides are >= 256 px). Windows are in pixels',
        "of the source file; bounds are left, bottom, right, top in the file's CRS (metres).",
        'A licence that asks for a notice beside the files gets one: `spacenet/LICENSE.md`.',
        '',
    ]
    for folder, records in groups.items():
        lines += [
            f'## {folder}/',
            '',
            '| file | source (under shared/data/) | crop window | bounds | CRS |',
            '|---|---|---|---|---|',
        ]
        for record in records:
            lines.append(
                f'| `{record.path}` | `{record.source}` | {record.window} | {record.bounds} '
                f'| {record.crs} |'
            )
        lines += ['', f'Licence and attribution: {LICENCES[records[0].licence]}', '']
    return '\n'.join(lines)


def main() -> None:
    """Parse the command line and write every sample file."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--source', type=Path, default=DEFAULT_SOURCE, help='shared/data folder')
    parser.add_argument('--out', type=Path, default=HERE, help='output folder')
    parser.add_argument('--overwrite', action='store_true', help='replace existing samples')
    args = parser.parse_args()
    source_root, out = args.source.resolve(), args.out.resolve()
    existing = [name for name in GENERATED if (out / name).exists()]
    if existing and not args.overwrite:
        parser.error(f'{out}: {", ".join(existing)} already exist; pass --overwrite to replace')
    for name in existing:
        if (out / name).is_dir():
            shutil.rmtree(out / name)

    groups = {
        'naip': make_naip(source_root, out),
        'landsat': make_landsat(source_root, out),
        f'sentinel2/{S2_PATCH}': make_sentinel2(source_root, out),
        'spacenet': make_spacenet(source_root, out),
    }
    with atomic_output(out / 'SOURCES.md', overwrite=True) as temporary:
        temporary.write_text(render_sources(groups))


if __name__ == '__main__':
    main()
