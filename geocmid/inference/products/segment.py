"""Segmentation of whole scenes with a trained model: class polygons and rasters per scene.

What segmentation adds to the streaming engine (:func:`~geocmid.inference.engine.predict_scene`)
and the writers (:class:`~geocmid.io.cog.PredictionWriter`, :func:`~geocmid.io.vectors.polygonize`)
is small:

* :class:`SegmentationModel`, the network and card of a ``geocmid train segment`` run folder;
  the card says which bands to read, how to normalise them (the same as in training), the
  classes with their colours, the tile and the ground resolution;
* the check that a scene gives the bands the model takes;
* per scene, a label COG (and optionally a probability COG) on the scene's own grid, polygonised
  as a whole into a GeoPackage layer;
* many scenes: globs, folders and lists, one set of outputs per scene in an output folder, on
  one device or spread over several (:func:`~geocmid.inference.jobs.run_jobs`).
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal

import geopandas as gpd
import torch
from pyproj import CRS
from rasterio.io import DatasetReader
from torch import nn

from geocmid.errors import InputError
from geocmid.inference.bands import model_bands
from geocmid.inference.engine import InferenceStats, predict_scene
from geocmid.inference.jobs import (
    ErrorHandler,
    SkipHandler,
    cuda_devices,
    default_tile,
    resolve_device,
    run_jobs,
)
from geocmid.inference.outputs import (
    check_item_outputs,
    check_outputs,
    check_resume,
    output_folder,
    provenance_tags,
    unique_names,
)
from geocmid.inference.reader import SceneReader, open_scene
from geocmid.inference.tiling import Blend
from geocmid.io.cards import ClassInfo, ModelCard
from geocmid.io.cog import PredictionWriter
from geocmid.io.vectors import metres_to_crs_units, polygonize
from geocmid.models.weights import sha256_file
from geocmid.raster.files import BandSelection, find_rasters
from geocmid.runs.segmentation import MODEL_NAME, load_segmentation_model
from geocmid.types import PathLike

#: ``'scene'`` (or None): the scene's own grid; ``'model'``: the card's ground resolution; a
#: number: that resolution in metres. Outputs always come back on the scene's grid.
type Resolution = float | Literal['scene', 'model'] | None

#: Suffix of the probability raster of a scene in an output folder: ``<name>_probabilities.tif``.
PROBABILITIES_SUFFIX = '_probabilities'

#: GeoPackage layer of the class polygons.
LAYER = 'predictions'


@dataclass(frozen=True)
class SegmentationModel:
    """A trained segmentation model ready for the engine.

    Attributes:
        network: maps normalised ``(B, C, h, w)`` images to logits ``(B, K, h, w)``.
        card: the model card: bands, normalisation, classes, tile, resolution.
        weights: the checkpoint the network came from, for provenance.
    """

    network: nn.Module
    card: ModelCard
    weights: Path

    @classmethod
    def load(cls, run_dir: PathLike) -> SegmentationModel:
        """Load the model of a ``geocmid train segment`` run folder (on the CPU, eval mode).

        Raises:
            InputError: no model card or checkpoint, a card of another task or without
                classes, or an unreadable checkpoint.
        """
        network, card = load_segmentation_model(run_dir)
        if card.classes is None or len(card.classes) < 2:
            raise InputError(run_dir, 'the model card lists no classes')
        return cls(network, card, Path(run_dir) / MODEL_NAME)

    @property
    def run_dir(self) -> Path:
        """The run folder the model was loaded from."""
        return self.weights.parent

    @property
    def classes(self) -> list[ClassInfo]:
        """Output classes in class-id order."""
        assert self.card.classes is not None  # checked by load()
        return self.card.classes

    @cached_property
    def sha256(self) -> str:
        """Hash of the checkpoint, computed once however many scenes are segmented."""
        return sha256_file(self.weights)


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment_scene` produced for one scene.

    Attributes:
        polygons: class polygons (``class_id``, ``class_name``, ``area_m2``, ``mean_score``)
            in the scene's CRS; background (class 0) is not polygonised.
        stats: windows processed, predicted and skipped (no valid pixel).
        vector: the GeoPackage written, if any.
        raster: the label COG written, if any.
        probabilities: the probability COG written, if any.
    """

    polygons: gpd.GeoDataFrame
    stats: InferenceStats
    vector: Path | None = None
    raster: Path | None = None
    probabilities: Path | None = None

    @property
    def paths(self) -> list[Path]:
        """The files written: GeoPackage, labels, probabilities (those asked for)."""
        return [p for p in (self.vector, self.raster, self.probabilities) if p is not None]


