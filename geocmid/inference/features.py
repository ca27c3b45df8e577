"""A network's outputs for every image of a dataset, normalised as its card says.

Evaluation takes frozen encoder features this way, ``geocmid classify`` a classifier's logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchgeo.datasets.utils import Sample

from geocmid.inference.devices import resolve_device

__all__ = ('extract_features',)


@torch.inference_mode()
def extract_features(
    encoder: nn.Module,
    dataset: Dataset[Sample],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: torch.device | str = 'auto',
) -> Tensor:
    """The outputs of ``encoder`` (features, logits) for every image of ``dataset``, in order.

    Args:
        encoder: The network, e.g. from
            :func:`~geocmid.inference.encoders.global_average_pooled`; put in eval mode.
        dataset: Samples holding ``'image'`` (C, H, W) in raw pixel units, all the same size.
        mean: Per-channel mean subtracted before dividing by ``std``.
        std: Per-channel standard deviation.
        batch_size: Images per forward pass.
        workers: Data-loading worker processes.
        device: Where the encoder runs; ``'auto'`` picks CUDA when available.

    Returns:
        float32 (N, D) outputs on the CPU.
    """
    device = resolve_device(device)
    encoder = encoder.eval().to(device)
    shift = torch.tensor(list(mean), dtype=torch.float32, device=device)[:, None, None]
    scale = torch.tensor(list(std), dtype=torch.float32, device=device)[:, None, None]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    features = []
    for batch in loader:
        images = (batch['image'].to(device) - shift) / scale
        features.append(encoder(images).float().cpu())
    return torch.cat(features)
