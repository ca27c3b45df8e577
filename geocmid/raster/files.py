"""Finding, opening and validating rasters; band selection; validity masks; ``geocmid info``.

Every problem with an input raster is raised here as :class:`~geocmid.errors.InputError`
naming the file, the first time the file is looked at. Nothing is skipped silently (TorchGeo's
``RasterDataset`` skips unreadable files, ``docs/data.md#rasters``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from pyproj import CRS as ProjCRS
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geocmid.errors import InputError
from geocmid.raster.locations import (
    gdal_path,
    is_location,
    is_remote,
    location_name,
    remote_env,
    remote_reason,
)
from geocmid.raster.stats import BandStats, sample_windows
from geocmid.types import PathLike

type BandSelection = Sequence[int | str]

#: Extensions searched for when a folder is given (case-insensitive). Files named explicitly
#: are opened whatever their extension (ENVI, netCDF, ...). ``.vrt`` is left out of folder
#: searches because a VRT usually mosaics the very files beside it, which would then be read
#: twice; name a VRT explicitly to use it. GDAL sidecars (.aux.xml, .ovr, .msk) never match.
RASTER_SUFFIXES = ('.tif', '.tiff', '.jp2', '.img')

#: Default pixel budget per raster for ``geocmid info --stats``.
INFO_STATS_PIXELS = 2**20


def find_rasters(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """List the rasters named by ``paths``: files as given, folders searched recursively.

    Hidden files and folders (names starting with '.', such as the temporary files of an
    interrupted write) are skipped.

    Args:
        paths: one or more files or folders.

    Returns:
        Absolute paths, sorted and without duplicates.

    Raises:
        InputError: a path does not exist, or a folder holds no raster.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    found: set[Path] = set()
    for given in paths:
        if is_location(given):  # a URL or GDAL path: opened (and checked) as given
            found.add(Path(gdal_path(given)))
            continue
        path = Path(given)
        if path.is_dir():
            rasters = [
                candidate
                for candidate in path.rglob('*')
                if candidate.suffix.lower() in RASTER_SUFFIXES
                and candidate.is_file()
                and not any(part.startswith('.') for part in candidate.relative_to(path).parts)
            ]
            if not rasters:
                raise InputError(
                    path, f'no rasters found in folder (searched for {", ".join(RASTER_SUFFIXES)})'
                )
            found.update(Path(os.path.abspath(r)) for r in rasters)
        elif path.is_file():
            found.add(Path(os.path.abspath(path)))
        else:
            raise InputError(path, 'no such file or folder')
    if not found:
        raise InputError(None, 'no input rasters given')
    return sorted(found)


def open_raster(path: PathLike) -> DatasetReader:
    """Open a raster, making sure GDAL can actually read its pixels.

    Besides opening, one block at the end of the raster (all bands) is decoded: a truncated
    GeoTIFF still opens, because its header is intact, and fails only when the missing blocks
    are read, which would otherwise happen in the middle of training.

    Args:
        path: the raster file.

    Returns:
        The open dataset; the caller closes it.

    Raises:
        InputError: missing, named with bytes that are not UTF-8, not a raster GDAL can read,
            truncated or corrupt, complex-valued, or without raster bands.
    """
    if is_location(path):
        path = gdal_path(path)
    elif not Path(path).is_file():
        raise InputError(path, 'no such file')
    try:
        os.fspath(path).encode('utf-8')
    except UnicodeEncodeError:
        # GDAL takes UTF-8 names only; the name is shown with its odd bytes escaped.
        shown = os.fsencode(path).decode('utf-8', 'backslashreplace')
        raise InputError(shown, 'file name is not valid UTF-8; rename the file') from None
    try:
        with warnings.catch_warnings():
            # Missing georeferencing is the caller's call (`info` describes such rasters,
            # datasets reject them through require_georeferencing), not a warning.
            warnings.simplefilter('ignore', NotGeoreferencedWarning)
            with remote_env(path):
                src = rasterio.open(path)
    except RasterioError as exc:
        if is_remote(path):
            raise InputError(location_name(path), remote_reason(str(exc))) from None
        raise InputError(path, f'not a readable raster ({_gdal_reason(exc, path)})') from None
    try:
        if src.count == 0:
            raise InputError(path, 'has no raster bands (a container of subdatasets?)')
        if any(np.dtype(dtype).kind == 'c' for dtype in src.dtypes):
            raise InputError(path, 'has complex-valued bands; convert them to amplitude first')
        rows, cols = src.block_shapes[0]
        last = Window(
            (src.width - 1) // cols * cols,
            (src.height - 1) // rows * rows,
            src.width - (src.width - 1) // cols * cols,
            src.height - (src.height - 1) // rows * rows,
        )
        src.read(window=last)
    except RasterioError as exc:
        src.close()
        if is_remote(path):
            raise InputError(location_name(path), remote_reason(str(exc))) from None
        raise InputError(path, f'corrupt or truncated raster ({_gdal_reason(exc, path)})') from None
    except BaseException:
        src.close()
        raise
    return src


