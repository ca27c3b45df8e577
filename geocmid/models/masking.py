"""Block-wise masks for masked image modelling, and the mean fill of masked pixels.

CMID masks square blocks of ``mask_patch_size`` pixels (32 in the paper): a 224 px crop has a 7 x 7
grid of cells of which exactly ``ceil(49 * 0.6) = 30`` are masked (``docs/cmid.md#masking``). The
cell mask is resized to whatever grid a consumer needs: the encoder's stem grid (the token mask, 56
x 56 at 224 px) or the pixel grid (for the mean fill and the reconstruction loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from geocmid.errors import InputError

__all__ = ('block_mask', 'masked_cell_count', 'mean_fill', 'resize_mask')


def masked_cell_count(num_cells: int, ratio: float) -> int:
    """Number of cells to mask: ``ceil(num_cells * ratio)``.

    Args:
        num_cells: Cells in the mask grid.
        ratio: Fraction of cells to mask, in (0, 1).

    Returns:
        The exact number of masked cells per image.
    """
    # Round first: 10 * 0.3 is 3.0000000000000004 in binary floating point, and a bare ceil would
    # mask 4 cells instead of 3.
    return math.ceil(round(num_cells * ratio, 9))


def block_mask(
    batch_size: int,
    image_size: int | tuple[int, int],
    *,
    ratio: float = 0.6,
    mask_patch_size: int = 32,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw one independent block mask per image.

    Every image gets exactly :func:`masked_cell_count` masked cells, chosen uniformly at random
    (a random permutation per image, drawn in one batched call on ``device``).

    Args:
        batch_size: Number of masks to draw.
        image_size: Crop size in pixels, ``size`` or ``(height, width)``.
        ratio: Fraction of cells to mask, in (0, 1).
        mask_patch_size: Side of one masked block in pixels.
        generator: Random generator for reproducible masks; it must live on ``device``.
        device: Device of the returned mask.

    Returns:
        Boolean cell mask of shape (B, H / mask_patch_size, W / mask_patch_size), True = masked.

    Raises:
        InputError: If ``ratio`` is outside (0, 1) or the crop does not tile into whole cells.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if not 0 < ratio < 1:
        raise InputError('task.mask_ratio', f'must be between 0 and 1 (exclusive), got {ratio}')
    if height % mask_patch_size or width % mask_patch_size:
        raise InputError(
            '--patch-size',
            f'{height} x {width} px does not tile into {mask_patch_size} px mask cells; '
            f'use a multiple of {mask_patch_size}',
        )
    rows, cols = height // mask_patch_size, width // mask_patch_size
    num_masked = masked_cell_count(rows * cols, ratio)
    scores = torch.rand(batch_size, rows * cols, generator=generator, device=device)
    chosen = scores.argsort(dim=1)[:, :num_masked]
    mask = torch.zeros(batch_size, rows * cols, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, chosen, True)
    return mask.view(batch_size, rows, cols)


def resize_mask(mask: Tensor, size: int | Sequence[int]) -> Tensor:
    """Resize a (B, h, w) mask to another grid by nearest-neighbour sampling.

    Upsampling by an integer factor repeats every cell (cell -> token -> pixel level). Block masks
    are aligned to their cells, so downsampling a pixel mask to a coarser grid that the cells tile
    (e.g. to the encoder's stem grid) is exact as well.

    Args:
        mask: Mask of shape (B, h, w) or (B, 1, h, w), any dtype.
        size: Target ``size`` or ``(height, width)`` (e.g. a ``torch.Size``).

    Returns:
        The mask on the target grid, shape (B, height, width), same dtype as ``mask``.
    """
    if mask.ndim == 4:
        mask = mask.squeeze(1)
    height, width = (size, size) if isinstance(size, int) else size
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    resized = F.interpolate(mask[:, None].float(), size=(height, width), mode='nearest')
    return resized[:, 0].to(mask.dtype)


def mean_fill(x: Tensor, mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """Replace masked pixels by the per-image, per-channel mean: ``x * (1 - M) + mu_c(x) * M``.

    As in CMID/A2MIM (``docs/cmid.md#masking``) the fill is applied to the already normalised crop,
    and the mean runs over the whole crop, masked pixels included. For rasters with nodata, pass
    ``valid`` so that the mean runs over valid pixels only: nodata pixels hold arbitrary fill
    values that would otherwise drag the mean. ``valid`` only changes the mean; which pixels are
    filled is decided by ``mask`` alone. An image without any valid pixel gets a zero mean.

    Args:
        x: Normalised images of shape (B, C, H, W).
        mask: Mask on any grid that tiles (H, W), e.g. the cell mask from :func:`block_mask`;
            shape (B, h, w) or (B, 1, h, w), True/1 = masked.
        valid: Optional (B, H, W) or (B, 1, H, W) mask of valid (not nodata) pixels.

    Returns:
        The mean-filled images, same shape and dtype as ``x``.
    """
    pixel_mask = resize_mask(mask, x.shape[-2:]).bool()[:, None]
    if valid is None:
        mean = x.mean(dim=(2, 3), keepdim=True)
    else:
        valid_pixels = resize_mask(valid, x.shape[-2:]).bool()[:, None]
        # where() rather than a product: nodata pixels may hold NaN, and NaN * 0 is NaN.
        total = torch.where(valid_pixels, x, 0).sum(dim=(2, 3), keepdim=True)
        mean = total / valid_pixels.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    # where() equals x * (1 - M) + mu * M for binary M, and also replaces masked NaN pixels.
    return torch.where(pixel_mask, mean, x)
