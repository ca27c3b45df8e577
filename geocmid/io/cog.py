"""Cloud-Optimized GeoTIFF outputs: streamed label and probability rasters, and COG validation.

GDAL's COG driver only creates files by copy, so finished rows are streamed into a temporary
tiled GeoTIFF beside the target, which is then copied to a COG (DEFLATE, 512 px blocks,
internal overviews) under a hidden name and renamed into place (:mod:`geocmid.io.atomic`).

Labels are uint8 with nodata 255 while class ids fit below it (up to 255 classes) and uint16
with nodata 65535 beyond; they carry a colour table (the nodata entry transparent), the class
names as metadata (``CLASS_NAMES``, ``CLASS_COLORS``) and, for GIS software, as category
names and a raster attribute table in a ``.aux.xml`` sidecar. Probabilities are one band per
class named after it, uint8 ``round(p * 254)`` with scale 1/254 and nodata 255, or float32
with nodata NaN.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, Self

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.env import get_gdal_config, set_gdal_config
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geocmid.errors import InputError
from geocmid.io.atomic import atomic_output, check_writable, partial_path
from geocmid.io.cards import ClassInfo

#: Scale of uint8-quantised probabilities: stored value v means probability v / 254.
PROBABILITY_SCALE = 1 / 254
#: Nodata of uint8-quantised probabilities.
PROBABILITY_NODATA = 255
#: GDAL block cache while streaming and converting. GDAL keeps every block it writes or reads
#: until the cache is full (by default 5 % of RAM), so without a cap the resident memory would
#: grow with the scene.
GDAL_CACHE_BYTES = 32 * 2**20
#: Block size of the temporary stream file and of the COG.
STREAM_BLOCKSIZE = 256
COG_BLOCKSIZE = 512

_PALETTE = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
)  # fmt: skip


class GridLike(Protocol):
    """A raster grid: open rasterio datasets and inference readers have these attributes."""

    @property
    def crs(self) -> CRS: ...  # noqa: D102

    @property
    def transform(self) -> Affine: ...  # noqa: D102

    @property
    def width(self) -> int: ...  # noqa: D102

    @property
    def height(self) -> int: ...  # noqa: D102


def label_encoding(num_classes: int) -> tuple[str, int]:
    """Label dtype and nodata value for ``num_classes`` classes (ids ``0 .. num_classes - 1``).

    Raises:
        InputError: more classes than uint16 can hold beside its nodata value.
    """
    if num_classes <= 255:
        return 'uint8', 255
    if num_classes <= 65535:
        return 'uint16', 65535
    raise InputError(None, f'{num_classes} classes do not fit in a uint16 label raster')


def default_classes(num_classes: int) -> list[ClassInfo]:
    """``class_0 ... class_N-1`` with a fixed palette (black for class 0, then distinct hues)."""
    classes = []
    for i in range(num_classes):
        if i < len(_PALETTE):
            color = _PALETTE[i]
        else:  # golden-angle hues: neighbours stay distinguishable for any class count
            hue = (i * 0.618033988749895) % 1.0
            r, g, b = (
                int(255 * (0.5 + 0.5 * math.cos(2 * math.pi * (hue + k / 3)))) for k in range(3)
            )
            color = (r, g, b)
        classes.append(ClassInfo(f'class_{i}', color))
    return classes


def labels_from_probabilities(
    probabilities: np.ndarray, valid: np.ndarray, threshold: float, dtype: str, nodata: int
) -> np.ndarray:
    """Class ids (argmax, or ``p >= threshold`` for one binary channel), nodata where invalid."""
    if probabilities.shape[0] == 1:
        labels = (probabilities[0] >= threshold).astype(dtype)
    else:
        labels = probabilities.argmax(axis=0).astype(dtype)
    labels[~valid] = nodata
    return labels


def quantise_probabilities(probabilities: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """uint8 ``round(p * 254)``, with :data:`PROBABILITY_NODATA` where invalid."""
    quantised = np.rint(np.clip(probabilities, 0.0, 1.0) * 254.0).astype(np.uint8)
    quantised[:, ~valid] = PROBABILITY_NODATA
    return quantised


@contextmanager
def gdal_cache_limit(max_bytes: int = GDAL_CACHE_BYTES) -> Iterator[None]:
    """Cap GDAL's block cache (a process-wide setting) for the duration of the block."""
    previous = get_gdal_config('GDAL_CACHEMAX')
    set_gdal_config('GDAL_CACHEMAX', min(int(previous), max_bytes))
    try:
        yield
    finally:
        set_gdal_config('GDAL_CACHEMAX', int(previous))


