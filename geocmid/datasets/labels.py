"""Segmentation labels (vector or raster) read onto an image window's grid.

Two kinds of labels are understood, both brought onto the exact pixel grid of each image window:

* **Vector labels** (GeoPackage, GeoJSON, Shapefile, ... anything pyogrio reads) are reprojected
  to the image CRS once and rasterised per window with :func:`rasterio.features.rasterize`
  (``all_touched=False``: a pixel is labelled when its centre lies inside a polygon; where
  polygons overlap, the later feature wins). Pixels covered by no polygon are class 0,
  ``background``. The class comes from ``label_field``:

  - no field: every polygon is class 1, ``foreground``;
  - integer values: used as class ids as they are (0 is background);
  - string values: mapped to ids by their position in ``class_names`` when given (the first
    name is background, id 0), otherwise by sorted name, starting at id 1.

* **Raster labels** (one file or a folder of rasters) hold class ids as pixel values. Each label
  raster that overlaps a window is warped onto the window's grid with nearest-neighbour
  resampling, so labels on another grid, resolution or CRS line up pixel for pixel. Pixels
  outside every label raster, and the label rasters' own nodata, get :data:`IGNORE_INDEX`.

Pixels that are nodata in the image get :data:`IGNORE_INDEX` too (:class:`LabelledDataset`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import rasterio.features
import rasterio.warp
import shapely
import torch
from pyproj import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.io import DatasetReader
from rasterio.transform import Affine, array_bounds
from shapely.geometry.base import BaseGeometry
from torchgeo.datasets import GeoDataset
from torchgeo.datasets.utils import GeoSlice, Sample

from geocmid.errors import InputError

#: Label value of pixels without a usable label; excluded from the loss and the metrics.
IGNORE_INDEX = 255

#: File suffixes read as vector labels; anything else is opened as a raster.
VECTOR_SUFFIXES = ('.gpkg', '.geojson', '.json', '.shp', '.fgb', '.parquet', '.gml', '.kml')

#: Class names of vector labels without a class field.
BINARY_CLASSES = ('background', 'foreground')


class VectorLabels:
    """Polygons with class ids, reprojected to the image CRS and rasterised per window.

    Attributes:
        source: The vector file.
        class_names: Class names in id order; id 0 is background.
        shapes: The polygons in the image CRS, with an integer ``class_id`` column.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        crs: CRS,
        label_field: str | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        """Read the polygons and assign class ids.

        Args:
            path: A vector file pyogrio can read.
            crs: The image CRS the polygons are reprojected to.
            label_field: Attribute holding each polygon's class; None for one foreground class.
            class_names: Class names in id order (see the module docstring for their role).

        Raises:
            InputError: The file cannot be read, has no CRS, lacks ``label_field``, has features
                without a class, or has classes that ``class_names`` does not list.
        """
        self.source = os.fspath(path)
        try:
            frame = gpd.read_file(path, engine='pyogrio')
        except Exception as exc:  # pyogrio raises several error types for unreadable files
            raise InputError(path, f'cannot read vector labels ({exc})') from None
        if frame.crs is None:
            raise InputError(path, 'vector labels have no CRS')
        # A fresh index: ids and geometries below are paired by position, not by old labels.
        frame = frame[~(frame.geometry.isna() | frame.geometry.is_empty)].reset_index(drop=True)
        if label_field is not None and label_field not in frame.columns:
            fields = ', '.join(str(c) for c in frame.columns if c != 'geometry')
            raise InputError(path, f"no field '{label_field}' (fields: {fields})")
        ids, self.class_names = _class_ids(frame, label_field, class_names, path)
        self.shapes = gpd.GeoDataFrame(
            {'class_id': ids}, geometry=frame.geometry.to_crs(crs), index=frame.index
        )

    def intersects(self, geometry: BaseGeometry) -> bool:
        """Whether any polygon intersects ``geometry`` (in the image CRS)."""
        return len(self.shapes.sindex.query(geometry, predicate='intersects')) > 0

    def read(self, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
        """Rasterise the polygons onto a window grid.

        Args:
            transform: The window's affine transform (float64, image CRS).
            shape: The window's (height, width).

        Returns:
            Class ids, int64 array of ``shape``; 0 where no polygon covers a pixel centre.
        """
        window = shapely.box(*array_bounds(*shape, transform)[:4])
        hits = self.shapes.iloc[self.shapes.sindex.query(window, predicate='intersects')]
        if hits.empty:
            return np.zeros(shape, dtype=np.int64)
        burned = rasterio.features.rasterize(
            zip(hits.geometry, hits['class_id'].tolist(), strict=True),
            out_shape=shape,
            transform=transform,
            fill=0,
            all_touched=False,
            dtype=np.uint8,
        )
        return burned.astype(np.int64)


class RasterLabels:
    """Class-id rasters warped with nearest-neighbour resampling onto each window's grid.

    Attributes:
        source: The label file or folder.
        class_names: Class names in id order.
        files: The label rasters.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        crs: CRS,
        class_names: Sequence[str] | None = None,
    ) -> None:
        """Index the label rasters and find the classes they use.

        Args:
            path: A label raster, or a folder searched recursively for ``*.tif``/``*.tiff``.
            crs: The image CRS.
            class_names: Class names in id order; when None, ``class_0 ...`` up to the largest
                id found in the rasters (scanned block by block).

        Raises:
            InputError: No raster found, a raster is unreadable, has no CRS or more than one
                band, holds non-integer values, or ids that ``class_names`` does not cover.
        """
        self.source = os.fspath(path)
        self.crs = crs
        root = Path(path)
        if root.is_dir():
            self.files = sorted(
                p for p in root.rglob('*') if p.suffix.lower() in ('.tif', '.tiff') and p.is_file()
            )
            if not self.files:
                raise InputError(path, 'no label rasters (*.tif) found in folder')
        else:
            self.files = [root]
        footprints = []
        largest = 0
        for file in self.files:
            try:
                with rasterio.open(file) as src:
                    footprints.append(_footprint(src, crs, file))
                    largest = max(largest, _largest_class_id(src, file))
            except RasterioIOError as exc:
                raise InputError(file, f'cannot read label raster ({exc})') from None
        self.footprints = gpd.GeoSeries(footprints, crs=crs)
        if class_names is None:
            class_names = [f'class_{i}' for i in range(largest + 1)]
        elif largest >= len(class_names):
            raise InputError(
                path, f'label id {largest} found but only {len(class_names)} class names given'
            )
        self.class_names = tuple(class_names)

    def intersects(self, geometry: BaseGeometry) -> bool:
        """Whether any label raster overlaps ``geometry`` (in the image CRS)."""
        return len(self.footprints.sindex.query(geometry, predicate='intersects')) > 0

    def read(self, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
        """Warp the overlapping label rasters onto a window grid (nearest neighbour).

        Args:
            transform: The window's affine transform (float64, image CRS).
            shape: The window's (height, width).

        Returns:
            Class ids, int64 array of ``shape``; :data:`IGNORE_INDEX` where no label raster
            has data. Where label rasters overlap, the later file (in sorted order) wins.
        """
        labels = np.full(shape, IGNORE_INDEX, dtype=np.int32)
        window = shapely.box(*array_bounds(*shape, transform)[:4])
        for i in self.footprints.sindex.query(window, predicate='intersects'):
            warped = np.full(shape, IGNORE_INDEX, dtype=np.int32)
            with rasterio.open(self.files[i]) as src:
                rasterio.warp.reproject(
                    rasterio.band(src, 1),
                    warped,
                    src_nodata=src.nodata,
                    dst_transform=transform,
                    dst_crs=self.crs,
                    dst_nodata=IGNORE_INDEX,
                    resampling=Resampling.nearest,
                )
            labels = np.where(warped != IGNORE_INDEX, warped, labels)
        return labels.astype(np.int64)


Labels = VectorLabels | RasterLabels


def open_labels(
    path: str | os.PathLike[str],
    crs: CRS,
    *,
    label_field: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Labels:
    """Open vector or raster labels, choosing by file type.

    Args:
        path: A vector file, a label raster or a folder of label rasters.
        crs: The image CRS the labels are brought onto.
        label_field: Class attribute of vector labels (not allowed for raster labels).
        class_names: Class names in id order.

    Returns:
        :class:`VectorLabels` or :class:`RasterLabels`.

    Raises:
        InputError: The path does not exist, ``label_field`` is given for raster labels, or
            the labels themselves are invalid.
    """
    if not Path(path).exists():
        raise InputError(path, 'labels not found')
    if Path(path).suffix.lower() in VECTOR_SUFFIXES:
        return VectorLabels(path, crs, label_field, class_names)
    if label_field is not None:
        raise InputError(path, 'a label field applies to vector labels only; this is a raster')
    return RasterLabels(path, crs, class_names)


class LabelledDataset(GeoDataset):
    """Image windows with their labels on the same pixel grid.

    Each sample is the image dataset's sample (``image``, ``valid``, ``bounds``,
    ``transform``, ...) plus ``mask``: (H, W) int64 class ids, :data:`IGNORE_INDEX` where the
    image is nodata or no label applies. When the image sample leaves ``valid`` out
    (:data:`~geocmid.datasets.geo_raster.DEVICE_READ`), nodata pixels are marked on the device
    by :func:`~geocmid.datasets.geo_raster.restore_on_device`. The mask grid is built in
    float64 from the query itself (its top-left corner and the dataset resolution), never from
    TorchGeo's float32 ``transform`` tensor.

    Unlike TorchGeo's ``IntersectionDataset`` (``images & masks``), this keeps one copy of
    ``bounds``/``transform`` (not 18-long concatenations) and leaves the image dataset
    untouched.
    """

    def __init__(self, images: GeoDataset, labels: Labels) -> None:
        """Pair an image dataset with labels.

        Args:
            images: The georeferenced image dataset; its CRS is the labels' CRS.
            labels: Labels opened in ``images.crs`` (see :func:`open_labels`).

        Raises:
            InputError: A scene of ``images`` does not intersect any label.
        """
        self.images = images
        self.labels = labels
        self.index = images.index
        self._res = images.res
        for path, footprint in zip(self.index['filepath'], self.index.geometry, strict=True):
            if not labels.intersects(footprint):
                raise InputError(path, f'scene does not intersect any label in {labels.source}')

    def __getitem__(self, query: GeoSlice) -> Sample:
        """Read the image window and its labels.

        Args:
            query: [xmin:xmax:xres, ymin:ymax:yres, tmin:tmax:tres] coordinates to index.

        Returns:
            The image sample with ``mask`` added.
        """
        sample = self.images[query]
        x, y, _ = self._disambiguate_slice(query)
        height, width = sample['image'].shape[-2:]
        transform = Affine(x.step, 0.0, x.start, 0.0, -y.step, y.stop)
        mask = torch.from_numpy(self.labels.read(transform, (height, width)))
        if 'valid' in sample:
            mask[~sample['valid'].bool()] = IGNORE_INDEX
        sample['mask'] = mask
        return sample

    @property
    def bounds(self) -> tuple[slice, slice, slice]:
        """x, y and t extent: the image dataset's (precomputed there, queried every sample)."""
        return self.images.bounds

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in id order."""
        return tuple(self.labels.class_names)


def _class_ids(
    frame: gpd.GeoDataFrame,
    label_field: str | None,
    class_names: Sequence[str] | None,
    path: str | os.PathLike[str],
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class id of every feature and the class names, following the module docstring's rules."""
    if label_field is None:
        names = tuple(class_names) if class_names is not None else BINARY_CLASSES
        if len(names) != 2:
            raise InputError(path, f'without a label field there are 2 classes, not {len(names)}')
        return np.ones(len(frame), dtype=np.int64), names
    values = frame[label_field]
    if missing := int(values.isna().sum()):
        raise InputError(path, f"{missing} feature(s) have no '{label_field}' value")
    if pd.api.types.is_integer_dtype(values) or pd.api.types.is_bool_dtype(values):
        ids = values.to_numpy(dtype=np.int64)
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= IGNORE_INDEX:
            raise InputError(path, f"'{label_field}' ids must lie in 0..{IGNORE_INDEX - 1}")
        count = int(ids.max(initial=0)) + 1
        if class_names is None:
            return ids, ('background', *(f'class_{i}' for i in range(1, count)))
        if count > len(class_names):
            raise InputError(
                path, f'class id {count - 1} found but only {len(class_names)} class names given'
            )
        return ids, tuple(class_names)
    if not pd.api.types.is_string_dtype(values) and not pd.api.types.is_object_dtype(values):
        raise InputError(path, f"'{label_field}' must hold integer ids or class names")
    values = values.astype(str)
    found = sorted(set(values) - {'background'})
    names = tuple(class_names) if class_names is not None else ('background', *found)
    unknown = [value for value in found if value not in names]
    if unknown:
        raise InputError(path, f'classes not among the class names: {", ".join(unknown)}')
    if len(names) > IGNORE_INDEX:
        raise InputError(path, f'{len(names)} classes; at most {IGNORE_INDEX} are supported')
    lookup = {name: i for i, name in enumerate(names)}
    return values.map(lookup).to_numpy(dtype=np.int64), names


def _footprint(src: DatasetReader, crs: CRS, path: Path) -> BaseGeometry:
    """The bounding box of an open label raster, in ``crs``."""
    if src.crs is None:
        raise InputError(path, 'label raster has no CRS')
    if src.count != 1:
        raise InputError(path, f'label raster must have 1 band of class ids, not {src.count}')
    return shapely.box(*rasterio.warp.transform_bounds(src.crs, crs, *src.bounds))


def _largest_class_id(src: DatasetReader, path: Path) -> int:
    """The largest class id in a label raster, read block by block (never the whole band)."""
    if not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
        raise InputError(path, f'label raster must hold integer class ids, not {src.dtypes[0]}')
    largest = 0
    for _, window in src.block_windows(1):
        block = src.read(1, window=window, masked=True)
        if block.count():
            largest = max(largest, int(block.max()))
    if largest >= IGNORE_INDEX:
        raise InputError(path, f'class ids must be below {IGNORE_INDEX} (the ignore value)')
    return largest
