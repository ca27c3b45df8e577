"""Option parsing and output shared by the commands."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from geocmid.errors import InputError

if TYPE_CHECKING:  # geocmid is imported only when a command runs, to keep the CLI quick
    from geocmid.runs.result import RunResult


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

#: Counts that must be at least 1 (--batch-size, --tile, --epochs, --max-steps, ...): 0 or a
#: negative number is a usage error (exit 2), never a silent fallback to the default.
POSITIVE = click.IntRange(min=1)

#: Counts that may be 0 (--workers: 0 loads data in the main process).
NON_NEGATIVE = click.IntRange(min=0)


def split_list(value: str | None) -> list[str] | None:
    """``'a, b,c'`` -> ``['a', 'b', 'c']``; None stays None (not given)."""
    if value is None:
        return None
    return [item.strip() for item in value.split(',') if item.strip()]


def parse_bands(value: str | None) -> list[int | str] | None:
    """``'1,2,3'`` -> ``[1, 2, 3]``; band names stay strings (``'red,nir'``)."""
    items = split_list(value)
    return None if items is None else [int(item) if item.isdigit() else item for item in items]


def check_output(path: Path | None, *, folder: bool = False) -> None:
    """Fail (exit 2) before any work starts if the output ``path`` cannot be written.

    Only writability is checked here, by trying (``os.access`` says yes to root everywhere);
    whether an existing output may be replaced is the command's business.

    Args:
        path: the output file or, with ``folder``, the output folder; None: nothing to check.
        folder: whether ``path`` is a folder (created if missing) rather than a file.
    """
    if path is None:
        return
    from geocmid.io.atomic import check_folder_writable

    check_folder_writable(path if folder else Path(path).absolute().parent, source=path)


def tta_option[F: Callable[..., Any]](command: F) -> F:
    """``--tta``: test-time augmentation (see ``geocmid/inference/tta.py``)."""
    return click.option(
        '--tta', type=click.Choice(['none', 'flips', 'd4']), default='none', show_default=True,
        help='Test-time augmentation: average the probabilities over the 4 flips or the 8 '
        'rotations and flips of each window, undone before blending.',
    )(command)  # fmt: skip


def freeze_encoder_option(head: str) -> Callable[[Any], Any]:
    """``--freeze-encoder``, with one meaning for every fine-tuning task.

    See ``geocmid/tasks/finetune/encoder.py``; ``head`` names what still trains.
    """
    return click.option(
        '--freeze-encoder',
        is_flag=True,
        default=None,
        help=f'Train the {head} only: the encoder keeps its weights and its BatchNorm '
        'statistics (eval mode).',
    )


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
            '--devices', type=POSITIVE, help='Number of devices; more than one trains with DDP.'
        ))  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def training_options[F: Callable[..., Any]](command: F) -> F:
    """``--num-nodes`` and ``--checkpoint-every``, which every training command takes."""
    command = click.option(
        '--checkpoint-every',
        help="How often checkpoints/last.ckpt is replaced: steps ('500') or a duration "
        "('10min', '1h'); default every 10 minutes of training or each epoch, whichever first.",
    )(command)
    return click.option(
        '--num-nodes',
        type=POSITIVE,
        help='Machines to train on (default 1); SLURM or torchrun starts one process per device.',
    )(command)


def resume_option[F: Callable[..., Any]](command: F) -> F:
    """``--resume``, which every training command takes."""
    return click.option(
        '--resume',
        is_flag=True,
        help='Continue from RUN_DIR/checkpoints/last.ckpt; --config RUN_DIR/config.yaml repeats '
        "the run's settings.",
    )(command)


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


def scene_inputs(*params: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--stack``, and the one resolution of the raster arguments ``params`` of a command.

    Before the command runs, each given value goes through
    :func:`geocmid.raster.sources.resolve_scenes`: a STAC Item, ItemCollection or
    STAC-GeoParquet file becomes one scene per Item, a URL (``https://``, ``s3://``...) its
    GDAL path, and with ``--stack`` a folder becomes one scene whose files are its bands. A
    value standing for one scene stays one path; several scenes become a list.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        # The command gains a --stack parameter, so the result is not typed as ``command``.
        @functools.wraps(command)
        def wrapper(*args: Any, stack: bool = False, **kwargs: Any) -> Any:
            from geocmid.raster.sources import resolve_all

            for name in params:
                value = kwargs.get(name)
                if value is None or value == ():
                    continue
                if isinstance(value, tuple | list):
                    kwargs[name] = tuple(resolve_all(value, stack=stack))
                else:
                    scenes = resolve_all([value], stack=stack)
                    kwargs[name] = scenes[0] if len(scenes) == 1 else scenes
            return command(*args, **kwargs)

        return click.option(
            '--stack', is_flag=True,
            help='Each folder given is ONE scene whose raster files are its bands (named by '
            'their descriptions or file names), stacked on the finest band grid.',
        )(wrapper)  # fmt: skip

    return decorate


def cluster_options[F: Callable[..., Any]](command: F, *, manifest: bool = True) -> F:
    """``--cluster``, ``--workers``, ``--inputs`` and ``--shard``: many inputs, many machines.

    Without ``manifest``, only ``--cluster`` and ``--workers``.

    See ``geocmid/inference/cluster.py`` and ``geocmid/inference/manifest.py``.
    """
    options = [
        click.option(
            '--inputs',
            type=click.Path(path_type=Path),
            help='Manifest of further inputs: a .txt with one file per line, or a .csv (its '
            "path or scene column). Relative paths are from the manifest's folder.",
        ),
        click.option(
            '--shard',
            metavar='I/N',
            help='Run only every N-th input from the I-th (0-based): one of N array jobs '
            '(SLURM, AWS Batch) over one manifest.',
        ),
        click.option(
            '--cluster',
            metavar='local|none|tcp://HOST:PORT',
            help="Where inputs run: 'local' (default with several inputs: an embedded Dask "
            "cluster, one worker per GPU or --workers CPU workers), 'none' (this process) or "
            'the address of a Dask scheduler.',
        ),
        click.option(
            '--workers',
            'cluster_workers',
            type=POSITIVE,
            help='With --cluster local: this many CPU workers, one torch thread each.',
        ),
    ]
    for option in reversed(options if manifest else options[2:]):
        command = option(command)
    return command


def resolve_cluster(cluster: str | None, inputs: int, devices: object, workers: int | None) -> str:
    """``--cluster`` as given, else ``local`` for several inputs, devices or workers."""
    if cluster is not None:
        return cluster
    from geocmid.inference.cluster import default_cluster

    several = devices != 1 or workers is not None
    return 'local' if several else default_cluster(inputs)


def stac_option[F: Callable[..., Any]](command: F) -> F:
    """``--stac``: a STAC Item beside each prediction (see ``geocmid/io/stac.py``)."""
    return click.option(
        '--stac', is_flag=True,
        help='Also write a STAC Item (<output>.json, beside the label COG) describing the '
        'outputs, and with an output folder a collection.json over every scene.',
    )(command)  # fmt: skip


def write_stac(results: Iterable[Any], folder: Path | None, overwrite: bool) -> None:
    """Write the STAC Item of each result (a ``DenseResult``) beside its label COG.

    With an output ``folder``, also its ``collection.json`` over every Item.
    """
    from geocmid.io.stac import prediction_item, write_collection, write_item
    from geocmid.raster.locations import location_name

    written = []
    for result in results:
        if result.raster is None:
            continue
        item = prediction_item(
            result.raster, vector=result.vector, probabilities=result.probabilities,
            source_name=location_name,
        )  # fmt: skip
        written.append(write_item(item, result.raster.with_suffix('.json'), overwrite))
    if folder is not None and written:
        write_collection(written, folder / 'collection.json', folder.name, overwrite=True)


def remote_output[F: Callable[..., Any]](param: str = 'output') -> Callable[[F], F]:
    """Let the output ``param`` be ``s3://bucket/key`` (see ``geocmid/io/remote.py``).

    The command writes to a local staging path of the same name; when it succeeds, every file
    it wrote there is uploaded whole. The bucket must exist, and the object must not unless
    ``--overwrite`` is given.
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from geocmid.io.remote import s3_output, staged_output

            target = None if kwargs.get(param) is None else s3_output(kwargs[param])
            if target is None:
                return command(*args, **kwargs)
            if kwargs.get('skip_existing'):
                raise click.UsageError('--skip-existing needs a local output folder')
            with staged_output(target, bool(kwargs.get('overwrite'))) as local:
                kwargs[param] = local
                return command(*args, **kwargs)

        # functools.wraps types the wrapper as _Wrapped; it keeps the command's signature.
        return wrapper  # type: ignore[return-value]

    return decorate
