"""Encoder weights: plain timm state dicts on disk, and import of the official CMID and GeRSP files.

geocmid stores an encoder as ``encoder.pt``, a flat state dict that loads with ``strict=True``
into ``timm.create_model(backbone, in_chans=C, num_classes=0)``, with a ``model_card.json`` beside
it. The importers turn the released checkpoints into that layout:

* ``cmid-resnet50``: CMID ResNet-50, a backbone-only file (timm/torchvision keys) or a full
  pre-training checkpoint, from which the student (``online_encoder.model.*``) is taken, as the
  official ``extract.py`` does (``docs/cmid.md#released-weights``).
* ``cmid-swin-b``: CMID Swin-B in the mmcls layout, renamed to timm's
  ``swin_base_patch4_window7_224`` with the PatchMerging channels reordered
  (``docs/cmid.md#released-weights``).
* ``gersp-resnet50``: GeRSP ResNet-50, an mmcv checkpoint whose ``state_dict`` holds the backbone
  under ``backbone.*`` (``docs/gersp.md#checkpoints``).
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import pickle
import re
import types
import typing
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
from torch import Tensor, nn

from geocmid.errors import InputError
from geocmid.io.atomic import atomic_output, check_writable
from geocmid.io.cards import ModelCard, card_path, default_band_names, read_card, write_card
from geocmid.raster.bands import RGB_BAND_NAMES

#: File name of an encoder inside a run folder.
ENCODER_NAME = 'encoder.pt'

#: Prefix of an encoder spec that asks for a randomly initialised backbone, e.g. 'random:resnet18'.
RANDOM_PREFIX = 'random:'

ImportFormat = Literal['cmid-resnet50', 'cmid-swin-b', 'gersp-resnet50']
IMPORT_FORMATS: tuple[str, ...] = typing.get_args(ImportFormat)

# The released weights take 8-bit RGB. Their normalisation is stored on the card in 8-bit units
# (the official [0, 1] statistics x 255), because geocmid normalises raw pixel values:
# (x - 255 m) / (255 s) equals the official (x / 255 - m) / s.
_CMID_MEAN = (0.33797, 0.3605, 0.3348)  # the official hard-coded RS statistics
_CMID_STD = (0.1359, 0.1352, 0.1407)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # GeRSP normalises with ImageNet statistics
_IMAGENET_STD = (0.229, 0.224, 0.225)

# Downsampling parameters of an mmcls Swin stage: PatchMerging's norm and bias-free reduction.
_DOWNSAMPLE = re.compile(r'stages\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)')

# Order of the 2 x 2 neighbourhood in the merged channels: mmcv's unfold-based PatchMerging
# indexes channel 4c + p with p over (0,0), (0,1), (1,0), (1,1); official Swin and timm index
# qC + c with q over (0,0), (1,0), (0,1), (1,1) (docs/cmid.md). Position q of timm is p = _PI[q].
_PI = (0, 2, 1, 3)


@dataclass(frozen=True)
class _Release:
    """How to read one official release: where its backbone lives and how to rename it."""

    method: str
    backbone: str
    wrapper: str  # top-level entry that holds the state dict in a full checkpoint
    prefix: str  # key prefix of the backbone inside it
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rename: Callable[[dict[str, Tensor]], dict[str, Tensor]]


def _resnet_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # The ResNet-50 keys already are timm's; only a classifier, if any, is dropped.
    return {k: v for k, v in state.items() if not k.startswith('fc.')}


def swin_mmcls_to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an mmcls/mmseg Swin state dict to timm's layout (``docs/cmid.md#released-weights``).

    Stage ``i``'s downsampling moves to the start of stage ``i + 1`` (timm >= 0.9), the
    PatchMerging channels are reordered, and the ``relative_position_index`` buffers are dropped
    because timm recomputes them.

    Args:
        state: Backbone state dict with mmcls keys (``patch_embed.projection``, ``stages.i...``).

    Returns:
        The state dict with timm keys.
    """
    out = {}
    for key, value in state.items():
        if key.endswith(('relative_position_index', 'attn_mask')):
            continue
        if match := _DOWNSAMPLE.fullmatch(key):
            stage, name = int(match[1]), match[2]
            order = unfold_to_concat_order(value.shape[-1] // 4)
            value = value[..., order].contiguous()
            out[f'layers.{stage + 1}.downsample.{name}'] = value
            continue
        key = re.sub(r'^patch_embed\.projection\.', 'patch_embed.proj.', key)
        key = re.sub(r'^stages\.', 'layers.', key)
        key = re.sub(r'^norm3\.', 'norm.', key)
        key = key.replace('.attn.w_msa.', '.attn.')
        key = key.replace('.ffn.layers.0.0.', '.mlp.fc1.').replace('.ffn.layers.1.', '.mlp.fc2.')
        out[key] = value
    return out


def unfold_to_concat_order(channels: int) -> Tensor:
    """Index that reorders PatchMerging input channels from mmcv's layout to timm's.

    ``merged_timm = merged_mmcv[..., order]`` for features, and likewise for the last axis of the
    reduction weight and for the norm parameters.

    Args:
        channels: C, the channel count before merging (the merged vector has 4C entries).
    """
    position = torch.tensor(_PI).unsqueeze(1)  # q -> p, one row per timm position block
    channel = torch.arange(channels).unsqueeze(0)
    return (4 * channel + position).flatten()


_CMID_STUDENT = 'online_encoder.model.'  # extract.py keeps the student, not the EMA teacher

_RELEASES: dict[str, _Release] = {
    'cmid-resnet50': _Release(
        method='cmid',
        backbone='resnet50',
        wrapper='model',
        prefix=_CMID_STUDENT,
        mean=_CMID_MEAN,
        std=_CMID_STD,
        rename=_resnet_keys,
    ),
    'cmid-swin-b': _Release(
        method='cmid',
        backbone='swin_base_patch4_window7_224',
        wrapper='model',
        prefix=_CMID_STUDENT,
        mean=_CMID_MEAN,
        std=_CMID_STD,
        rename=swin_mmcls_to_timm,
    ),
    'gersp-resnet50': _Release(
        method='gersp',
        backbone='resnet50',
        wrapper='state_dict',
        prefix='backbone.',  # the query encoder (student), stored twice: backbone.* = encoder_q.*
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        rename=_resnet_keys,
    ),
}


class _DiscardedObject(dict):
    """Stand-in for the official trainer's logging objects, which the importer throws away."""


# The CMID trainer pickles its MetricStroge (a dict of HistoryBuffer, each a deque of floats and
# numpy scalars) into full checkpoints (docs/cmid.md#released-weights). The class's module is
# Exploring.utils.metric; it is re-exported as Exploring.utils.MetricStroge.
_STUBBED = {
    ('Exploring.utils', 'MetricStroge'),
    ('Exploring.utils.metric', 'MetricStroge'),
    ('Exploring.utils.history_buffer', 'HistoryBuffer'),
}
_ALLOWED: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): OrderedDict,
    ('collections', 'deque'): deque,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('_codecs', 'encode'): codecs.encode,  # how protocol 2 stores bytes
    ('torch', 'Size'): torch.Size,
    ('torch', 'device'): torch.device,
    ('numpy', 'dtype'): np.dtype,
    ('numpy', 'ndarray'): np.ndarray,
    # The functions numpy pickles scalars and arrays with; numpy 1 files name them numpy.core.
    **{
        (module, name): function
        for module in ('numpy.core.multiarray', 'numpy._core.multiarray')
        for name, function in (
            ('scalar', np.float64(0).__reduce__()[0]),
            ('_reconstruct', np.zeros(0).__reduce__()[0]),
        )
    },
    **{
        ('torch._utils', name): getattr(torch._utils, name)
        for name in (
            '_rebuild_tensor',
            '_rebuild_tensor_v2',
            '_rebuild_parameter',
            '_rebuild_parameter_with_state',
        )
    },
    **{('torch', name): v for name, v in vars(torch).items() if isinstance(v, torch.dtype)},
}


