"""Change detection on image pairs: what change adds to the dense-product pipeline.

A pair runs through the same dense-product pipeline as a single scene
(:mod:`geocmid.inference.dense`: the streaming engine, the COG writer, polygons, many inputs on
one device or several). What change adds is small:

* :class:`PairSource` reads both dates of an :class:`~geocmid.datasets.pairs.AlignedPair` on the
  before image's grid and stacks them on the channel axis, ``(2C, h, w)``, so the engine sees
  an ordinary ``C``-to-``K`` window source; the validity is the union of both images' nodata;
* the model is a siamese network behind :class:`StackedPair`, which splits the channels back
  into TorchGeo's ``(B, T=2, C, h, w)`` layout, or, without a trained model, a label-free
  score (:mod:`geocmid.inference.change_scores`: ``fusion`` of IR-MAD and a pretrained
  encoder's features by default, or ``irmad``, ``features``, ``cva``), fitted on a sample of
  the pair before the scene is streamed;
* the change score is cut at 0.5 for a trained model; a label-free score by a rule found from
  the scene's scores (Kittler-Illingworth by default, :mod:`geocmid.inference.thresholds`);
* many pairs: a CSV, a pair folder or (before, after) tuples, one set of outputs per pair in an
  output folder, each error naming where the pair was listed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from einops import rearrange
from rasterio.windows import Window
from torch import Tensor, nn

from geocmid.datasets.pairs import (
    AlignedPair,
    PairRecord,
    align_pair,
    pair_statistics,
    read_pairs,
)
from geocmid.errors import InputError
from geocmid.inference.bands import model_bands
from geocmid.inference.change_methods import CHANGE_METHODS, ChangeMethod, check_method
from geocmid.inference.change_scores import LabelFreeScore, fit_scores, logit_to_score
from geocmid.inference.cluster import placement
from geocmid.inference.dense import (
    DenseOutputs,
    DenseProduct,
    DenseResult,
    predict_dense,
    predict_many,
)
from geocmid.inference.devices import worker_devices
from geocmid.inference.jobs import ErrorHandler, SkipHandler
from geocmid.inference.manifest import take_shard
from geocmid.inference.onnx_model import OnnxNetwork, is_onnx, load_model
from geocmid.inference.outputs import check_outputs, check_resume, output_folder
from geocmid.inference.runtable import run_table_path
from geocmid.inference.spool import Threshold, check_threshold
from geocmid.inference.thresholds import otsu_threshold
from geocmid.inference.tiling import Blend
from geocmid.io.cards import CHANGE_CLASSES, ClassInfo, ModelCard
from geocmid.models.weights import ENCODER_NAME, RANDOM_PREFIX, load_encoder, sha256_file
from geocmid.raster.bands import COMMON_NAMES
from geocmid.raster.files import BandSelection
from geocmid.raster.normalise import normalise_window
from geocmid.raster.stats import sample_windows
from geocmid.types import PathLike

if TYPE_CHECKING:
    from distributed import Client

# otsu_threshold is part of this module's interface (the threshold of label-free change).
__all__ = (
    'LAYER',
    'ChangeModel',
    'ChangeResult',
    'PairSource',
    'StackedPair',
    'change_model',
    'check_pair',
    'detect_change',
    'detect_changes',
    'otsu_threshold',
    'pair_records',
)

#: GeoPackage layer of the change polygons.
LAYER = 'changes'


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


@dataclass(frozen=True)
class ChangeModel:
    """A change model ready for the engine: a trained siamese model or a label-free encoder.

    Attributes:
        network: maps normalised, stacked pairs ``(B, 2C, h, w)`` to change logits
            ``(B, 1, h, w)``.
        card: the model card: bands, normalisation, tile.
        weights: the checkpoint or encoder the network came from, for provenance.
        label_free: True for a label-free score of an encoder (then ``network`` is the encoder
            until :func:`detect_change` fits the score on the pair).
        method: the label-free method (:data:`~geocmid.inference.change_scores.CHANGE_METHODS`);
            None for a trained model.
    """

    network: nn.Module
    card: ModelCard
    weights: Path
    label_free: bool
    method: ChangeMethod | None = None

    @classmethod
    def load(cls, run_dir: PathLike) -> ChangeModel:
        """Load a ``geocmid train change`` run folder or its ``.onnx`` export (CPU, eval mode).

        Raises:
            InputError: no model card or checkpoint, a card of another task, an unreadable
                checkpoint, or a bad ONNX file.
        """
        loaded = load_model(run_dir, 'change')
        return cls(StackedPair(loaded.network).eval(), loaded.card, loaded.weights, False)

    @classmethod
    def from_encoder(
        cls, encoder: PathLike, method: str = CHANGE_METHODS[0], in_chans: int | None = None
    ) -> ChangeModel:
        """A label-free change model of an encoder (``encoder.pt``, run folder, ``random:NAME``).

        Args:
            encoder: the encoder; its card gives the bands and normalisation.
            method: the label-free method (default ``fusion``).
            in_chans: the channels of a random encoder (``random:NAME``), e.g. from ``--bands``.

        Raises:
            InputError: an unknown method, no encoder or card, or weights that do not fit the
                card.
        """
        method = check_method(method)
        network, card = load_encoder(encoder, in_chans=in_chans)
        path = Path(encoder)
        weights = path / ENCODER_NAME if path.is_dir() else path
        return cls(network.eval(), card, weights, True, method)

    @property
    def default_threshold(self) -> Threshold:
        """0.5 on a trained model's change probability; Kittler-Illingworth on a label-free one."""
        return 'ki' if self.label_free else 0.5

    @property
    def classes(self) -> Sequence[ClassInfo]:
        """Classes of the change raster: 0 no change, 1 change."""
        return CHANGE_CLASSES

    @property
    def num_outputs(self) -> int:
        """One channel: the change logit (its sigmoid is the change score)."""
        return 1

    @cached_property
    def sha256(self) -> str:
        """Hash of the weights, computed once however many pairs are processed."""
        if not self.weights.is_file():  # a random encoder (``random:NAME``)
            return 'none (random initialisation)'
        return sha256_file(self.weights)

    def loader(self) -> Callable[[], ChangeModel]:
        """Loads this model again from its files (in a worker process)."""
        if self.label_free:
            return partial(
                ChangeModel.from_encoder, self.weights, self.method or 'fusion', self.card.in_chans
            )
        if is_onnx(self.weights):  # its card may come from --bands: ship it
            return partial(_onnx_change, self.weights, self.card)
        return partial(ChangeModel.load, self.weights.parent)