class _StreamFile:
    """A temporary tiled GeoTIFF filled strip by strip, one full row of blocks at a time.

    Rows are buffered until a whole row of blocks of the current strip is complete, so GDAL
    receives complete blocks and never has to read a half-written one back (except where a
    strip border cuts a block).
    """

    def __init__(self, path: Path, grid: GridLike, count: int, dtype: str, nodata: float) -> None:
        self.path = path
        path.unlink(missing_ok=True)  # the leftover of an interrupted run
        self.dataset = rasterio.open(
            path, 'w', driver='GTiff', width=grid.width, height=grid.height, count=count,
            dtype=dtype, crs=grid.crs, transform=grid.transform, nodata=nodata, tiled=True,
            blockxsize=STREAM_BLOCKSIZE, blockysize=STREAM_BLOCKSIZE, BIGTIFF='IF_SAFER',
        )  # fmt: skip
        self.buffer = np.empty((count, STREAM_BLOCKSIZE, 0), dtype=dtype)
        self.col_off = 0  # first column of the current strip
        self.top = 0  # first row of the buffer in the raster
        self.filled = 0  # rows of the buffer holding data

    def write(self, row_off: int, col_off: int, data: np.ndarray) -> None:
        """Append a block (count, rows, cols); within a strip, rows must arrive in order."""
        if (col_off, data.shape[2]) != (self.col_off, self.buffer.shape[2]):
            self._flush()
            self.buffer = np.empty((*data.shape[:1], STREAM_BLOCKSIZE, data.shape[2]), data.dtype)
            self.col_off, self.top = col_off, row_off
        if row_off != self.top + self.filled:
            expected = self.top + self.filled
            raise ValueError(f'rows must arrive in order: got {row_off}, expected {expected}')
        start = 0
        while start < data.shape[1]:
            take = min(data.shape[1] - start, STREAM_BLOCKSIZE - self.filled)
            self.buffer[:, self.filled : self.filled + take] = data[:, start : start + take]
            self.filled += take
            start += take
            if self.filled == STREAM_BLOCKSIZE or self.top + self.filled == self.dataset.height:
                self._flush()

    def _flush(self) -> None:
        if self.filled:
            window = Window(self.col_off, self.top, self.buffer.shape[2], self.filled)
            self.dataset.write(self.buffer[:, : self.filled], window=window)
            self.top += self.filled
            self.filled = 0

    def close(self) -> None:
        """Write buffered rows and close the file."""
        if not self.dataset.closed:
            self._flush()
            self.dataset.close()

    def discard(self) -> None:
        """Close without writing and delete the file."""
        if not self.dataset.closed:
            self.dataset.close()
        self.path.unlink(missing_ok=True)
        Path(f'{self.path}.aux.xml').unlink(missing_ok=True)


def write_cog(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    resampling: Literal['nearest', 'mode', 'average', 'bilinear'],
    output_grid: GridLike | None = None,
    overwrite: bool = False,
    sidecar: str | None = None,
) -> Path:
    """Copy a raster to a COG atomically: DEFLATE, 512 px blocks, internal overviews.

    Args:
        source: a GeoTIFF with the final pixels, metadata and colour table.
        path: the COG to write.
        resampling: overview resampling: 'mode' or 'nearest' for labels, 'average' for
            probabilities; with ``output_grid``, 'mode' and 'nearest' warp with nearest and the
            others with bilinear.
        output_grid: warp onto this grid (same CRS) while copying; None keeps the source grid.
        overwrite: replace an existing file.
        sidecar: PAM XML text written as ``<path>.aux.xml`` together with the raster.

    Returns:
        ``path``.
    """
    options = dict(
        COMPRESS='DEFLATE', PREDICTOR='YES', BLOCKSIZE=COG_BLOCKSIZE, BIGTIFF='IF_SAFER',
        OVERVIEW_RESAMPLING=resampling.upper(),
    )  # fmt: skip
    with atomic_output(path, overwrite) as temporary, gdal_cache_limit():
        with rasterio.open(source) as src:
            if output_grid is None or _same_grid(src, output_grid):
                rasterio.shutil.copy(src, temporary, driver='COG', **options)
            else:
                categorical = resampling in ('mode', 'nearest')
                warped = _warp_copy(src, temporary, output_grid, categorical)
                try:
                    rasterio.shutil.copy(warped, temporary, driver='COG', **options)
                finally:
                    warped.unlink(missing_ok=True)
        if sidecar is not None:
            Path(f'{temporary}.aux.xml').write_text(sidecar, encoding='utf-8')
    return Path(path)


