"""Streaming whole-scene prediction: windows -> batches -> model -> blended rows -> a sink.

The engine is model-agnostic: it takes any callable that maps a normalised float32 batch
``(B, C, h, w)`` to logits ``(B, K, h, w)``. It turns logits into class probabilities (softmax,
or sigmoid for a single binary output) *before* blending, so the blended map is itself a
probability map; labels are taken afterwards by the sink. (TerraTorch and ArcGIS blend raw
logits instead; Raster Vision averages softmax scores as geocmid does.)

Memory does not grow with the scene height: windows are processed in raster order and the
accumulator holds one window-row band, ``(K, tile, width)`` sums plus ``(tile, width)``
weights. When the windows move down to the next band, the rows above it can receive no more
contributions; they are normalised and handed to the sink, and the band slides down. Scenes
wider than ``max_width`` are processed as vertical strips (:meth:`TileGrid.strips`), each
with the windows that touch it, so memory stays bounded in width too; results are the same.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from rasterio.windows import Window
from torch import Tensor, nn

from geocmid.errors import InputError
from geocmid.inference.devices import autocast_dtype
from geocmid.inference.tiling import BLENDS, Blend, Strip, TileGrid, default_overlap
from geocmid.progress import progress_bar

#: A model: normalised float32 images (B, C, h, w) -> logits (B, K, h, w).
Predictor = Callable[[Tensor], Tensor]


class WindowSource(Protocol):
    """What the engine reads from: a grid of ``height`` x ``width`` pixels read by windows."""

    @property
    def height(self) -> int:
        """Grid height in pixels."""
        ...

    @property
    def width(self) -> int:
        """Grid width in pixels."""
        ...

    def read(self, window: Window, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Return float32 (C, *size) normalised pixels and a bool (*size) validity mask."""
        ...


class BlockSink(Protocol):
    """Where finished blocks go: strip by strip from left to right, top to bottom in a strip."""

    def write_block(
        self, row_off: int, col_off: int, probabilities: np.ndarray, valid: np.ndarray
    ) -> None:
        """Take a block at (``row_off``, ``col_off``): float32 (K, rows, cols), bool validity."""
        ...


class BlendAccumulator:
    """Weighted sums of class probabilities over the band of rows that windows still touch.

    Args:
        num_classes: number of probability channels K.
        band_height: height of the open band: the window height.
        height: height of the whole grid.
        strip: the columns accumulated (its span) and handed to the sink (its own columns).
        sink: receives finished, normalised blocks.
    """

    def __init__(
        self, num_classes: int, band_height: int, height: int, strip: Strip, sink: BlockSink
    ) -> None:
        self.height = height
        self.strip = strip
        self.sink = sink
        self.top = 0
        width = strip.span[1] - strip.span[0]
        self.sums = np.zeros((num_classes, band_height, width), dtype=np.float32)
        self.weights = np.zeros((band_height, width), dtype=np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the probability sums, (K, band height, span width): not the scene's size."""
        return self.sums.shape

    def add(self, window: Window, probabilities: np.ndarray, weights: np.ndarray) -> None:
        """Add one window's probabilities with their weights (0 where the input is invalid).

        Windows must come in raster order; reaching a new row of windows finishes the rows
        above it.

        Args:
            window: where the window lies in the grid.
            probabilities: float32 (K, window height, window width).
            weights: float32 (window height, window width).
        """
        row, col = int(window.row_off), int(window.col_off) - self.strip.span[0]
        rows, cols = weights.shape
        self.advance_to(row)
        top = row - self.top
        probabilities *= weights
        self.sums[:, top : top + rows, col : col + cols] += probabilities
        self.weights[top : top + rows, col : col + cols] += weights

    def advance_to(self, row: int) -> None:
        """Finish every row above ``row`` and hand it to the sink."""
        band_height = self.weights.shape[0]
        while self.top < row:
            self._emit(min(row - self.top, band_height))

    def finish(self) -> None:
        """Finish all remaining rows."""
        self.advance_to(self.height)

    def _emit(self, count: int) -> None:
        count = min(count, self.height - self.top)
        first, last = (x - self.strip.span[0] for x in (self.strip.start, self.strip.stop))
        weights = self.weights[:count, first:last]
        valid = weights > 0
        probabilities = np.zeros((self.sums.shape[0], *weights.shape), np.float32)
        np.divide(self.sums[:, :count, first:last], weights, out=probabilities, where=valid)
        self.sink.write_block(self.top, self.strip.start, probabilities, valid)
        # Slide the band down: the rows below the finished ones move to the top.
        self.sums[:, :-count] = self.sums[:, count:]
        self.sums[:, -count:] = 0.0
        self.weights[:-count] = self.weights[count:]
        self.weights[-count:] = 0.0
        self.top += count


@dataclass(frozen=True)
class InferenceStats:
    """What a run did.

    Attributes:
        windows: windows processed (a window on a strip border counts once per strip).
        predicted: windows that went through the model.
        skipped: windows without any valid pixel (no forward pass).
        buffer_shape: largest shape of the accumulator's probability sums (K, tile, width),
            the memory that scales with the scene.
    """

    windows: int
    predicted: int
    skipped: int
    buffer_shape: tuple[int, ...]


def probabilities_from_logits(logits: Tensor) -> Tensor:
    """Softmax over classes, or sigmoid when the model has a single (binary) output."""
    logits = logits.float()
    return logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(dim=1)


def _read_group(
    source: WindowSource, group: list[tuple[int, int, Window]], size: tuple[int, int]
) -> tuple[list[tuple[int, int, Window, np.ndarray]], np.ndarray | None]:
    """Read a group of windows; keep those with at least one valid pixel."""
    kept, images = [], []
    for i, j, window in group:
        image, valid = source.read(window, size)
        if valid.any():
            kept.append((i, j, window, valid))
            images.append(image)
    return kept, (np.stack(images) if images else None)


def _prefetched(
    source: WindowSource,
    windows: list[tuple[int, int, Window]],
    size: tuple[int, int],
    batch_size: int,
) -> Iterator[tuple[int, list[tuple[int, int, Window, np.ndarray]], np.ndarray | None]]:
    """Yield ``(windows in the group, kept windows, images)`` while the next group is read.

    One background thread reads, so I/O overlaps the forward pass; a single thread also keeps
    the dataset handle, which GDAL does not allow to be shared, on one thread at a time.
    """
    groups = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix='geocmid-read') as pool:
        pending: deque[Future[tuple[list[tuple[int, int, Window, np.ndarray]], np.ndarray | None]]]
        pending = deque(pool.submit(_read_group, source, group, size) for group in groups[:2])
        try:
            for index, group in enumerate(groups):
                kept, images = pending.popleft().result()
                if index + 2 < len(groups):  # keep two groups in flight while the model runs
                    pending.append(pool.submit(_read_group, source, groups[index + 2], size))
                yield len(group), kept, images
        finally:
            for future in pending:
                future.cancel()


