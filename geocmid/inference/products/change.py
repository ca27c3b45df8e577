"""Change detection on an image pair: what it adds to the streaming segmentation machinery.

A pair runs through the same engine (:func:`~geocmid.inference.engine.predict_scene`) and the
same writers (:class:`~geocmid.io.cog.PredictionWriter`, :func:`~geocmid.io.vectors.polygonize`)
as a single scene. What change adds is small:

* :class:`PairSource` reads both dates of an :class:`~geocmid.datasets.pairs.AlignedPair` on the
  before image's grid and stacks them on the channel axis, ``(2C, h, w)``, so the engine sees
  an ordinary ``C``-to-``K`` window source; the validity is the union of both images' nodata;
* the model is a siamese network behind :class:`StackedPair`, which splits the channels back
  into TorchGeo's ``(B, T=2, C, h, w)`` layout, or, without a trained model, the label-free
  :class:`FeatureDistance` of a pretrained encoder;
* the threshold on the blended change score may be found by Otsu's method, which needs the
  whole score distribution: the scores are then spooled to a temporary raster while their
  histogram is counted, and replayed into the writer once the threshold is known;
* many pairs: a CSV, a pair folder or (before, after) tuples, one set of outputs per pair in an
  output folder (:func:`~geocmid.inference.jobs.run_jobs`, as for many scenes).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal, Self

import geopandas as gpd
import numpy as np
import rasterio
import torch
from einops import rearrange
from rasterio.windows import Window
from torch import Tensor, nn

from geocmid.datasets.pairs import (
    AlignedPair,
    Grid,
    PairRecord,
    align_pair,
    pair_statistics,
    read_pairs,
)
from geocmid.errors import InputError
from geocmid.inference.bands import model_bands
from geocmid.inference.engine import predict_scene
from geocmid.inference.jobs import ErrorHandler, SkipHandler, default_tile, resolve_device, run_jobs
from geocmid.inference.outputs import (
    check_item_outputs,
    check_outputs,
    check_resume,
    output_folder,
    provenance_tags,
)
from geocmid.inference.reader import normalise_window
from geocmid.inference.tiling import Blend
from geocmid.io.cards import ModelCard
from geocmid.io.cog import GDAL_CACHE_BYTES, PredictionWriter, gdal_cache_limit
from geocmid.io.vectors import polygonize
from geocmid.models.weights import ENCODER_NAME, load_encoder, sha256_file
from geocmid.raster.files import BandSelection
from geocmid.runs.change import CHANGE_CLASSES, load_change_model
from geocmid.runs.segmentation import MODEL_NAME
from geocmid.types import PathLike

#: GeoPackage layer of the change polygons.
LAYER = 'changes'

#: Bins of the change-score histogram behind Otsu's threshold (a resolution of 1/1024).
OTSU_BINS = 1024

#: Rows and columns of the spooled score raster replayed into the writer at once.
_REPLAY_ROWS = 256
_REPLAY_COLUMNS = 8192


class StackedPair(nn.Module):
    """Adapter from the engine's stacked ``(B, 2C, h, w)`` windows to a siamese change model.

    Args:
        model: maps ``(B, 2, C, h, w)`` (before, after) to change logits ``(B, 1, h, w)``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pairs: Tensor) -> Tensor:
        """Change logits of stacked, normalised pairs."""
        return self.model(rearrange(pairs, 'b (t c) h w -> b t c h w', t=2))


