"""Running one inference job per input: in this process, or on the workers of a Dask cluster.

In this process the inputs run one after the other. On a cluster (:mod:`.cluster`) Dask gives
each input to the next free worker; each worker builds its runner (loads the model) once, on
its first job, and keeps it for the jobs that follow. When a worker dies, Dask runs its input
again on another worker (up to the scheduler's ``allowed-failures``); outputs are written
atomically, so a killed attempt leaves none half-written. A bad input is reported by name and,
unless ``fail_fast``, the other inputs still run. Every input ends as a row of the run table
(:mod:`.runtable`): done, skipped or failed, with the seconds it took and the worker it ran on.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from geocmid.errors import InputError
from geocmid.inference.cluster import DEVICE_VARIABLE, THREADS_VARIABLE, Placement
from geocmid.inference.devices import resolve_device
from geocmid.inference.runtable import RunTable
from geocmid.progress import progress_bar

#: Builds the function that runs one job, on the device given (once per process).
type RunnerFactory[J, R] = Callable[[torch.device], Callable[[J], R]]

#: Called with the input's name and its error when a job fails and ``fail_fast`` is off.
type ErrorHandler = Callable[[str, InputError], None]

#: Called with the name of each input skipped because its outputs are complete already.
type SkipHandler = Callable[[str], None]


@dataclass(frozen=True)
class Outcome[R]:
    """What one job gave: its result or the error of its input, how long and where it ran."""

    result: R | None
    error: InputError | None
    seconds: float
    worker: str


class WorkerLost(RuntimeError):
    """Inputs whose workers kept dying while running them (internal error, exit 1)."""


# The runners built in this (worker) process, by run; one run's at a time.
_runners: dict[str, Callable[[object], object]] = {}
_runners_lock = threading.Lock()


def run_jobs[J, R](
    jobs: Mapping[str, J],
    runner: RunnerFactory[J, R],
    *,
    placement: Placement | None = None,
    fail_fast: bool = True,
    on_error: ErrorHandler | None = None,
    skipped: Sequence[str] = (),
    on_skip: SkipHandler | None = None,
    progress: bool = True,
    unit: str = 'scene',
    table: RunTable | None = None,
) -> dict[str, R]:
    """Run one job per input, in this process or on the workers of a Dask cluster.

    Args:
        jobs: the job of each input, by the input's name.
        runner: builds the job function for a device. On a cluster it is called once in each
            worker process, so it must be picklable (a module-level function or a
            :func:`functools.partial` of one), and so must the jobs and their results.
        placement: where the jobs run (:func:`~geocmid.inference.cluster.placement`); None:
            here, on the default device.
        fail_fast: stop at the first bad input; otherwise report it to ``on_error`` and go on.
        on_error: called with the input's name and its error when ``fail_fast`` is False.
        skipped: inputs left out because their outputs are complete already; they are reported
            to ``on_skip`` and counted as done by the progress bar.
        on_skip: called with the name of each skipped input, before any job runs.
        progress: show a progress bar over the inputs.
        unit: what an input is, for the progress bar.
        table: the run table, filled as the jobs finish and written when they end, however.

    Returns:
        The result of each job that succeeded, by name, in the order of ``jobs``.

    Raises:
        InputError: with ``fail_fast`` (or without ``on_error``), the first bad input; an
            error that names no input is attributed to the job's name.
        WorkerLost: inputs whose workers died more often than the scheduler allows.
    """
    placement = placement or Placement(None)
    results: dict[str, R] = {}
    lost: list[str] = []

    def finish(name: str, outcome: Outcome[R]) -> None:
        if outcome.error is None:
            # Without an error the result is set (R itself may include None, so no assert).
            results[name] = outcome.result  # type: ignore[assignment]
            if table is not None:
                table.done(name, outcome.seconds, outcome.worker)
            return
        exc = outcome.error
        error = exc if exc.source is not None else InputError(name, exc.problem)
        if table is not None:
            table.failed(name, str(error), outcome.seconds, outcome.worker)
        if fail_fast or on_error is None:
            raise error from None
        on_error(name, error)

    for name in skipped:
        if table is not None:
            table.skipped(name)
        if on_skip is not None:
            on_skip(name)
    bar = progress_bar(
        total=len(jobs) + len(skipped), initial=len(skipped), unit=unit, desc=f'{unit}s',
        disable=not progress, postfix={'skipped': len(skipped)} if skipped else None,
    )  # fmt: skip
    try:
        with bar:
            if placement.client is None:
                run = runner(resolve_device(placement.device))
                where = f'{socket.gethostname()}:{os.getpid()}'
                for name, job in jobs.items():
                    finish(name, _timed(run, job, where))
                    bar.update()
            else:
                for name, outcome in _on_cluster(jobs, runner, placement):
                    if isinstance(outcome, Outcome):
                        finish(name, outcome)
                    elif isinstance(outcome, BaseException):  # a defect: the run stops
                        if table is not None:
                            table.failed(name, f'{type(outcome).__name__}: {outcome}')
                        raise outcome
                    else:
                        lost.append(name)
                        if table is not None:
                            table.failed(name, outcome)
                    bar.update()
    finally:
        if table is not None:
            table.write()
    if lost:
        raise WorkerLost(f'{len(lost)} {unit}(s) lost with their workers: {", ".join(lost)}')
    return {name: results[name] for name in jobs if name in results}


def _timed[J, R](run: Callable[[J], R], job: J, worker: str) -> Outcome[R]:
    """Run a job; the error of a bad input is an outcome too, not an exception."""
    start = time.perf_counter()
    try:
        result, error = run(job), None
    except InputError as exc:
        result, error = None, exc
    return Outcome(result, error, time.perf_counter() - start, worker)


def _on_cluster[J, R](
    jobs: Mapping[str, J], runner: RunnerFactory[J, R], placement: Placement
) -> Iterator[tuple[str, Outcome[R] | str | Exception]]:
    """Yield ``(name, outcome)`` as the workers finish the jobs.

    The outcome is an :class:`Outcome`; why an input was lost with its workers; or the
    exception of a job that raised anything but :class:`InputError`.

    Leaving the generator early (the caller raising on a bad input) cancels the jobs not yet
    finished; outputs are atomic, so a cancelled job leaves none half-written.
    """
    from distributed import KilledWorker, as_completed

    client = placement.client
    assert client is not None
    run_id = uuid.uuid4().hex
    futures = {
        client.submit(
            _run_on_worker, run_id, runner, placement.device, job, key=f'{name}-{run_id}',
            pure=False,
        ): name
        for name, job in jobs.items()
    }  # fmt: skip
    try:
        for future in as_completed(futures, loop=client.loop):
            name = futures[future]
            try:
                yield name, future.result()
            except KilledWorker as exc:
                yield name, f'its worker died while running it, more often than allowed ({exc})'
            except Exception as exc:  # noqa: BLE001 - recorded in the run table, then raised
                yield name, exc
    finally:
        client.cancel(list(futures))


def _run_on_worker(run_id: str, runner: RunnerFactory, device: str, job: object) -> Outcome:
    """Run one job on a Dask worker, building this worker's runner on its first job."""
    from distributed import get_worker

    with _runners_lock:
        run = _runners.get(run_id)
        if run is None:
            threads = os.environ.get(THREADS_VARIABLE)
            if threads:
                torch.set_num_threads(int(threads))
            resolved = resolve_device(os.environ.get(DEVICE_VARIABLE, device))
            if resolved.type == 'cuda':
                torch.cuda.set_device(resolved)
            _runners.clear()  # the model of an earlier run is not needed again
            run = _runners[run_id] = runner(resolved)
    return _timed(run, job, get_worker().address)