def _onnx_change(path: Path, card: ModelCard) -> ChangeModel:
    """An exported change model with the card it was first loaded with."""
    return ChangeModel(StackedPair(OnnxNetwork(path)).eval(), card, path, False)


def random_channels(encoder: PathLike | None, bands: BandSelection | None) -> int | None:
    """The channels of a random encoder (``random:NAME``): as many as ``bands`` selects."""
    if encoder is None or bands is None or not os.fspath(encoder).startswith(RANDOM_PREFIX):
        return None
    return len(list(bands))


def change_model(
    model: PathLike | None = None,
    *,
    encoder: PathLike | None = None,
    method: str | None = None,
    in_chans: int | None = None,
) -> ChangeModel:
    """A trained change model (a run folder) or a label-free one (an encoder): exactly one.

    Args:
        model: a run folder of ``geocmid train change`` or its ``.onnx`` export.
        encoder: an encoder for label-free change.
        method: the label-free method (default ``fusion``); only with ``encoder``.
        in_chans: the channels of a random encoder (``random:NAME``).

    Raises:
        InputError: neither or both given, a method with a trained model, an unknown method,
            or a model that cannot be loaded.
    """
    if method is not None and model is not None:
        raise InputError('--method', 'chooses a label-free method: give --encoder, not --model')
    if (model is None) == (encoder is None):
        problem = 'give exactly one of --model (a trained change model) and --encoder (label-free)'
        raise InputError('--model', problem)
    if model is not None:
        return ChangeModel.load(model)
    assert encoder is not None  # exactly one is given
    return ChangeModel.from_encoder(encoder, method or CHANGE_METHODS[0], in_chans)


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