class FeatureDistance(nn.Module):
    """Label-free change score: how much a pretrained encoder's features differ between dates.

    Each stage's feature maps of both dates are compared by cosine distance per feature pixel
    (0 for parallel, 2 for opposite features), upsampled bilinearly to the window and averaged
    over the stages, from fine (stride 2 or 4) to coarse (stride 32), so that both small and
    large changes count. The score ``distance / 2`` lies in [0, 1]; it is returned as a logit,
    so that the engine's sigmoid turns it back into the score before blending.

    Args:
        encoder: a timm encoder with ``forward_intermediates`` (ResNet, Swin, ...).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def score(self, pairs: Tensor) -> Tensor:
        """Change score in [0, 1], (B, 1, h, w), of stacked, normalised pairs (B, 2C, h, w)."""
        before, after = pairs.chunk(2, dim=1)
        features = self.encoder.forward_intermediates(
            torch.cat([before, after]), intermediates_only=True
        )
        distance = pairs.new_zeros((pairs.shape[0], 1, *pairs.shape[-2:]))
        for stage in features:
            a, b = stage.float().chunk(2)
            cosine = nn.functional.cosine_similarity(a, b, dim=1, eps=1e-6)[:, None]
            distance += nn.functional.interpolate(
                1.0 - cosine, size=pairs.shape[-2:], mode='bilinear', align_corners=False
            )
        return (distance / (2 * len(features))).clamp(0.0, 1.0)

    def forward(self, pairs: Tensor) -> Tensor:
        """The change score as a logit (see the class docstring)."""
        return torch.logit(self.score(pairs), eps=1e-6)


@dataclass(frozen=True)
class ChangeModel:
    """A change model ready for the engine: a trained siamese model or a label-free encoder.

    Attributes:
        network: maps normalised, stacked pairs ``(B, 2C, h, w)`` to change logits
            ``(B, 1, h, w)``.
        card: the model card: bands, normalisation, tile.
        weights: the checkpoint or encoder the network came from, for provenance.
        label_free: True for the :class:`FeatureDistance` of an encoder.
    """

    network: nn.Module
    card: ModelCard
    weights: Path
    label_free: bool

    @classmethod
    def load(cls, run_dir: PathLike) -> ChangeModel:
        """Load the model of a ``geocmid train change`` run folder (on the CPU, eval mode).

        Raises:
            InputError: no model card or checkpoint, a card of another task, or an unreadable
                checkpoint.
        """
        network, card = load_change_model(run_dir)
        return cls(StackedPair(network).eval(), card, Path(run_dir) / MODEL_NAME, False)

    @classmethod
    def from_encoder(cls, encoder: PathLike) -> ChangeModel:
        """The label-free :class:`FeatureDistance` of an encoder (``encoder.pt`` or run folder).

        Raises:
            InputError: no encoder or card, or weights that do not fit the card.
        """
        network, card = load_encoder(encoder)
        weights = Path(encoder) / ENCODER_NAME if Path(encoder).is_dir() else Path(encoder)
        return cls(FeatureDistance(network).eval(), card, weights, True)

    @property
    def default_threshold(self) -> float | Literal['otsu']:
        """0.5 on a trained model's change probability; Otsu on a label-free score."""
        return 'otsu' if self.label_free else 0.5

    @cached_property
    def sha256(self) -> str:
        """Hash of the weights, computed once however many pairs are processed."""
        return sha256_file(self.weights)


def change_model(model: PathLike | None = None, *, encoder: PathLike | None = None) -> ChangeModel:
    """A trained change model (a run folder) or a label-free one (an encoder): exactly one.

    Raises:
        InputError: neither or both given, or a model that cannot be loaded.
    """
    if (model is None) == (encoder is None):
        problem = 'give exactly one of --model (a trained change model) and --encoder (label-free)'
        raise InputError('--model', problem)
    return ChangeModel.load(model) if model is not None else ChangeModel.from_encoder(encoder)


