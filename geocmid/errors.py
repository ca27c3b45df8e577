"""Error types raised for bad input; the CLI maps them to exit code 2."""

from __future__ import annotations

import os

from geocmid.types import PathLike


class InputError(ValueError):
    """Bad input from the user: a file, folder, option or value that cannot be used.

    The message is one line that names the input and the problem, e.g.
    ``scene.tif: raster has no CRS``.
    """

    def __init__(self, source: PathLike | None, problem: str | None = None) -> None:
        if problem is None:
            # One argument: a whole message, as torch's DataLoader re-raises a worker's error
            # with `exc_type(message)`; keep its last line, which is the original message.
            lines = str(source).strip().splitlines() or ['']
            source, problem = None, lines[-1].removeprefix(f'{__name__}.InputError: ')
        self.source = None if source is None else os.fspath(source)
        self.problem = problem
        super().__init__(problem if self.source is None else f'{self.source}: {problem}')

    def __reduce__(self) -> tuple[type[InputError], tuple[str | None, str]]:
        # DataLoader workers pickle exceptions back to the main process; without this the
        # two-argument constructor cannot be rebuilt and the error would surface as exit 1.
        return (type(self), (self.source, self.problem))