@dataclass(frozen=True)
class ChangeResult(DenseResult):
    """What :func:`detect_change` produced for one pair.

    Attributes:
        polygons: change polygons (``class_id`` 1, ``class_name`` 'change', ``area_m2``,
            ``mean_score``) in the before image's CRS.
        stats: windows processed, predicted and skipped (no valid pixel).
        threshold: the change-score threshold applied (given, 0.5, or found by the rule), in
            the units of the score COG and of the polygons' ``mean_score``.
        method: the label-free method, or None for a trained model.
        threshold_rule: the rule that found the threshold, or None for a given number.
        vector: the GeoPackage written, if any.
        raster: the binary change COG written, if any.
        probabilities: the change-score COG written, if any.
    """

    threshold: float = 0.5
    method: str | None = None
    threshold_rule: str | None = None

    @property
    def changed_area_m2(self) -> float:
        """Total area of the change polygons in square metres."""
        return float(self.polygons['area_m2'].sum())


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
    threshold: Threshold | None = None,
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
    tta: str = 'none',
    method: str | None = None,
    change_fraction: float | None = None,
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
        model: a run folder of ``geocmid train change``, its ``.onnx`` export, or a loaded
            :class:`ChangeModel` (:meth:`ChangeModel.from_encoder` for label-free detection).
        vector: GeoPackage of change polygons to write (layer :data:`LAYER`).
        raster: binary change COG to write (uint8: 0 no change, 1 change, 255 nodata).
        probabilities: change-score COG to write: the probability of change, or the label-free
            score (float32, in the method's units) that the threshold was applied to.
        threshold: score at or above which a pixel changed, or a rule that finds it from the
            scene's scores: 'ki' (Kittler-Illingworth), 'otsu', 'fraction' (needs
            ``change_fraction``); default 0.5 for a trained model, 'ki' for a label-free one.
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
        tta: test-time augmentation: 'none', 'flips' or 'd4' (:mod:`geocmid.inference.tta`).
        method: label-free only: the method, overriding the model's (``fusion``, ``irmad``,
            ``features``, ``cva``; :mod:`geocmid.inference.change_scores`).
        change_fraction: the expected share of changed pixels: the threshold leaves that share
            above it (the ``fraction`` rule).

    Returns:
        The polygons, the threshold applied and the paths written.

    Raises:
        InputError: existing or unwritable outputs, a bad pair (see
            :func:`~geocmid.datasets.pairs.align_pair`), bands the model takes but the images
            lack, a bad threshold, method or change fraction, bands of different meaning in the
            two images (label-free), or no valid pixel in the overlap.
    """
    if not isinstance(model, ChangeModel):
        model = ChangeModel.load(model)
    if method is not None:
        if not model.label_free:
            raise InputError('--method', 'chooses a label-free method: give --encoder, not --model')
        model = replace(model, method=check_method(method))
    threshold = _threshold(model, threshold, change_fraction)
    outputs = DenseOutputs.of(vector, raster, probabilities)
    check_outputs(outputs.paths, overwrite, inputs=[before, after])
    with align_pair(before, after, nodata=nodata) as pair:
        selected = _check_bands(pair, model.card, bands)
        source = _pair_source(pair, model.card, selected)
        to_score = None
        if model.label_free:
            if bands is None:
                _check_band_meaning(pair, selected)
            model = replace(model, network=_fit_label_free(model, source))
            to_score = logit_to_score
        whole = pair.before_grid
        result = predict_dense(
            source, model, outputs, grid=pair.grid, inputs={'before': before, 'after': after},
            product='change', layer=LAYER, result=ChangeResult,
            output_grid=None if (whole.width, whole.height) == (pair.width, pair.height) else whole,
            threshold=threshold, tile=tile, overlap=overlap, batch_size=batch_size, blend=blend,
            probability_dtype=probability_dtype, min_area=min_area, simplify=simplify,
            device=device, overwrite=overwrite, progress=progress, tta=tta,
            change_fraction=change_fraction, to_score=to_score,
            tags={
                'nodata': nodata,
                'model_kind': f'label-free {model.method}' if model.label_free else 'trained',
                'threshold_rule': threshold if isinstance(threshold, str) else None,
            },
        )  # fmt: skip
    rule = threshold if isinstance(threshold, str) else None
    return replace(result, method=model.method, threshold_rule=rule)


def _threshold(
    model: ChangeModel, threshold: Threshold | str | None, change_fraction: float | None
) -> Threshold:
    """The threshold or rule to apply: checked, ``fraction`` when a change fraction is given.

    Raises:
        InputError: a bad threshold, a change fraction outside (0, 1), or a change fraction
            with another threshold.
    """
    if change_fraction is not None:
        if not 0.0 < change_fraction < 1.0:
            raise InputError('--change-fraction', f'must be in (0, 1), got {change_fraction}')
        if threshold not in (None, 'fraction'):
            raise InputError('--change-fraction', f'conflicts with --threshold {threshold}')
        return 'fraction'
    if threshold == 'fraction':
        raise InputError('--threshold', "'fraction' needs --change-fraction")
    chosen = model.default_threshold if threshold is None else threshold
    return check_threshold(chosen, bounded=not model.label_free)


def _fit_label_free(model: ChangeModel, source: PairSource, max_pixels: int = 2**20) -> nn.Module:
    """Fit the model's label-free score on sample windows of the pair (a bounded read).

    Raises:
        InputError: no valid pixel in the sample, or a score that cannot be fitted.
    """
    assert model.method is not None
    windows, _ = sample_windows(
        source.height, source.width, (256, 256), max_pixels, np.random.default_rng(0)
    )
    samples = (source.read(window, (window.height, window.width)) for window in windows)
    encoder = model.network if model.method in ('features', 'fusion') else None
    try:
        fit = fit_scores(model.method, samples, encoder)
    except InputError as error:
        raise InputError(source.path, str(error).split(': ', 1)[-1]) from None
    return LabelFreeScore(fit, encoder).eval()


def _check_band_meaning(pair: AlignedPair, bands: tuple[int, ...]) -> None:
    """Both images' selected bands measure the same thing, where both say what they measure.

    Only common band names (``red``, ``nir``, ``swir16``...; :data:`COMMON_NAMES`) are
    compared: other descriptions (sensor metadata, file names) differ between dates of the
    same band.

    Raises:
        InputError: a band named differently in the two images (e.g. ``red`` and ``nir``):
            comparing them measures no change; ``--bands`` aligns them explicitly.
    """
    names = pair.band_names
    for band in bands:
        first, second = ((n[band - 1] or '').lower() if band <= len(n) else '' for n in names)
        if first in COMMON_NAMES and second in COMMON_NAMES and first != second:
            raise InputError(
                pair.after,
                f'band {band} is {second!r} here but {first!r} in {pair.before}; '
                'pass --bands to say which bands to compare',
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
    shard: tuple[int, int] | None = None,
    client: Client | str | None = None,
    workers: int | None = None,
    raster: bool = False,
    probabilities: bool = False,
    devices: int | str | Sequence[str] = 1,
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
        out_dir: folder receiving ``<name>.gpkg`` per pair (and the rasters asked for) and the
            run table ``run.parquet``, created if missing; None writes nothing and only
            returns the polygons.
        shard: ``(I, N)``: only every N-th pair from the I-th (0-based), for array jobs; the
            run table is then ``run-<I>-of-<N>.parquet``.
        client: where the pairs run: a :class:`distributed.Client`, a scheduler address
            (``'tcp://host:8786'``), ``'local'`` (an embedded cluster) or ``'none'`` (here);
            None: here, unless several ``devices`` or ``workers`` start an embedded cluster.
            Each worker loads the model once from its files.
        workers: CPU workers of an embedded cluster, one torch thread each.
        raster: also write ``<name>_change.tif``, the binary change COG.
        probabilities: also write ``<name>_score.tif``, the change-score COG.
        devices: the number of GPUs of an embedded cluster, one worker each pinned to its GPU
            (``cuda:0`` ... ``cuda:N-1``), or the devices themselves (``['cuda:1', 'cuda:3']``;
            ``['cpu', 'cpu']`` for two CPU workers). 1: the pairs run on ``device``.
        device: the device of the pairs run here or on a scheduler's workers; 'auto' picks
            CUDA when available.
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
            overlap, batch_size, blend, nodata, bands, probability_dtype, tta).

    Returns:
        The result of each pair that was processed (not skipped) and succeeded (polygons,
        threshold, paths), by pair name (``<before stem>_<after stem>`` unless the CSV names
        it).

    Raises:
        InputError: a bad pair list, model, output folder or device list, ``skip_existing``
            with ``overwrite`` or without ``out_dir``; with ``fail_fast``, the first bad pair,
            named in the message.
    """
    check_resume(overwrite, skip_existing)
    several = worker_devices(devices, device) if devices != 1 else []
    records = pair_records(pairs)
    if isinstance(model, ChangeModel):
        loaded = model
    else:
        loaded = change_model(
            model, encoder=encoder, in_chans=random_channels(encoder, settings.get('bands'))
        )
    folder = None if out_dir is None else output_folder(out_dir)
    if folder is None and (raster or probabilities):
        raise InputError('--raster', 'writing rasters needs an output folder (out_dir)')
    if folder is None and skip_existing:
        raise InputError('--skip-existing', 'skipping finished pairs needs an output folder')

    def outputs(name: str) -> DenseOutputs:
        if folder is None:
            return DenseOutputs()
        return DenseOutputs(
            folder / f'{name}.gpkg',
            folder / f'{name}_change.tif' if raster else None,
            folder / f'{name}_score.tif' if probabilities else None,
        )

    items = {record.name: record for record in records}
    count = len(take_shard(items, shard) if shard else items)
    with placement(
        client, devices=several, workers=workers, device=str(device), inputs=count
    ) as where:
        return predict_many(
            CHANGE, items, loaded, outputs, placement=where, shard=shard,
            run_table=None if folder is None else run_table_path(folder, shard),
            fail_fast=fail_fast, on_error=on_error, on_skip=on_skip, progress=progress,
            overwrite=overwrite, skip_existing=skip_existing, **settings,
        )  # fmt: skip