@dataclass(frozen=True)
class SceneJob:
    """One scene of a many-scene run and where its outputs go."""

    scene: Path
    vector: Path
    raster: Path
    probabilities: Path | None

    @property
    def outputs(self) -> list[Path | None]:
        """GeoPackage, labels and probabilities (None when not asked for)."""
        return [self.vector, self.raster, self.probabilities]


def find_scenes(scenes: PathLike | Iterable[PathLike]) -> list[Path]:
    """The scenes named by files, folders (searched recursively) and glob patterns.

    A pattern is expanded by this function (for shells that do not, and for scripts); a path
    that exists is taken as is, even if its name holds glob characters.

    Returns:
        Absolute paths, sorted, without duplicates.

    Raises:
        InputError: a pattern matches nothing, a path does not exist, a folder holds no raster.
    """
    if isinstance(scenes, str | os.PathLike):
        scenes = [scenes]
    paths: list[PathLike] = []
    for item in scenes:
        if not os.path.exists(item) and glob.has_magic(os.fspath(item)):
            matches = sorted(glob.glob(os.fspath(item), recursive=True))
            if not matches:
                raise InputError(item, 'matches no file')
            paths.extend(matches)
        else:
            paths.append(item)
    if not paths:
        raise InputError('SCENE', 'no scene given')
    return find_rasters(paths)


def _resolution(resolution: Resolution, card: ModelCard, src: DatasetReader) -> float | None:
    """The grid spacing to read the scene at, in its CRS units; None for its own grid."""
    if resolution is None or resolution == 'scene':
        return None
    if resolution == 'model':
        if card.resolution is None:
            problem = 'the model card records no ground resolution; give one in metres'
            raise InputError('--resolution', problem)
        metres = card.resolution
    else:
        try:
            metres = float(resolution)
        except ValueError:
            problem = f"must be 'scene', 'model' or metres, not {resolution!r}"
            raise InputError('--resolution', problem) from None
    if not metres > 0:
        raise InputError('--resolution', f'must be positive, got {metres}')
    return metres_to_crs_units(metres, CRS.from_user_input(src.crs), tuple(src.bounds))


def check_scene(
    scene: PathLike,
    card: ModelCard,
    outputs: Sequence[PathLike | None],
    *,
    overwrite: bool = False,
    bands: BandSelection | None = None,
    resolution: Resolution = None,
) -> tuple[tuple[int, ...], float | None]:
    """Check a scene, its outputs and the settings before any computation.

    Returns:
        The scene bands to read (:func:`model_bands`) and the grid spacing to read them at
        (None for the scene's own grid).

    Raises:
        InputError: existing, unwritable or clashing outputs, a scene that cannot be read or
            has no CRS, bands that do not fit the model, or a bad resolution.
    """
    check_outputs(outputs, overwrite, inputs=[scene])
    with open_scene(scene) as src:
        selected = model_bands(scene, src.count, src.descriptions, card, bands)
        return selected, _resolution(resolution, card, src)


