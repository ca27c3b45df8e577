"""Heads on top of an encoder's last-stage map: projector, local DINO head, MIM decoder.

Shared by the pre-training methods: CMID uses all three (``docs/cmid.md``); GeRSP uses
:class:`Projector` with 2048 -> 2048 -> 128 (``docs/gersp.md#architecture``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ('LocalHead', 'MIMDecoder', 'Projector')


class Projector(nn.Module):
    """Global projector: GAP, Linear, ReLU, Linear, L2 normalisation (no BatchNorm).

    CMID: ``Projector(C, 2048, 256)``; GeRSP: ``Projector(2048, 2048, 128)``.
    """

    def __init__(self, in_features: int, hidden_features: int = 2048, out_features: int = 256):
        """Initialise a new Projector.

        Args:
            in_features: Channels of the encoder map.
            hidden_features: Width of the hidden layer.
            out_features: Dimension of the output embedding.
        """
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden_features),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_features, out_features),
        )

    def forward(self, features: Tensor) -> Tensor:
        """Project features to unit-length embeddings.

        Args:
            features: Feature map (B, C, h, w), globally average-pooled first, or vectors (B, C).

        Returns:
            L2-normalised embeddings of shape (B, out_features).
        """
        if features.ndim == 4:
            features = features.mean(dim=(2, 3))
        return F.normalize(self.mlp(features), dim=-1)


class LocalHead(nn.Module):
    """DINO head on individual tokens: MLP, L2-normalised bottleneck, weight-normed prototypes.

    ``Linear(C, 2048) [BN] GELU Linear(2048, 2048) [BN] GELU Linear(2048, 256)``, L2
    normalisation, then a bias-free weight-normalised ``Linear(256, 2048)`` whose magnitude
    ``g`` is fixed to 1, so the logits are cosine similarities to 2048 prototypes
    (docs/cmid.md#local-branch). Linear layers on (N, C) token rows are the official 1 x 1
    ``Conv1d`` on (B, C, L), and BatchNorm over the rows equals BatchNorm1d over (B, L). BatchNorm
    is used for ResNet encoders and not for Swin. Initialisation follows DINO
    (docs/cmid.md#deviations): truncated normal std 0.02 and zero biases on the MLP; the prototype
    layer keeps PyTorch's default, as in DINO.

    Hand-written: lightly's ``DINOProjectionHead`` uses the deprecated ``nn.utils.weight_norm``,
    whose modules cannot be deep-copied, so no EMA teacher can be made from it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 2048,
        hidden_features: int = 2048,
        bottleneck_features: int = 256,
        num_layers: int = 3,
        use_bn: bool = True,
    ) -> None:
        """Initialise a new LocalHead.

        Args:
            in_features: Channels of the encoder tokens.
            out_features: Number of prototypes (logits per token).
            hidden_features: Width of the hidden layers.
            bottleneck_features: Width of the normalised bottleneck.
            num_layers: Number of MLP layers (at least 1).
            use_bn: Put BatchNorm after each hidden layer (ResNet: True, Swin: False).
        """
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_features))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_features))
            layers.append(nn.GELU())
            width = hidden_features
        layers.append(nn.Linear(width, bottleneck_features))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_dino)
        self.prototypes = weight_norm(nn.Linear(bottleneck_features, out_features, bias=False))
        magnitude = self.prototypes.parametrizations.weight.original0
        magnitude.data.fill_(1)
        magnitude.requires_grad_(False)

    def forward(self, tokens: Tensor) -> Tensor:
        """Compute prototype logits for every token.

        Args:
            tokens: Tokens of shape (..., in_features), e.g. (B, 20, C) matched tokens.

        Returns:
            Logits of shape (..., out_features).
        """
        rows = tokens.reshape(-1, tokens.shape[-1])
        logits = self.prototypes(F.normalize(self.mlp(rows), dim=-1))
        return logits.reshape(*tokens.shape[:-1], logits.shape[-1])


def _init_dino(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MIMDecoder(nn.Module):
    """SimMIM linear decoder: 1 x 1 convolution to ``scale^2 * out_chans``, then PixelShuffle.

    Reconstructs all ``out_chans`` bands of the normalised crop from the last-stage map
    (``docs/cmid.md#reconstruction-loss``; the official code is fixed to 3 bands).
    """

    def __init__(self, in_features: int, out_chans: int, scale: int = 32) -> None:
        """Initialise a new MIMDecoder.

        Args:
            in_features: Channels of the encoder map.
            out_chans: Bands to reconstruct.
            scale: Output stride of the encoder map.
        """
        super().__init__()
        self.decoder = nn.Sequential(
            nn.Conv2d(in_features, scale**2 * out_chans, kernel_size=1), nn.PixelShuffle(scale)
        )

    def forward(self, features: Tensor) -> Tensor:
        """Reconstruct images.

        Args:
            features: Feature map of shape (B, C, h, w).

        Returns:
            Reconstruction of shape (B, out_chans, h * scale, w * scale).
        """
        return self.decoder(features)
