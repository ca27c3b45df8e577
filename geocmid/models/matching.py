"""Position matching of the last-stage tokens of two crops, by where they lie in the patch.

CMID's local branch pairs each token of one view with the nearest token of the other view and keeps
the ``num_matches`` closest pairs (``docs/cmid.md#local-branch``). geocmid fixes a defect of the
official code (``docs/cmid.md#deviations``): the official location grids used albumentations'
fractional start values as pixel offsets, which dropped the crop offsets, so two crops of equal size
matched position to position wherever they were cut. Here the cell centres of both token grids are
placed in one common frame, the pixel coordinates of the source patch, from each crop's true box and
flip flag (see :class:`geocmid.transforms.augment.CropGeometry`), so tokens are matched by true
geometric overlap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geocmid.errors import InputError

__all__ = ('cell_centres', 'gather_tokens', 'match_tokens')


def cell_centres(boxes: Tensor, flipped: Tensor, grid_size: int) -> Tensor:
    """Centres of the cells of each crop's token grid, in source-patch pixel coordinates.

    For a crop of box ``[x0, y0, x1, y1]`` (height h, width w) and a g x g grid, cell (k, l) has
    centre ``(y0 + (k + 1/2) h / g, x0 + (l + 1/2) w / g)``. A flipped crop shows its source columns
    in reverse, so the token at output column l sits at source column ``g - 1 - l``.

    Args:
        boxes: (B, 4) crop boxes ``[x0, y0, x1, y1]`` in patch pixels.
        flipped: (B,) bool, True where the crop was flipped horizontally.
        grid_size: g, the side of the token grid (crop size / 32 for CMID's backbones).

    Returns:
        (B, g * g, 2) centres as (y, x), tokens in raster order (index ``k * g + l``).
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    fractions = (torch.arange(grid_size, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid_size
    rows = y0[:, None] + fractions * (y1 - y0)[:, None]
    cols = x0[:, None] + fractions * (x1 - x0)[:, None]
    cols = torch.where(flipped[:, None].to(boxes.device), cols.flip(-1), cols)
    ys, xs = torch.broadcast_tensors(rows[:, :, None], cols[:, None, :])
    return torch.stack([ys, xs], dim=-1).flatten(1, 2)


def match_tokens(
    centres_a: Tensor, centres_b: Tensor, num_matches: int = 20
) -> tuple[Tensor, Tensor]:
    """Pair tokens of view a with their nearest tokens of view b and keep the closest pairs.

    For each token i of a, its nearest neighbour j*(i) in b by Euclidean distance between cell
    centres; then the ``num_matches`` tokens of a with the smallest nearest-neighbour distance
    (capped at the number of tokens). Ties keep the lower token index; the kept tokens are returned
    in raster order (``docs/cmid.md#local-branch``). This is geocmid's fix of the official
    matching: the centres carry each crop's true offset, size and flip (:func:`cell_centres`).

    Args:
        centres_a: (B, Na, 2) cell centres of view a.
        centres_b: (B, Nb, 2) cell centres of view b, in the same frame.
        num_matches: Pairs to keep per image.

    Returns:
        ``idx_a`` (B, n) indices of the kept tokens of a, ascending, and ``idx_b`` (B, n) the
        indices of their nearest tokens of b, with ``n = min(num_matches, Na)``.

    Raises:
        InputError: If ``num_matches`` is less than 1.
    """
    if num_matches < 1:
        raise InputError('num_matches', f'must be at least 1, got {num_matches}')
    # Exact differences rather than torch.cdist, whose matrix-product shortcut (used from 25
    # points on) is off by rounding and turns exact ties and zeros into arbitrary orderings.
    distances = torch.linalg.vector_norm(centres_a[:, :, None] - centres_b[:, None], dim=-1)
    nearest_distance, nearest = distances.min(dim=-1)
    count = min(num_matches, centres_a.shape[1])
    closest = nearest_distance.sort(dim=-1, stable=True).indices[:, :count]
    idx_a = closest.sort(dim=-1).values
    idx_b = nearest.gather(1, idx_a)
    return idx_a, idx_b


def gather_tokens(feature_map: Tensor, idx: Tensor) -> Tensor:
    """Pick tokens of a feature map by raster index.

    Args:
        feature_map: (B, C, g, g) last-stage features.
        idx: (B, n) token indices ``k * g + l``, as returned by :func:`match_tokens`.

    Returns:
        (B, n, C) the selected tokens.
    """
    tokens = feature_map.flatten(2).transpose(1, 2)
    return tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
