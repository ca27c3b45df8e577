"""The Python API analysts script: one call per job, files in, files and GeoDataFrames out."""

from __future__ import annotations

from .data.pairs import AlignedPair, align_pair
from .embeddings import embed
from .evaluation import EvaluationResult, evaluate_knn, evaluate_linear
from .inference.change import ChangeModel, ChangeResult, change_model, detect_change, detect_changes
from .inference.segment import SegmentationModel, SegmentResult, segment_scenes
from .inference.segment import segment_scene as segment
from .models.weights import load_encoder

__all__ = (
    'AlignedPair',
    'ChangeModel',
    'ChangeResult',
    'EvaluationResult',
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
    'segment',
    'segment_scenes',
)
