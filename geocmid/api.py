"""The Python API analysts script: one call per job, files in, files and GeoDataFrames out."""

from __future__ import annotations

import os
from typing import Any

from geocmid.datasets.pairs import AlignedPair, align_pair
from geocmid.evaluation.evaluate import EvaluationResult, evaluate_knn, evaluate_linear
from geocmid.inference.products.change import (
    ChangeModel,
    ChangeResult,
    change_model,
    detect_change,
    detect_changes,
)
from geocmid.inference.products.embed import embed
from geocmid.inference.products.segment import SegmentationModel, SegmentResult, segment_scenes
from geocmid.inference.products.segment import segment_scene as segment
from geocmid.models.weights import load_encoder
from geocmid.runs.pretrain import load_pretrain_config, run_pretraining
from geocmid.runs.result import RunResult

__all__ = (
    'AlignedPair',
    'ChangeModel',
    'ChangeResult',
    'EvaluationResult',
    'RunResult',
    'SegmentResult',
    'SegmentationModel',
    'align_pair',
    'change_model',
    'detect_change',
    'detect_changes',
    'embed',
    'evaluate_knn',
    'evaluate_linear',
    'load_encoder',
    'pretrain',
    'segment',
    'segment_scenes',
)


def pretrain(
    output: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> RunResult:
    """Pretrain an encoder, as ``geocmid pretrain`` does, and write the run folder ``output``.

    Example::

        run = geocmid.pretrain('runs/cmid', rasters='scenes/', backbone='resnet18',
                               patch_size=64, max_steps=100)
        encoder, card = geocmid.load_encoder(run.run_dir)

    Args:
        output: The run folder.
        config: A YAML file of settings; ``settings`` win over it.
        resume: Continue from ``output/checkpoints/last.ckpt``.
        overwrite: Replace the outputs of an existing run folder.
        progress: Show a progress bar.
        **settings: Any field of :class:`~geocmid.runs.pretrain.PretrainConfig` (``rasters``,
            ``images``, ``method``, ``backbone``, ``bands``, ``patch_size``, ``max_steps``,
            ``task={...}``, ...).

    Raises:
        InputError: Bad data, settings or run folder.
    """
    resolved = load_pretrain_config(config, output=output, **settings)
    return run_pretraining(resolved, resume=resume, overwrite=overwrite, progress=progress)
