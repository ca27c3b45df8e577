"""Model cards: the JSON file that says what an exported encoder or model expects and produces.

A card (``model_card.json``) sits beside every ``encoder.pt`` and in every run folder. It records
the backbone, the input bands and their normalisation, the patch size and ground resolution, a
summary of the training data, the resolved configuration and, for downstream models, the task
and its classes. ``segment`` and ``change`` read it for their defaults, palette and class names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geocmid
from geocmid.errors import InputError
from geocmid.io.atomic import atomic_output

#: File name of a model card inside a run folder or beside ``encoder.pt``.
CARD_NAME = 'model_card.json'

#: Version of the card layout; bumped when a field changes meaning.
CARD_VERSION = 1

_REQUIRED = ('method', 'backbone', 'in_chans', 'bands', 'band_indices')


@dataclass(frozen=True)
class ClassInfo:
    """One output class of a downstream model.

    Attributes:
        name: Class name shown in outputs (raster metadata, GeoPackage attribute).
        color: RGB colour, each component 0 to 255.
    """

    name: str
    color: tuple[int, int, int]


#: The classes of every change model: 0 no change, 1 change.
CHANGE_CLASSES = (ClassInfo('no_change', (0, 0, 0)), ClassInfo('change', (230, 25, 75)))


@dataclass
class ModelCard:
    """What an encoder or a fine-tuned model expects as input and what it produces.

    Attributes:
        method: How the weights were obtained, e.g. 'cmid', 'gersp', 'random'.
        backbone: timm model name, e.g. 'resnet50' or 'swin_base_patch4_window7_224'.
        backbone_kwargs: Extra keyword arguments of ``timm.create_model`` that the weights need,
            e.g. ``{'img_size': 64}`` for a Swin trained on 64-pixel patches.
        bands: Band names, one per input channel, in channel order.
        band_indices: 1-based indices of those bands in the source rasters.
        in_chans: Number of input channels; defaults to (and must equal) ``len(bands)``.
        mean: Per-band normalisation mean, in the units the data loader feeds the model;
            None when the weights fix none (random initialisation).
        std: Per-band normalisation standard deviation; None as for ``mean``.
        patch_size: Square input size in pixels used for training; None when not fixed.
        resolution: Ground resolution in metres per pixel; None for chips without georeference.
        data: Summary of the training data (files, counts, CRS, ...).
        config: The resolved configuration of the run that produced the weights.
        geocmid_version: geocmid version that wrote the card.
        task: Downstream task ('segmentation', 'change', 'classification'); None for encoders.
        classes: Output classes of a downstream model, in class-index order.
        tile_size: Default inference tile size in pixels for a downstream model.
        provenance: Where the weights came from: a source checkpoint and its sha256 for imported
            weights, the encoder a downstream model was fine-tuned from, ...
    """

    method: str
    backbone: str
    bands: list[str]
    band_indices: list[int]
    in_chans: int | None = None  # filled in from bands when not given
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: list[float] | None = None
    std: list[float] | None = None
    patch_size: int | None = None
    resolution: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    geocmid_version: str = geocmid.__version__
    task: str | None = None
    classes: list[ClassInfo] | None = None
    tile_size: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ('bands', 'band_indices', 'mean', 'std'):
            if isinstance(getattr(self, name), tuple):  # JSON has lists; accept tuples in code
                setattr(self, name, list(getattr(self, name)))
        if self.in_chans is None and isinstance(self.bands, list):
            self.in_chans = len(self.bands)
        _validate(self, source=None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dictionary, with the card version spelled out."""
        body = dataclasses.asdict(self)
        if self.classes is not None:
            body['classes'] = [{'name': c.name, 'color': list(c.color)} for c in self.classes]
        return {'card_version': CARD_VERSION, **body}

    def to_json(self) -> str:
        """The card as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + '\n'

    @classmethod
    def from_dict(
        cls, body: Mapping[str, Any], source: str | os.PathLike[str] | None = None
    ) -> ModelCard:
        """Build a card from a parsed JSON object.

        Args:
            body: The parsed JSON object.
            source: Where it came from, named in errors.

        Raises:
            InputError: A required key is missing, a key is unknown or a value is invalid.
        """
        if not isinstance(body, Mapping):
            raise InputError(source, f'model card must be a JSON object, not {type(body).__name__}')
        known = {f.name for f in dataclasses.fields(cls)} | {'card_version'}
        missing = [key for key in _REQUIRED if key not in body]
        if missing:
            raise InputError(source, f'model card lacks required key(s): {", ".join(missing)}')
        unknown = sorted(set(body) - known)
        if unknown:
            raise InputError(source, f'model card has unknown key(s): {", ".join(unknown)}')
        version = body.get('card_version', CARD_VERSION)
        if not isinstance(version, int) or version > CARD_VERSION:
            raise InputError(
                source,
                f'card_version {version!r} is newer than this geocmid reads ({CARD_VERSION})',
            )
        fields = {k: v for k, v in body.items() if k != 'card_version'}
        if fields.get('classes') is not None:
            fields['classes'] = _parse_classes(fields['classes'], source)
        try:
            card = cls(**fields)
        except InputError as exc:  # raised by __post_init__ without a source
            raise InputError(source, exc.problem) from None
        except TypeError as exc:  # e.g. a wrongly typed container that the dataclass cannot take
            raise InputError(source, f'invalid model card: {exc}') from None
        return card

    @classmethod
    def from_json(cls, text: str, source: str | os.PathLike[str] | None = None) -> ModelCard:
        """Parse a card from JSON text; ``source`` is named in errors."""
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(source, f'model card is not valid JSON ({exc})') from None
        return cls.from_dict(body, source)


def _parse_classes(value: Any, source: str | os.PathLike[str] | None) -> list[ClassInfo]:
    """Turn the JSON form ``[{'name': ..., 'color': [r, g, b]}, ...]`` into ClassInfo records."""
    if not isinstance(value, list):
        raise InputError(source, 'classes must be a list of {"name", "color"} objects')
    classes = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or set(item) != {'name', 'color'}:
            raise InputError(source, f'classes[{i}] must have exactly the keys "name" and "color"')
        color = item['color']
        if not isinstance(color, list):
            raise InputError(source, f'classes[{i}].color must be a list [r, g, b]')
        classes.append(ClassInfo(item['name'], tuple(color)))
    return classes


def _validate(card: ModelCard, source: str | os.PathLike[str] | None) -> None:
    """Check every field's type and range; raise InputError naming the first bad field."""

    def fail(problem: str) -> None:
        raise InputError(source, f'invalid model card: {problem}')

    for name in ('method', 'backbone', 'geocmid_version'):
        if not isinstance(getattr(card, name), str) or not getattr(card, name):
            fail(f'{name} must be a non-empty string')
    if not _is_list(card.bands, str) or not card.bands:
        fail('bands must be a non-empty list of band names')
    if not _is_int(card.in_chans) or card.in_chans != len(card.bands):
        fail(f'in_chans is {card.in_chans!r} but {len(card.bands)} band(s) are listed')
    if len(set(card.bands)) != len(card.bands):
        fail(f'bands has duplicate names: {card.bands}')
    if not _is_list(card.band_indices, int) or any(i < 1 for i in card.band_indices):
        fail('band_indices must be a list of 1-based band indices')
    if len(card.band_indices) != card.in_chans:
        fail(f'{len(card.band_indices)} band_indices for {card.in_chans} bands')
    for name in ('mean', 'std'):
        values = getattr(card, name)
        if values is None:
            continue
        if not _is_list(values, (int, float)) or not all(math.isfinite(v) for v in values):
            fail(f'{name} must be a list of finite numbers')
        if len(values) != card.in_chans:
            fail(f'{name} has {len(values)} value(s) for {card.in_chans} bands')
    if (card.mean is None) != (card.std is None):
        fail('mean and std must both be given or both be null')
    if card.std is not None and any(v <= 0 for v in card.std):
        fail('std values must be positive')
    for name in ('patch_size', 'tile_size'):
        value = getattr(card, name)
        if value is not None and (not _is_int(value) or value < 1):
            fail(f'{name} must be a positive integer or null')
    if card.resolution is not None and (
        not isinstance(card.resolution, (int, float))
        or isinstance(card.resolution, bool)
        or not card.resolution > 0
        or not math.isfinite(card.resolution)
    ):
        fail('resolution must be a positive number of metres or null')
    for name in ('backbone_kwargs', 'data', 'config', 'provenance'):
        if not isinstance(getattr(card, name), dict):
            fail(f'{name} must be a JSON object')
    if card.task is not None and (not isinstance(card.task, str) or not card.task):
        fail('task must be a non-empty string or null')
    if card.classes is not None:
        for i, item in enumerate(card.classes):
            if not isinstance(item, ClassInfo) or not isinstance(item.name, str) or not item.name:
                fail(f'classes[{i}] must have a non-empty name')
            if len(item.color) != 3 or not all(_is_int(v) and 0 <= v <= 255 for v in item.color):
                fail(f'classes[{i}].color must be three integers 0 to 255')


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but True is never a valid size or index
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    )


