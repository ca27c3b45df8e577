"""Random training patches that are never mostly nodata, sharded across DDP ranks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import numpy as np
import shapely
import torch.distributed as dist
from rasterio.windows import Window
from shapely import Polygon
from torchgeo.samplers import SpatialSampler

from geocmid.datasets.geo_raster import GeoRasterDataset, Placement
from geocmid.errors import InputError
from geocmid.raster.locations import reads_remotely

#: Largest validity grid per file, in cells per side: bounds memory for large scenes.
MAX_GRID_CELLS = 128

#: Smallest cell side in pixels.
MIN_CELL = 8

#: Candidate patches drawn at once (vectorised).
BATCH = 1024

#: Batches in a row without an accepted patch before giving up (nearly infeasible settings).
MAX_BATCHES = 10

#: Validity grids already built, per dataset and (file, placement).
_GRIDS: WeakKeyDictionary[GeoRasterDataset, dict[tuple[str, Placement], ValidityGrid]] = (
    WeakKeyDictionary()
)


@dataclass(frozen=True)
class ValidityGrid:
    """Exact count of valid pixels in each ``cell`` x ``cell`` block of one file.

    Two bounds decide whether a window has enough valid pixels without reading it:

    * in O(1), from a summed-area table: the window misses at most the invalid pixels of the
      blocks it touches;
    * exactly per block, for the rare windows the first bound cannot accept: a block of area
      A with V valid pixels, overlapping the window by O pixels, puts at least
      max(0, V - (A - O)) of them inside.

    Both are guaranteed lower bounds on the window's real valid pixels, so an accepted patch
    passes on its real pixels: the sampler never reads a patch to check it, and no read
    patch is ever rejected.

    Attributes:
        cell: block side in pixels.
        height: file height on the dataset grid.
        width: file width on the dataset grid.
        counts: (rows, cols) valid pixels per block.
        cumulative: running sum of ``counts`` (flattened), for drawing blocks by weight.
        invalid_table: (rows + 1, cols + 1) summed-area table of invalid pixels per block.
    """

    cell: int
    height: int
    width: int
    counts: np.ndarray
    cumulative: np.ndarray
    invalid_table: np.ndarray

    @classmethod
    def of(cls, dataset: GeoRasterDataset, i: int) -> ValidityGrid:
        """The grid of file ``i``, built once per dataset and placement, then reused.

        Building reads the file's whole validity (its pixels, for nodata-valued files), so
        samplers re-created on the same dataset (one per DDP rank, one per run stage) share it.
        """
        grids = _GRIDS.setdefault(dataset, {})
        key = (dataset.files[i], dataset.placements[i])
        if key not in grids:
            grids[key] = cls.build(dataset, i)
        return grids[key]

    @classmethod
    def build(cls, dataset: GeoRasterDataset, i: int) -> ValidityGrid:
        """Count the valid pixels of file ``i`` by windows (bounded memory, one pass).

        A file read over the network is not read whole: its validity is read once at one
        pixel per block (from an overview where it has one, see
        :meth:`~geocmid.datasets.geo_raster.GeoRasterDataset.read_valid_coarse`) and a block
        counts as wholly valid or invalid, an estimate rather than a bound
        (``docs/data.md#remote-rasters``).
        """
        p = dataset.placements[i]
        cell = max(MIN_CELL, math.ceil(max(p.height, p.width) / MAX_GRID_CELLS))
        counts = np.zeros((math.ceil(p.height / cell), math.ceil(p.width / cell)), np.int64)
        top = np.arange(counts.shape[0]) * cell
        left = np.arange(counts.shape[1]) * cell
        areas = np.outer(
            np.minimum(top + cell, p.height) - top, np.minimum(left + cell, p.width) - left
        )
        if reads_remotely(dataset.files[i]):
            counts = np.where(dataset.read_valid_coarse(i, counts.shape), areas, 0)
        else:
            counts = cls._count(dataset, i, cell, counts)
        table = np.zeros((counts.shape[0] + 1, counts.shape[1] + 1), np.int64)
        table[1:, 1:] = (areas - counts).cumsum(axis=0).cumsum(axis=1)
        return cls(cell, p.height, p.width, counts, np.cumsum(counts.ravel()), table)

    @staticmethod
    def _count(dataset: GeoRasterDataset, i: int, cell: int, counts: np.ndarray) -> np.ndarray:
        """Exact valid pixels per block of file ``i``, read window by window into ``counts``."""
        p = dataset.placements[i]
        chunk = cell * max(1, 1024 // cell)
        for row in range(0, p.height, chunk):
            for col in range(0, p.width, chunk):
                window = Window(col, row, min(chunk, p.width - col), min(chunk, p.height - row))
                valid = dataset.read_valid(i, window)
                padded = np.pad(valid, ((0, -valid.shape[0] % cell), (0, -valid.shape[1] % cell)))
                rows, cols = padded.shape[0] // cell, padded.shape[1] // cell
                block = padded.reshape(rows, cell, cols, cell).sum(axis=(1, 3))
                counts[row // cell : row // cell + rows, col // cell : col // cell + cols] = block
        return counts

    @property
    def total(self) -> int:
        """Valid pixels in the file."""
        return int(self.cumulative[-1]) if self.cumulative.size else 0

    def propose(
        self, rng: np.random.Generator, n: int, height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Upper-left corners of ``n`` windows inside the file, centred on random valid pixels.

        Centres are drawn uniformly among the valid pixels, at block resolution: a block is
        drawn by its valid count, then a pixel uniformly inside it.
        """
        c = self.cell
        block = np.searchsorted(self.cumulative, rng.integers(self.total, size=n), side='right')
        row0, col0 = np.divmod(block, self.counts.shape[1])
        row0, col0 = row0 * c, col0 * c
        rows = row0 + (rng.random(n) * np.minimum(c, self.height - row0)).astype(np.int64)
        cols = col0 + (rng.random(n) * np.minimum(c, self.width - col0)).astype(np.int64)
        rows = np.clip(rows - height // 2, 0, self.height - height)
        cols = np.clip(cols - width // 2, 0, self.width - width)
        return rows, cols

    def valid_lower_bound_fast(
        self, rows: np.ndarray, cols: np.ndarray, height: int, width: int
    ) -> np.ndarray:
        """Window area minus the invalid pixels of the blocks it touches (vectorised, O(1))."""
        c, table = self.cell, self.invalid_table
        top, bottom = rows // c, (rows + height - 1) // c + 1
        left, right = cols // c, (cols + width - 1) // c + 1
        invalid = table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]
        return height * width - invalid

    def valid_lower_bound(self, row: int, col: int, height: int, width: int) -> int:
        """The tighter, block-by-block lower bound on the valid pixels of one window."""
        c = self.cell
        cell_rows = np.arange(row // c, (row + height - 1) // c + 1) * c
        cell_cols = np.arange(col // c, (col + width - 1) // c + 1) * c
        counts = self.counts[cell_rows[0] // c : cell_rows[-1] // c + 1,
                             cell_cols[0] // c : cell_cols[-1] // c + 1]  # fmt: skip
        block_h = np.minimum(cell_rows + c, self.height) - cell_rows
        block_w = np.minimum(cell_cols + c, self.width) - cell_cols
        inside_h = np.minimum(cell_rows + c, row + height) - np.maximum(cell_rows, row)
        inside_w = np.minimum(cell_cols + c, col + width) - np.maximum(cell_cols, col)
        outside = np.outer(block_h, block_w) - np.outer(inside_h, inside_w)
        return int(np.maximum(counts - outside, 0).sum())


class ValidPatchSampler(SpatialSampler):
    """Random patches with at most ``max_nodata_fraction`` invalid pixels, sharded over ranks.

    Patches are centred on valid pixels drawn uniformly over all files (through per-file
    :class:`ValidityGrid` counts, built when the first sampler on a dataset is created, at the
    cost of one pass over every file's validity), lie inside one file, sit on the dataset's
    pixel grid, and are kept only when the grid's lower bound proves that enough of their
    pixels are valid: no yielded patch is ever mostly nodata. Files smaller than the patch
    are not sampled.

    TorchGeo samplers do not shard across DDP ranks (TorchGeo #305). Here every rank draws
    the same global sequence for an epoch (seeded by ``seed`` and the epoch only) and keeps
    every ``world_size``-th patch from position ``rank``: ranks get disjoint shares of one
    sequence, the first ``len(self) * world_size`` patches that a single process would draw.
    Train with ``Trainer(use_distributed_sampler=False)`` so Lightning does not wrap the
    sampler again.

    Each iteration uses the current epoch and then advances it, so plain loops get fresh
    patches; :meth:`set_epoch` (called by Lightning each epoch) pins it, as for
    ``DistributedSampler``. :meth:`resume` continues an epoch part-way through, for a run
    resumed from a checkpoint taken mid-epoch.
    """

    strategy = 'random'

    def __init__(
        self,
        dataset: GeoRasterDataset,
        *,
        size: int | tuple[int, int],
        length: int | None = None,
        max_nodata_fraction: float | None = None,
        roi: Polygon | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """Initialise a new ValidPatchSampler.

        Args:
            dataset: the rasters to sample.
            size: patch (height, width) in pixels of the dataset grid, or one side.
            length: patches per epoch over all ranks (default: about the number of
                non-overlapping patches that fit in the valid area).
            max_nodata_fraction: largest share of invalid pixels in a patch (default:
                ``dataset.max_nodata_fraction``).
            roi: only patches entirely inside this polygon (in the dataset CRS).
            seed: base seed; the epoch is mixed in.
            rank: this process's rank (default: from ``torch.distributed``, else 0).
            world_size: number of ranks (default: from ``torch.distributed``, else 1).

        Raises:
            InputError: the patch does not fit in any file, or no patch satisfies the
                nodata threshold.
        """
        super().__init__(dataset, roi=roi)
        self.dataset = dataset
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if max_nodata_fraction is None:
            max_nodata_fraction = dataset.max_nodata_fraction
        if not 0 <= max_nodata_fraction < 1:
            raise InputError(
                None, f'max_nodata_fraction must be in [0, 1), got {max_nodata_fraction}'
            )
        self.max_nodata_fraction = max_nodata_fraction
        self.roi = roi
        if roi is not None:
            shapely.prepare(roi)
        self.seed = seed
        self.epoch = 0
        #: (epoch, patches of this rank to skip) for the next iteration of that epoch.
        self._resume_at: tuple[int, int] | None = None
        self.rank, self.world_size = _distributed(rank, world_size)

        height, width = self.size
        root = dataset.roots[0] if len(dataset.roots) == 1 else None
        fits = [p.height >= height and p.width >= width for p in dataset.placements]
        if not any(fits):
            raise InputError(root, f'patch size {height}x{width} px is larger than every raster')
        self.grids = [ValidityGrid.of(dataset, i) if ok else None for i, ok in enumerate(fits)]
        self._weights = np.cumsum([g.total if g else 0 for g in self.grids])
        if self._weights[-1] == 0:
            raise InputError(root, 'no valid pixel in any raster large enough for the patch size')
        self._needed = math.ceil((1 - max_nodata_fraction) * height * width)
        try:
            self._draw(np.random.default_rng(seed), BATCH)
        except RuntimeError:
            raise InputError(
                root,
                f'no {height}x{width} px patch has at most {max_nodata_fraction:.0%} nodata',
            ) from None

        total = length or max(1, int(self._weights[-1]) // (height * width))
        self._length = math.ceil(total / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (same on every rank)."""
        self.epoch = epoch

    def resume(self, epoch: int, consumed: int) -> None:
        """Make the next iteration of ``epoch`` start after this rank's first ``consumed`` patches.

        The skipped patches are drawn but not yielded (nor read), so the rest of the epoch is
        exactly the sequence an uninterrupted run goes on with. Iterations of other epochs are
        unaffected; the current epoch becomes ``epoch``.

        Args:
            epoch: The epoch to continue.
            consumed: Patches of this rank's share already trained on in that epoch.
        """
        self.epoch = epoch
        self._resume_at = (epoch, consumed)

    def __iter__(self) -> Iterator[tuple[slice, slice]]:
        """This rank's patches for the current epoch, then advance the epoch.

        Yields:
            [xmin:xmax, ymin:ymax] in the dataset CRS.
        """
        epoch = self.epoch
        self.epoch += 1
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == epoch:
            skip, self._resume_at = self._resume_at[1], None
        return itertools.islice(self._patches(epoch), skip, None)

    def _patches(self, epoch: int) -> Iterator[tuple[slice, slice]]:
        """Draw the global sequence of ``epoch`` and yield this rank's share."""
        rng = np.random.default_rng([self.seed, epoch])
        wanted = len(self) * self.world_size
        drawn = 0
        while True:
            # Whole batches, whatever is left to draw: the global sequence then depends on
            # the seed and epoch only, not on the length or the number of ranks.
            for i, row, col in self._draw(rng, BATCH):
                if drawn == wanted:
                    return
                if drawn % self.world_size == self.rank:
                    yield self._slices(i, row, col)
                drawn += 1

    def _draw(self, rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
        """Accepted patches among ``n`` candidates: (file index, row, col) in the file.

        Raises:
            RuntimeError: :data:`MAX_BATCHES` batches in a row accepted nothing.
        """
        height, width = self.size
        for _ in range(MAX_BATCHES):
            files = np.searchsorted(self._weights, rng.integers(self._weights[-1], size=n), 'right')
            rows = np.empty(n, dtype=np.int64)
            cols = np.empty(n, dtype=np.int64)
            accepted = np.empty(n, dtype=bool)
            for i in np.unique(files):
                grid = self._grid(i)
                mine = files == i
                rows[mine], cols[mine] = grid.propose(rng, int(mine.sum()), height, width)
                bound = grid.valid_lower_bound_fast(rows[mine], cols[mine], height, width)
                accepted[mine] = bound >= self._needed
            for k in np.flatnonzero(~accepted):  # the O(1) bound was not enough: look closer
                tight = self._grid(files[k]).valid_lower_bound(rows[k], cols[k], height, width)
                accepted[k] = tight >= self._needed
            if self.roi is not None:
                for k in np.flatnonzero(accepted):
                    box = shapely.box(*self._box(files[k], rows[k], cols[k]))
                    accepted[k] = self.roi.contains(box)
            keep = np.flatnonzero(accepted)
            if keep.size:
                kept = (files[keep].tolist(), rows[keep].tolist(), cols[keep].tolist())
                return list(zip(*kept, strict=True))
        raise RuntimeError(
            f'no patch with at most {self.max_nodata_fraction:.0%} nodata in '
            f'{MAX_BATCHES * n} draws'
        )

    def _grid(self, i: int) -> ValidityGrid:
        """The validity grid of file ``i``, which only files too small for a patch lack."""
        grid = self.grids[int(i)]
        assert grid is not None  # such files have zero weight and are never drawn
        return grid

    def _box(self, i: int, row: int, col: int) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of a patch in the dataset CRS."""
        p = self.dataset.placements[i]
        grid = self.dataset.grid
        left, top = grid @ (p.col + col, p.row + row)
        right, bottom = grid @ (p.col + col + self.size[1], p.row + row + self.size[0])
        return left, bottom, right, top

    def _slices(self, i: int, row: int, col: int) -> tuple[slice, slice]:
        """The patch as the GeoSlice datasets take."""
        left, bottom, right, top = self._box(i, row, col)
        return slice(left, right), slice(bottom, top)


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size), from ``torch.distributed`` where not given."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if not 0 <= rank < world_size:
        raise InputError(None, f'rank {rank} is not in [0, {world_size})')
    return rank, world_size