def _warp_copy(
    src: rasterio.io.DatasetReader, beside: Path, grid: GridLike, categorical: bool
) -> Path:
    """Warp ``src`` onto ``grid`` into a temporary tiled GeoTIFF next to ``beside``.

    A warped view drops the dataset's metadata (class names, provenance), and a COG cannot
    take it afterwards without losing its layout, so the warp goes through a plain GeoTIFF
    that receives the tags before the COG copy.
    """
    warped = beside.with_suffix('.warped.tif')
    resampling = Resampling.nearest if categorical else Resampling.bilinear
    with WarpedVRT(
        src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
        resampling=resampling,
    ) as vrt:  # fmt: skip
        rasterio.shutil.copy(vrt, warped, driver='GTiff', TILED='YES', BIGTIFF='IF_SAFER')
    with rasterio.open(warped, 'r+') as dst:
        dst.update_tags(**src.tags())
    return warped


def _same_grid(a: GridLike, b: GridLike) -> bool:
    return (a.crs, a.transform, a.width, a.height) == (b.crs, b.transform, b.width, b.height)


def category_sidecar(classes: Sequence[ClassInfo]) -> str:
    """PAM XML with category names and a thematic raster attribute table for band 1.

    rasterio cannot write either, and GeoTIFF has no tag for them: GDAL keeps them in a
    ``.aux.xml`` sidecar, which QGIS and ArcGIS read to label the classes.
    """
    dataset = ET.Element('PAMDataset')
    band = ET.SubElement(dataset, 'PAMRasterBand', band='1')
    categories = ET.SubElement(band, 'CategoryNames')
    for item in classes:
        ET.SubElement(categories, 'Category').text = item.name
    table = ET.SubElement(band, 'GDALRasterAttributeTable', tableType='thematic')
    # (name, GDALRATFieldType, GDALRATFieldUsage): integer 0 / string 2; MinMax 5, Name 2,
    # Red 6, Green 7, Blue 8, Alpha 9.
    fields = [
        ('Value', 0, 5), ('Class_Name', 2, 2), ('Red', 0, 6), ('Green', 0, 7), ('Blue', 0, 8),
        ('Alpha', 0, 9),
    ]  # fmt: skip
    for index, (name, kind, usage) in enumerate(fields):
        field = ET.SubElement(table, 'FieldDefn', index=str(index))
        ET.SubElement(field, 'Name').text = name
        ET.SubElement(field, 'Type').text = str(kind)
        ET.SubElement(field, 'Usage').text = str(usage)
    for value, item in enumerate(classes):
        row = ET.SubElement(table, 'Row', index=str(value))
        for cell in (value, item.name, *item.color, 255):
            ET.SubElement(row, 'F').text = str(cell)
    ET.indent(dataset)
    return ET.tostring(dataset, encoding='unicode') + '\n'


