"""Encoder files and the conversion of the official CMID/GeRSP key layouts to timm."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging
from torch import Tensor

from geocmid.errors import InputError
from geocmid.io.cards import ModelCard, write_card
from geocmid.models.weights import (
    convert_checkpoint,
    load_encoder,
    save_encoder,
    swin_mmcls_to_timm,
    unfold_to_concat_order,
)

# Neighbourhood orders of a 2 x 2 PatchMerging, as (row, column) offsets, written from the two
# implementations: mmcv's nn.Unfold walks the kernel row by row; timm (and the official Swin)
# concatenates x0 = [0::2, 0::2], x1 = [1::2, 0::2], x2 = [0::2, 1::2], x3 = [1::2, 1::2].
UNFOLD_ORDER = [(0, 0), (0, 1), (1, 0), (1, 1)]
TIMM_ORDER = [(0, 0), (1, 0), (0, 1), (1, 1)]


def mmcls_swin_shapes(
    embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...], window: int = 7
) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of an mmcls Swin backbone, as the official mmcls layout names them."""
    shapes: dict[str, tuple[int, ...]] = {
        'patch_embed.projection.weight': (embed_dim, 3, 4, 4),
        'patch_embed.projection.bias': (embed_dim,),
        'patch_embed.norm.weight': (embed_dim,),
        'patch_embed.norm.bias': (embed_dim,),
    }
    dim = embed_dim
    for stage, (depth, n_heads) in enumerate(zip(depths, heads, strict=True)):
        for block in range(depth):
            prefix = f'stages.{stage}.blocks.{block}.'
            shapes |= {
                prefix + 'norm1.weight': (dim,),
                prefix + 'norm1.bias': (dim,),
                prefix + 'attn.w_msa.relative_position_bias_table': (
                    (2 * window - 1) ** 2,
                    n_heads,
                ),
                prefix + 'attn.w_msa.relative_position_index': (window**2, window**2),
                prefix + 'attn.w_msa.qkv.weight': (3 * dim, dim),
                prefix + 'attn.w_msa.qkv.bias': (3 * dim,),
                prefix + 'attn.w_msa.proj.weight': (dim, dim),
                prefix + 'attn.w_msa.proj.bias': (dim,),
                prefix + 'norm2.weight': (dim,),
                prefix + 'norm2.bias': (dim,),
                prefix + 'ffn.layers.0.0.weight': (4 * dim, dim),
                prefix + 'ffn.layers.0.0.bias': (4 * dim,),
                prefix + 'ffn.layers.1.weight': (dim, 4 * dim),
                prefix + 'ffn.layers.1.bias': (dim,),
            }
        if stage < len(depths) - 1:
            shapes |= {
                f'stages.{stage}.downsample.norm.weight': (4 * dim,),
                f'stages.{stage}.downsample.norm.bias': (4 * dim,),
                f'stages.{stage}.downsample.reduction.weight': (2 * dim, 4 * dim),
            }
            dim *= 2
    shapes |= {'norm3.weight': (dim,), 'norm3.bias': (dim,)}
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randint(0, 49, shape, generator=generator)
        if key.endswith('relative_position_index')
        else torch.randn(shape, generator=generator)
        for key, shape in shapes.items()
    }


def explicit_merge_permutation(channels: int) -> list[int]:
    """For each timm merged channel, the mmcv merged channel holding the same value."""
    unfold = [(c, pos) for c in range(channels) for pos in UNFOLD_ORDER]  # index 4c + p
    concat = [(c, pos) for pos in TIMM_ORDER for c in range(channels)]  # index qC + c
    return [unfold.index(entry) for entry in concat]


@pytest.mark.parametrize('channels', [1, 3, 128])
def test_unfold_to_concat_order_matches_explicit_orders(channels: int) -> None:
    assert unfold_to_concat_order(channels).tolist() == explicit_merge_permutation(channels)


