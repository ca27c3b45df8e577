"""One pipeline for every dense product: windows -> model -> blended map -> COGs -> polygons.

A dense product (segmentation, change detection) says only what is its own:

* how an input is read: a window source for the engine (a scene, an aligned pair) and the
  grids its outputs lie on;
* its model (:class:`DenseModel`): the network, its card, the classes of the label raster,
  and how many outputs the network gives (several: argmax of a softmax; one: a binary score,
  cut at a threshold that is given or found from the scores by a rule);
* how its inputs are checked, named and listed (:class:`DenseProduct`).

This module does the rest, once for all of them: the device and tile, provenance tags, the
streaming engine (:func:`~geocmid.inference.engine.predict_scene`), the COG writer
(:class:`~geocmid.io.cog.PredictionWriter`), the Otsu pass, polygons
(:func:`~geocmid.io.vectors.polygonize`), and many inputs in this process or on the workers of
a Dask cluster (:func:`~geocmid.inference.jobs.run_jobs`), with a run table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, Self

import geopandas as gpd
import numpy as np
import torch
from torch import nn

from geocmid.errors import InputError
from geocmid.inference.cluster import Placement
from geocmid.inference.devices import resolve_device
from geocmid.inference.engine import InferenceStats, WindowSource, predict_scene
from geocmid.inference.jobs import ErrorHandler, SkipHandler, run_jobs
from geocmid.inference.manifest import take_shard
from geocmid.inference.outputs import check_item_outputs, check_resume, provenance_tags
from geocmid.inference.runtable import RunTable
from geocmid.inference.spool import ScoreSpool, Threshold
from geocmid.inference.tiling import Blend
from geocmid.inference.tta import with_tta
from geocmid.io.atomic import scratch_folder
from geocmid.io.cards import ClassInfo, ModelCard
from geocmid.io.cog import GDAL_CACHE_BYTES, GridLike, PredictionWriter, gdal_cache_limit
from geocmid.io.vectors import polygonize
from geocmid.types import PathLike

#: Tile used when a model card gives neither a tile nor a patch size.
DEFAULT_TILE = 256


def default_tile(card: ModelCard) -> int:
    """The inference tile a model card implies: its tile size, else its training patch size."""
    return card.tile_size or card.patch_size or DEFAULT_TILE


class DenseModel(Protocol):
    """A model a dense product runs: its network, card and label classes."""

    @property
    def network(self) -> nn.Module:
        """Maps normalised ``(B, C, h, w)`` windows to logits ``(B, num_outputs, h, w)``."""
        ...

    @property
    def card(self) -> ModelCard:
        """The model card: bands, normalisation, tile."""
        ...

    @property
    def weights(self) -> Path:
        """The file the weights came from, for provenance."""
        ...

    @property
    def classes(self) -> Sequence[ClassInfo]:
        """Classes of the label raster, by class id."""
        ...

    @property
    def num_outputs(self) -> int:
        """Channels of the logits: the classes (softmax), or 1 for a binary score (sigmoid)."""
        ...

    @property
    def sha256(self) -> str:
        """Hash of the weights (computed once however many inputs are processed)."""
        ...

    def loader(self) -> Callable[[], Self]:
        """A picklable function that loads this model again, in a worker process."""
        ...


@dataclass(frozen=True)
class DenseOutputs:
    """The files one input's predictions go to; None for those not asked for.

    Attributes:
        vector: GeoPackage of polygons.
        raster: label COG.
        probabilities: probability (or score) COG.
    """

    vector: Path | None = None
    raster: Path | None = None
    probabilities: Path | None = None

    @classmethod
    def of(
        cls,
        vector: PathLike | None = None,
        raster: PathLike | None = None,
        probabilities: PathLike | None = None,
    ) -> DenseOutputs:
        """Outputs from paths given in any form."""
        paths = (None if p is None else Path(p) for p in (vector, raster, probabilities))
        return cls(*paths)

    @property
    def slots(self) -> list[Path | None]:
        """GeoPackage, labels and probabilities, None where not asked for."""
        return [self.vector, self.raster, self.probabilities]

    @property
    def paths(self) -> list[Path]:
        """The files asked for: GeoPackage, labels, probabilities."""
        return [p for p in self.slots if p is not None]


@dataclass(frozen=True)
class DenseResult:
    """What a dense product produced for one input.

    Attributes:
        polygons: class polygons (``class_id``, ``class_name``, ``area_m2``, ``mean_score``) in
            the input's CRS; background (class 0) is not polygonised.
        stats: windows processed, predicted and skipped (no valid pixel).
        threshold: the score threshold applied by a binary model; None for argmax.
        vector: the GeoPackage written, if any.
        raster: the label COG written, if any.
        probabilities: the probability COG written, if any.
    """

    polygons: gpd.GeoDataFrame
    stats: InferenceStats
    threshold: float | None = None
    vector: Path | None = None
    raster: Path | None = None
    probabilities: Path | None = None

    @property
    def paths(self) -> list[Path]:
        """The files written: GeoPackage, labels, probabilities (those asked for)."""
        return [p for p in (self.vector, self.raster, self.probabilities) if p is not None]


def predict_dense[R: DenseResult](
    source: WindowSource,
    model: DenseModel,
    outputs: DenseOutputs,
    *,
    grid: GridLike,
    inputs: Mapping[str, PathLike],
    product: str,
    layer: str,
    result: type[R],
    output_grid: GridLike | None = None,
    threshold: Threshold | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    blend: Blend = 'cosine',
    probability_dtype: Literal['uint8', 'float32'] = 'uint8',
    min_area: float = 0.0,
    simplify: float = 0.0,
    device: torch.device | str = 'auto',
    overwrite: bool = False,
    progress: bool = True,
    tags: Mapping[str, object] | None = None,
    tta: str = 'none',
    change_fraction: float | None = None,
    to_score: Callable[[np.ndarray], np.ndarray] | None = None,
) -> R:
    """Predict one input into its outputs and polygons; the outputs must have been checked.

    Rasters not asked for are still needed by the polygons (labels, mean scores): they go to a
    hidden folder beside the outputs, so that renaming them into place stays on one
    filesystem; without outputs, to the system's temporary folder. With a threshold rule
    the scores are spooled while their histogram is counted, and replayed into the writer once
    the threshold is known.

    Args:
        source: the input, read by windows, normalised.
        model: the model.
        outputs: where the outputs go.
        grid: the grid the source's windows lie on.
        inputs: the input files by role (``scene``; ``before``, ``after``), for provenance.
        product: the product's name (``segment``, ``change``), for the scratch folder.
        layer: the GeoPackage layer of the polygons.
        result: the result class to return.
        output_grid: the grid to write on when it differs from ``grid`` (a larger or finer
            one with the same CRS).
        threshold: for a binary model: the score at or above which a pixel is class 1, or the
            rule that finds it (``ki``, ``otsu``, ``fraction``; :mod:`~.thresholds`).
        tile: window size in pixels; default the card's (:func:`default_tile`).
        overlap: window overlap in pixels; default a quarter of the tile.
        batch_size: windows per forward pass.
        blend: 'cosine', 'linear', 'gaussian' or 'none' (crop-centre).
        probability_dtype: 'uint8' (quantised, scale 1/254) or 'float32'.
        min_area: smallest polygon kept, in square metres.
        simplify: polygon simplification tolerance in metres (0 keeps pixel edges).
        device: where the model runs; 'auto' picks CUDA when available.
        overwrite: replace existing outputs.
        progress: show a progress bar over the windows.
        tags: further provenance settings (None values are left out).
        tta: test-time augmentation, 'none', 'flips' or 'd4' (:mod:`geocmid.inference.tta`).
        change_fraction: the share of class-1 pixels, for the ``fraction`` rule.
        to_score: turns the engine's blended values into the score that is thresholded and
            written (then always as float32); the values themselves when None.

    Raises:
        InputError: a bad device, engine setting or TTA mode, or no valid pixel in the input.
    """
    device = resolve_device(device)
    tile = tile or default_tile(model.card)
    network = with_tta(model.network, tta).to(device)
    run_engine = partial(
        predict_scene, source, network, num_classes=model.num_outputs, tile=tile,
        overlap=overlap, batch_size=batch_size, blend=blend, device=device, progress=progress,
    )  # fmt: skip
    folder = outputs.paths[0].absolute().parent if outputs.paths else None
    with scratch_folder(folder, prefix=f'.geocmid-{product}-') as scratch:
        spooled = None
        if isinstance(threshold, str) or to_score is not None:
            with (
                ScoreSpool(scratch / 'spool.tif', grid, to_score) as spooled,
                gdal_cache_limit(GDAL_CACHE_BYTES),
            ):
                stats = run_engine(spooled)
            if isinstance(threshold, str):
                threshold = spooled.threshold(threshold, change_fraction)
        if to_score is not None:
            probability_dtype = 'float32'  # scores are not probabilities: no quantisation
        # Argmax of several classes needs no threshold; one binary score is cut at ``cut``.
        cut = None if threshold is None else float(threshold)
        labels_path = outputs.raster or scratch / 'labels.tif'
        scores_path = outputs.probabilities or scratch / 'probabilities.tif'
        provenance = provenance_tags(
            model.weights, sha256=model.sha256, inputs=inputs, tile=tile, overlap=overlap,
            blend=blend, threshold=None if cut is None else f'{cut:.6g}',
            tta=None if tta == 'none' else tta, **(tags or {}),
        )  # fmt: skip
        with PredictionWriter(
            grid, labels_path, classes=model.classes, probabilities_path=scores_path,
            probability_dtype=probability_dtype, output_grid=output_grid, tags=provenance,
            overwrite=overwrite, **({} if cut is None else {'threshold': cut}),
        ) as writer:  # fmt: skip
            if spooled is None:
                stats = run_engine(writer)
            else:
                for block in spooled.replay():
                    writer.write_block(*block)
        polygons = polygonize(
            labels_path, outputs.vector, probabilities_path=scores_path,
            class_names=[c.name for c in model.classes], min_area=min_area, simplify=simplify,
            layer=layer, overwrite=overwrite,
        )  # fmt: skip
    return result(
        polygons=polygons, stats=stats, threshold=cut,
        vector=outputs.vector, raster=outputs.raster, probabilities=outputs.probabilities,
    )  # fmt: skip


@dataclass(frozen=True)
class DenseJob[I]:
    """One input of a many-input run and where its outputs go."""

    item: I
    outputs: DenseOutputs


def _as_is(item: object, error: InputError) -> InputError:
    """Errors of an input that name it already."""
    return error


@dataclass(frozen=True)
class DenseProduct[I, M: DenseModel, R]:
    """What a product adds to the many-input run: its functions, each picklable.

    Attributes:
        unit: what an input is ('scene', 'pair'), for the progress bar and messages.
        layer: the GeoPackage layer, to tell complete outputs.
        inputs: the files of an input, which no output may replace.
        check: checks an input before any computation: ``check(item, model, settings)``.
        predict: predicts an input into its outputs:
            ``predict(item, model, outputs, device, settings)``.
        named: the error of an input as reported (e.g. prefixed with where it was listed).
    """

    unit: str
    layer: str
    inputs: Callable[[I], Sequence[PathLike]]
    check: Callable[[I, M, Mapping[str, Any]], None]
    predict: Callable[[I, M, DenseOutputs, torch.device, Mapping[str, Any]], R]
    named: Callable[[I, InputError], InputError] = _as_is


def predict_many[I, M: DenseModel, R](
    product: DenseProduct[I, M, R],
    items: Mapping[str, I],
    model: M,
    outputs: Callable[[str], DenseOutputs],
    *,
    placement: Placement | None = None,
    shard: tuple[int, int] | None = None,
    run_table: PathLike | None = None,
    fail_fast: bool = True,
    on_error: ErrorHandler | None = None,
    on_skip: SkipHandler | None = None,
    progress: bool = True,
    overwrite: bool = False,
    skip_existing: bool = False,
    **settings: Any,
) -> dict[str, R]:
    """Predict many inputs, each into its own outputs, in this process or on a Dask cluster.

    Every input and its outputs are checked before the first input runs.

    Args:
        product: the product.
        items: the inputs by name.
        model: the model, loaded.
        outputs: the outputs of an input, by its name.
        placement: where the inputs run (:func:`~geocmid.inference.cluster.placement`): in
            this process, one after the other, with ``model``; or on a cluster's workers, each
            loading the model once from its files (:meth:`DenseModel.loader`). None: here.
        shard: ``(I, N)``: only the inputs ``I``, ``I + N``, ``I + 2N``... (an array job's
            share; :func:`~geocmid.inference.manifest.take_shard`).
        run_table: the run table to write (:mod:`~geocmid.inference.runtable`); None: none.
        fail_fast: stop at the first bad input; otherwise report it through ``on_error`` and
            go on with the others.
        on_error: called with an input's name and its error when ``fail_fast`` is False.
        on_skip: called with the name of each input skipped by ``skip_existing``.
        progress: show a progress bar over the inputs.
        overwrite: replace existing outputs.
        skip_existing: resume an interrupted run: skip the inputs whose outputs all exist and
            are complete (:func:`~geocmid.inference.outputs.outputs_complete`) and process the
            others again, replacing partial or invalid outputs.
        **settings: the product's settings for each input.

    Returns:
        The result of each input that was processed (not skipped) and succeeded, by name.

    Raises:
        InputError: ``skip_existing`` with ``overwrite``; with ``fail_fast``, the first bad
            input.
    """
    check_resume(overwrite, skip_existing)
    if shard is not None:
        items = take_shard(items, shard)
    every_input = [path for item in items.values() for path in product.inputs(item)]
    table = None
    if run_table is not None:
        table = RunTable(
            run_table, {name: product.inputs(item) for name, item in items.items()},
            {name: outputs(name).paths for name in items},
        )  # fmt: skip
    jobs: dict[str, DenseJob[I]] = {}
    skipped: list[str] = []
    for name, item in items.items():
        job = DenseJob(item, outputs(name))
        try:
            if check_item_outputs(
                job.outputs.slots, product.layer, overwrite=overwrite,
                skip_existing=skip_existing, inputs=every_input,
            ):  # fmt: skip
                skipped.append(name)
                continue
            product.check(item, model, settings)
        except InputError as exc:
            error = product.named(item, exc)
            if fail_fast or on_error is None:
                raise error from None  # nothing ran: no run table
            if table is not None:
                table.failed(name, str(error))
            on_error(name, error)
            continue
        jobs[name] = job
    # Resuming replaces the leftovers of the inputs that run again.
    options = {**settings, 'overwrite': overwrite or skip_existing}
    if placement is None or placement.client is None:
        # In this process: the model loaded here runs here, the inputs one after the other.
        runner = partial(_runner, product, lambda: model, options)
    else:
        # On a cluster: each worker process loads the model once from its files. Every output
        # was checked above, so a job run again after its worker died replaces what the dead
        # attempt renamed into place.
        options['overwrite'] = True
        runner = partial(_runner, product, model.loader(), options)
    return run_jobs(
        jobs, runner, placement=placement, fail_fast=fail_fast, on_error=on_error,
        skipped=skipped, on_skip=on_skip, progress=progress, unit=product.unit, table=table,
    )  # fmt: skip


def _runner[I, M: DenseModel, R](
    product: DenseProduct[I, M, R],
    load: Callable[[], M],
    options: Mapping[str, Any],
    device: torch.device,
) -> partial[R]:
    """The job function of one device (in a worker process: loads the model there, once)."""
    return partial(_job, product, load(), options, device)


def _job[I, M: DenseModel, R](
    product: DenseProduct[I, M, R],
    model: M,
    options: Mapping[str, Any],
    device: torch.device,
    job: DenseJob[I],
) -> R:
    """Predict the input of one job into its outputs, naming the input in errors."""
    try:
        return product.predict(job.item, model, job.outputs, device, options)
    except InputError as exc:
        raise product.named(job.item, exc) from None
