"""The files an inference run writes: checked up front, named per input, tagged with provenance.

Shared by every whole-scene product (segmentation, change detection), so that all of them refuse
the same bad outputs before any computation and record the same provenance.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import geocmid

from ..errors import InputError
from ..io.atomic import check_writable
from ..models.weights import sha256_file
from .tiling import default_overlap

type PathLike = str | os.PathLike[str]


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
    """Metadata recorded in output rasters (spec R5.6): model, inputs and settings.

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
