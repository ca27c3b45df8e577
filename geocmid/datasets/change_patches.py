"""Labelled image pairs as training patches for change detection.

A labelled pair is checked up front (:func:`label_regions`), split into training and
validation regions by whole pairs or rows (:func:`split_regions`), and served as patches of
both dates and a change mask (:class:`ChangePatches`). The label is put on the pair's grid
like the after image (nearest neighbour), or taken pixel for pixel when it has no
georeferencing, as in LEVIR-CD and SZTAKI AirChange.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
from rasterio.windows import Window
from torchgeo.datasets import NonGeoDataset

from geocmid.datasets.labels import IGNORE_INDEX
from geocmid.datasets.pairs import PairRecord, align_pair, is_georeferenced, open_image
from geocmid.errors import InputError
from geocmid.raster.files import PathLike
from geocmid.raster.grid import RasterOnGrid


def change_threshold(label: PathLike) -> int:
    """The smallest label value that means change: 1 for 0/1 masks, 128 for 0/255 masks.

    Masks stored as 8-bit images (LEVIR-CD, SZTAKI AirChange) mark change with 255 and may
    carry stray intermediate values from lossy edits; anything above 127 is change there.

    Raises:
        InputError: the label is unreadable.
    """
    with open_image(label) as src:
        maximum = max(float(np.nanmax(src.read(1, window=w))) for _, w in src.block_windows(1))
    return 1 if maximum <= 1 else 128


@dataclass(frozen=True)
class PairRegion:
    """A labelled pair, or a band of its rows, that patches are drawn from.

    Attributes:
        record: the pair.
        rows: first and last (exclusive) grid row of the region.
        width: grid width in pixels.
        count: bands of each image.
        threshold: smallest label value meaning change (see :func:`change_threshold`).
    """

    record: PairRecord
    rows: tuple[int, int]
    width: int
    count: int
    threshold: int

    @property
    def height(self) -> int:
        """Rows in the region."""
        return self.rows[1] - self.rows[0]


def label_regions(
    records: Sequence[PairRecord], *, nodata: float | None = None
) -> list[PairRegion]:
    """Check every labelled pair up front and describe it as a region of whole rows.

    Raises:
        InputError: a missing file, a bad pair (see :func:`align_pair`), a missing label, or
            a label that cannot be put on the pair's grid.
    """
    regions = []
    for record in records:
        record.check_files()
        if record.label is None:
            raise InputError(record.source or record.name, 'the pair has no label')
        try:
            with _LabelledPair(record, nodata) as labelled:
                pair = labelled.pair
                height, width, count = pair.height, pair.width, pair.count
            threshold = change_threshold(record.label)
        except InputError as exc:
            raise InputError(record.source or record.name, str(exc)) from None
        regions.append(PairRegion(record, (0, height), width, count, threshold))
    return regions


class _LabelledPair:
    """An aligned pair and its label on the pair's grid.

    A georeferenced label is put on the grid (nearest neighbour); a label without
    georeferencing must have the before image's size and is taken pixel for pixel.
    """

    def __init__(self, record: PairRecord, nodata: float | None) -> None:
        assert record.label is not None
        self.pair = align_pair(
            record.before, record.after, nodata=nodata, allow_ungeoreferenced=True
        )
        try:
            src = open_image(record.label)
        except BaseException:
            self.pair.close()
            raise
        try:
            offset = None
            if not is_georeferenced(src):
                before = self.pair.before_grid
                if (src.width, src.height) != (before.width, before.height):
                    raise InputError(
                        record.label,
                        f'is {src.width} x {src.height} px without georeferencing, but the '
                        f'before image is {before.width} x {before.height} px',
                    )
                offset = (int(self.pair.window.row_off), int(self.pair.window.col_off))
            self.label = RasterOnGrid(
                src, record.label, self.pair.grid, nodata=None, resampling='nearest', offset=offset
            )
        except BaseException:
            src.close()
            self.pair.close()
            raise

    def read(
        self, window: Window, indexes: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Before and after (C, h, w), their validity and the label (h, w) in ``window``."""
        before, after, valid = self.pair.read(window, indexes=indexes)
        label, label_valid = self.label.read(window, (1,), None)
        return before, after, valid & label_valid, label[0]

    def close(self) -> None:
        """Close the pair and the label."""
        self.pair.close()
        self.label.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *args: object) -> None:
        self.close()


def split_regions(
    regions: Sequence[PairRegion], val_fraction: float, seed: int = 0
) -> tuple[list[PairRegion], list[PairRegion]]:
    """Hold out whole pairs for validation, or the bottom rows of a single pair.

    Validation never shares pixels with training: with two or more pairs, a seeded choice of
    ``round(val_fraction * n)`` pairs (at least one, never all) is held out; a single pair is
    cut into a top band for training and a bottom band for validation.

    Args:
        regions: the labelled pairs.
        val_fraction: share of pairs (or rows) held out, in (0, 1).
        seed: seed of the choice of validation pairs.

    Returns:
        ``(train, val)`` regions.
    """
    if not 0 < val_fraction < 1:
        raise InputError('--val-fraction', f'must be between 0 and 1, got {val_fraction}')
    if len(regions) == 1:
        region = regions[0]
        kept = max(1, min(region.height - 1, round(region.height * (1 - val_fraction))))
        cut = region.rows[0] + kept
        top = dataclasses.replace(region, rows=(region.rows[0], cut))
        bottom = dataclasses.replace(region, rows=(cut, region.rows[1]))
        return [top], [bottom]
    count = min(len(regions) - 1, max(1, round(val_fraction * len(regions))))
    held_out = set(np.random.default_rng(seed).permutation(len(regions))[:count].tolist())
    train = [r for i, r in enumerate(regions) if i not in held_out]
    val = [r for i, r in enumerate(regions) if i in held_out]
    return train, val


