"""The one normalisation of raw pixels for a model: ``(x - mean) / std``, nodata set to 0.

0 after normalisation is the band mean, the neutral value for the model. Training batches are
normalised on the device after the transfer (native dtype on the host, see
:class:`~geocmid.datasets.geo_raster.GeoRasterDataset`); inference windows on the host.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def normalise(image: Tensor, mean: Tensor, std: Tensor, valid: Tensor | None = None) -> Tensor:
    """float32 ``(image - mean) / std`` with invalid pixels set to 0.

    Args:
        image: (..., C, H, W) raw pixels in any dtype.
        mean: (C,) per-band mean in raw units.
        std: (C,) per-band standard deviation.
        valid: (..., H, W) bool validity, or None when every pixel is valid.

    Returns:
        The normalised float32 image, on ``image``'s device.
    """
    image = image.to(torch.float32)
    mean = mean.to(image)[:, None, None]
    std = std.to(image)[:, None, None]
    normalised = (image - mean) / std
    if valid is not None:
        # where(), not a product: nodata may be NaN, and NaN * 0 is NaN.
        normalised = torch.where(valid.unsqueeze(-3), normalised, 0)
    return normalised


def normalise_window(
    data: np.ndarray, valid: np.ndarray, mean: np.ndarray, std: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise a window read for inference (:func:`normalise`) and zero-pad it to ``size``.

    Shared by every window source (a scene, an image pair), so that all feed the model alike.

    Args:
        data: (C, rows, cols) raw pixels.
        valid: (rows, cols) validity.
        mean: per-band mean, shaped (C,) or (C, 1, 1).
        std: per-band standard deviation, shaped like ``mean``.
        size: (height, width) to pad to at the bottom and right (the model's tile).

    Returns:
        ``(image, valid)``: the float32 normalised window and its validity; the padding is 0
        and invalid.
    """
    image = np.zeros((data.shape[0], *size), dtype=np.float32)
    mask = np.zeros(size, dtype=bool)
    rows, cols = data.shape[1:]
    normalised = normalise(
        torch.from_numpy(data.astype(np.float32, copy=False)),
        torch.from_numpy(np.asarray(mean, dtype=np.float32).reshape(-1)),
        torch.from_numpy(np.asarray(std, dtype=np.float32).reshape(-1)),
        torch.from_numpy(np.ascontiguousarray(valid, dtype=bool)),
    )
    image[:, :rows, :cols] = normalised.numpy()
    mask[:rows, :cols] = valid
    return image, mask