def require_georeferencing(src: DatasetReader, path: PathLike) -> None:
    """Raise unless ``src`` has a CRS and an affine geotransform.

    Raises:
        InputError: the raster has no CRS, or is placed by GCPs only, or not at all.
    """
    if src.crs is None:
        raise InputError(path, 'raster has no CRS')
    if src.transform == Affine.identity():
        if src.gcps[0]:
            raise InputError(path, 'raster is georeferenced by GCPs only; warp it with gdalwarp')
        raise InputError(path, 'raster has no geotransform')


def check_bands(
    path: PathLike,
    count: int,
    bands: BandSelection | None,
    descriptions: Sequence[str | None] = (),
) -> tuple[int, ...]:
    """Resolve a band selection to 1-based band indexes, checking it against the raster.

    Args:
        path: the raster, for error messages.
        count: its number of bands.
        bands: 1-based indexes (ints or digit strings) or band names matched against the
            band descriptions (exactly, else ignoring case); None selects every band.
        descriptions: the raster's band descriptions (``src.descriptions``).

    Returns:
        The selected band indexes, in the order given.

    Raises:
        InputError: an empty selection, an index out of range or an unknown name.
    """
    if bands is None:
        return tuple(range(1, count + 1))
    if isinstance(bands, str | int):
        bands = [bands]
    if len(bands) == 0:
        raise InputError(path, 'empty band selection')
    names = [name or '' for name in descriptions]
    indexes = []
    for band in bands:
        if isinstance(band, bool):
            raise InputError(path, f'invalid band {band!r}')
        if isinstance(band, int) or str(band).strip().isdigit():
            index = int(band)
            if not 1 <= index <= count:
                raise InputError(
                    path,
                    f'band {index} out of range: the raster has {count} band(s), numbered from 1',
                )
        elif band in names:
            index = names.index(band) + 1
        elif band.lower() in (lowered := [name.lower() for name in names]):
            index = lowered.index(band.lower()) + 1
        else:
            known = ', '.join(f'{i} {name!r}' for i, name in enumerate(names, 1) if name)
            raise InputError(path, f'no band named {band!r} (band names: {known or "none"})')
        indexes.append(index)
    return tuple(indexes)


def crs_name(crs: CRS | None) -> str:
    """'EPSG:xxxx' when the CRS has an EPSG code, else its WKT name; 'none' without a CRS."""
    if crs is None:
        return 'none'
    epsg = crs.to_epsg()
    if epsg is not None:
        return f'EPSG:{epsg}'
    return ProjCRS.from_wkt(crs.to_wkt()).name


