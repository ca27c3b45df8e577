"""The run table of a many-input run: what ran, where, how long, and what it wrote.

One row per input (``name``, ``input`` files, ``status`` done / skipped / failed, ``error``,
``seconds``, ``worker``, ``outputs``), written as Parquet beside the outputs when the run ends,
however it ends. ``--skip-existing`` reads the previous table to keep the record of the inputs
it skips.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from geocmid.io.atomic import atomic_output
from geocmid.types import PathLike

#: The table's name in the output folder (a shard's: ``run-<I>-of-<N>.parquet``).
RUN_TABLE = 'run.parquet'

#: Columns, in order.
COLUMNS = ('name', 'input', 'status', 'error', 'seconds', 'worker', 'outputs')

#: Values of ``status``.
STATUSES = ('done', 'skipped', 'failed')


def run_table_path(folder: PathLike, shard: tuple[int, int] | None = None) -> Path:
    """``run.parquet`` in ``folder``; one table per shard, so array jobs never share one."""
    if shard is None:
        return Path(folder) / RUN_TABLE
    index, count = shard
    return Path(folder) / f'run-{index}-of-{count}.parquet'


def read_run_table(path: PathLike) -> pd.DataFrame | None:
    """The table of an earlier run, or None when there is none (or it cannot be read)."""
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError):
        return None


class RunTable:
    """The rows of one run, filled as inputs finish, written once at the end.

    Args:
        path: the Parquet file to write.
        inputs: the files of each input, by name, in the run's order.
        outputs: the output files of each input, by name.
    """

    def __init__(
        self,
        path: PathLike,
        inputs: Mapping[str, Sequence[PathLike]],
        outputs: Mapping[str, Sequence[PathLike]],
    ) -> None:
        self.path = Path(path)
        self.inputs = {name: [str(p) for p in files] for name, files in inputs.items()}
        self.outputs = {name: [str(p) for p in files] for name, files in outputs.items()}
        self.rows: dict[str, dict[str, object]] = {}
        previous = read_run_table(self.path)
        self.previous = {} if previous is None else previous.set_index('name').to_dict('index')

    def done(self, name: str, seconds: float, worker: str) -> None:
        """Record an input whose outputs were written."""
        self._add(name, 'done', '', seconds, worker)

    def failed(self, name: str, error: str, seconds: float = math.nan, worker: str = '') -> None:
        """Record an input that failed, with its one-line error."""
        self._add(name, 'failed', error, seconds, worker)

    def skipped(self, name: str) -> None:
        """Record an input skipped because its outputs were complete (keeping where it ran)."""
        before = self.previous.get(name, {})
        seconds, worker = before.get('seconds', math.nan), before.get('worker', '')
        self._add(name, 'skipped', '', float(seconds), str(worker))

    def _add(self, name: str, status: str, error: str, seconds: float, worker: str) -> None:
        self.rows[name] = {
            'name': name, 'input': self.inputs.get(name, []), 'status': status, 'error': error,
            'seconds': float(seconds), 'worker': worker, 'outputs': self.outputs.get(name, []),
        }  # fmt: skip

    def frame(self) -> pd.DataFrame:
        """The rows recorded, in the run's order of inputs."""
        order = [name for name in self.inputs if name in self.rows]
        order += [name for name in self.rows if name not in self.inputs]
        return pd.DataFrame([self.rows[name] for name in order], columns=list(COLUMNS))

    def write(self) -> Path:
        """Write the table atomically, replacing an earlier run's."""
        with atomic_output(self.path, overwrite=True) as tmp:
            self.frame().to_parquet(tmp, index=False)
        return self.path
