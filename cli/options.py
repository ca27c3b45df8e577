"""Option parsing and output shared by the commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from geocmid.errors import InputError

if TYPE_CHECKING:  # geocmid is imported only when a command runs, to keep the CLI quick
    from geocmid.runs.segmentation import RunResult


class BandIndices(click.ParamType):
    """``'1,2,3'`` -> ``[1, 2, 3]``: 1-based band indices, comma-separated."""

    name = 'bands'

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> list[int]:
        """Parse the comma-separated list, failing as a usage error (exit 2)."""
        if isinstance(value, list):
            return value
        items = split_list(str(value)) or []
        if not items or not all(item.isdigit() and int(item) > 0 for item in items):
            self.fail(f'expected 1-based band indices such as 1,2,3, got {value!r}', param, ctx)
        return [int(item) for item in items]


BANDS = BandIndices()


def split_list(value: str | None) -> list[str] | None:
    """``'a, b,c'`` -> ``['a', 'b', 'c']``; None stays None (not given)."""
    if value is None:
        return None
    return [item.strip() for item in value.split(',') if item.strip()]


def parse_bands(value: str | None) -> list[int | str] | None:
    """``'1,2,3'`` -> ``[1, 2, 3]``; band names stay strings (``'red,nir'``)."""
    items = split_list(value)
    return None if items is None else [int(item) if item.isdigit() else item for item in items]


def hardware_options[F: Callable[..., Any]](command: F, *, devices: bool = True) -> F:
    """``--devices`` (unless ``devices`` is False), ``--accelerator`` and ``--precision``."""
    options = [
        click.option(
            '--accelerator', help="Lightning accelerator: 'auto' (default), 'cpu', 'gpu'."
        ),
        click.option(
            '--precision',
            type=click.Choice(['auto', '32', 'bf16-mixed', '16-mixed']),
            help="'auto' (default: bf16-mixed on GPUs that support it, 16-mixed on other GPUs, "
            '32 on CPU), 32, bf16-mixed or 16-mixed.',
        ),
    ]
    if devices:
        options.insert(0, click.option(
            '--devices', type=int, help='Number of devices; more than one trains with DDP.'
        ))  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def run_folder_options[F: Callable[..., Any]](command: F) -> F:
    """``--overwrite`` and ``--quiet``, which every command writing a run folder takes."""
    command = click.option('--quiet', is_flag=True, help='No progress bar.')(command)
    return click.option(
        '--overwrite', is_flag=True, help='Replace the outputs of an existing run folder.'
    )(command)


def echo_fine_tuning(result: RunResult, shown: dict[str, str]) -> None:
    """Print the steps taken, the ``shown`` metrics (key -> label) logged, and the outputs."""
    values = [f'{name} {result.metrics[k]:.4f}' for k, name in shown.items() if k in result.metrics]
    click.echo(f'step {result.global_step}: {", ".join(values)}')
    click.echo(f'model: {result.model}')
    click.echo(f'model card: {result.model_card}')


class ItemReport:
    """Reports a many-item run (scenes, pairs) as it goes: errors and skips, one line each.

    Pass :meth:`error` and :meth:`skip` as the library's ``on_error`` and ``on_skip``, then call
    :meth:`finish` with the results: it raises when an item failed, so the exit status is 2.
    """

    def __init__(self, noun: str) -> None:
        self.noun = noun
        self.failed: list[InputError] = []
        self.skipped: list[str] = []

    def error(self, name: str, error: InputError) -> None:
        """Print a failed item's one-line error."""
        self.failed.append(error)
        click.echo(f'error: {error}', err=True)

    def skip(self, name: str) -> None:
        """Print an item skipped because its outputs are complete."""
        self.skipped.append(name)
        click.echo(f'{name}: skipped, outputs complete')

    def finish(self, source: object, summaries: list[str]) -> None:
        """Print each finished item's summary; fail (exit 2) when any item failed."""
        for summary in summaries:
            click.echo(summary)
        if self.failed:
            total = len(self.failed) + len(summaries) + len(self.skipped)
            message = f'{len(self.failed)} of {total} {self.noun}(s) failed (see above)'
            raise InputError(str(source), message)
