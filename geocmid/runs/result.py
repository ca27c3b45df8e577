"""What a training run wrote: the one result every runner returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunResult:
    """What a training run (pretraining or fine-tuning) wrote.

    Attributes:
        run_dir: The run folder.
        model_card: The model card of what the run exports.
        global_step: Optimiser steps taken in total (including resumed ones).
        metrics: The last logged value of each metric (losses, IoUs, accuracies).
        model: The fine-tuned model (``model.ckpt``); None for pretraining.
        encoder: The pretrained encoder state dict (``encoder.pt``); None for fine-tuning.
        checkpoint: The Lightning checkpoint to resume from; None for fine-tuning.
    """

    run_dir: Path
    model_card: Path
    global_step: int
    metrics: dict[str, float]
    model: Path | None = None
    encoder: Path | None = None
    checkpoint: Path | None = None
