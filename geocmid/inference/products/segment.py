"""Segmentation of whole scenes with a trained model: class polygons and rasters per scene.

What segmentation adds to the dense-product pipeline (:mod:`geocmid.inference.dense`: the
streaming engine, the COG writer, polygons, many inputs) is small:

* :class:`SegmentationModel`, the network and card of a ``geocmid train segment`` run folder;
  the card says which bands to read, how to normalise them (the same as in training), the
  classes with their colours, the tile and the ground resolution;
* the check that a scene gives the bands the model takes;
* the scene read window by window on its own grid or resampled to the model's resolution, the
  outputs always on the scene's grid;
* many scenes: globs, folders and lists, one set of outputs per scene in an output folder.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pyproj import CRS
from rasterio.io import DatasetReader
from torch import nn

from geocmid.errors import InputError
from geocmid.inference.bands import model_bands
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
from geocmid.inference.manifest import read_manifest, take_shard
from geocmid.inference.onnx_model import OnnxNetwork, is_onnx, load_model
from geocmid.inference.outputs import check_outputs, check_resume, output_folder, unique_names
from geocmid.inference.runtable import run_table_path
from geocmid.inference.tiling import Blend
from geocmid.io.cards import ClassInfo, ModelCard
from geocmid.models.weights import sha256_file
from geocmid.raster.files import BandSelection, find_rasters
from geocmid.raster.scene import SceneReader, open_scene
from geocmid.raster.units import metres_to_crs_units
from geocmid.types import PathLike

if TYPE_CHECKING:
    from distributed import Client

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
        """Load a ``geocmid train segment`` run folder or its ``.onnx`` export (CPU, eval mode).

        Raises:
            InputError: no model card or checkpoint, a card of another task or without
                classes, an unreadable checkpoint, or a bad ONNX file.
        """
        loaded = load_model(run_dir, 'segmentation')
        if loaded.card.classes is None or len(loaded.card.classes) < 2:
            raise InputError(run_dir, 'the model card lists no classes')
        return cls(loaded.network, loaded.card, loaded.weights)

    @property
    def run_dir(self) -> Path:
        """The run folder the model was loaded from, or its ONNX file."""
        return self.weights if is_onnx(self.weights) else self.weights.parent

    @property
    def classes(self) -> list[ClassInfo]:
        """Output classes in class-id order."""
        assert self.card.classes is not None  # checked by load()
        return self.card.classes

    @property
    def num_outputs(self) -> int:
        """Channels of the logits: one per class."""
        return len(self.classes)

    @cached_property
    def sha256(self) -> str:
        """Hash of the checkpoint, computed once however many scenes are segmented."""
        return sha256_file(self.weights)

    def loader(self) -> Callable[[], SegmentationModel]:
        """Loads this model again from its run folder or ONNX file (in a worker process)."""
        if is_onnx(self.weights):  # its card may come from --bands and --classes: ship it
            return partial(_onnx_segmentation, self.weights, self.card)
        return partial(SegmentationModel.load, self.run_dir)


def _onnx_segmentation(path: Path, card: ModelCard) -> SegmentationModel:
    """An exported segmentation model with the card it was first loaded with."""
    return SegmentationModel(OnnxNetwork(path).eval(), card, path)


@dataclass(frozen=True)
class SegmentResult(DenseResult):
    """What :func:`segment_scene` produced for one scene.

    Attributes:
        polygons: class polygons (``class_id``, ``class_name``, ``area_m2``, ``mean_score``)
            in the scene's CRS; background (class 0) is not polygonised.
        stats: windows processed, predicted and skipped (no valid pixel).
        threshold: None (classes are the argmax of the probabilities).
        vector: the GeoPackage written, if any.
        raster: the label COG written, if any.
        probabilities: the probability COG written, if any.
    """


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
    tta: str = 'none',
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
        model: a run folder of ``geocmid train segment``, its ``.onnx`` export (``geocmid
            export``, run by onnxruntime) or a loaded model (:meth:`SegmentationModel.load`).
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
        tta: test-time augmentation: 'none', 'flips' or 'd4' (:mod:`geocmid.inference.tta`).

    Returns:
        The polygons, the window counts and the paths written.

    Raises:
        InputError: existing or unwritable outputs, a scene without CRS or with other bands
            than the model takes, bad settings, or a scene without any valid pixel.
    """
    if not isinstance(model, SegmentationModel):
        model = SegmentationModel.load(model)
    outputs = DenseOutputs.of(vector, raster, probabilities)
    selected, spacing = check_scene(
        scene, model.card, outputs.paths, overwrite=overwrite, bands=bands, resolution=resolution
    )
    with SceneReader(
        scene, bands=selected, mean=model.card.mean, std=model.card.std, resolution=spacing,
        nodata=nodata,
    ) as reader:  # fmt: skip
        return predict_dense(
            reader, model, outputs, grid=reader, inputs={'scene': scene}, product='segment',
            layer=LAYER, result=SegmentResult, output_grid=reader.scene if reader.warped else None,
            tile=tile, overlap=overlap, batch_size=batch_size, blend=blend,
            probability_dtype=probability_dtype, min_area=min_area, simplify=simplify,
            device=device, overwrite=overwrite, progress=progress, tta=tta,
            tags={'nodata': nodata, 'resolution': spacing},
        )  # fmt: skip