class ChangePatches(NonGeoDataset):
    """Square patches of labelled pairs, for training (random) or validation (a grid).

    Each sample holds ``image``, float32 (2, C, P, P): the before and after patches in raw
    units; ``valid``, bool (P, P): where both images hold data; and ``mask``, int64 (1, P, P):
    1 for change, 0 for no change and :data:`IGNORE_INDEX` where either image or the label has
    no data or the patch runs past its region (regions smaller than a patch are padded). This
    is TorchGeo's change-detection layout: ``(T=2, C, H, W)`` images and a leading mask axis.
    Normalisation is the data module's job, as everywhere in TorchGeo.

    Files are opened lazily in each data-loader worker, since open rasters cannot be pickled.

    Args:
        regions: the labelled pairs (see :func:`label_regions`, :func:`split_regions`).
        patch_size: patch side in pixels.
        indexes: 1-based bands to read, in model channel order.
        length: random patches per epoch; None for a grid of non-overlapping patches
            covering every region once (validation).
        nodata: overrides or supplies the images' nodata value.
        seed: random patch ``i`` is drawn from a generator seeded with ``(seed, i)``, so it
            depends on neither the worker nor the rank that reads it; samplers pick the indices
            (:class:`~geocmid.samplers.shard.EpochIndexSampler`: new ones per rank and epoch).
    """

    def __init__(
        self,
        regions: Sequence[PairRegion],
        patch_size: int,
        indexes: Sequence[int],
        *,
        length: int | None = None,
        nodata: float | None = None,
        seed: int = 0,
    ) -> None:
        self.regions = list(regions)
        self.seed = seed
        self.patch_size = patch_size
        self.indexes = tuple(indexes)
        self.length = length
        self.nodata = nodata
        self.grid = [] if length is not None else list(self._grid_windows())
        # Random patches are drawn from pairs in proportion to their area.
        areas = np.array([r.height * r.width for r in self.regions], dtype=np.float64)
        self.weights = torch.from_numpy(areas / areas.sum())
        self._open: dict[int, _LabelledPair] = {}
        self._chips: dict[int, tuple[np.ndarray, ...]] = {}

    def _grid_windows(self) -> Iterator[tuple[int, Window]]:
        size = self.patch_size
        for index, region in enumerate(self.regions):
            for row in range(region.rows[0], region.rows[1], size):
                for col in range(0, region.width, size):
                    yield index, Window(col, row, size, size)

    def __len__(self) -> int:
        return self.length if self.length is not None else len(self.grid)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.length is None:
            region_index, window = self.grid[index]
        else:
            generator = torch.Generator().manual_seed(self.seed * 2**32 + index)
            region_index = int(torch.multinomial(self.weights, 1, generator=generator))
            region = self.regions[region_index]
            rows = max(1, region.height - self.patch_size + 1)
            cols = max(1, region.width - self.patch_size + 1)
            row = region.rows[0] + int(torch.randint(rows, (), generator=generator))
            col = int(torch.randint(cols, (), generator=generator))
            window = Window(col, row, self.patch_size, self.patch_size)
        return self._sample(region_index, window)

    def _sample(self, region_index: int, window: Window) -> dict[str, torch.Tensor]:
        region = self.regions[region_index]
        # Clip to the region; the rest of the patch is padding.
        rows = min(int(window.height), region.rows[1] - int(window.row_off))
        cols = min(int(window.width), region.width - int(window.col_off))
        clipped = Window(window.col_off, window.row_off, cols, rows)
        before, after, valid, label = self._read(region_index, clipped)
        size = self.patch_size
        image = np.zeros((2, len(self.indexes), size, size), dtype=np.float32)
        image[0, :, :rows, :cols] = before
        image[1, :, :rows, :cols] = after
        padded = np.zeros((size, size), dtype=bool)
        padded[:rows, :cols] = valid
        mask = np.full((1, size, size), IGNORE_INDEX, dtype=np.int64)
        mask[0, :rows, :cols] = np.where(valid, label >= region.threshold, IGNORE_INDEX)
        return {
            'image': torch.from_numpy(image),
            'valid': torch.from_numpy(padded),
            'mask': torch.from_numpy(mask),
        }

    def _read(self, region_index: int, window: Window) -> tuple[np.ndarray, ...]:
        """Before, after, validity and label in ``window`` (see :meth:`_LabelledPair.read`).

        Pairs without georeferencing are PNG or JPEG chips: formats that GDAL can only decode
        from the top of the file, so every window would decode the image again. They are
        small, so each is decoded once per worker and kept; georeferenced pairs are read by
        windows.
        """
        pair = self._pair(region_index)
        if pair.pair.crs is not None:
            return pair.read(window, self.indexes)
        if region_index not in self._chips:
            whole = Window(0, 0, pair.pair.width, pair.pair.height)
            self._chips[region_index] = pair.read(whole, self.indexes)
        rows = slice(int(window.row_off), int(window.row_off + window.height))
        cols = slice(int(window.col_off), int(window.col_off + window.width))
        return tuple(array[..., rows, cols] for array in self._chips[region_index])

    def _pair(self, region_index: int) -> _LabelledPair:
        if region_index not in self._open:
            self._open[region_index] = _LabelledPair(self.regions[region_index].record, self.nodata)
        return self._open[region_index]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state['_open'], state['_chips'] = {}, {}
        return state

    def close(self) -> None:
        """Close the files opened in this process and forget decoded chips."""
        for pair in self._open.values():
            pair.close()
        self._open.clear()
        self._chips.clear()
