"""What every fine-tuning task does with its encoder: the meaning of ``--freeze-encoder``.

A frozen encoder gets no gradients AND keeps its BatchNorm layers in eval mode, across every
``train()`` call Lightning makes: freezing the weights alone would still let BatchNorm update
its running statistics on the new data, so the frozen encoder would no longer compute its
pretrained features. Only the task's head (decoder or classifier) trains.
"""

from __future__ import annotations

from typing import Any, Self

from torch import nn


class EncoderSetup(nn.Module):
    """Mixin for TorchGeo fine-tuning tasks whose ``freeze_backbone`` hyperparameter is set.

    Put it before the TorchGeo task class (``class Segmentation(EncoderSetup,
    SemanticSegmentation)``), implement :meth:`encoder_parts`, and call
    :meth:`freeze_if_asked` at the end of ``configure_models``.
    """

    hparams: Any

    def encoder_parts(self) -> tuple[nn.Module, nn.Module | None]:
        """The encoder and, when it lies inside the encoder module, the head that still trains.

        Returns:
            ``(encoder, head)``; ``head`` is None when the encoder holds no trained part.
        """
        raise NotImplementedError

    def freeze_if_asked(self) -> None:
        """Without gradients and in eval mode, the encoder when ``freeze_backbone`` is set."""
        if not self.hparams['freeze_backbone']:
            return
        encoder, head = self.encoder_parts()
        encoder.requires_grad_(False)
        if head is not None:
            head.requires_grad_(True)
        self._keep_frozen_eval(encoder, head, self.training)

    def train(self, mode: bool = True) -> Self:
        """Set training mode, keeping a frozen encoder (not its head) in eval mode.

        Args:
            mode: Training (True) or evaluation (False) mode.

        Returns:
            The task.
        """
        super().train(mode)
        if self.hparams['freeze_backbone']:
            self._keep_frozen_eval(*self.encoder_parts(), mode)
        return self

    @staticmethod
    def _keep_frozen_eval(encoder: nn.Module, head: nn.Module | None, mode: bool) -> None:
        encoder.eval()
        if head is not None:
            head.train(mode)
