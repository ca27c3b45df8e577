"""Error types raised for bad input; the CLI maps them to exit code 2."""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad input from the user: a file, folder, option or value that cannot be used.

    The message is one line that names the input and the problem, e.g.
    ``scene.tif: raster has no CRS``.
    """

    def __init__(self, source: str | os.PathLike[str] | None, problem: str) -> None:
        self.source = None if source is None else os.fspath(source)
        self.problem = problem
        super().__init__(problem if self.source is None else f'{self.source}: {problem}')