@dataclass(frozen=True)
class ValidityRule:
    """How a raster marks pixels without data.

    A pixel is valid only where every selected band is valid (``docs/data.md#validity``).
    Validity comes from, in this order: a nodata value given by the user, the raster's nodata
    value, its GDAL mask bands (an alpha band or an internal/external mask), else every pixel
    is valid; and NaN is never valid. Warped views follow :func:`geocmid.raster.grid.validity_of`.

    Attributes:
        nodata: pixels equal to this value (NaN matches NaN) are invalid.
        masks: read GDAL's mask bands instead of comparing values.
        per_dataset: the mask is shared by all bands, so one mask read suffices.
        alpha: read this band and take its non-zero pixels as valid. Used for warped views
            (``WarpedVRT``), whose ``read_masks`` does not reflect their alpha band.
    """

    nodata: float | None = None
    masks: bool = False
    per_dataset: bool = False
    alpha: int | None = None

    @classmethod
    def of(
        cls, src: DatasetReader | WarpedVRT, indexes: Sequence[int], nodata: float | None = None
    ) -> ValidityRule:
        """The rule for reading ``indexes`` of ``src``, with an optional nodata override."""
        if nodata is not None:
            return cls(nodata=nodata)
        if src.nodata is not None:
            return cls(nodata=src.nodata)
        flags = [src.mask_flag_enums[i - 1] for i in indexes]
        if all(MaskFlags.all_valid in band for band in flags):
            return cls()
        return cls(masks=True, per_dataset=all(MaskFlags.per_dataset in band for band in flags))

    def valid(
        self,
        src: DatasetReader | WarpedVRT,
        indexes: Sequence[int],
        window: Window | None = None,
        data: np.ndarray | None = None,
    ) -> np.ndarray:
        """(H, W) bool validity of the ``indexes`` bands of ``src`` in ``window``.

        Args:
            src: the open raster (or warped view).
            indexes: the selected bands (1-based).
            window: the window read; None for the whole raster.
            data: the pixels already read from ``window``, if any, so a nodata comparison
                does not read them again; floating-point data is also invalid where NaN.

        Returns:
            True where every selected band holds data.
        """
        if self.nodata is not None:
            if data is None:
                data = src.read(list(indexes), window=window)
            if math.isnan(self.nodata):
                return ~np.isnan(data).any(axis=0)
            if self.nodata == 0 and data.dtype.kind == 'u':
                # The common case (unsigned imagery, nodata 0): some band is 0 exactly where
                # the band minimum is, and one reduction beats a comparison per band.
                return np.minimum.reduce(data) != 0
            # Band by band: cheaper than reducing a (C, H, W) comparison along its first axis.
            valid = data[0] != self.nodata
            for band in data[1:]:
                valid &= band != self.nodata
        elif self.alpha is not None:
            valid = src.read(self.alpha, window=window) > 0
        elif self.masks:
            read = indexes[:1] if self.per_dataset else indexes
            valid = src.read_masks(list(read), window=window).all(axis=0)
        elif window is None:
            valid = np.ones((src.height, src.width), dtype=bool)
        else:
            valid = np.ones((int(window.height), int(window.width)), dtype=bool)
        if data is not None and data.dtype.kind == 'f':  # NaN is never data
            valid &= ~np.isnan(data).any(axis=0)
        return valid


def alpha_band(src: DatasetReader) -> int | None:
    """Index (1-based) of the band declared as alpha, if any."""
    interpretations = list(src.colorinterp)
    if ColorInterp.alpha in interpretations:
        return interpretations.index(ColorInterp.alpha) + 1
    return None


def raster_band_stats(
    src: DatasetReader,
    indexes: Sequence[int],
    rule: ValidityRule,
    max_pixels: int,
    rng: np.random.Generator,
) -> BandStats:
    """Per-band statistics of the valid pixels of a raster, from sampled windows.

    Args:
        src: the open raster.
        indexes: bands to describe (1-based).
        rule: how invalid pixels are recognised; they are left out.
        max_pixels: pixel budget; rasters within it are read whole, giving exact statistics.
        rng: generator choosing the sampled blocks.

    Returns:
        The statistics, with ``exact`` telling whether the raster was read whole.
    """
    rows, cols = src.block_shapes[0]
    # Strip-organised rasters have one-row blocks; windows of 512 rows keep reads efficient.
    block = (rows, cols) if rows > 1 else (512, src.width)
    windows, whole = sample_windows(src.height, src.width, block, max_pixels, rng)
    total = BandStats.empty(len(indexes))
    for window in windows:
        data = src.read(list(indexes), window=window)
        valid = rule.valid(src, indexes, window, data)
        total = total.merge(BandStats.from_pixels(data, valid))
    return BandStats(total.count, total.mean, total.m2, total.minimum, total.maximum, exact=whole)


@dataclass(frozen=True)
class RasterInfo:
    """What ``geocmid info`` reports about one raster.

    Attributes:
        path: the file.
        driver: GDAL driver name.
        width: columns.
        height: rows.
        dtypes: data type per band.
        crs: 'EPSG:xxxx', else the CRS's name, or 'none'.
        res: (x, y) pixel size in CRS units; None without a geotransform.
        bounds: (left, bottom, right, top) in CRS units; None without a geotransform.
        nodata: the nodata value, if any.
        validity: how invalid pixels are marked ('nodata value', 'alpha band', ...).
        descriptions: band descriptions (None where unset).
        stats: per-band statistics of the valid pixels, when asked for.
    """

    path: Path
    driver: str
    width: int
    height: int
    dtypes: tuple[str, ...]
    crs: str
    res: tuple[float, float] | None
    bounds: tuple[float, float, float, float] | None
    nodata: float | None
    validity: str
    descriptions: tuple[str | None, ...]
    stats: BandStats | None = None

    @property
    def count(self) -> int:
        """Number of bands."""
        return len(self.dtypes)