def segment_scene(
    scene: PathLike,
    model: PathLike | SegmentationModel,
    *,
    vector: PathLike | None = None,
    raster: PathLike | None = None,
    probabilities: PathLike | None = None,
    bands: BandSelection | None = None,
    nodata: float | None = None,
    resolution: Resolution = None,
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
) -> SegmentResult:
    """Segment a scene and polygonise its classes.

    Example, building footprints and a label COG::

        result = segment_scene('scene.tif', 'runs/seg', vector='buildings.gpkg',
                               raster='labels.tif', min_area=20)
        print(len(result.polygons), result.polygons['area_m2'].sum())

    The scene is read window by window through the data layer, with the bands and the
    normalisation the model was trained with (its card); the class probabilities are blended
    across windows, the label raster is taken from them and polygonised as a whole. Outputs lie
    on the scene's grid (same CRS, geotransform and size), with nodata wherever the scene has
    none, and are written atomically; every output path is checked before any computation.

    Args:
        scene: the scene (any georeferenced raster GDAL reads).
        model: a run folder of ``geocmid train segment`` or a loaded model
            (:meth:`SegmentationModel.load`).
        vector: GeoPackage of class polygons to write (layer :data:`LAYER`).
        raster: label COG to write (class ids, the card's palette and class names).
        probabilities: probability COG to write (one band per class).
        bands: scene bands to feed the model (see :func:`model_bands`); default the card's.
        nodata: overrides or supplies the scene's nodata value.
        resolution: 'scene' (default) reads the scene's own grid; 'model' or metres resample
            it to that resolution for the model, and the outputs back to the scene's grid.
        tile: window size in pixels; default the card's tile size.
        overlap: window overlap in pixels; default a quarter of the tile.
        batch_size: windows per forward pass.
        blend: 'cosine', 'linear', 'gaussian' or 'none' (crop-centre).
        probability_dtype: 'uint8' (quantised, scale 1/254) or 'float32'.
        min_area: smallest polygon kept, in square metres.
        simplify: polygon simplification tolerance in metres (0 keeps pixel edges).
        device: where the model runs; 'auto' picks CUDA when available.
        overwrite: replace existing outputs.
        progress: show a progress bar over the windows.

    Returns:
        The polygons, the window counts and the paths written.

    Raises:
        InputError: existing or unwritable outputs, a scene without CRS or with other bands
            than the model takes, bad settings, or a scene without any valid pixel.
    """
    if not isinstance(model, SegmentationModel):
        model = SegmentationModel.load(model)
    outputs = [Path(p) for p in (vector, raster, probabilities) if p is not None]
    selected, spacing = check_scene(
        scene, model.card, outputs, overwrite=overwrite, bands=bands, resolution=resolution
    )
    device = resolve_device(device)
    tile = tile or default_tile(model.card)
    classes = model.classes
    tags = provenance_tags(
        model.weights, sha256=model.sha256, inputs={'scene': scene}, tile=tile,
        overlap=overlap, blend=blend, nodata=nodata, resolution=spacing,
    )  # fmt: skip
    network = model.network.to(device)
    # Rasters not asked for are still needed by the polygons (labels, mean scores): they go to
    # a hidden folder beside the outputs, so that renaming them into place stays on one
    # filesystem; without outputs, to the system's temporary folder.
    folder = outputs[0].absolute().parent if outputs else None
    with tempfile.TemporaryDirectory(dir=folder, prefix='.geocmid-segment-') as scratch:
        labels_path = Path(raster or Path(scratch) / 'labels.tif')
        scores_path = Path(probabilities or Path(scratch) / 'probabilities.tif')
        with (
            SceneReader(
                scene, bands=selected, mean=model.card.mean, std=model.card.std,
                resolution=spacing, nodata=nodata,
            ) as reader,
            PredictionWriter(
                reader, labels_path, classes=classes, probabilities_path=scores_path,
                probability_dtype=probability_dtype,
                output_grid=reader.scene if reader.warped else None, tags=tags,
                overwrite=overwrite,
            ) as writer,
        ):  # fmt: skip
            stats = predict_scene(
                reader, network, writer, num_classes=len(classes), tile=tile, overlap=overlap,
                batch_size=batch_size, blend=blend, device=device, progress=progress,
            )  # fmt: skip
        polygons = polygonize(
            labels_path, vector, probabilities_path=scores_path,
            class_names=[c.name for c in classes], min_area=min_area, simplify=simplify,
            layer=LAYER, overwrite=overwrite,
        )  # fmt: skip
    return SegmentResult(
        polygons,
        stats,
        vector=Path(vector) if vector is not None else None,
        raster=Path(raster) if raster is not None else None,
        probabilities=Path(probabilities) if probabilities is not None else None,
    )