def card_path(path: str | os.PathLike[str]) -> Path:
    """Where the card of ``path`` lives: inside a folder, or beside a weights file."""
    path = Path(path)
    if path.is_dir():
        return path / CARD_NAME
    if path.suffix.lower() == '.json':
        return path
    return path.with_name(CARD_NAME)


def write_card(path: str | os.PathLike[str], card: ModelCard, *, overwrite: bool = False) -> Path:
    """Write ``card`` atomically as JSON.

    Args:
        path: The card file, a folder (the card goes inside) or a weights file (the card goes
            beside it, as ``model_card.json``).
        card: The card to write.
        overwrite: Replace an existing card.

    Returns:
        The path written.

    Raises:
        InputError: The card exists and ``overwrite`` is False, or the folder is not writable.
    """
    target = card_path(path)
    with atomic_output(target, overwrite=overwrite) as tmp:
        Path(tmp).write_text(card.to_json(), encoding='utf-8')
    return target


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read the card of a run folder, of a weights file, or a card file itself.

    Args:
        path: A run folder, ``encoder.pt`` (or any file with a card beside it) or the card.

    Raises:
        InputError: There is no card, it is not valid JSON, or a key is missing or invalid.
    """
    target = card_path(path)
    if not target.is_file():
        where = 'in this folder' if Path(path).is_dir() else 'beside this file'
        raise InputError(path, f'no {CARD_NAME} {where} (expected {target})')
    try:
        text = target.read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(target, f'cannot read model card ({exc})') from None
    return ModelCard.from_json(text, source=target)


def default_band_names(count: int) -> list[str]:
    """Placeholder band names ``band_1 ... band_N`` for data without band descriptions."""
    return [f'band_{i}' for i in range(1, count + 1)]