class _ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle refers to a class or function outside the allowlist."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensors, plain containers and the stubbed trainer objects.

    Nothing outside ``_ALLOWED`` can be constructed or called, so a checkpoint cannot run code;
    PyTorch's own ``weights_only`` unpickler cannot be used here because it refuses dict
    subclasses such as MetricStroge.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _STUBBED:
            return _DiscardedObject
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        raise _ForbiddenGlobalError(f'{module}.{name}')


# torch.load takes a pickle module; this one carries the restricted Unpickler (storages are
# still resolved by torch before find_class is asked).
# (A ModuleType declares no attributes, hence the two ignores.)
_restricted_pickle = types.ModuleType('geocmid_restricted_pickle')
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = (  # type: ignore[attr-defined]
    lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load()
)


def read_checkpoint(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """Read a PyTorch checkpoint without ever running code from it.

    The file is read with ``torch.load(weights_only=True)`` first. Full CMID checkpoints pickle
    the official trainer's logging objects, which that refuses; they are then read with a
    restricted unpickler that replaces those objects with stand-ins and allows nothing else
    beyond tensors, containers and numpy scalars (``docs/cmid.md#released-weights``).

    Args:
        path: The checkpoint file.

    Returns:
        The checkpoint's top-level dictionary.

    Raises:
        InputError: The file is missing, is not a checkpoint, or pickles anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, 'no such file' if not path.exists() else 'not a file')
    # Unpickling bytes that are not a checkpoint fails with almost any exception type (IndexError,
    # KeyError, ...), so every failure to read counts as bad input here.
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # noqa: BLE001 - retried below, where the cause is reported
        try:
            checkpoint = torch.load(
                path, map_location='cpu', weights_only=False, pickle_module=_restricted_pickle
            )
        except _ForbiddenGlobalError as exc:
            raise InputError(
                path, f'refusing to unpickle {exc}: only tensors and containers are read'
            ) from None
        except Exception as exc:  # noqa: BLE001
            raise InputError(path, f'not a PyTorch checkpoint ({_first_line(exc)})') from None
    if not isinstance(checkpoint, Mapping):
        raise InputError(path, f'not a checkpoint: holds a {type(checkpoint).__name__}, not a dict')
    return checkpoint


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# Lines of torch's weights-only error that give advice (among which: load with
# weights_only=False, i.e. run the file's code) rather than say what is wrong with the file.
_TORCH_ADVICE = ('Weights only load failed', 'Please file an issue', 'Check the documentation')


def unpickling_problem(exc: BaseException, what: str) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused a file, without torch's advice.

    Args:
        exc: The exception ``torch.load`` raised.
        what: What the file should have been, e.g. ``'an encoder state dict'``.

    Returns:
        ``'refusing to unpickle posix.system: ...'`` for a file that pickles code, else
        ``'not <what> (<torch's reason>)'``.
    """
    text = str(exc)
    if match := re.search(r'GLOBAL ([\w.]+)', text):
        return f'refusing to unpickle {match[1]}: only tensors and containers are read'
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_TORCH_ADVICE)]
    reason = reasons[0].removeprefix('WeightsUnpickler error:').strip() if reasons else ''
    return f'not {what} ({reason or type(exc).__name__})'


