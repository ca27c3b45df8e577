"""Tests for geocmid.models.backbones: masked timm encoders for any band count."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import yaml

import geocmid
from geocmid.errors import InputError
from geocmid.models.backbones import MaskedEncoder, check_patch_size, create_encoder
from geocmid.models.masking import block_mask

#: A tiny Swin for 64 px inputs: windows of 2 tile the 16, 8, 4, 2 token grids exactly.
TINY_SWIN: dict[str, Any] = {
    'embed_dim': 16,
    'depths': (2, 2, 2, 2),
    'num_heads': (1, 1, 2, 2),
    'window_size': 2,
}
SWIN = 'swin_tiny_patch4_window7_224'
TINY_CONFIG = Path(__file__).resolve().parents[1] / 'configs' / 'cmid_tiny_test.yaml'
CASES = [('resnet18', {}, 512, (1, 64, 1, 1)), (SWIN, TINY_SWIN, 128, (1, 1, 16))]


@pytest.fixture(params=CASES, ids=['resnet18', 'tiny-swin'])
def case(request: pytest.FixtureRequest) -> tuple[MaskedEncoder, dict[str, Any], int, tuple]:
    name, kwargs, channels, token_shape = request.param
    torch.manual_seed(0)
    return MaskedEncoder(name, 5, 64, **kwargs).eval(), kwargs, channels, token_shape


def _plain_forward(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    features = encoder.forward_features(x)
    is_nhwc = getattr(encoder, 'output_fmt', 'NCHW') == 'NHWC'
    return features.permute(0, 3, 1, 2) if is_nhwc else features


def test_forward_shapes(case: tuple) -> None:
    model, _, channels, token_shape = case
    x = torch.randn(2, 5, 64, 64)
    assert model(x).shape == (2, channels, 2, 2)
    assert model(x, block_mask(2, 64)).shape == (2, channels, 2, 2)
    assert model.num_features == channels
    assert model.reduction == 32
    assert model.mask_token.shape == token_shape
    assert torch.count_nonzero(model.mask_token) == 0


def test_no_mask_and_empty_mask_equal_plain_timm_forward(case: tuple) -> None:
    model, _, _, _ = case
    with torch.no_grad():
        model.mask_token.fill_(3.0)  # even a trained token must not act without masked cells
        x = torch.randn(2, 5, 64, 64)
        expected = _plain_forward(model.encoder, x)
        assert torch.allclose(model(x), expected, atol=1e-6)
        empty = torch.zeros(2, 2, 2, dtype=torch.bool)
        assert torch.allclose(model(x, empty), expected, atol=1e-6)


def test_token_is_added_only_at_masked_positions(case: tuple) -> None:
    model, _, _, _ = case
    trunk = model.encoder.layers if model.is_swin else model.encoder.layer1
    captured: list[torch.Tensor] = []
    trunk.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0].detach()))
    mask = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])
    with torch.no_grad():
        token = model.mask_token
        token.copy_(torch.linspace(1, 2, token.numel()).view_as(token))
        x = torch.randn(2, 5, 64, 64)
        model(x)
        model(x, mask)
    plain, masked = captured
    if model.is_swin:  # NHWC -> NCHW for a single comparison below
        plain, masked = plain.permute(0, 3, 1, 2), masked.permute(0, 3, 1, 2)
    difference = masked - plain
    stem_mask = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 2 x 2 cells -> 16 x 16
    token = model.mask_token.reshape(1, -1, 1, 1)
    expected = token * stem_mask[:, None]
    assert torch.allclose(difference, expected, atol=1e-5)


def test_mask_token_receives_gradient_only_when_masking(case: tuple) -> None:
    model, _, _, _ = case
    model.train()
    x = torch.randn(2, 5, 64, 64)
    model(x).sum().backward()
    assert model.mask_token.grad is None
    model(x, torch.ones(2, 2, 2)).square().mean().backward()
    assert model.mask_token.grad is not None
    assert model.mask_token.grad.abs().sum() > 0


def test_encoder_state_dict_loads_strictly_into_plain_timm(case: tuple) -> None:
    model, kwargs, _, _ = case
    extra = {'img_size': 64} if model.is_swin else {}
    plain = timm.create_model(model.backbone, in_chans=5, num_classes=0, **kwargs, **extra)
    plain.load_state_dict(model.encoder.state_dict(), strict=True)
    assert not any(key.startswith(('fc.', 'head.fc')) for key in model.encoder.state_dict())
    assert 'mask_token' not in model.encoder.state_dict()
    x = torch.randn(1, 5, 64, 64)
    with torch.no_grad():
        assert torch.allclose(_plain_forward(plain.eval(), x), model(x), atol=1e-6)


def test_channels_last_gives_same_result() -> None:
    torch.manual_seed(0)
    model = MaskedEncoder('resnet18', 4, 64).eval()
    x = torch.randn(2, 4, 64, 64)
    mask = block_mask(2, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.mask_token.fill_(0.5)
        reference = model(x, mask)
        model = model.to(memory_format=torch.channels_last)
        result = model(x.to(memory_format=torch.channels_last), mask)
    assert torch.allclose(result, reference, atol=1e-5)
    assert result.is_contiguous(memory_format=torch.channels_last)


def test_resnet50_stem_width_and_features() -> None:
    model = MaskedEncoder('resnet50', 3, 64)
    assert model.mask_token.shape == (1, 64, 1, 1)
    assert model.num_features == 2048
    assert model.encoder.fc.__class__ is torch.nn.Identity


def test_drop_path_defaults_to_zero_and_can_be_set() -> None:
    encoder = create_encoder(SWIN, 3, 64, **TINY_SWIN)
    rates = [m.drop_prob for m in encoder.modules() if type(m).__name__ == 'DropPath']
    assert rates == []  # timm uses Identity for rate 0
    encoder = create_encoder(SWIN, 3, 64, drop_path_rate=0.2, **TINY_SWIN)
    rates = [m.drop_prob for m in encoder.modules() if type(m).__name__ == 'DropPath']
    assert rates and max(rates) == pytest.approx(0.2)


def test_swin_is_built_for_the_patch_size() -> None:
    encoder = create_encoder(SWIN, 3, 128, **TINY_SWIN)
    assert tuple(encoder.patch_embed.img_size) == (128, 128)


@pytest.mark.parametrize(
    ('backbone', 'patch_size', 'kwargs', 'message'),
    [
        ('resnet18', 48, {}, 'multiple of 32 px'),
        ('resnet18', 0, {}, 'multiple of 32 px'),
        ('swin_base_patch4_window7_224', 256, {}, 'multiple of 224 px'),
        ('swin_base_patch4_window7_224', 64, {}, 'multiple of 224 px'),
        (SWIN, 96, TINY_SWIN, 'multiple of 64 px'),
    ],
)
def test_check_patch_size_rejects(
    backbone: str, patch_size: int, kwargs: dict, message: str
) -> None:
    with pytest.raises(InputError, match=f'^--patch-size: .*{message}'):
        check_patch_size(backbone, patch_size, **kwargs)


@pytest.mark.parametrize(
    ('backbone', 'patch_size', 'kwargs'),
    [('resnet50', 96, {}), ('swin_base_patch4_window7_224', 224, {}), (SWIN, 128, TINY_SWIN)],
)
def test_check_patch_size_accepts(backbone: str, patch_size: int, kwargs: dict) -> None:
    check_patch_size(backbone, patch_size, **kwargs)


@pytest.mark.parametrize(
    ('backbone', 'message'),
    [('no_such_net', 'unknown timm model'), ('vit_tiny_patch16_224', 'VisionTransformer')],
)
def test_unsupported_backbones_raise_input_error(backbone: str, message: str) -> None:
    with pytest.raises(InputError, match=f'^--backbone: .*{message}'):
        MaskedEncoder(backbone, 3, 64)


def test_pretraining_checks_patch_size_with_the_task_backbone_kwargs(
    tmp_path: Path, make_geotiff: Callable[..., Path]
) -> None:
    """64 px suits the Swin of ``task.backbone_kwargs`` (window 2), not its default window 7."""
    rng = np.random.default_rng(0)
    make_geotiff('data/a.tif', rng.integers(1, 255, (3, 96, 96), dtype=np.uint8))
    task = yaml.safe_load(TINY_CONFIG.read_text())['task']
    task['backbone_kwargs'] = {key: list(value) if isinstance(value, tuple) else value
                               for key, value in TINY_SWIN.items()}  # fmt: skip
    run = geocmid.pretrain(
        tmp_path / 'run', config=TINY_CONFIG, rasters=tmp_path / 'data', backbone=SWIN,
        patch_size=64, max_steps=1, task=task, progress=False,
    )  # fmt: skip
    assert run.global_step == 1
    with pytest.raises(InputError, match='^--patch-size: .*multiple of 64 px'):
        geocmid.pretrain(
            tmp_path / 'run2', config=TINY_CONFIG, rasters=tmp_path / 'data', backbone=SWIN,
            patch_size=96, max_steps=1, task=task, progress=False,
        )  # fmt: skip
    assert not (tmp_path / 'run2' / 'checkpoints').exists()  # refused before training
