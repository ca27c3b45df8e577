"""Lightning/TorchGeo tasks: what is trained and how."""

from geocmid.tasks.ssl.cmid import CMID
from geocmid.tasks.ssl.gersp import GeRSP

__all__ = ('CMID', 'GeRSP')