def load_tensors(path: str | os.PathLike[str], what: str) -> Mapping[str, Any]:
    """Read a dictionary saved with ``torch.save`` without ever running code from it.

    Args:
        path: The file.
        what: What it should hold, for errors, e.g. ``'an encoder state dict'``.

    Returns:
        The dictionary, its tensors on the CPU.

    Raises:
        InputError: The file is missing, is not a PyTorch file, pickles anything but tensors and
            containers, or does not hold a dictionary.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, 'no such file' if not path.exists() else 'not a file')
    # Unpickling bytes that are not a checkpoint fails with almost any exception type (IndexError,
    # KeyError, ...), so every failure to read counts as bad input here.
    try:
        contents = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a bad file
        raise InputError(path, unpickling_problem(exc, what)) from None
    if not isinstance(contents, Mapping):
        raise InputError(path, f'not {what}: holds a {type(contents).__name__}, not a dict')
    return contents


def convert_checkpoint(
    checkpoint: Mapping[str, Any], fmt: ImportFormat, source: str | os.PathLike[str] | None = None
) -> dict[str, Tensor]:
    """Extract the backbone of an official checkpoint and rename it to timm's keys.

    Args:
        checkpoint: A loaded checkpoint: a backbone-only state dict or a full checkpoint.
        fmt: Which release it is.
        source: Named in errors.

    Returns:
        A state dict that loads strictly into ``timm.create_model(backbone, num_classes=0)``.

    Raises:
        InputError: The keys or shapes do not match the expected backbone.
    """
    release = _release(fmt, source)
    state = _backbone_state(checkpoint, release)
    problem = state_dict_mismatch(_expected_state(release.backbone), state)
    if problem:
        guesses = _matching_formats(checkpoint)
        hint = f'; it looks like --format {" or ".join(guesses)}' if guesses else ''
        raise InputError(
            source, f'not a {fmt} checkpoint ({release.backbone} expected{hint}): {problem}'
        )
    return state


def _backbone_state(checkpoint: Mapping[str, Any], release: _Release) -> dict[str, Any]:
    """The backbone entries of ``checkpoint`` as ``release`` stores them, renamed to timm keys."""
    state = checkpoint
    if isinstance(state.get(release.wrapper), Mapping):
        state = state[release.wrapper]
    if any(isinstance(k, str) and k.startswith(release.prefix) for k in state):
        # A full checkpoint: keep the student backbone only, not the EMA teacher or the heads.
        state = {
            k[len(release.prefix) :]: v
            for k, v in state.items()
            if isinstance(k, str) and k.startswith(release.prefix)
        }
    # The stage-0 mask token belongs to CMID's masked wrapper, not to the encoder.
    state = {k: v for k, v in state.items() if k != 'mask_token'}
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        return state  # not a state dict: the mismatch check names the odd entries
    return release.rename(state)


def _matching_formats(checkpoint: Mapping[str, Any]) -> list[str]:
    """The import formats whose layout ``checkpoint`` matches, to suggest in an error."""
    return [
        fmt
        for fmt, release in _RELEASES.items()
        if not state_dict_mismatch(
            _expected_state(release.backbone), _backbone_state(checkpoint, release)
        )
    ]


def _release(fmt: str, source: str | os.PathLike[str] | None) -> _Release:
    if fmt not in _RELEASES:
        choices = ', '.join(IMPORT_FORMATS)
        raise InputError(source, f'unknown format {fmt!r}; choose one of {choices}')
    return _RELEASES[fmt]


@functools.cache
def _expected_state(backbone: str) -> dict[str, Tensor]:
    """Names and shapes of a 3-band timm backbone without classifier (meta tensors)."""
    # On the meta device nothing is allocated or initialised: only names and shapes are wanted.
    with torch.device('meta'):
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    return model.state_dict()


def state_dict_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Any]) -> str | None:
    """Describe, in one line, how ``found`` differs from ``expected``; None when they match.

    A match means every key is present with the same shape, i.e. ``load_state_dict(found,
    strict=True)`` succeeds.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f'{k} {_shape(found[k])} instead of {tuple(v.shape)}'
        for k, v in expected.items()
        if k in found and _shape(found[k]) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f'{len(missing)} missing key(s), e.g. {", ".join(missing[:3])}')
    if unexpected:
        examples = ', '.join(map(str, unexpected[:3]))
        parts.append(f'{len(unexpected)} unexpected key(s), e.g. {examples}')
    if wrong:
        parts.append(f'{len(wrong)} shape mismatch(es), e.g. {"; ".join(wrong[:2])}')
    return '; '.join(parts) or None


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, Tensor) else f'a {type(value).__name__}'


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def save_encoder(
    path: str | os.PathLike[str], state_dict: Mapping[str, Tensor], *, overwrite: bool = False
) -> Path:
    """Write an encoder state dict atomically as a plain dict of CPU tensors.

    Args:
        path: Target file (usually ``RUN_DIR/encoder.pt``); a folder gets ``encoder.pt`` inside.
        state_dict: The encoder's state dict, timm keys.
        overwrite: Replace an existing file.

    Returns:
        The path written.

    Raises:
        InputError: The file exists and ``overwrite`` is False, or the folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ENCODER_NAME
    # Detached CPU copies so that the file loads anywhere with weights_only=True.
    plain = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in state_dict.items()}
    with atomic_output(path, overwrite=overwrite) as tmp:
        torch.save(plain, tmp)
    return path


def load_encoder(
    source: str | os.PathLike[str],
    *,
    in_chans: int | None = None,
    bands: list[str] | None = None,
) -> tuple[nn.Module, ModelCard]:
    """Build a timm encoder (no classifier) and its model card.

    Args:
        source: A run folder, an ``encoder.pt`` with ``model_card.json`` beside it, or
            ``'random:<backbone>'`` for a randomly initialised baseline.
        in_chans: Input channel count of a random encoder; for a saved one, checked if given.
        bands: Band names of a random encoder (defaults to band_1 ... band_N); for a saved one,
            checked if given.

    Returns:
        The model, in eval mode, and its card.

    Raises:
        InputError: No weights or card, an unknown backbone, weights that do not fit the card's
            backbone, or a channel count that differs from the one requested.
    """
    spec = os.fspath(source)
    if spec.startswith(RANDOM_PREFIX):
        return _random_encoder(spec, spec.removeprefix(RANDOM_PREFIX), in_chans, bands)
    path = Path(spec)
    weights = path / ENCODER_NAME if path.is_dir() else path
    if not weights.is_file():
        problem = f'no {ENCODER_NAME} in this folder' if path.is_dir() else 'no such file'
        raise InputError(spec, problem)
    card = read_card(weights)
    if in_chans is not None and in_chans != card.in_chans:
        raise InputError(spec, f'encoder takes {card.in_chans} band(s), {in_chans} requested')
    if bands is not None and list(bands) != card.bands:
        raise InputError(spec, f'encoder takes bands {card.bands}, {list(bands)} requested')
    model = _create(card, card_path(weights))
    state = load_tensors(weights, 'an encoder state dict')
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise InputError(
            weights, f'does not fit {card.backbone} with {card.in_chans} input band(s): {mismatch}'
        )
    model.load_state_dict(state, strict=True)
    return model.eval(), card


def _create(card: ModelCard, source: str | os.PathLike[str]) -> nn.Module:
    """The card's timm backbone, randomly initialised, without classifier."""
    if not timm.is_model(card.backbone):
        raise InputError(source, f'unknown timm backbone {card.backbone!r}')
    try:
        return timm.create_model(
            card.backbone,
            pretrained=False,
            in_chans=card.in_chans,
            num_classes=0,
            **card.backbone_kwargs,
        )
    except (TypeError, ValueError, AssertionError) as exc:  # bad backbone_kwargs
        raise InputError(source, f'cannot build {card.backbone}: {_first_line(exc)}') from None


