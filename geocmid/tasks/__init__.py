"""Lightning/TorchGeo tasks: what is trained and how."""

from .cmid import CMID
from .gersp import GeRSP

__all__ = ('CMID', 'GeRSP')