def describe_raster(path: PathLike, stats: bool = False) -> RasterInfo:
    """Describe one raster; a raster without CRS is described, not rejected.

    Args:
        path: the raster file.
        stats: also compute per-band statistics from sampled blocks.

    Returns:
        The description.

    Raises:
        InputError: the file is missing, unreadable or corrupt.
    """
    with open_raster(path) as src:
        indexes = tuple(range(1, src.count + 1))
        rule = ValidityRule.of(src, indexes)
        georeferenced = src.transform != Affine.identity()
        if rule.nodata is not None:
            validity = 'nodata value'
        elif rule.masks:
            validity = 'mask band' if alpha_band(src) is None else 'alpha band'
        else:
            validity = 'every pixel'
        band_stats = None
        if stats:
            rng = np.random.default_rng(0)
            band_stats = raster_band_stats(src, indexes, rule, INFO_STATS_PIXELS, rng)
        return RasterInfo(
            path=Path(path),
            driver=src.driver,
            width=src.width,
            height=src.height,
            dtypes=tuple(src.dtypes),
            crs=crs_name(src.crs),
            res=src.res if georeferenced else None,
            bounds=tuple(src.bounds) if georeferenced else None,
            nodata=src.nodata,
            validity=validity,
            descriptions=tuple(src.descriptions),
            stats=band_stats,
        )


def describe_rasters(path: PathLike, stats: bool = False) -> list[RasterInfo]:
    """Describe the raster ``path``, or every raster in the folder ``path`` (recursively).

    All files are validated before anything is returned, so a corrupt file anywhere fails the
    whole call with an error naming it.

    Raises:
        InputError: a missing path, an empty folder, or a corrupt or unreadable file.
    """
    return [describe_raster(raster, stats) for raster in find_rasters(path)]


def format_info(info: RasterInfo) -> str:
    """Human-readable, multi-line description of one raster."""
    dtypes = ', '.join(dict.fromkeys(info.dtypes))
    lines = [
        str(info.path),
        f'  driver      {info.driver}',
        f'  size        {info.width} x {info.height} px, {info.count} band(s), {dtypes}',
        f'  crs         {info.crs}',
    ]
    if info.res is not None and info.bounds is not None:
        lines.append(f'  resolution  {_number(info.res[0])} x {_number(info.res[1])}')
        left, bottom, right, top = map(_number, info.bounds)
        lines.append(f'  bounds      left {left}, bottom {bottom}, right {right}, top {top}')
    else:
        lines.append('  georef      none (no geotransform)')
    nodata = 'none' if info.nodata is None else _number(info.nodata)
    lines.append(f'  nodata      {nodata} (valid pixels: {info.validity})')
    for band, description in enumerate(info.descriptions, 1):
        line = f'  band {band:<6} {description or "-"} ({info.dtypes[band - 1]})'
        if info.stats is not None:
            s = info.stats
            line += (
                f'  mean {s.mean[band - 1]:.6g}  std {s.std[band - 1]:.6g}'
                f'  min {s.minimum[band - 1]:.6g}  max {s.maximum[band - 1]:.6g}'
            )
        lines.append(line)
    if info.stats is not None:
        scope = 'all pixels' if info.stats.exact else 'sampled blocks'
        lines.append(f'  stats       {int(info.stats.count.max())} valid pixels ({scope})')
    return '\n'.join(lines)


def _number(value: float) -> str:
    """A coordinate or value without float noise (up to 12 significant digits)."""
    return f'{value:.12g}'


def _gdal_reason(exc: Exception, path: PathLike) -> str:
    """GDAL's message on one line, without the file name the InputError already shows."""
    message = ' '.join(str(exc).split())
    for spelling in {os.fspath(path), os.path.abspath(path)}:
        message = message.replace(f"'{spelling}' ", '').replace(f'{spelling}: ', '')
    return message.rstrip('.')
