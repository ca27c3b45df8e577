"""The files an inference run writes: checked up front, named per input, tagged with provenance.

Shared by every whole-scene product (segmentation, change detection), so that all of them refuse
the same bad outputs before any computation, resume many-input runs the same way and record the
same provenance.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pyogrio
from pyogrio.errors import DataSourceError
from rasterio.errors import RasterioError

import geocmid
from geocmid.errors import InputError
from geocmid.inference.tiling import default_overlap
from geocmid.io.atomic import check_writable
from geocmid.io.cog import validate_cog
from geocmid.models.weights import sha256_file
from geocmid.types import PathLike


def check_outputs(
    paths: Iterable[PathLike | None], overwrite: bool, inputs: Iterable[PathLike] = ()
) -> list[Path]:
    """Fail before any computation if the outputs of one run cannot all be written.

    Args:
        paths: the outputs; None entries (outputs not asked for) are ignored.
        overwrite: whether existing files may be replaced.
        inputs: the run's input files, which no output may replace, even with ``overwrite``.

    Returns:
        The outputs given, as absolute paths.

    Raises:
        InputError: an output exists without ``overwrite``, its folder is missing or not
            writable, two outputs are the same file, or an output is an input.
    """
    given = [Path(p) for p in paths if p is not None]
    targets = [check_writable(path, overwrite) for path in given]
    sources = {Path(p).resolve() for p in inputs}
    seen: set[Path] = set()
    for path, target in zip(given, targets, strict=True):
        resolved = target.resolve()
        if resolved in sources:
            raise InputError(path, 'is an input of this run; choose another output path')
        if resolved in seen:
            raise InputError(path, 'is given for two outputs')
        seen.add(resolved)
    return targets


def check_resume(overwrite: bool, skip_existing: bool) -> None:
    """Refuse ``skip_existing`` with ``overwrite``: one keeps finished outputs, the other not.

    Raises:
        InputError: both are set.
    """
    if overwrite and skip_existing:
        raise InputError('--skip-existing', 'cannot be combined with --overwrite')


def outputs_complete(paths: Iterable[PathLike | None], layer: str) -> bool:
    """Whether every output of one input exists and is complete.

    A GeoPackage must open and hold ``layer``; any other output must be a valid COG
    (:func:`~geocmid.io.cog.validate_cog`). Outputs are written atomically, so an interrupted
    run leaves the final paths absent rather than truncated; these checks also catch files
    damaged or replaced since.

    Args:
        paths: the outputs; None entries (outputs not asked for) are ignored.
        layer: the layer each GeoPackage must hold.
    """
    for path in (Path(p) for p in paths if p is not None):
        if not path.is_file():
            return False
        try:
            if path.suffix.lower() == '.gpkg':
                if layer not in pyogrio.list_layers(path)[:, 0]:
                    return False
            elif validate_cog(path):
                return False
        except (DataSourceError, RasterioError, OSError):
            return False
    return True


def check_item_outputs(
    paths: Sequence[PathLike | None],
    layer: str,
    *,
    overwrite: bool,
    skip_existing: bool,
    inputs: Iterable[PathLike] = (),
) -> bool:
    """Check the outputs of one input of a many-input run; True when it is done already.

    With ``skip_existing``, complete outputs (:func:`outputs_complete`) mark the input as done;
    otherwise its outputs must be writable (:func:`check_outputs`), and with ``skip_existing``
    partial or invalid leftovers may be replaced, since the input is computed again.

    Args:
        paths: the input's outputs; None entries are ignored.
        layer: the layer of its GeoPackage.
        overwrite: whether existing files may be replaced.
        skip_existing: whether an input with complete outputs is skipped.
        inputs: the run's input files, which no output may replace.

    Returns:
        True when the input is to be skipped.

    Raises:
        InputError: see :func:`check_outputs`.
    """
    if skip_existing and outputs_complete(paths, layer):
        return True
    check_outputs(paths, overwrite or skip_existing, inputs)
    return False


def output_folder(path: PathLike) -> Path:
    """The folder receiving one set of outputs per input, created if missing.

    Raises:
        InputError: ``path`` is a file, or the folder cannot be created or written to.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(path, 'exists and is not a folder')
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(path, f'cannot create output folder ({exc.strerror})') from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(path, 'output folder is not writable')
    return folder


def unique_names(paths: Sequence[PathLike]) -> list[str]:
    """File stems to name each input's outputs by, made unique in order of appearance.

    Two inputs with the same stem (``a/scene.tif``, ``b/scene.tif``) would write the same
    outputs; the second becomes ``scene_2``, so that no input silently replaces another's.
    """
    names: list[str] = []
    taken: set[str] = set()
    for path in paths:
        stem = name = Path(path).stem
        copy = 1
        while name in taken:
            copy += 1
            name = f'{stem}_{copy}'
        taken.add(name)
        names.append(name)
    return names


def provenance_tags(
    weights: PathLike,
    *,
    inputs: Mapping[str, PathLike],
    tile: int,
    overlap: int | None,
    blend: str,
    sha256: str | None = None,
    **settings: object,
) -> dict[str, str]:
    """Metadata recorded in output rasters (docs/inference.md#writers): model, inputs, settings.

    Args:
        weights: the file the model weights came from.
        inputs: input files by role (``scene``; ``before``, ``after``); keys are upper-cased.
        tile: window size in pixels.
        overlap: window overlap in pixels; None for the default (a quarter of the tile).
        blend: the blend mode.
        sha256: the weights' hash when already known (hashing a large checkpoint takes time).
        **settings: further settings (threshold, nodata, resolution...); None values are left out.

    Returns:
        Tag names (upper case) to string values.
    """
    tags = {
        'GEOCMID_VERSION': geocmid.__version__,
        'MODEL': str(Path(weights).absolute()),
        'MODEL_SHA256': sha256 or sha256_file(weights),
    }
    tags |= {role.upper(): str(Path(path).absolute()) for role, path in inputs.items()}
    tags |= {
        'TILE': str(tile),
        'OVERLAP': str(default_overlap(tile) if overlap is None else overlap),
        'BLEND': blend,
    }
    tags |= {name.upper(): str(value) for name, value in settings.items() if value is not None}
    return tags
