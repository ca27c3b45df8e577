"""Lightning's progress bar, drawn as plain lines where the output is not a terminal."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import TQDMProgressBar

from geocmid.progress import LineProgress


class LineProgressBar(TQDMProgressBar):
    """:class:`TQDMProgressBar` whose bars print a line per 10 % or 30 s (see geocmid.progress)."""

    def _bar(self, desc: str, **options: object) -> LineProgress:
        return LineProgress(desc=desc, disable=self.is_disabled, file=sys.stderr, **options)

    def init_sanity_tqdm(self) -> LineProgress:
        """The sanity check bar."""
        return self._bar(self.sanity_check_description)

    def init_train_tqdm(self) -> LineProgress:
        """The training bar."""
        return self._bar(self.train_description, smoothing=0)

    def init_validation_tqdm(self) -> LineProgress:
        """The validation bar."""
        return self._bar(self.validation_description)

    def init_predict_tqdm(self) -> LineProgress:
        """The prediction bar."""
        return self._bar(self.predict_description, smoothing=0)

    def init_test_tqdm(self) -> LineProgress:
        """The test bar."""
        return self._bar('Testing')


def progress_callback() -> TQDMProgressBar:
    """Lightning's redrawn bar on a terminal, :class:`LineProgressBar` in a log or a file."""
    return TQDMProgressBar() if sys.stdout.isatty() else LineProgressBar()
