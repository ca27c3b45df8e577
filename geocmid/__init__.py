"""geocmid: self-supervised remote-sensing encoders and georeferenced whole-scene inference."""

from importlib.metadata import PackageNotFoundError, version

from .errors import InputError

try:
    __version__ = version('geocmid')
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = '0.0.0+unknown'

__all__ = ('InputError', '__version__')