class PredictionWriter:
    """A row sink for :func:`~geocmid.inference.engine.predict_scene` that writes COGs.

    Blocks of blended probabilities go to a label raster (and optionally a probability raster);
    :meth:`close` converts them to COGs, and leaving the ``with`` block on an error deletes
    everything. Both output paths are checked before any computation. While the writer is
    open, GDAL's (process-wide) block cache is capped at :data:`GDAL_CACHE_BYTES`.

    Args:
        grid: the grid the rows come on (the reader's grid).
        labels_path: the label COG to write.
        classes: class names and colours, one per class id (2 for a binary sigmoid model).
        probabilities_path: also write per-class probabilities here.
        probability_dtype: 'uint8' (quantised, scale 1/254, nodata 255) or 'float32' (NaN).
        threshold: probability above which a binary (one-channel) model says class 1.
        output_grid: the grid to write on when it differs from ``grid`` (the scene's grid,
            when the model ran at another resolution); same CRS.
        tags: provenance metadata added to both files (model, checkpoint hash, settings...).
        overwrite: replace existing outputs.
    """

    def __init__(
        self,
        grid: GridLike,
        labels_path: str | os.PathLike[str],
        *,
        classes: Sequence[ClassInfo],
        probabilities_path: str | os.PathLike[str] | None = None,
        probability_dtype: Literal['uint8', 'float32'] = 'uint8',
        threshold: float = 0.5,
        output_grid: GridLike | None = None,
        tags: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        if len(classes) < 2:
            raise InputError(None, f'a label raster needs at least 2 classes, got {len(classes)}')
        self.labels_path = check_writable(labels_path, overwrite)
        self.probabilities_path = (
            None if probabilities_path is None else check_writable(probabilities_path, overwrite)
        )
        if self.probabilities_path == self.labels_path:
            raise InputError(probabilities_path, 'is the same file as the label output')
        self.classes = list(classes)
        self.threshold = threshold
        self.output_grid = output_grid
        self.overwrite = overwrite
        self.label_dtype, self.label_nodata = label_encoding(len(self.classes))
        self.probability_dtype = probability_dtype
        self._grid = grid
        # Undone by abort(): the GDAL cache cap, held while rows stream in.
        self._held = contextlib.ExitStack()
        self._held.enter_context(gdal_cache_limit())
        tags = {
            **(tags or {}),
            'CLASS_NAMES': json.dumps([c.name for c in self.classes]),
            'CLASS_COLORS': json.dumps([list(c.color) for c in self.classes]),
        }
        self._streams: list[_StreamFile] = []
        try:
            self.labels = self._open_stream(
                self.labels_path, 1, self.label_dtype, self.label_nodata
            )
            self.labels.dataset.update_tags(**tags)
            self.labels.dataset.set_band_description(1, 'class_id')
            colormap = {i: (*c.color, 255) for i, c in enumerate(self.classes)}
            self.labels.dataset.write_colormap(1, {**colormap, self.label_nodata: (0, 0, 0, 0)})
            self.probabilities: _StreamFile | None = None
            self._probability_tags = tags
        except BaseException:
            self.abort()
            raise

    def _open_stream(self, path: Path, count: int, dtype: str, nodata: float) -> _StreamFile:
        # Beside the final output, hidden, like the partial COG of geocmid.io.atomic.
        stream_path = partial_path(path).with_suffix('.stream.tif')
        stream = _StreamFile(stream_path, self._grid, count, dtype, nodata)
        self._streams.append(stream)
        return stream

    def _open_probabilities(self, count: int) -> _StreamFile:
        """Open the probability stream once the number of channels is known."""
        assert self.probabilities_path is not None
        nodata = PROBABILITY_NODATA if self.probability_dtype == 'uint8' else float('nan')
        stream = self._open_stream(self.probabilities_path, count, self.probability_dtype, nodata)
        dataset = stream.dataset
        dataset.update_tags(**self._probability_tags)
        names = [c.name for c in self.classes]
        for band, name in enumerate(names[1:] if count == 1 else names, start=1):
            dataset.set_band_description(band, name)
        if self.probability_dtype == 'uint8':
            dataset.scales = (PROBABILITY_SCALE,) * count
            dataset.offsets = (0.0,) * count
        return stream

    def write_block(
        self, row_off: int, col_off: int, probabilities: np.ndarray, valid: np.ndarray
    ) -> None:
        """Take a finished block from the engine: (K, rows, cols) probabilities, validity."""
        channels = probabilities.shape[0]
        if channels != len(self.classes) and not (channels == 1 and len(self.classes) == 2):
            classes = len(self.classes)
            raise InputError('model', f'{channels} output channel(s) for {classes} classes')
        labels = labels_from_probabilities(
            probabilities, valid, self.threshold, self.label_dtype, self.label_nodata
        )
        self.labels.write(row_off, col_off, labels[None])
        if self.probabilities_path is not None:
            if self.probabilities is None:
                self.probabilities = self._open_probabilities(channels)
            if self.probability_dtype == 'uint8':
                values = quantise_probabilities(probabilities, valid)
            else:
                values = probabilities.astype(np.float32, copy=True)
                values[:, ~valid] = np.nan
            self.probabilities.write(row_off, col_off, values)

    def close(self) -> list[Path]:
        """Convert the streamed rasters to COGs at their final paths.

        Returns:
            The paths written: labels, then probabilities when requested.
        """
        try:
            for stream in self._streams:
                stream.close()
            written = [
                write_cog(
                    self.labels.path, self.labels_path, resampling='mode',
                    output_grid=self.output_grid, overwrite=self.overwrite,
                    sidecar=category_sidecar(self.classes),
                )
            ]  # fmt: skip
            if self.probabilities is not None and self.probabilities_path is not None:
                written.append(
                    write_cog(
                        self.probabilities.path, self.probabilities_path, resampling='average',
                        output_grid=self.output_grid, overwrite=self.overwrite,
                    )
                )  # fmt: skip
            return written
        finally:
            self.abort()

    def abort(self) -> None:
        """Delete the temporary stream files (outputs already in place are kept)."""
        for stream in self._streams:
            stream.discard()
        self._streams.clear()
        self._held.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def validate_cog(path: str | os.PathLike[str]) -> list[str]:
    """Check that ``path`` is a Cloud-Optimized GeoTIFF; return the problems (empty if valid).

    rio-cogeo's ``cog_validate``, a port of GDAL's ``validate_cloud_optimized_geotiff.py``,
    checks the layout (tiling, internal overviews, IFDs before data, data from the smallest
    overview up), its warnings counted as problems. GDAL must also report ``LAYOUT=COG`` (the
    COG driver wrote the file, as it writes every output here), which rio-cogeo does not check.
    """
    # Imported on use: rio-cogeo loads morecantile and pydantic, half a second most runs skip.
    from rio_cogeo.cogeo import cog_validate

    _, errors, warnings = cog_validate(Path(path), strict=True, quiet=True)
    problems = errors + warnings
    with rasterio.open(path) as src:
        if src.driver == 'GTiff' and src.tags(ns='IMAGE_STRUCTURE').get('LAYOUT') != 'COG':
            problems.append('GDAL does not report LAYOUT=COG')
    return problems