def _random_encoder(
    spec: str, backbone: str, in_chans: int | None, bands: list[str] | None
) -> tuple[nn.Module, ModelCard]:
    if bands is None:
        if in_chans is None:
            raise InputError(spec, 'a random encoder needs the input bands or their number')
        bands = default_band_names(in_chans)
    elif in_chans is not None and in_chans != len(bands):
        raise InputError(
            spec, f'{in_chans} input channel(s) requested but {len(bands)} band name(s) given'
        )
    try:
        card = ModelCard(
            method='random',
            backbone=backbone,
            bands=list(bands),
            band_indices=list(range(1, len(bands) + 1)),
        )
    except InputError as exc:
        raise InputError(spec, exc.problem) from None
    return _create(card, spec).eval(), card


def import_weights(
    checkpoint: str | os.PathLike[str],
    fmt: ImportFormat,
    output: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> tuple[Path, ModelCard]:
    """Import an official CMID or GeRSP checkpoint as ``encoder.pt`` plus ``model_card.json``.

    Args:
        checkpoint: The downloaded file (backbone-only or full checkpoint).
        fmt: Which release it is: 'cmid-resnet50', 'cmid-swin-b' or 'gersp-resnet50'.
        output: The encoder file to write (a folder gets ``encoder.pt`` inside); the card is
            written beside it.
        overwrite: Replace existing outputs.

    Returns:
        The encoder path and the card written beside it.

    Raises:
        InputError: Unknown format, missing or unreadable checkpoint, keys that do not match the
            format, or existing outputs without ``overwrite``.
    """
    release = _release(fmt, checkpoint)
    output = Path(output)
    encoder = output / ENCODER_NAME if output.is_dir() else output
    # Checked up front, before the (slow) read, and so that neither file is written when the
    # other one cannot be.
    for target in (encoder, card_path(encoder)):
        check_writable(target, overwrite)
    state = convert_checkpoint(read_checkpoint(checkpoint), fmt, checkpoint)
    card = ModelCard(
        method=release.method,
        backbone=release.backbone,
        bands=list(RGB_BAND_NAMES),
        band_indices=[1, 2, 3],
        mean=[round(255 * m, 6) for m in release.mean],
        std=[round(255 * s, 6) for s in release.std],
        patch_size=224,
        data={
            'dtype': 'uint8',
            'note': 'official release; normalisation given in 8-bit units (official [0, 1] '
            'statistics x 255)',
        },
        provenance={
            'checkpoint': str(Path(checkpoint).resolve()),
            'sha256': sha256_file(checkpoint),
            'format': fmt,
        },
    )
    save_encoder(encoder, state, overwrite=overwrite)
    write_card(encoder, card, overwrite=overwrite)
    return encoder, card