def segment_scenes(
    scenes: PathLike | Iterable[PathLike] | None,
    model: PathLike | SegmentationModel,
    out_dir: PathLike,
    *,
    inputs: PathLike | None = None,
    shard: tuple[int, int] | None = None,
    client: Client | str | None = None,
    workers: int | None = None,
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
) -> dict[str, SegmentResult]:
    """Segment many scenes into an output folder: ``<name>.gpkg`` and ``<name>.tif`` each.

    Every scene and its outputs are checked before the first scene is segmented. Scenes whose
    stems repeat get ``_2``, ``_3``... (see :func:`~geocmid.inference.outputs.unique_names`).
    The output folder also receives the run table ``run.parquet`` (:mod:`~.runtable`).

    Example, on a Dask cluster::

        from distributed import Client

        with Client('tcp://scheduler:8786') as client:
            results = segment_scenes('tiles/*.tif', 'runs/seg', 'maps/', client=client)
        for name, result in results.items():
            print(name, len(result.polygons))

    Args:
        scenes: files, folders (searched recursively) or glob patterns; None with ``inputs``.
        model: a run folder of ``geocmid train segment`` or a loaded model.
        out_dir: the output folder, created if missing.
        inputs: a manifest (:func:`~geocmid.inference.manifest.read_manifest`) of further
            scenes; a scene it lists that is missing fails on its own, the others run.
        shard: ``(I, N)``: segment only every N-th scene from the I-th (0-based), for array
            jobs; the run table is then ``run-<I>-of-<N>.parquet``.
        client: where the scenes run: a :class:`distributed.Client`, a scheduler address
            (``'tcp://host:8786'``), ``'local'`` (an embedded cluster) or ``'none'`` (here);
            None: here, unless several ``devices`` or ``workers`` start an embedded cluster.
            Each worker loads the model once from its files.
        workers: CPU workers of an embedded cluster, one torch thread each.
        probabilities: also write ``<name>_probabilities.tif``.
        devices: the number of GPUs of an embedded cluster, one worker each pinned to its GPU
            (``cuda:0`` ... ``cuda:N-1``), or the devices themselves (``['cuda:1', 'cuda:3']``;
            ``['cpu', 'cpu']`` for two CPU workers). 1: the scenes run on ``device``.
        device: the device of the scenes run here or on a scheduler's workers; 'auto' picks
            CUDA when available.
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
            overlap, batch_size, blend, probability_dtype, min_area, simplify, tta).

    Returns:
        The result of each scene that was segmented (not skipped) and succeeded, by name.

    Raises:
        InputError: a bad model, output folder or device list, ``skip_existing`` with
            ``overwrite``; with ``fail_fast``, the first bad scene.
    """
    check_resume(overwrite, skip_existing)
    several = worker_devices(devices, device) if devices != 1 else []
    loaded = model if isinstance(model, SegmentationModel) else SegmentationModel.load(model)
    paths = [] if scenes is None or scenes == () else find_scenes(scenes)
    if inputs is not None:
        paths += read_manifest(inputs)
    if not paths:
        raise InputError('SCENE', 'no scene given')
    folder = output_folder(out_dir)

    def outputs(name: str) -> DenseOutputs:
        scores = folder / f'{name}{PROBABILITIES_SUFFIX}.tif' if probabilities else None
        return DenseOutputs(folder / f'{name}.gpkg', folder / f'{name}.tif', scores)

    items = dict(zip(unique_names(paths), paths, strict=True))
    count = len(take_shard(items, shard) if shard else items)
    with placement(
        client, devices=several, workers=workers, device=str(device), inputs=count
    ) as where:
        return predict_many(
            SEGMENTATION, items, loaded, outputs, placement=where, shard=shard,
            run_table=run_table_path(folder, shard), fail_fast=fail_fast, on_error=on_error,
            on_skip=on_skip, progress=progress, overwrite=overwrite,
            skip_existing=skip_existing, **settings,
        )  # fmt: skip


def _scene_files(scene: Path) -> list[Path]:
    """The files of a scene: itself."""
    return [scene]


def _check(scene: Path, model: SegmentationModel, settings: Mapping[str, Any]) -> None:
    """Check a scene of a many-scene run (its outputs are checked by the pipeline)."""
    check_scene(
        scene, model.card, [], bands=settings.get('bands'), resolution=settings.get('resolution')
    )


def _predict(
    scene: Path,
    model: SegmentationModel,
    outputs: DenseOutputs,
    device: torch.device,
    settings: Mapping[str, Any],
) -> SegmentResult:
    """Segment a scene of a many-scene run into its outputs."""
    return segment_scene(
        scene, model, vector=outputs.vector, raster=outputs.raster,
        probabilities=outputs.probabilities, device=device, progress=False, **settings,
    )  # fmt: skip


#: Segmentation as a dense product of many scenes.
SEGMENTATION = DenseProduct('scene', LAYER, _scene_files, _check, _predict)