def test_patch_merging_outputs_equal_after_conversion() -> None:
    channels = 6
    generator = torch.Generator().manual_seed(1)
    norm_weight = torch.randn(4 * channels, generator=generator)
    norm_bias = torch.randn(4 * channels, generator=generator)
    reduction = torch.randn(2 * channels, 4 * channels, generator=generator)
    x = torch.randn(2, 8, 10, channels, generator=generator)  # NHWC, as both Swins keep it

    # mmcv PatchMerging: unfold the 2 x 2 neighbourhoods, then LayerNorm and a bias-free Linear.
    columns = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)
    columns = F.layer_norm(columns, (4 * channels,), norm_weight, norm_bias, eps=1e-5)
    expected = (columns @ reduction.T).reshape(2, 4, 5, 2 * channels)

    converted = swin_mmcls_to_timm(
        {
            'stages.0.downsample.norm.weight': norm_weight,
            'stages.0.downsample.norm.bias': norm_bias,
            'stages.0.downsample.reduction.weight': reduction,
        }
    )
    assert set(converted) == {
        'layers.1.downsample.norm.weight',
        'layers.1.downsample.norm.bias',
        'layers.1.downsample.reduction.weight',
    }
    merging = PatchMerging(dim=channels)
    merging.load_state_dict(
        {k.removeprefix('layers.1.downsample.'): v for k, v in converted.items()}, strict=True
    )
    with torch.no_grad():
        torch.testing.assert_close(merging(x), expected, rtol=1e-5, atol=1e-5)


def test_relative_position_bias_tables_copy_unchanged() -> None:
    # The mmcls WindowMSA indexes its bias table with a row sequence (2W - 1) * h + w summed
    # over query and key, the key axis reversed; timm must index the same entries.
    window = 7
    seq = [(2 * window - 1) * h + w for h in range(window) for w in range(window)]
    n = window * window
    mmcls_index = [[seq[i] + seq[n - 1 - j] for j in range(n)] for i in range(n)]
    model = timm.create_model(
        'swin_base_patch4_window7_224', embed_dim=16, depths=(2,), num_heads=(2,), img_size=28
    )
    timm_index = model.layers[0].blocks[0].attn.relative_position_index
    assert timm_index.tolist() == mmcls_index


def test_small_swin_converts_key_by_key() -> None:
    depths, heads = (2, 2), (2, 4)
    official = random_state(mmcls_swin_shapes(16, depths, heads))
    converted = swin_mmcls_to_timm(official)
    model = timm.create_model(
        'swin_base_patch4_window7_224',
        embed_dim=16,
        depths=depths,
        num_heads=heads,
        img_size=56,
        num_classes=0,
    )
    model.load_state_dict(converted, strict=True)
    loaded = model.state_dict()

    renames = {
        'patch_embed.proj.weight': 'patch_embed.projection.weight',
        'patch_embed.norm.bias': 'patch_embed.norm.bias',
        'layers.0.blocks.1.attn.qkv.weight': 'stages.0.blocks.1.attn.w_msa.qkv.weight',
        'layers.1.blocks.0.attn.proj.bias': 'stages.1.blocks.0.attn.w_msa.proj.bias',
        'layers.1.blocks.1.attn.relative_position_bias_table': (
            'stages.1.blocks.1.attn.w_msa.relative_position_bias_table'
        ),
        'layers.0.blocks.0.mlp.fc1.weight': 'stages.0.blocks.0.ffn.layers.0.0.weight',
        'layers.1.blocks.1.mlp.fc2.bias': 'stages.1.blocks.1.ffn.layers.1.bias',
        'layers.0.blocks.1.norm2.weight': 'stages.0.blocks.1.norm2.weight',
        'norm.weight': 'norm3.weight',
    }
    for timm_key, mmcls_key in renames.items():
        assert torch.equal(loaded[timm_key], official[mmcls_key]), timm_key

    # Stage 0's merging moved to the start of stage 1, its input channels reordered.
    permutation = explicit_merge_permutation(16)
    mm_reduction = official['stages.0.downsample.reduction.weight']
    mm_norm = official['stages.0.downsample.norm.weight']
    for timm_channel, mm_channel in enumerate(permutation):
        timm_reduction = loaded['layers.1.downsample.reduction.weight']
        assert torch.equal(timm_reduction[:, timm_channel], mm_reduction[:, mm_channel])
        assert loaded['layers.1.downsample.norm.weight'][timm_channel] == mm_norm[mm_channel]
    assert not any('relative_position_index' in key for key in converted)


