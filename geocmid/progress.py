"""Progress bars that suit where they are shown: redrawn on a terminal, plain lines in a log.

On a terminal, a progress bar is tqdm's, redrawn in place. Anywhere else (CI logs, ``nohup``, a
file) carriage-return redraws pile up as one endless line, so the bar prints one line every
:data:`LINE_STEP` of the work or every :data:`LINE_SECONDS`, whichever comes first.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

#: Share of the total between two lines in a log.
LINE_STEP = 0.1

#: Most seconds between two lines in a log.
LINE_SECONDS = 30.0


class LineProgress(tqdm):
    """tqdm writing one plain line per :data:`LINE_STEP` of the total or :data:`LINE_SECONDS`.

    tqdm is asked to refresh on every update; :meth:`display` decides which refreshes become
    a line. Only the drawing changes (not the counting), so the bar's interface is tqdm's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(mininterval=0, miniters=1, dynamic_ncols=False, leave=False, ascii=True)
        self._line_n: float = -1
        self._line_t = 0.0
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Print the bar as a line when enough work or time has passed since the last one."""
        if msg == '':  # tqdm clearing the bar on close: there is nothing to clear
            return False
        now = self._time()
        step = LINE_STEP * self.total if self.total else float('inf')
        due = (
            self._line_n < 0
            or self.n - self._line_n >= step
            or now - self._line_t >= LINE_SECONDS
            or (self.total is not None and self.n >= self.total > self._line_n)
        )
        if due and self.n != self._line_n:
            self._line_n, self._line_t = self.n, now
            self.fp.write(self.__str__().replace('\r', '').strip() + '\n')
            self.fp.flush()
        return True

    def reset(self, total: float | None = None) -> None:
        """Start over (Lightning reuses a bar for each epoch): the next update prints a line."""
        self._line_n, self._line_t = -1, 0.0
        super().reset(total)

    def close(self) -> None:
        """Print the final count if the last line did not show it, then close."""
        if not self.disable and self.n != self._line_n:
            self._line_t = -LINE_SECONDS  # force the line
            self.display()
        super().close()


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str | None = None,
    unit: str = 'it',
    disable: bool = False,
    file: TextIO | None = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar on a terminal, a :class:`LineProgress` elsewhere (same interface).

    Args:
        iterable: What to iterate over, if the bar wraps an iterable.
        total: The amount of work (default ``len(iterable)``).
        desc: The bar's label.
        unit: The unit of work, e.g. ``'window'``.
        disable: Show nothing (``--quiet``).
        file: Where to draw (default stderr).
        **kwargs: Further tqdm options (``initial``, ``postfix``...).

    Returns:
        The bar: update it, or iterate over it, and close it (or use it as a context manager).
    """
    stream = sys.stderr if file is None else file
    kind = tqdm if _is_terminal(stream) else LineProgress
    return kind(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream, **kwargs)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
