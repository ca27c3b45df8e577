"""Tile embeddings: one encoder vector per window of a grid over each raster, as GeoParquet.

Each row holds the window's footprint in the raster's CRS, computed from the raster's float64
geotransform (corner by corner, so rotated grids stay exact), the source file, the window's
pixel offsets and size, the share of valid pixels, and the globally average-pooled feature
vector. Windows without any valid pixel are skipped. Many rasters may be embedded on the
workers of a Dask cluster (:mod:`~geocmid.inference.cluster`), one raster per job, each worker
loading the encoder once; the table is put together, in raster order, in this process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import torch
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.windows import Window
from torch import nn

from geocmid.errors import InputError
from geocmid.inference.cluster import placement
from geocmid.inference.encoders import global_average_pooled, seeded_encoder
from geocmid.inference.jobs import run_jobs
from geocmid.inference.runtable import RunTable
from geocmid.inference.tiling import window_starts
from geocmid.io.atomic import atomic_output, check_writable
from geocmid.io.cards import ModelCard
from geocmid.progress import progress_bar
from geocmid.raster.files import ValidityRule, crs_name, find_rasters, raster_band_stats
from geocmid.raster.scene import SceneReader, open_scene
from geocmid.raster.stats import BandStats
from geocmid.types import PathLike

if TYPE_CHECKING:
    from distributed import Client

#: Pixels read per raster to estimate band statistics for an encoder whose card has none.
STATS_PIXELS = 2**20

#: Columns of the embeddings table besides ``embedding`` and ``geometry``.
COLUMNS = ('source', 'row', 'col', 'height', 'width', 'valid_fraction')


def grid_windows(height: int, width: int, tile: int, stride: int) -> list[Window]:
    """Windows of ``tile`` pixels every ``stride`` pixels, anchored at the raster origin.

    The last row and column of windows end on the raster edge, so every pixel is covered
    when ``stride <= tile``; a raster smaller than a tile gets one window of its own size.
    """
    return [
        Window(col, row, min(tile, width), min(tile, height))
        for row in window_starts(height, tile, stride)
        for col in window_starts(width, tile, stride)
    ]


def window_footprint(transform: Affine, window: Window) -> shapely.Polygon:
    """The polygon covered by ``window``: its four pixel corners through ``transform``."""
    col, row, width, height = window.col_off, window.row_off, window.width, window.height
    corners = [(col, row), (col + width, row), (col + width, row + height), (col, row + height)]
    return shapely.Polygon([transform @ corner for corner in corners])


def embed(
    rasters: PathLike | Sequence[PathLike],
    encoder: PathLike,
    output: PathLike | None = None,
    *,
    tile: int | None = None,
    stride: int | None = None,
    bands: Sequence[int] | None = None,
    batch_size: int = 32,
    device: torch.device | str = 'auto',
    overwrite: bool = False,
    progress: bool = False,
    client: Client | str | None = None,
    workers: int | None = None,
) -> gpd.GeoDataFrame:
    """Embed every window of a grid over each raster with a frozen encoder.

    Args:
        rasters: A raster, a folder of rasters (searched recursively), or several of either.
            All must share one CRS.
        encoder: ``encoder.pt`` (with its card), a run folder, or ``'random:<backbone>'``
            (then ``bands`` and ``tile`` are required).
        output: GeoParquet file to write; None only returns the table.
        tile: Window side in pixels; default the card's patch size.
        stride: Step between windows in pixels; default ``tile`` (no overlap).
        bands: 1-based raster bands in the encoder's channel order; default the card's
            ``band_indices``.
        batch_size: Windows per forward pass.
        device: Where the encoder runs; ``'auto'`` picks CUDA when available.
        overwrite: Replace an existing ``output``.
        progress: Show a progress bar over the rasters.
        client: Where the rasters are embedded: a :class:`distributed.Client`, a scheduler
            address, ``'local'`` (an embedded cluster) or ``'none'`` (here, the default).
            With an ``output``, the run table ``<output stem>.run.parquet`` is written too.
        workers: CPU workers of an embedded cluster, one torch thread each.

    Returns:
        One row per window with valid pixels: ``source``, ``row``, ``col``, ``height``,
        ``width``, ``valid_fraction``, ``embedding`` (float32 vector) and the footprint
        ``geometry``, in the rasters' CRS.

    Raises:
        InputError: A missing encoder or card, a random encoder without ``bands``, no tile
            size, a bad tile or stride, rasters without CRS or with different CRSs, bands the
            rasters lack, or an existing ``output`` without ``overwrite``.
    """
    if output is not None:
        check_writable(output, overwrite)
    model, card = seeded_encoder(encoder, bands)
    tile = tile or card.patch_size
    if tile is None:
        raise InputError('--tile', "is required: the encoder's model card gives no patch size")
    stride = stride or tile
    for name, value in (('--tile', tile), ('--stride', stride)):
        if value < 1:
            raise InputError(name, f'must be a positive number of pixels, got {value}')
    indexes = list(bands) if bands else list(card.band_indices)
    files = find_rasters(rasters)
    crs = _check_rasters(files, indexes)
    if card.mean is not None and card.std is not None:
        mean, std = list(card.mean), list(card.std)
    else:  # a random encoder's card fixes no normalisation: standardise with the rasters'
        mean, std = _band_statistics(files, indexes)

    embed_file = partial(_embed_file, indexes=indexes, mean=mean, std=std, tile=tile,
                         stride=stride, batch_size=batch_size)  # fmt: skip
    jobs = {str(path): path for path in files}
    table = None
    if output is not None:
        log = Path(output).with_name(f'{Path(output).stem}.run.parquet')
        table = RunTable(log, {name: [name] for name in jobs}, {name: [output] for name in jobs})
    with placement(client, workers=workers, device=str(device), inputs=len(files)) as where:
        if where.client is None:  # the encoder loaded here runs here, a bar over each's windows
            here = partial(embed_file, progress=progress)
            runner = partial(_file_embedder, lambda: model, here)
        else:  # each worker loads it once; a bar over the rasters
            runner = partial(_file_embedder, partial(seeded_encoder, encoder, bands), embed_file)
        outer = progress and where.client is not None
        parts = run_jobs(jobs, runner, placement=where, progress=outer, unit='raster', table=table)
    rows = [row for part, _ in parts.values() for row in part]
    footprints = [footprint for _, part in parts.values() for footprint in part]
    frame = gpd.GeoDataFrame(
        pd.DataFrame(rows, columns=[*COLUMNS, 'embedding']), geometry=footprints, crs=crs
    )
    if output is not None:
        write_embeddings(frame, output, overwrite=overwrite)
    return frame


def _file_embedder(
    load: Callable[[], nn.Module | tuple[nn.Module, ModelCard]],
    embed_file: Callable[..., tuple[list[dict[str, object]], list[shapely.Polygon]]],
    device: torch.device,
) -> Callable[[Path], tuple[list[dict[str, object]], list[shapely.Polygon]]]:
    """The job of one device: embed a raster with the encoder ``load`` gives, loaded once."""
    loaded = load()
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    return partial(embed_file, global_average_pooled(model).eval().to(device))


def _embed_file(
    model: nn.Module,
    path: Path,
    *,
    indexes: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    tile: int,
    stride: int,
    batch_size: int,
    progress: bool = False,
) -> tuple[list[dict[str, object]], list[shapely.Polygon]]:
    """The rows and footprints of every window of one raster with a valid pixel.

    With ``progress``, a bar counts the raster's windows (the real count, whatever its size).
    """
    rows: list[dict[str, object]] = []
    footprints: list[shapely.Polygon] = []
    with SceneReader(path, bands=indexes, mean=mean, std=std) as reader:
        windows = grid_windows(reader.height, reader.width, tile, stride)
        shown = progress_bar(windows, desc=path.name, unit='window', disable=not progress)
        for window, fraction, vector in _embed_windows(model, reader, shown, batch_size):
            rows.append(
                {
                    'source': str(path),
                    'row': int(window.row_off),
                    'col': int(window.col_off),
                    'height': int(window.height),
                    'width': int(window.width),
                    'valid_fraction': fraction,
                    'embedding': vector,
                }
            )
            footprints.append(window_footprint(reader.transform, window))
    return rows, footprints


@torch.inference_mode()
def _embed_windows(
    model: torch.nn.Module, reader: SceneReader, windows: Iterable[Window], batch_size: int
) -> Iterator[tuple[Window, float, np.ndarray]]:
    """Yield ``(window, valid fraction, embedding)`` for every window with a valid pixel."""
    device = next(model.parameters()).device
    batch: list[tuple[Window, float, np.ndarray]] = []

    def run() -> Iterator[tuple[Window, float, np.ndarray]]:
        images = torch.from_numpy(np.stack([image for _, _, image in batch])).to(device)
        vectors = model(images).float().cpu().numpy()
        for (window, fraction, _), vector in zip(batch, vectors, strict=True):
            yield window, fraction, vector
        batch.clear()

    for window in windows:
        # Every window of a raster has the same size, so none needs padding to batch.
        image, valid = reader.read(window, (int(window.height), int(window.width)))
        if not valid.any():
            continue
        batch.append((window, float(valid.mean()), image))
        if len(batch) == batch_size:
            yield from run()
    if batch:
        yield from run()


def _check_rasters(files: Sequence[Path], indexes: Sequence[int]) -> CRS:
    """Check that every raster is georeferenced and has the bands; return their shared CRS.

    Everything is checked before any window is embedded, and one table holds one CRS.
    """
    crs_of = {}
    for path in files:
        with open_scene(path) as src:
            bad = [index for index in indexes if not 1 <= index <= src.count]
            if bad:
                raise InputError(
                    path, f'band index(es) {bad} not in 1..{src.count}; choose bands with --bands'
                )
            crs_of[path] = src.crs
    first, crs = files[0], crs_of[files[0]]
    for path, other in crs_of.items():
        if other != crs:
            raise InputError(
                path,
                f'CRS {crs_name(other)} differs from {crs_name(crs)} of {first}; '
                'embed rasters of each CRS separately',
            )
    return crs


def _band_statistics(
    files: Sequence[Path], indexes: Sequence[int]
) -> tuple[list[float], list[float]]:
    """Per-band mean and std of the valid pixels of ``files``, from sampled windows."""
    rng = np.random.default_rng(0)
    total = BandStats.empty(len(indexes))
    for path in files:
        with open_scene(path) as src:
            rule = ValidityRule.of(src, indexes)
            total = total.merge(raster_band_stats(src, indexes, rule, STATS_PIXELS, rng))
    std = [float(s) if s > 0 else 1.0 for s in total.std]
    return [float(m) for m in total.mean], std


def write_embeddings(table: gpd.GeoDataFrame, path: PathLike, *, overwrite: bool = False) -> Path:
    """Write an embeddings table as GeoParquet, atomically.

    Raises:
        InputError: ``path`` exists and ``overwrite`` is False, or its folder is not writable.
    """
    with atomic_output(path, overwrite=overwrite) as tmp:
        table.to_parquet(tmp)
    return Path(path)
