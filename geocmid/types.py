"""Type aliases shared across geocmid."""

import os

#: A file or folder path as callers give it: a string or any path-like object.
type PathLike = str | os.PathLike[str]
