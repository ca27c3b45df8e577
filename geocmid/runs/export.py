"""ONNX export of a run's network, with the whole model card inside the file.

One rule for normalisation (see ``docs/onnx.md``): it stays **outside** the graph. The graph is
the network the run folder holds, unchanged; it takes the card's bands, each normalised as
``(x - mean) / std`` with the card's ``mean`` and ``std``, exactly as geocmid's own inference
feeds the torch network. The card travels in the file's ``metadata_props`` as JSON
(:data:`CARD_KEY`), with the geocmid version, the hash of the weights exported and the input
size rule, so the file alone says how to use it.

Exported graphs, by the run's card:

* segmentation: ``image`` ``(B, C, H, W)`` -> ``logits`` ``(B, K, H, W)``;
* change: ``before`` and ``after`` ``(B, C, H, W)`` -> ``logits`` ``(B, 1, H, W)``;
* classification: ``image`` ``(B, C, S, S)`` -> ``logits`` ``(B, K)``;
* a pretrained encoder (``task`` null): ``image`` ``(B, C, H, W)`` -> globally pooled
  ``features`` ``(B, D)``.

Batch, height and width are dynamic where the architecture allows; dense models need height and
width in multiples of their output stride (:data:`MULTIPLE_KEY`, 32 for U-Nets on ResNets).
An architecture that fixes its input size (a Swin built for one ``img_size``) is exported with
that size fixed, and :data:`SIZE_KEY` says so.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

import geocmid
from geocmid.errors import InputError
from geocmid.io.atomic import atomic_output, check_writable
from geocmid.io.cards import ModelCard, read_card
from geocmid.models.weights import ENCODER_NAME, load_encoder, sha256_file
from geocmid.runs.artefacts import (
    MODEL_NAME,
    load_change_model,
    load_classifier,
    load_segmentation_model,
)
from geocmid.types import PathLike

#: ``metadata_props`` key of the model card (its JSON, as ``model_card.json`` holds it).
CARD_KEY = 'geocmid.card'
#: ``metadata_props`` key of the geocmid version that exported the file.
VERSION_KEY = 'geocmid.version'
#: ``metadata_props`` key of the SHA-256 of the weights file exported.
WEIGHTS_KEY = 'geocmid.weights_sha256'
#: ``metadata_props`` key of what the graph is: segmentation, change, classification, encoder.
TASK_KEY = 'geocmid.task'
#: ``metadata_props`` key of the rule of normalisation (always outside the graph).
NORMALISATION_KEY = 'geocmid.normalisation'
#: ``metadata_props`` key of the multiple that input height and width must be of.
MULTIPLE_KEY = 'geocmid.size_multiple'
#: ``metadata_props`` key of a fixed input size (``'H,W'``), absent when height and width vary.
SIZE_KEY = 'geocmid.input_size'

#: What :data:`NORMALISATION_KEY` says.
NORMALISATION = 'outside the graph: (x - card.mean) / card.std per band, in card.bands order'

#: ONNX opset of exported graphs: recent, and run by every onnxruntime since 1.14.
OPSET = 18

#: Largest difference of outputs accepted between torch and onnxruntime on the checking input.
TOLERANCE = 1e-3


class _TwoDates(nn.Module):
    """A siamese change network with the dates as two inputs: ``(before, after) -> logits``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, before: Tensor, after: Tensor) -> Tensor:
        """Change logits of two normalised images ``(B, C, H, W)``."""
        return self.network(torch.stack([before, after], dim=1))


@dataclass(frozen=True)
class Exportable:
    """A run's network ready for export.

    Attributes:
        network: the module exported, in eval mode.
        card: the run's model card.
        task: 'segmentation', 'change', 'classification' or 'encoder'.
        weights: the weights file the network came from.
        inputs: names of the graph's inputs.
        output: name of the graph's output.
        size: the height and width of the example input.
        multiple: height and width must be multiples of this.
        dense: whether the output is a map (height and width follow the input's).
    """

    network: nn.Module
    card: ModelCard
    task: str
    weights: Path
    inputs: tuple[str, ...]
    output: str
    size: int
    multiple: int
    dense: bool


