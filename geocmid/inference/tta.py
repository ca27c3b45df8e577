"""Test-time augmentation: a network wrapped to average its probabilities over flips/rotations.

:class:`TestTimeAugmentation` runs the network on each transformed input, undoes the transform
on each output map, averages the *probabilities* (softmax over classes, or sigmoid for a
single binary output, as the engine computes them) and returns the logits of the average (log
for softmax, logit for sigmoid). The engine's own softmax or sigmoid turns them back into that
average, so blending, thresholds and writers need no change, and any network (torch or ONNX,
see :mod:`geocmid.inference.onnx_model`) can be wrapped.

Modes: ``'none'``; ``'flips'``, the four flips of the window (identity, horizontal, vertical,
both); ``'d4'``, the eight symmetries of the square (four rotations, each with and without a
horizontal flip). A classifier's outputs ``(B, K)`` have nothing to undo and are averaged as
they are.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from geocmid.errors import InputError

type TTA = Literal['none', 'flips', 'd4']

#: The test-time augmentation modes.
TTA_MODES: tuple[TTA, ...] = ('none', 'flips', 'd4')

#: Each mode's transforms: (quarter turns counter-clockwise, horizontal flip first).
_TRANSFORMS: dict[str, tuple[tuple[int, bool], ...]] = {
    'none': ((0, False),),
    # A half turn is the vertical and horizontal flip; with a horizontal flip, the vertical one.
    'flips': ((0, False), (0, True), (2, True), (2, False)),
    'd4': tuple((turns, flip) for turns in range(4) for flip in (False, True)),
}


def check_tta(mode: str) -> TTA:
    """``mode`` if it is one of :data:`TTA_MODES`.

    Raises:
        InputError: another value.
    """
    if mode not in TTA_MODES:
        raise InputError('--tta', f'must be one of {", ".join(TTA_MODES)}, not {mode!r}')
    return mode


def _apply(x: Tensor, turns: int, flip: bool) -> Tensor:
    """The transform: a horizontal flip (if any), then ``turns`` quarter turns."""
    x = x.flip(-1) if flip else x
    return torch.rot90(x, turns, dims=(-2, -1)) if turns else x


def _undo(y: Tensor, turns: int, flip: bool) -> Tensor:
    """The inverse of :func:`_apply`."""
    y = torch.rot90(y, -turns, dims=(-2, -1)) if turns else y
    return y.flip(-1) if flip else y


class TestTimeAugmentation(nn.Module):
    """A network whose logits are those of its probabilities averaged over transforms.

    Args:
        network: maps ``(..., H, W)`` inputs to logits ``(B, K, H, W)`` or ``(B, K)``.
        mode: 'flips' or 'd4' ('none' runs the network once).
    """

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, network: nn.Module, mode: TTA) -> None:
        super().__init__()
        self.network = network
        self.mode = check_tta(mode)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the probabilities averaged over the mode's transforms."""
        total: Tensor | None = None
        transforms = _TRANSFORMS[self.mode]
        for turns, flip in transforms:
            logits = self.network(_apply(x, turns, flip))
            if logits.ndim > 2:
                logits = _undo(logits, turns, flip)
            # float64 sums of float32 values are exact: identical outputs average to themselves
            logits = logits.double()
            probabilities = logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(dim=1)
            total = probabilities if total is None else total + probabilities
        assert total is not None
        mean = total / len(transforms)
        logits = torch.logit(mean) if mean.shape[1] == 1 else mean.log()
        return logits.float()


def with_tta(network: nn.Module, mode: str) -> nn.Module:
    """``network`` wrapped in :class:`TestTimeAugmentation`, or itself for ``'none'``.

    Raises:
        InputError: an unknown mode.
    """
    checked = check_tta(mode)
    if checked == 'none':
        return network
    return TestTimeAugmentation(network, checked)