class PairSource:
    """An aligned pair as an engine window source: both dates stacked, ``(2C, h, w)``.

    Args:
        pair: the aligned pair.
        bands: 1-based bands read from both images, in model channel order.
        mean: per-band normalisation mean (raw units), the same for both dates.
        std: per-band normalisation standard deviation.
    """

    def __init__(
        self, pair: AlignedPair, bands: tuple[int, ...], mean: np.ndarray, std: np.ndarray
    ) -> None:
        self.pair = pair
        self.bands = bands
        self.mean = np.tile(np.asarray(mean, dtype=np.float32), 2)[:, None, None]
        self.std = np.tile(np.asarray(std, dtype=np.float32), 2)[:, None, None]
        # Named in the engine's error when the overlap holds no valid pixel.
        self.path = f'{pair.before} and {pair.after}'

    @property
    def height(self) -> int:
        """Grid height in pixels."""
        return self.pair.height

    @property
    def width(self) -> int:
        """Grid width in pixels."""
        return self.pair.width

    def read(self, window: Window, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Both dates in ``window``, normalised, stacked and zero-padded to ``size``."""
        before, after, valid = self.pair.read(window, indexes=self.bands)
        return normalise_window(np.concatenate([before, after]), valid, self.mean, self.std, size)


def otsu_threshold(counts: np.ndarray, edges: np.ndarray) -> float:
    """Otsu's threshold of a histogram: the cut that maximises the between-class variance.

    Written here because the scores are only ever seen as a streamed histogram (scikit-image's
    ``threshold_otsu`` is not a dependency, and no full-scene array exists to pass it).

    Args:
        counts: pixels per bin.
        edges: bin edges, one more than ``counts``.

    Returns:
        The lower edge of the first bin of the upper class: values ``>=`` it are class 1.
    """
    total = counts.sum()
    if total == 0:
        raise ValueError('empty histogram')
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts) / total  # share of the lower class, cutting after each bin
    mean = np.cumsum(counts * centres) / total
    with np.errstate(divide='ignore', invalid='ignore'):
        between = (mean[-1] * weight - mean) ** 2 / (weight * (1 - weight))
    between[~np.isfinite(between)] = -1.0  # cuts with an empty class
    if between.max() < 0:  # a single populated bin: nothing to separate
        return float(edges[np.flatnonzero(counts)[0] + 1])
    return float(edges[int(np.argmax(between)) + 1])


class ScoreSpool:
    """A block sink that spools the blended change score and counts its histogram.

    The scores go to a temporary raster, so that they can be thresholded once their whole
    distribution is known and then replayed into the writer.

    Args:
        path: the temporary GeoTIFF (float32, NaN where invalid).
        grid: the grid blocks come on.
    """

    def __init__(self, path: Path, grid: Grid) -> None:
        self.path = path
        self.counts = np.zeros(OTSU_BINS, dtype=np.int64)
        self.edges = np.linspace(0.0, 1.0, OTSU_BINS + 1)
        self.dataset = rasterio.open(
            path, 'w', driver='GTiff', width=grid.width, height=grid.height, count=1,
            dtype='float32', crs=grid.crs, transform=grid.transform, nodata=float('nan'),
            tiled=True, blockxsize=256, blockysize=256,
        )  # fmt: skip

    def write_block(
        self, row_off: int, col_off: int, probabilities: np.ndarray, valid: np.ndarray
    ) -> None:
        """Take a finished block: (1, rows, cols) scores and their validity."""
        score = probabilities[0].astype(np.float32, copy=True)
        self.counts += np.histogram(score[valid], bins=self.edges)[0]
        score[~valid] = np.nan
        window = Window(col_off, row_off, score.shape[1], score.shape[0])
        self.dataset.write(score, 1, window=window)

    def threshold(self) -> float:
        """Otsu's threshold of the scores written so far."""
        return otsu_threshold(self.counts, self.edges)

    def replay(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Yield the spooled scores the way the engine delivers blocks.

        Strips of at most ``_REPLAY_COLUMNS`` columns go from left to right, rows from top to
        bottom within a strip.

        Yields:
            ``(row_off, col_off, scores (1, rows, cols), valid (rows, cols))``.
        """
        self.close()
        with rasterio.open(self.path) as src:
            for col in range(0, src.width, _REPLAY_COLUMNS):
                width = min(_REPLAY_COLUMNS, src.width - col)
                for row in range(0, src.height, _REPLAY_ROWS):
                    window = Window(col, row, width, min(_REPLAY_ROWS, src.height - row))
                    score = src.read(1, window=window)
                    valid = ~np.isnan(score)
                    yield row, col, np.nan_to_num(score)[None], valid

    def close(self) -> None:
        """Finish writing the spool."""
        self.dataset.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ChangeResult:
    """What :func:`detect_change` produced for one pair.

    Attributes:
        polygons: change polygons (``class_id`` 1, ``class_name`` 'change', ``area_m2``,
            ``mean_score``) in the before image's CRS.
        threshold: the change-score threshold applied (given, 0.5, or Otsu's).
        vector: the GeoPackage written, if any.
        raster: the binary change COG written, if any.
        probabilities: the change-score COG written, if any.
    """

    polygons: gpd.GeoDataFrame
    threshold: float
    vector: Path | None = None
    raster: Path | None = None
    probabilities: Path | None = None

    @property
    def changed_area_m2(self) -> float:
        """Total area of the change polygons in square metres."""
        return float(self.polygons['area_m2'].sum())

    @property
    def paths(self) -> list[Path]:
        """The files written: GeoPackage, change raster, scores (those asked for)."""
        return [p for p in (self.vector, self.raster, self.probabilities) if p is not None]


@dataclass(frozen=True)
class PairJob:
    """One pair of a many-pair run and where its outputs go."""

    record: PairRecord
    vector: Path | None
    raster: Path | None
    probabilities: Path | None

    @property
    def outputs(self) -> list[Path | None]:
        """GeoPackage, change raster and scores (None when not asked for)."""
        return [self.vector, self.raster, self.probabilities]


def check_pair(
    before: PathLike,
    after: PathLike,
    model: ChangeModel,
    outputs: Iterable[PathLike | None] = (),
    *,
    overwrite: bool = False,
    nodata: float | None = None,
    bands: BandSelection | None = None,
) -> None:
    """Check a pair and its outputs before any computation (only file headers are read).

    Raises:
        InputError: existing, unwritable or clashing outputs, a bad pair (see
            :func:`~geocmid.datasets.pairs.align_pair`), or bands the model takes but the images
            lack.
    """
    check_outputs(outputs, overwrite, inputs=[before, after])
    with align_pair(before, after, nodata=nodata) as pair:
        _check_bands(pair, model.card, bands)


def _check_bands(
    pair: AlignedPair, card: ModelCard, bands: BandSelection | None = None
) -> tuple[int, ...]:
    """The bands of the pair that feed the model, by the rule ``segment`` follows."""
    return model_bands(pair.before, pair.count, (), card, bands)


def detect_change(
    before: PathLike,
    after: PathLike,
    model: PathLike | ChangeModel,
    *,
    vector: PathLike | None = None,
    raster: PathLike | None = None,
    probabilities: PathLike | None = None,
    threshold: float | Literal['otsu'] | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    blend: Blend = 'cosine',
    nodata: float | None = None,
    bands: BandSelection | None = None,
    probability_dtype: Literal['uint8', 'float32'] = 'uint8',
    device: torch.device | str = 'auto',
    overwrite: bool = False,
    progress: bool = True,
) -> ChangeResult:
    """Detect changes between two images and polygonise them.

    Example, label-free with a pretrained encoder::

        encoder = ChangeModel.from_encoder('runs/cmid/encoder.pt')
        result = detect_change('2016.tif', '2020.tif', encoder, vector='changes.gpkg')
        print(result.changed_area_m2, result.threshold)

    The after image is aligned onto the before image's grid
    (:func:`~geocmid.datasets.pairs.align_pair`), both are read window by window, the model's
    change score is blended across windows and thresholded into a binary change raster, which
    is polygonised as a whole. Outputs lie on the before image's whole grid (nodata outside the
    overlap and wherever either image has no data) and are written atomically; every output
    path is checked before any computation.

    Args:
        before: the earlier image.
        after: the later image.
        model: a run folder of ``geocmid train change`` or a loaded :class:`ChangeModel`
            (:meth:`ChangeModel.from_encoder` for label-free detection).
        vector: GeoPackage of change polygons to write (layer :data:`LAYER`).
        raster: binary change COG to write (uint8: 0 no change, 1 change, 255 nodata).
        probabilities: change-score COG to write (probability of change, or the label-free
            feature distance in [0, 1]).
        threshold: score at or above which a pixel changed, or 'otsu'; default 0.5 for a
            trained model and 'otsu' for a label-free one.
        min_area: smallest change polygon kept, in square metres.
        simplify: polygon simplification tolerance in metres (0 keeps pixel edges).
        tile: window size in pixels; default the model card's.
        overlap: window overlap in pixels; default a quarter of the tile.
        batch_size: windows per forward pass.
        blend: 'cosine', 'linear', 'gaussian' or 'none' (crop-centre).
        nodata: overrides or supplies both images' nodata value.
        bands: 1-based indexes of the image bands to feed the model (e.g. the RGB bands of RGBN
            images for an RGB model); default the card's, by the rule of
            :func:`~geocmid.inference.bands.model_bands`.
        probability_dtype: 'uint8' (quantised, scale 1/254) or 'float32'.
        device: where the model runs; 'auto' picks CUDA when available.
        overwrite: replace existing outputs.
        progress: show a progress bar over the windows.

    Returns:
        The polygons, the threshold applied and the paths written.

    Raises:
        InputError: existing or unwritable outputs, a bad pair (see
            :func:`~geocmid.datasets.pairs.align_pair`), bands the model takes but the images
            lack, a bad threshold, or no valid pixel in the overlap.
    """
    if not isinstance(model, ChangeModel):
        model = ChangeModel.load(model)
    outputs = [Path(p) for p in (vector, raster, probabilities) if p is not None]
    check_outputs(outputs, overwrite, inputs=[before, after])
    threshold = model.default_threshold if threshold is None else threshold
    if threshold != 'otsu' and not 0.0 <= float(threshold) <= 1.0:
        raise InputError('--threshold', f"must be between 0 and 1 or 'otsu', got {threshold}")
    tile = tile or default_tile(model.card)
    device = resolve_device(device)
    network = model.network.to(device)
    engine = dict(
        num_classes=1, tile=tile, overlap=overlap, batch_size=batch_size, blend=blend,
        device=device, progress=progress,
    )  # fmt: skip
    # Rasters not asked for are still needed by the polygons (labels, mean scores): they go to
    # a hidden folder beside the outputs, so that renaming them into place stays on one
    # filesystem; without outputs, to the system's temporary folder.
    folder = outputs[0].absolute().parent if outputs else None
    with (
        align_pair(before, after, nodata=nodata) as pair,
        tempfile.TemporaryDirectory(dir=folder, prefix='.geocmid-change-') as scratch,
    ):
        source = _pair_source(pair, model.card, _check_bands(pair, model.card, bands))
        spool = None
        if threshold == 'otsu':
            # Otsu needs every score: spool them, then replay them into the writer.
            with (
                ScoreSpool(Path(scratch) / 'spool.tif', pair.grid) as spool,
                gdal_cache_limit(GDAL_CACHE_BYTES),
            ):
                predict_scene(source, network, spool, **engine)
            threshold = spool.threshold()
        labels_path = Path(raster or Path(scratch) / 'change.tif')
        scores_path = Path(probabilities or Path(scratch) / 'score.tif')
        tags = provenance_tags(
            model.weights, sha256=model.sha256, inputs={'before': before, 'after': after},
            tile=tile, overlap=overlap, blend=blend, threshold=f'{threshold:.6g}', nodata=nodata,
            model_kind='label-free feature distance' if model.label_free else 'trained',
        )  # fmt: skip
        whole = pair.before_grid
        with PredictionWriter(
            pair.grid, labels_path, classes=CHANGE_CLASSES, probabilities_path=scores_path,
            probability_dtype=probability_dtype, threshold=float(threshold),
            output_grid=None if (whole.width, whole.height) == (pair.width, pair.height) else whole,
            tags=tags, overwrite=overwrite,
        ) as writer:  # fmt: skip
            if spool is None:
                predict_scene(source, network, writer, **engine)
            else:
                for block in spool.replay():
                    writer.write_block(*block)
        polygons = polygonize(
            labels_path, vector, probabilities_path=scores_path,
            class_names=[c.name for c in CHANGE_CLASSES], background=0,
            min_area=min_area, simplify=simplify, layer=LAYER, overwrite=overwrite,
        )  # fmt: skip
    return ChangeResult(
        polygons,
        float(threshold),
        vector=Path(vector) if vector is not None else None,
        raster=Path(raster) if raster is not None else None,
        probabilities=Path(probabilities) if probabilities is not None else None,
    )


def _pair_source(pair: AlignedPair, card: ModelCard, bands: tuple[int, ...]) -> PairSource:
    """The pair read with ``bands`` and the card's normalisation."""
    if card.mean is not None and card.std is not None:
        return PairSource(pair, bands, np.asarray(card.mean), np.asarray(card.std))
    # An encoder that fixes no normalisation (random initialisation): standardise the pair.
    stats = pair_statistics(pair, bands)
    return PairSource(pair, bands, stats.mean, np.where(stats.std > 0, stats.std, 1.0))


def pair_records(pairs: PathLike | Iterable[tuple[PathLike, PathLike]]) -> list[PairRecord]:
    """The pairs of a pair list (CSV or folder) or of (before, after) tuples, uniquely named.

    Tuples are named ``<before stem>_<after stem>``, with ``_<n>`` appended to a repeat.

    Raises:
        InputError: a bad pair list, or no pairs.
    """
    if isinstance(pairs, str | os.PathLike):
        return read_pairs(pairs)
    records: list[PairRecord] = []
    names: set[str] = set()
    for index, (before, after) in enumerate(pairs, start=1):
        before, after = Path(before), Path(after)
        name = f'{before.stem}_{after.stem}'
        if name in names:
            name = f'{name}_{index}'
        names.add(name)
        records.append(PairRecord(before, after, name=name, source=f'pair {index} ({name})'))
    if not records:
        raise InputError('pairs', 'no pairs given')
    return records


def detect_changes(
    pairs: PathLike | Iterable[tuple[PathLike, PathLike]],
    *,
    model: PathLike | ChangeModel | None = None,
    encoder: PathLike | None = None,
    out_dir: PathLike | None = None,
    raster: bool = False,
    probabilities: bool = False,
    device: torch.device | str = 'auto',
    fail_fast: bool = True,
    on_error: ErrorHandler | None = None,
    on_skip: SkipHandler | None = None,
    progress: bool = True,
    overwrite: bool = False,
    skip_existing: bool = False,
    **settings: Any,
) -> dict[str, ChangeResult]:
    """Detect changes in many pairs, each after image aligned onto its before image's grid.

    Every pair and its outputs are checked (file headers only) before the first pair runs.

    Example, the changed area between consecutive dates of a folder of scenes::

        scenes = sorted(Path('sample_data/naip').glob('*.tif'))
        results = detect_changes(zip(scenes, scenes[1:]), encoder='encoder.pt', out_dir='out')
        for name, result in results.items():
            print(name, f'{result.changed_area_m2 / 1e4:.1f} ha')

    Args:
        pairs: (before, after) paths, or a pair list: a CSV with ``before,after`` columns
            (optionally ``name``) or a LEVIR-CD / SZTAKI AirChange folder.
        model: a change run folder (``geocmid train change``) or a loaded :class:`ChangeModel`.
        encoder: instead of ``model``, an encoder for label-free detection (per-pixel distance
            of the two dates' features, thresholded by Otsu's method by default).
        out_dir: folder receiving ``<name>.gpkg`` per pair (and the rasters asked for), created
            if missing; None writes nothing and only returns the polygons.
        raster: also write ``<name>_change.tif``, the binary change COG.
        probabilities: also write ``<name>_score.tif``, the change-score COG.
        device: where the model runs; 'auto' picks CUDA when available.
        fail_fast: stop at the first bad pair; otherwise report it through ``on_error`` and
            go on with the others.
        on_error: called with a pair's name and its error when ``fail_fast`` is False.
        on_skip: called with the name of each pair skipped by ``skip_existing``.
        progress: show a progress bar over the pairs.
        overwrite: replace existing outputs.
        skip_existing: resume an interrupted run: skip the pairs whose outputs all exist and
            are complete (:func:`~geocmid.inference.outputs.outputs_complete`) and process the
            others again, replacing partial or invalid outputs. Needs ``out_dir``.
        **settings: the options of :func:`detect_change` (threshold, min_area, simplify, tile,
            overlap, batch_size, blend, nodata, probability_dtype).

    Returns:
        The result of each pair that was processed (not skipped) and succeeded (polygons,
        threshold, paths), by pair name (``<before stem>_<after stem>`` unless the CSV names
        it).

    Raises:
        InputError: a bad pair list, model or output folder, ``skip_existing`` with
            ``overwrite`` or without ``out_dir``; with ``fail_fast``, the first bad pair, named
            in the message.
    """
    check_resume(overwrite, skip_existing)
    records = pair_records(pairs)
    loaded = model if isinstance(model, ChangeModel) else change_model(model, encoder=encoder)
    folder = None if out_dir is None else output_folder(out_dir)
    if folder is None and (raster or probabilities):
        raise InputError('--raster', 'writing rasters needs an output folder (out_dir)')
    if folder is None and skip_existing:
        raise InputError('--skip-existing', 'skipping finished pairs needs an output folder')

    def output(name: str, wanted: bool) -> Path | None:
        return folder / name if folder is not None and wanted else None

    jobs: dict[str, PairJob] = {}
    skipped: list[str] = []
    for record in records:
        job = PairJob(
            record, output(f'{record.name}.gpkg', True),
            output(f'{record.name}_change.tif', raster),
            output(f'{record.name}_score.tif', probabilities),
        )  # fmt: skip
        try:
            record.check_files()
            inputs = [record.before, record.after]
            if check_item_outputs(
                job.outputs, LAYER, overwrite=overwrite, skip_existing=skip_existing, inputs=inputs
            ):
                skipped.append(record.name)
                continue
            check_pair(
                record.before, record.after, loaded, nodata=settings.get('nodata'),
                bands=settings.get('bands'),
            )  # fmt: skip
        except InputError as exc:
            error = _named(record, exc)
            if fail_fast or on_error is None:
                raise error from None
            on_error(record.name, error)
            continue
        jobs[record.name] = job
    # Resuming replaces the leftovers of the pairs that run again.
    options = {**settings, 'overwrite': overwrite or skip_existing}
    return run_jobs(
        jobs, partial(_runner, loaded, options), devices=[device], fail_fast=fail_fast,
        on_error=on_error, skipped=skipped, on_skip=on_skip, progress=progress, unit='pair',
    )  # fmt: skip


def _named(record: PairRecord, error: InputError) -> InputError:
    """``error`` prefixed with where the pair was listed, unless it already names that."""
    where = record.source or record.name
    return error if error.source == where else InputError(where, str(error))


def _runner(
    model: ChangeModel, options: dict[str, Any], device: torch.device
) -> partial[ChangeResult]:
    """The job function of a device."""
    return partial(_change_job, model, options, device)


def _change_job(
    model: ChangeModel, options: dict[str, Any], device: torch.device, job: PairJob
) -> ChangeResult:
    """Detect the changes of one pair into its output files, naming the pair in errors."""
    try:
        return detect_change(
            job.record.before, job.record.after, model, vector=job.vector, raster=job.raster,
            probabilities=job.probabilities, device=device, progress=False, **options,
        )  # fmt: skip
    except InputError as exc:
        raise _named(job.record, exc) from None