def exportable(run_dir: PathLike) -> Exportable:
    """The network of a run folder (or ``encoder.pt``) and what its graph looks like.

    Raises:
        InputError: no card, a missing checkpoint or encoder, or a checkpoint of another task.
    """
    card = read_card(run_dir)
    folder = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    if card.task is None:
        network, card = load_encoder(run_dir)
        weights = folder / ENCODER_NAME if Path(run_dir).is_dir() else Path(run_dir)
        size = card.patch_size or 224
        return Exportable(network, card, 'encoder', weights, ('image',), 'features', size, 1, False)
    loaders = {
        'segmentation': load_segmentation_model,
        'change': load_change_model,
        'classification': load_classifier,
    }
    if card.task not in loaders:
        raise InputError(run_dir, f'cannot export a {card.task!r} model')
    network, card = loaders[card.task](folder)
    task, weights = str(card.task), folder / MODEL_NAME  # one of the loaders' tasks
    if task == 'classification':
        size = card.patch_size or 224
        return Exportable(network, card, task, weights, ('image',), 'logits', size, 1, False)
    multiple = int(getattr(getattr(network, 'encoder', None), 'output_stride', 32))
    size = max(multiple, -(-(card.patch_size or 64) // multiple) * multiple)
    inputs: tuple[str, ...] = ('image',)
    if task == 'change':
        network, inputs = _TwoDates(network).eval(), ('before', 'after')
    return Exportable(network, card, task, weights, inputs, 'logits', size, multiple, True)


def export_onnx(
    run_dir: PathLike, output: PathLike, *, overwrite: bool = False, fp16: bool = False
) -> Path:
    """Export the network of a run folder to ONNX with its model card inside.

    The graph is checked with ``onnx.checker`` and run by onnxruntime with batch 2 (batch 1
    was traced) at the traced size and, where sizes may vary, at another size; its outputs must
    match torch's within :data:`TOLERANCE` before anything is written. The file is written
    atomically.

    Args:
        run_dir: a fine-tuning run folder (segmentation, change, classification), or a
            pretraining run folder or ``encoder.pt`` (the bare encoder, giving features).
        output: the ``.onnx`` file to write.
        overwrite: replace an existing file.
        fp16: store the weights in float16 (inputs and outputs stay float32); needs the
            ``onnxconverter-common`` package and is not checked against torch's outputs.

    Returns:
        The file written.

    Raises:
        InputError: an existing or unwritable output, a run folder without card or
            checkpoint, a checkpoint of another task, or ``fp16`` without its package.
    """
    check_writable(output, overwrite)
    if fp16:
        _float16_converter(output)
    model = exportable(run_dir)
    proto, fixed = _export(model)
    _check_against_torch(model, proto.SerializeToString(), fixed)
    if fp16:
        with warnings.catch_warnings():  # one warning per weight too small for float16
            warnings.simplefilter('ignore')
            proto = _float16_converter(output).convert_float_to_float16(proto, keep_io_types=True)
    metadata = {
        CARD_KEY: model.card.to_json(),
        VERSION_KEY: geocmid.__version__,
        WEIGHTS_KEY: sha256_file(model.weights),
        TASK_KEY: model.task,
        NORMALISATION_KEY: NORMALISATION,
        MULTIPLE_KEY: str(model.multiple),
    }
    if fixed:
        metadata[SIZE_KEY] = f'{model.size},{model.size}'
    onnx.helper.set_model_props(proto, metadata)
    proto.producer_name, proto.producer_version = 'geocmid', geocmid.__version__
    proto.doc_string = f'geocmid {model.task} model; normalisation {NORMALISATION}'
    onnx.checker.check_model(proto, full_check=True)
    with atomic_output(output, overwrite=overwrite) as tmp:
        onnx.save_model(proto, tmp)
    return Path(output)


def _export(model: Exportable) -> tuple[onnx.ModelProto, bool]:
    """The traced graph, and whether its height and width had to be fixed."""
    example = _example(model, batch=1, size=model.size, seed=0)
    axes = {name: {0: 'batch', 2: 'height', 3: 'width'} for name in model.inputs}
    axes[model.output] = {0: 'batch', 2: 'height', 3: 'width'} if model.dense else {0: 'batch'}
    proto = _trace(model, example, axes)
    if _runs_at_other_sizes(model, proto):
        return proto, False
    for spec in axes.values():  # a fixed-size architecture (e.g. a Swin's img_size)
        spec.pop(2, None)
        spec.pop(3, None)
    return _trace(model, example, axes), True


def _trace(
    model: Exportable, example: tuple[Tensor, ...], axes: dict[str, dict[int, str]]
) -> onnx.ModelProto:
    """Trace with the TorchScript exporter into an in-memory model."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; it is kept because it handles smp and timm models without it.
        warnings.simplefilter('ignore')
        torch.onnx.export(
            model.network, example, buffer,  # type: ignore[arg-type]  # a file-like is documented
            input_names=list(model.inputs),
            output_names=[model.output], dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def _example(model: Exportable, batch: int, size: int, seed: int) -> tuple[Tensor, ...]:
    """Normal random inputs, one per graph input, each a different tensor.

    The tracer merges inputs that are the same tensor object into one graph input.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, model.card.in_chans or 1, size, size)
    return tuple(torch.randn(shape, generator=generator) for _ in model.inputs)


def _session(content: bytes) -> Any:
    """A CPU onnxruntime session, quiet."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(content, options, providers=['CPUExecutionProvider'])


def _runs_at_other_sizes(model: Exportable, proto: onnx.ModelProto) -> bool:
    """Whether onnxruntime runs the graph at another height and width than traced."""
    try:
        _run(_session(proto.SerializeToString()), model, _example(model, 2, _other(model), 1))
    except Exception:  # noqa: BLE001 - onnxruntime's errors have no common base class
        return False
    return True


def _other(model: Exportable) -> int:
    """Another valid height and width than the traced one, to check that they may vary."""
    return model.size + max(32, model.multiple)


def _run(session: Any, model: Exportable, inputs: tuple[Tensor, ...]) -> np.ndarray:
    feeds = {name: x.numpy() for name, x in zip(model.inputs, inputs, strict=True)}
    return session.run(None, feeds)[0]


def _check_against_torch(model: Exportable, content: bytes, fixed: bool) -> None:
    """Raise when onnxruntime's outputs differ from torch's beyond :data:`TOLERANCE`."""
    session = _session(content)
    sizes = [model.size] if fixed else [model.size, _other(model)]
    for seed, size in enumerate(sizes, start=2):
        inputs = _example(model, 2, size, seed)
        with torch.no_grad():
            expected = model.network(*inputs).numpy()
        found = _run(session, model, inputs)
        difference = float(np.abs(found - expected).max())
        if found.shape != expected.shape or difference > TOLERANCE * max(
            1.0, float(np.abs(expected).max())
        ):
            raise RuntimeError(
                f'the ONNX graph disagrees with torch at size {size} (largest difference '
                f'{difference:.3g}); please report this with the model card'
            )


def _float16_converter(output: PathLike) -> Any:
    """``onnxconverter_common.float16``, or an InputError saying how to install it."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        problem = '--fp16 needs the onnxconverter-common package (pip install onnxconverter-common)'
        raise InputError(output, problem) from None
    return float16


def read_metadata(path: PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, as a dictionary (for inspection and tests)."""
    proto = onnx.load_model(Path(path), load_external_data=False)
    return {prop.key: prop.value for prop in proto.metadata_props}