def segment_scenes(
    scenes: PathLike | Iterable[PathLike],
    model: PathLike | SegmentationModel,
    out_dir: PathLike,
    *,
    probabilities: bool = False,
    devices: int | Sequence[str] = 1,
    device: torch.device | str = 'auto',
    fail_fast: bool = True,
    on_error: ErrorHandler | None = None,
    on_skip: SkipHandler | None = None,
    progress: bool = True,
    overwrite: bool = False,
    skip_existing: bool = False,
    **settings: Any,
) -> dict[str, SegmentResult]:
    """Segment many scenes into an output folder: ``<name>.gpkg`` and ``<name>.tif`` each.

    Every scene and its outputs are checked before the first scene is segmented. Scenes whose
    stems repeat get ``_2``, ``_3``... (see :func:`~geocmid.inference.outputs.unique_names`).

    Example::

        results = segment_scenes('tiles/*.tif', 'runs/seg', 'maps/', min_area=20)
        for name, result in results.items():
            print(name, len(result.polygons))

    Args:
        scenes: files, folders (searched recursively) or glob patterns.
        model: a run folder of ``geocmid train segment`` or a loaded model.
        out_dir: the output folder, created if missing.
        probabilities: also write ``<name>_probabilities.tif``.
        devices: the number of GPUs to spread the scenes over, one worker process each
            (``cuda:0`` ... ``cuda:N-1``), or the devices themselves (``['cuda:1', 'cuda:3']``;
            ``['cpu', 'cpu']`` for two CPU workers). 1: the scenes run here on ``device``.
        device: the device of a single-device run; 'auto' picks CUDA when available.
        fail_fast: stop at the first bad scene; otherwise report it through ``on_error`` and
            go on with the others.
        on_error: called with a scene's name and its error when ``fail_fast`` is False.
        on_skip: called with the name of each scene skipped by ``skip_existing``.
        progress: show a progress bar over the scenes.
        overwrite: replace existing outputs.
        skip_existing: resume an interrupted run: skip the scenes whose outputs all exist and
            are complete (:func:`~geocmid.inference.outputs.outputs_complete`) and segment the
            others again, replacing partial or invalid outputs.
        **settings: the options of :func:`segment_scene` (bands, nodata, resolution, tile,
            overlap, batch_size, blend, probability_dtype, min_area, simplify).

    Returns:
        The result of each scene that was segmented (not skipped) and succeeded, by name.

    Raises:
        InputError: a bad model, output folder or device list, ``skip_existing`` with
            ``overwrite``; with ``fail_fast``, the first bad scene.
    """
    check_resume(overwrite, skip_existing)
    workers = _devices(devices, device)
    loaded = model if isinstance(model, SegmentationModel) else SegmentationModel.load(model)
    paths = find_scenes(scenes)
    folder = output_folder(out_dir)
    jobs: dict[str, SceneJob] = {}
    skipped: list[str] = []
    for name, scene in zip(unique_names(paths), paths, strict=True):
        job = SceneJob(
            scene, folder / f'{name}.gpkg', folder / f'{name}.tif',
            folder / f'{name}{PROBABILITIES_SUFFIX}.tif' if probabilities else None,
        )  # fmt: skip
        try:
            if check_item_outputs(
                job.outputs, LAYER, overwrite=overwrite, skip_existing=skip_existing, inputs=paths
            ):
                skipped.append(name)
                continue
            check_scene(
                scene, loaded.card, [], bands=settings.get('bands'),
                resolution=settings.get('resolution'),
            )  # fmt: skip
        except InputError as exc:
            if fail_fast or on_error is None:
                raise
            on_error(name, exc)
            continue
        jobs[name] = job
    # Resuming replaces the leftovers of the scenes that run again.
    options = {**settings, 'overwrite': overwrite or skip_existing}
    if len(workers) == 1:
        # One device: the model loaded above runs here, the scenes one after the other.
        runner = partial(_runner_for_model, loaded, options)
    else:
        # Several: each worker process loads the model once from the run folder.
        runner = partial(_runner_for_run_dir, loaded.run_dir, options)
    return run_jobs(
        jobs, runner, devices=workers, fail_fast=fail_fast, on_error=on_error, skipped=skipped,
        on_skip=on_skip, progress=progress,
    )  # fmt: skip


def _devices(devices: int | Sequence[str], device: torch.device | str) -> list[str]:
    """One device per worker: N GPUs for an integer above 1, else ``device`` alone."""
    if isinstance(devices, str):  # one name, not a sequence of letters
        devices = [devices]
    if isinstance(devices, int):
        if devices == 1:
            return [str(device)]
        workers = [str(d) for d in cuda_devices(devices)]
    else:
        workers = [str(d) for d in devices]
        if not workers:
            raise InputError('--devices', 'no device given')
    if device != 'auto':
        raise InputError('--device', 'give either one --device or several --devices, not both')
    return workers


def _runner_for_model(
    model: SegmentationModel, options: dict[str, Any], device: torch.device
) -> partial[SegmentResult]:
    """The job function of one device for a model already loaded."""
    return partial(_segment_job, model, options, device)


def _runner_for_run_dir(
    run_dir: Path, options: dict[str, Any], device: torch.device
) -> partial[SegmentResult]:
    """The job function of one worker process: loads the model there, once."""
    return partial(_segment_job, SegmentationModel.load(run_dir), options, device)


def _segment_job(
    model: SegmentationModel, options: dict[str, Any], device: torch.device, job: SceneJob
) -> SegmentResult:
    """Segment the scene of one job into its output files."""
    return segment_scene(
        job.scene, model, vector=job.vector, raster=job.raster, probabilities=job.probabilities,
        device=device, progress=False, **options,
    )  # fmt: skip