def test_swin_base_every_official_key_maps_with_its_shape() -> None:
    shapes = mmcls_swin_shapes(128, (2, 2, 18, 2), (4, 8, 16, 32))
    # timm's 327 tensors, plus the position-index buffer of each of the 24 blocks.
    assert len(shapes) == 327 + 24
    official = {key: torch.zeros(shape) for key, shape in shapes.items()}
    checkpoint = {
        'model': {
            'online_encoder.mask_token': torch.zeros(1, 1, 128),
            **{f'online_encoder.model.{k}': v for k, v in official.items()},
            **{f'branch_encoder.{k}': v for k, v in official.items()},
        }
    }
    converted = convert_checkpoint(checkpoint, 'cmid-swin-b')
    model = timm.create_model('swin_base_patch4_window7_224', pretrained=False, num_classes=0)
    expected = model.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in expected.items()
    }
    model.load_state_dict(converted, strict=True)


def resnet50_state(seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    return timm.create_model('resnet50', num_classes=0).state_dict()


def test_cmid_resnet50_full_checkpoint_takes_the_student() -> None:
    student, teacher = resnet50_state(0), resnet50_state(1)
    checkpoint = {
        'epoch': 199,
        'model': {
            'online_encoder.mask_token': torch.zeros(1, 64, 1, 1),
            **{f'online_encoder.model.{k}': v for k, v in student.items()},
            **{f'branch_encoder.{k}': v for k, v in teacher.items()},
            'mim2org.decoder_pred.0.weight': torch.zeros(3072, 2048, 1, 1),
            'queue': torch.zeros(256, 65536 // 64),
        },
    }
    converted = convert_checkpoint(checkpoint, 'cmid-resnet50')

    reference = timm.create_model('resnet50', num_classes=0).eval()
    reference.load_state_dict(student, strict=True)
    model = timm.create_model('resnet50', num_classes=0).eval()
    model.load_state_dict(converted, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert torch.equal(converted['layer4.2.bn3.weight'], student['layer4.2.bn3.weight'])


def test_backbone_only_and_gersp_layouts() -> None:
    state = resnet50_state(0)
    flat = convert_checkpoint(dict(state), 'cmid-resnet50')
    # A torchvision-style file with its classifier still loads: fc is dropped.
    classifier = {'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)}
    with_fc = convert_checkpoint({**state, **classifier}, 'cmid-resnet50')
    gersp = convert_checkpoint(
        {
            'meta': {'epoch': 100},
            'state_dict': {
                **{f'backbone.{k}': v for k, v in state.items()},
                **{f'encoder_k.0.{k}': torch.zeros_like(v) for k, v in state.items()},
                'proj_q.0.weight': torch.zeros(2048, 2048),
            },
        },
        'gersp-resnet50',
    )
    for converted in (flat, with_fc, gersp):
        assert converted.keys() == state.keys()
        assert all(torch.equal(converted[k], state[k]) for k in state)


def test_wrong_format_names_what_was_expected() -> None:
    swin = random_state(mmcls_swin_shapes(128, (2, 2, 18, 2), (4, 8, 16, 32)))
    with pytest.raises(InputError, match=r'ckpt.pth: not a cmid-resnet50 checkpoint') as info:
        convert_checkpoint(swin, 'cmid-resnet50', 'ckpt.pth')
    message = str(info.value)
    assert 'resnet50 expected' in message
    assert 'looks like --format cmid-swin-b' in message
    assert 'missing key(s), e.g. conv1.weight' in message
    with pytest.raises(InputError, match='looks like --format cmid-resnet50 or gersp-resnet50'):
        convert_checkpoint(resnet50_state(0), 'cmid-swin-b', 'ckpt.pth')
    with pytest.raises(InputError, match=r"unexpected key.*'epoch'|epoch"):
        convert_checkpoint({'epoch': 3, 'optimizer': {}}, 'gersp-resnet50', 'ckpt.pth')


def small_card(**overrides: object) -> ModelCard:
    fields: dict = {
        'method': 'cmid',
        'backbone': 'resnet18',
        'bands': ['red', 'green', 'blue', 'nir'],
        'band_indices': [1, 2, 3, 4],
        'mean': [1.0, 2.0, 3.0, 4.0],
        'std': [1.0, 1.0, 1.0, 1.0],
        'patch_size': 64,
    }
    fields.update(overrides)
    return ModelCard(**fields)


def test_save_and_load_encoder_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = timm.create_model('resnet18', in_chans=4, num_classes=0)
    assert save_encoder(tmp_path, encoder.state_dict()) == tmp_path / 'encoder.pt'
    write_card(tmp_path, small_card())
    assert isinstance(torch.load(tmp_path / 'encoder.pt', weights_only=True), dict)

    for source in (tmp_path, tmp_path / 'encoder.pt', str(tmp_path / 'encoder.pt')):
        model, card = load_encoder(source)
        assert card == small_card()
        assert not model.training
        x = torch.randn(2, 4, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x), encoder.eval()(x), rtol=0, atol=0)

    with pytest.raises(InputError, match='exists; use --overwrite'):
        save_encoder(tmp_path / 'encoder.pt', encoder.state_dict())
    with pytest.raises(InputError, match='encoder takes 4 band'):
        load_encoder(tmp_path, in_chans=3)


def test_load_encoder_with_backbone_kwargs(tmp_path: Path) -> None:
    kwargs = {'embed_dim': 16, 'depths': [2, 2], 'num_heads': [2, 4], 'img_size': 56}
    encoder = timm.create_model('swin_base_patch4_window7_224', in_chans=2, num_classes=0, **kwargs)
    save_encoder(tmp_path / 'encoder.pt', encoder.state_dict())
    card = small_card(
        backbone='swin_base_patch4_window7_224',
        backbone_kwargs=kwargs,
        bands=['vv', 'vh'],
        band_indices=[1, 2],
        mean=None,
        std=None,
    )
    write_card(tmp_path, card)
    model, loaded = load_encoder(tmp_path / 'encoder.pt')
    assert loaded.backbone_kwargs == kwargs
    assert torch.equal(model.patch_embed.proj.weight, encoder.patch_embed.proj.weight)


def test_load_encoder_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match='no encoder.pt in this folder'):
        load_encoder(tmp_path)
    with pytest.raises(InputError, match='no such file'):
        load_encoder(tmp_path / 'missing.pt')

    save_encoder(tmp_path, timm.create_model('resnet18', in_chans=4, num_classes=0).state_dict())
    with pytest.raises(InputError, match='no model_card.json beside this file'):
        load_encoder(tmp_path / 'encoder.pt')
    write_card(tmp_path, small_card(backbone='resnet34'))
    with pytest.raises(InputError, match=r'encoder.pt: does not fit resnet34 with 4 input band'):
        load_encoder(tmp_path)
    rgb = small_card(bands=['a', 'b', 'c'], band_indices=[1, 2, 3], mean=None, std=None)
    write_card(tmp_path, rgb, overwrite=True)
    mismatch = r'shape mismatch.*conv1.weight \(64, 4, 7, 7\) instead of \(64, 3, 7, 7\)'
    with pytest.raises(InputError, match=mismatch):
        load_encoder(tmp_path)
    write_card(tmp_path, small_card(backbone='no_such_net'), overwrite=True)
    with pytest.raises(InputError, match="unknown timm backbone 'no_such_net'"):
        load_encoder(tmp_path)


def test_random_encoder_spec() -> None:
    model, card = load_encoder('random:resnet18', in_chans=5)
    assert model.conv1.weight.shape == (64, 5, 7, 7)
    assert model.num_features == 512
    assert card.method == 'random'
    assert card.bands == ['band_1', 'band_2', 'band_3', 'band_4', 'band_5']
    assert card.band_indices == [1, 2, 3, 4, 5]
    _, named = load_encoder('random:resnet18', bands=['red', 'nir'])
    assert named.in_chans == 2
    with pytest.raises(InputError, match='random:resnet18: a random encoder needs the input bands'):
        load_encoder('random:resnet18')
    with pytest.raises(InputError, match="random:resnet9000: unknown timm backbone 'resnet9000'"):
        load_encoder('random:resnet9000', in_chans=3)
    with pytest.raises(InputError, match='3 input channel.*2 band name'):
        load_encoder('random:resnet18', in_chans=3, bands=['red', 'nir'])