def predict_scene(
    source: WindowSource,
    predict: Predictor,
    sink: BlockSink,
    *,
    num_classes: int,
    tile: int,
    overlap: int | None = None,
    batch_size: int = 4,
    blend: Blend = 'cosine',
    device: torch.device | str = 'cpu',
    amp: bool = True,
    max_width: int = 8192,
    progress: bool = True,
) -> InferenceStats:
    """Predict a whole scene window by window and stream finished blocks to ``sink``.

    Each output pixel is ``sum(weight * probabilities) / sum(weight)`` over the windows that
    cover it, where the weight is the window's blend weight (see
    :meth:`~geocmid.inference.tiling.TileGrid.weights`) times the input validity. Pixels whose
    input is invalid in every covering window get no weight and come out invalid. Windows
    without any valid pixel are not passed to the model. The accumulation order is the raster
    order of the windows, whatever the batch size or ``max_width``, so results do not depend
    on them.

    Args:
        source: the scene, read by windows (e.g. a :class:`~geocmid.raster.scene.SceneReader`).
        predict: the model; an :class:`torch.nn.Module` is put in eval mode.
        sink: receives finished blocks (e.g. a :class:`~geocmid.io.cog.PredictionWriter`).
        num_classes: K, the number of model outputs (1 for a binary sigmoid model).
        tile: window size in pixels; windows are padded to it when the scene is smaller.
        overlap: overlap between windows in pixels; default a quarter of the tile.
        batch_size: windows per forward pass.
        blend: how overlapping windows are combined: 'cosine', 'linear', 'gaussian' or
            'none' (crop-centre).
        device: where the model runs.
        amp: run the model in mixed precision where the device has it, as training does:
            bfloat16 (float16 on GPUs without it) on CUDA, float32 elsewhere
            (:func:`~geocmid.inference.devices.autocast_dtype`); False: float32 everywhere.
        max_width: widest strip processed at once, in pixels; wider scenes are split into
            strips whose border windows are computed twice.
        progress: show a progress bar (windows done, windows/s, ETA).

    Returns:
        Counts of the windows and the accumulator's buffer shape.

    Raises:
        InputError: a bad tile, overlap or blend, a model output of the wrong shape, or a
            scene without any valid pixel.
    """
    if blend not in BLENDS:
        raise InputError(None, f'unknown blend {blend!r}; choose one of {", ".join(BLENDS)}')
    overlap = default_overlap(tile) if overlap is None else overlap
    grid = TileGrid(source.height, source.width, tile, overlap)
    device = torch.device(device)
    if isinstance(predict, nn.Module):
        predict.eval()
    size = (tile, tile)
    strips = grid.strips(max_width)
    dtype = autocast_dtype(device) if amp else None
    autocast = (
        contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
    )
    predicted = skipped = 0
    largest: tuple[int, ...] = ()
    total = sum(len(grid.row_starts) * len(strip.columns) for strip in strips)
    bar = progress_bar(total=total, unit='win', desc='inference', disable=not progress)
    with bar, torch.inference_mode():
        for strip in strips:
            accumulator = BlendAccumulator(
                num_classes, grid.window_height, grid.height, strip, sink
            )
            largest = max(largest, accumulator.shape)
            windows = grid.windows(strip.columns)
            for count, kept, images in _prefetched(source, windows, size, batch_size):
                bar.update(count)
                skipped += count - len(kept)
                if images is None:
                    continue
                with autocast:
                    logits = predict(torch.from_numpy(images).to(device))
                expected = (len(kept), num_classes, *size)
                if tuple(logits.shape) != expected:
                    shape = tuple(logits.shape)
                    problem = f'returned logits of shape {shape}, expected {expected}'
                    raise InputError('model', problem)
                probabilities = probabilities_from_logits(logits).cpu().numpy()
                rows, cols = grid.window_height, grid.window_width
                for (i, j, window, valid), scores in zip(kept, probabilities, strict=True):
                    weights = grid.weights(i, j, blend) * valid[:rows, :cols]
                    accumulator.add(window, scores[:, :rows, :cols], weights)
                predicted += len(kept)
            if predicted == 0 and strip is strips[-1]:
                where = getattr(source, 'path', None)
                raise InputError(where, 'no valid pixel to predict (all nodata)')
            accumulator.finish()
    return InferenceStats(total, predicted, skipped, largest)
