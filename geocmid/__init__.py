"""geocmid: self-supervised remote-sensing encoders and georeferenced whole-scene inference."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from geocmid.errors import InputError

if TYPE_CHECKING:
    from geocmid.api import *  # noqa: F403

try:
    __version__ = version('geocmid')
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = '0.0.0+unknown'

#: The Python API (:mod:`geocmid.api`), importable from ``geocmid`` itself. Listed here rather
#: than read from ``geocmid.api.__all__``: deciding whether a name is exported must not import
#: the API, because Python asks (``hasattr``) for every ``from geocmid import <submodule>``,
#: also while the API itself is being imported. tests/test_segment.py checks both lists agree.
API = (
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


def __getattr__(name: str) -> Any:
    """Import the API on first use.

    So ``import geocmid`` (and ``geocmid info``) stays light: the API pulls in torch, Lightning
    and TorchGeo.
    """
    if name not in API:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module('.api', __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *API})


__all__ = ('InputError', '__version__', *API)
