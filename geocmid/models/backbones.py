"""timm encoders for any band count, with CMID's stage-0 mask token.

:class:`MaskedEncoder` wraps a timm ResNet or Swin Transformer built without classifier and without
pretrained weights. Its forward returns the last-stage feature map (B, C, H / 32, W / 32) in NCHW
for both families. Given a mask, a learnable, zero-initialised token is *added* to the stem output
at masked positions, ``feat + token * M`` (``docs/cmid.md#masking``): after the ResNet stem (conv,
norm, activation, max-pool) or after the Swin patch embedding. Without a mask it is the plain
encoder, which is how the teacher runs.

The wrapped timm model is exposed as :attr:`MaskedEncoder.encoder`; its state dict loads strictly
into ``timm.create_model(name, in_chans=C, num_classes=0, **kwargs)`` (for Swin add
``img_size=patch_size``), so checkpoints stay plain timm checkpoints.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import timm
import torch
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import Tensor, nn

from geocmid.errors import InputError
from geocmid.models.masking import resize_mask

__all__ = ('MaskedEncoder', 'check_patch_size', 'create_encoder', 'is_swin')

#: Every geocmid encoder has an output stride of 32 (block masks and the MIM decoder rely on it).
REDUCTION = 32

_SWIN_TYPES = (SwinTransformer, SwinTransformerV2)

#: The timm families geocmid builds encoders from.
type Swin = SwinTransformer | SwinTransformerV2
type Encoder = ResNet | Swin


def is_swin(model: nn.Module) -> TypeGuard[Swin]:
    """Whether ``model`` is a timm Swin Transformer (built for one input size)."""
    return isinstance(model, _SWIN_TYPES)


def _build(name: str, **kwargs: Any) -> Encoder:
    """Create a timm model with no classifier and no download, or explain why it is unusable."""
    if not timm.is_model(name):
        raise InputError('--backbone', f'unknown timm model {name!r}')
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if not isinstance(model, (ResNet, *_SWIN_TYPES)):
        raise InputError(
            '--backbone',
            f'{name!r} is a {type(model).__name__}; supported are timm ResNet (resnet*) '
            'and Swin Transformer (swin_*, swinv2_*) models',
        )
    return model


def _architecture(backbone: str, **timm_kwargs: Any) -> Encoder:
    """Build ``backbone`` on the meta device: the architecture only, no memory, no init cost."""
    with torch.device('meta'):
        return _build(backbone, **timm_kwargs)


def _feature_info(model: Encoder) -> list[dict[str, Any]]:
    """Per-stage ``feature_info`` of a timm model: ``num_chs``, ``reduction`` (int), ``module``."""
    return model.feature_info


def _required_multiple(model: Encoder) -> int:
    """Smallest patch size step ``model`` accepts: 32, and for a Swin whole windows per stage."""
    steps = [REDUCTION]
    if is_swin(model):
        # timm's stage modules declare no attribute types (nn.Module types them Tensor | Module).
        stages: list[Any] = list(model.layers)
        for stage, info in zip(stages, _feature_info(model), strict=True):
            steps += [info['reduction'] * side for side in stage.blocks[0].window_size]
    return math.lcm(*steps)


def check_patch_size(backbone: str, patch_size: int, **timm_kwargs: Any) -> None:
    """Check that ``backbone`` can encode square patches of ``patch_size`` pixels.

    Every encoder needs a multiple of 32 px: the last stage has stride 32, and CMID masks and
    reconstructs 32 px blocks. A Swin additionally needs every stage's token grid to be a
    multiple of its attention window (``patch_size`` a multiple of 32 x window for a constant
    window: 224, 448, ... for window 7): otherwise timm shrinks the windows or pads the token
    grid, and the relative position tables change shape, so weights would no longer move
    between patch sizes.

    Args:
        backbone: timm model name.
        patch_size: Side of the square input in pixels.
        **timm_kwargs: Extra timm arguments the encoder is built with (e.g. ``window_size``).

    Raises:
        InputError: Naming ``--patch-size`` (or ``--backbone``) and the reason.
    """
    _check_patch_size(_architecture(backbone, **timm_kwargs), backbone, patch_size)


def _check_patch_size(architecture: Encoder, backbone: str, patch_size: int) -> None:
    multiple = _required_multiple(architecture)
    if patch_size <= 0 or patch_size % multiple:
        why = 'whole attention windows in every stage' if multiple != REDUCTION else 'stride 32'
        raise InputError(
            '--patch-size',
            f'{backbone} needs a positive multiple of {multiple} px ({why}), got {patch_size}',
        )


def create_encoder(backbone: str, in_chans: int, patch_size: int, **timm_kwargs: Any) -> Encoder:
    """Create the timm encoder that :class:`MaskedEncoder` wraps, for ``in_chans`` bands.

    No pretrained weights are downloaded. Drop-path defaults to 0 (CMID pre-training,
    arXiv:2304.09670); pass ``drop_path_rate`` to change it. A Swin is built for
    ``img_size=patch_size``.

    Args:
        backbone: timm model name, a ResNet (``resnet18``, ``resnet50``, ...) or a Swin
            (``swin_base_patch4_window7_224``, ...).
        in_chans: Number of input bands.
        patch_size: Side of the square input in pixels (see :func:`check_patch_size`).
        **timm_kwargs: Passed to ``timm.create_model``.

    Returns:
        The timm model with ``num_classes=0``.

    Raises:
        InputError: If the backbone is unknown or unsupported, or cannot take ``patch_size``.
    """
    architecture = _architecture(backbone, **timm_kwargs)
    _check_patch_size(architecture, backbone, patch_size)
    timm_kwargs.setdefault('drop_path_rate', 0.0)
    if is_swin(architecture):
        timm_kwargs['img_size'] = patch_size
    return _build(backbone, in_chans=in_chans, **timm_kwargs)


class MaskedEncoder(nn.Module):
    """A timm encoder returning its last-stage map, with a mask token added after the stem.

    The teacher is an exact copy of this module run without a mask
    (:func:`geocmid.models.momentum.copy_as_teacher`); average only :attr:`encoder` into it, so
    the mask token, which the teacher never uses, is left out of the EMA as in the official code.
    """

    def __init__(self, backbone: str, in_chans: int, patch_size: int, **timm_kwargs: Any) -> None:
        """Initialise a new MaskedEncoder.

        Args:
            backbone: timm model name (see :func:`create_encoder`).
            in_chans: Number of input bands.
            patch_size: Side of the square input in pixels.
            **timm_kwargs: Passed to ``timm.create_model``.
        """
        super().__init__()
        self.backbone = backbone
        self.in_chans = in_chans
        self.patch_size = patch_size
        encoder = create_encoder(backbone, in_chans, patch_size, **timm_kwargs)
        self.encoder = encoder
        self.is_swin = is_swin(encoder)
        #: Channels of the last-stage map.
        self.num_features: int = encoder.num_features
        #: Output stride of the last-stage map.
        self.reduction: int = _feature_info(encoder)[-1]['reduction']
        if isinstance(encoder, ResNet):
            # ResNet stem output is NCHW with the stem width as channels (64 for resnet18/50);
            # timm's first feature_info entry describes the stem whatever its norm layer.
            width = _feature_info(encoder)[0]['num_chs']
            self.mask_token = nn.Parameter(torch.zeros(1, width, 1, 1))
        else:
            # Swin stem output is NHWC (B, h, w, E): the token broadcasts over (h, w).
            self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Encode images, adding the mask token at masked positions when ``mask`` is given.

        Args:
            x: Images of shape (B, in_chans, patch_size, patch_size); masked pixels should
                already be mean-filled (:func:`geocmid.models.masking.mean_fill`).
            mask: Optional mask on any grid that tiles the stem grid (cell, token or pixel
                level), shape (B, h, w) or (B, 1, h, w), True/1 = masked. None = plain forward.

        Returns:
            Last-stage feature map of shape (B, num_features, H / 32, W / 32).
        """
        # timm's forward_features, split after the stem so that the token can enter there.
        encoder = self.encoder
        if not isinstance(encoder, ResNet):  # a Swin
            feat = encoder.patch_embed(x)
            if mask is not None:
                tokens = resize_mask(mask, feat.shape[1:3]).to(feat.dtype)
                feat = feat + self.mask_token * tokens[..., None]
            feat = encoder.norm(encoder.layers(feat))
            # permute() keeps the result a view: NHWC storage is NCHW channels_last.
            return feat.permute(0, 3, 1, 2)
        feat = encoder.maxpool(encoder.act1(encoder.bn1(encoder.conv1(x))))
        if mask is not None:
            tokens = resize_mask(mask, feat.shape[-2:]).to(feat.dtype)
            feat = feat + self.mask_token * tokens[:, None]
        for stage in ('layer1', 'layer2', 'layer3', 'layer4'):  # timm sets these by name
            feat = encoder.get_submodule(stage)(feat)
        return feat