def _named(record: PairRecord, error: InputError) -> InputError:
    """``error`` prefixed with where the pair was listed, unless it already names that."""
    where = record.source or record.name
    return error if error.source == where else InputError(where, str(error))


def _pair_files(record: PairRecord) -> list[Path]:
    """The files of a pair: both images."""
    return [record.before, record.after]


def _check(record: PairRecord, model: ChangeModel, settings: Mapping[str, Any]) -> None:
    """Check a pair of a many-pair run (its outputs are checked by the pipeline)."""
    record.check_files()
    check_pair(
        record.before, record.after, model, nodata=settings.get('nodata'),
        bands=settings.get('bands'),
    )  # fmt: skip


def _predict(
    record: PairRecord,
    model: ChangeModel,
    outputs: DenseOutputs,
    device: torch.device,
    settings: Mapping[str, Any],
) -> ChangeResult:
    """Detect the changes of a pair of a many-pair run into its outputs."""
    return detect_change(
        record.before, record.after, model, vector=outputs.vector, raster=outputs.raster,
        probabilities=outputs.probabilities, device=device, progress=False, **settings,
    )  # fmt: skip


#: Change detection as a dense product of many pairs.
CHANGE = DenseProduct('pair', LAYER, _pair_files, _check, _predict, _named)
