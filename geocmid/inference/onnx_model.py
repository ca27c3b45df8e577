"""Networks from ONNX files (``geocmid export``), run by onnxruntime behind a torch module.

:class:`OnnxNetwork` takes and returns torch tensors, so the streaming engine, TTA and the
writers use an exported model exactly as they use the torch network it came from. The model
card comes back from the file's metadata (see :mod:`geocmid.runs.export` and ``docs/onnx.md``);
normalisation stays outside the graph, as for the torch network.

:func:`load_model` is the one place that turns ``--model`` into a network: a ``.onnx`` file
here, a run folder through :mod:`geocmid.runs.artefacts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from geocmid.errors import InputError
from geocmid.io.cards import (
    CHANGE_CLASSES,
    ClassInfo,
    ModelCard,
    default_band_names,
)
from geocmid.io.cog import default_classes
from geocmid.runs.artefacts import (
    MODEL_NAME,
    load_change_model,
    load_classifier,
    load_segmentation_model,
)
from geocmid.types import PathLike

#: ``metadata_props`` key of the model card (the same as :data:`geocmid.runs.export.CARD_KEY`,
#: which inference cannot import: export needs the onnx package, inference only onnxruntime).
CARD_KEY = 'geocmid.card'

#: Suffix of the files :func:`load_model` reads with onnxruntime.
ONNX_SUFFIX = '.onnx'

_LOADERS = {
    'segmentation': load_segmentation_model,
    'change': load_change_model,
    'classification': load_classifier,
}


class OnnxNetwork(nn.Module):
    """An ONNX graph as a torch module: ``forward`` takes and returns float32 tensors.

    A graph with two inputs (a change model's ``before`` and ``after``) takes them stacked,
    ``(B, 2, C, H, W)``, as the torch change network does. Outputs come back on the input's
    device. The CUDA execution provider is used when onnxruntime has it, else the CPU's.

    Args:
        path: the ``.onnx`` file.
        threads: onnxruntime's intra-op threads; default torch's (``torch.get_num_threads``).
        providers: execution providers, in order of preference; default CUDA when available,
            then CPU.

    Raises:
        InputError: the file cannot be read or is not a valid ONNX model.
    """

    def __init__(
        self, path: PathLike, threads: int | None = None, providers: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: its warnings are not the user's business
        if providers is None:
            available = onnxruntime.get_available_providers()
            wanted = ('CUDAExecutionProvider', 'CPUExecutionProvider')
            providers = [p for p in wanted if p in available]
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=list(providers)
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(path, f'is not a readable ONNX model ({first})') from None
        self.path = Path(path)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name

    @property
    def metadata(self) -> dict[str, str]:
        """The file's ``metadata_props``."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: Tensor) -> Tensor:
        """Run the graph on ``x`` (a change graph: ``(B, 2, C, H, W)``), output on its device."""
        array = x.detach().float().cpu().numpy()
        if len(self.inputs) == 1:
            feeds = {self.inputs[0]: np.ascontiguousarray(array)}
        else:  # the dates of a change graph
            feeds = {name: np.ascontiguousarray(array[:, t]) for t, name in enumerate(self.inputs)}
        (result,) = self.session.run([self.output], feeds)
        return torch.from_numpy(result).to(x.device)


def read_onnx_card(network: OnnxNetwork) -> ModelCard | None:
    """The model card stored in an exported file; None when the file has none.

    Raises:
        InputError: a card that is not valid.
    """
    text = network.metadata.get(CARD_KEY)
    return None if text is None else ModelCard.from_json(text, source=network.path)


@dataclass(frozen=True)
class LoadedNetwork:
    """A network for inference, from a run folder or an ONNX file.

    Attributes:
        network: the network in eval mode (on the CPU for torch).
        card: its model card.
        weights: the file the weights came from (``model.ckpt`` or the ``.onnx`` file).
        source: what was given: the run folder or the ``.onnx`` file (to load it again).
    """

    network: nn.Module
    card: ModelCard
    weights: Path
    source: Path


def is_onnx(path: PathLike) -> bool:
    """Whether ``--model`` names an ONNX file (by its suffix)."""
    return Path(path).suffix.lower() == ONNX_SUFFIX


def load_model(
    path: PathLike,
    task: str,
    *,
    bands: Sequence[int | str] | None = None,
    classes: Sequence[str] | None = None,
) -> LoadedNetwork:
    """The network of ``task`` that ``--model`` names: a run folder or an exported ``.onnx``.

    Args:
        path: a run folder of ``geocmid train <task>`` or a ``.onnx`` file of ``geocmid
            export``.
        task: 'segmentation', 'change' or 'classification'.
        bands: for an ONNX file without card only: the scene bands it takes (``--bands``).
        classes: for an ONNX file without card only: its class names, class 0 first
            (``--classes``; a change model's classes are fixed).

    Raises:
        InputError: see :mod:`geocmid.runs.artefacts`; for ONNX: a missing, unreadable or
            corrupt file, a file without card and without ``bands`` (and ``classes``), or a
            card of another task.
    """
    if not is_onnx(path):
        network, found = _LOADERS[task](path)
        return LoadedNetwork(network, found, Path(path) / MODEL_NAME, Path(path))
    if not Path(path).is_file():
        raise InputError(path, 'no such file')
    network = OnnxNetwork(path).eval()
    card = read_onnx_card(network) or bare_card(path, task, bands, classes)
    if card.task != task:
        raise InputError(path, f'not a {task} model (task: {card.task})')
    return LoadedNetwork(network, card, Path(path), Path(path))


def bare_card(
    path: PathLike,
    task: str,
    bands: Sequence[int | str] | None,
    classes: Sequence[str] | None,
) -> ModelCard:
    """A card for an ONNX file without one, from the user's ``--bands`` and ``--classes``.

    Nothing is known of its normalisation: the card has none, and the graph gets the values as
    the reader gives them (raw values for a scene; a pair standardised by its own statistics).

    Raises:
        InputError: ``bands`` (or, but for change, ``classes``) not given, or fewer than two
            classes.
    """
    wanted = ['--bands'] if bands is None else []
    if task != 'change' and classes is None:
        wanted.append('--classes')
    if wanted:
        problem = (
            f'holds no geocmid model card ({CARD_KEY} metadata); export it with `geocmid '
            f'export`, or give {" and ".join(wanted)}'
        )
        raise InputError(path, problem)
    assert bands is not None
    if classes is not None and len(classes) < 2:
        raise InputError('--classes', f'give at least two class names, got {list(classes)}')
    numbers = [b for b in bands if isinstance(b, int)]
    names = default_band_names(len(bands)) if len(numbers) == len(bands) else list(map(str, bands))
    try:
        return ModelCard(
            method='unknown', backbone='unknown', bands=names,
            band_indices=numbers if len(numbers) == len(bands) else list(range(1, len(bands) + 1)),
            task=task,
            classes=list(CHANGE_CLASSES) if task == 'change' else _named_classes(classes or []),
        )  # fmt: skip
    except InputError as exc:
        raise InputError('--bands', exc.problem) from None


def _named_classes(names: Sequence[str]) -> list[ClassInfo]:
    """Classes with these names and the default palette's colours."""
    return [
        ClassInfo(name, c.color) for name, c in zip(names, default_classes(len(names)), strict=True)
    ]
