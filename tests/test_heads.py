"""Tests for geocmid.models.heads: projector, local DINO head and MIM decoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightly.models.modules.heads import DINOProjectionHead
from torch import nn

from geocmid.models.heads import LocalHead, MIMDecoder, Projector
from geocmid.models.momentum import copy_as_teacher


def test_projector_pools_and_normalises() -> None:
    torch.manual_seed(0)
    projector = Projector(32, 64, 16)
    features = torch.randn(3, 32, 2, 2)
    out = projector(features)
    assert out.shape == (3, 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(out, projector(features.mean(dim=(2, 3))))
    # Independent computation: Linear, ReLU, Linear, normalise.
    first, _, second = projector.mlp
    pooled = features.numpy().mean(axis=(2, 3))
    hidden = np.maximum(pooled @ first.weight.detach().numpy().T + first.bias.detach().numpy(), 0)
    logits = hidden @ second.weight.detach().numpy().T + second.bias.detach().numpy()
    expected = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-5)


def test_projector_has_no_batchnorm() -> None:
    projector = Projector(2048, 2048, 128)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in projector.modules())
    assert [m.out_features for m in projector.modules() if isinstance(m, nn.Linear)] == [2048, 128]


@pytest.mark.parametrize(('use_bn', 'num_bn'), [(True, 2), (False, 0)])
def test_local_head_layout(use_bn: bool, num_bn: int) -> None:
    head = LocalHead(
        64, out_features=128, hidden_features=96, bottleneck_features=32, use_bn=use_bn
    )
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 96), (96, 96), (96, 32)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.mlp) == num_bn
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    tokens = torch.randn(4, 20, 64)
    assert head(tokens).shape == (4, 20, 128)


def test_local_head_dino_init() -> None:
    torch.manual_seed(0)
    head = LocalHead(512)
    for linear in (m for m in head.mlp if isinstance(m, nn.Linear)):
        assert torch.count_nonzero(linear.bias) == 0
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
    magnitude = head.prototypes.parametrizations.weight.original0
    assert torch.equal(magnitude, torch.ones(2048, 1))
    assert not magnitude.requires_grad


def test_local_head_logits_are_cosines_to_prototypes() -> None:
    torch.manual_seed(0)
    head = LocalHead(16, out_features=8, hidden_features=12, bottleneck_features=6, use_bn=False)
    tokens = torch.randn(2, 5, 16)
    logits = head(tokens).detach().numpy()
    # Reference: run the MLP layer by layer in numpy, then cosine against the direction rows.
    rows = tokens.reshape(-1, 16).numpy()
    for layer in head.mlp:
        if isinstance(layer, nn.Linear):
            rows = rows @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()
        else:
            rows = 0.5 * rows * (1 + np.vectorize(math.erf)(rows / np.sqrt(2)))
    directions = head.prototypes.parametrizations.weight.original1.detach().numpy()
    cosines = (rows / np.linalg.norm(rows, axis=1, keepdims=True)) @ (
        directions / np.linalg.norm(directions, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(logits.reshape(-1, 8), cosines, atol=1e-5)
    assert np.abs(logits).max() <= 1 + 1e-6


def test_local_head_gradient_skips_frozen_magnitude() -> None:
    head = LocalHead(16, out_features=8, hidden_features=12, bottleneck_features=6)
    head(torch.randn(4, 3, 16)).square().sum().backward()
    weight = head.prototypes.parametrizations.weight
    assert weight.original0.grad is None
    assert weight.original1.grad is not None


def test_mim_decoder_pixel_shuffle_layout() -> None:
    torch.manual_seed(0)
    decoder = MIMDecoder(8, out_chans=5)
    features = torch.randn(2, 8, 2, 3)
    out = decoder(features)
    assert out.shape == (2, 5, 64, 96)
    conv = decoder.decoder[0]
    assert conv.kernel_size == (1, 1) and conv.out_channels == 32 * 32 * 5
    # Output pixel (c, 32 i + a, 32 j + b) is 1 x 1 conv channel c * 1024 + a * 32 + b at (i, j).
    weight = conv.weight.detach()[:, :, 0, 0].numpy()
    bias = conv.bias.detach().numpy()
    for c, i, j, a, b in [(0, 0, 0, 0, 0), (4, 1, 2, 31, 7), (2, 0, 1, 5, 30)]:
        channel = c * 1024 + a * 32 + b
        expected = weight[channel] @ features[1, :, i, j].numpy() + bias[channel]
        assert out[1, c, 32 * i + a, 32 * j + b].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.filterwarnings('ignore:.*weight_norm.*is deprecated:FutureWarning')
def test_lightly_dino_head_cannot_be_copied_as_teacher() -> None:
    # Why LocalHead is hand-written: lightly's DINO head (old-style weight_norm) has the same
    # layout, but the teacher copy fails on it; ours copies.
    lightly_head = DINOProjectionHead(16, 12, 6, 8, batch_norm=False)
    with pytest.raises(RuntimeError, match='deepcopy'):
        copy_as_teacher(lightly_head)
    head = LocalHead(16, out_features=8, hidden_features=12, bottleneck_features=6, use_bn=False)
    teacher = copy_as_teacher(head)
    tokens = torch.randn(5, 16)
    torch.testing.assert_close(teacher(tokens), head(tokens))
