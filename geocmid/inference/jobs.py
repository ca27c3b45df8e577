"""Running one inference job per input: many inputs at once, on one device or several.

Many inputs run one after the other in this process on one device, or, given several devices,
in one worker process per device. Each worker is pinned to its device for its whole life and
builds its runner (loads the model) once; inputs go to whichever worker is free next, so a
large scene does not hold back the others queued behind it on a round-robin schedule. A bad
input is reported by name and, unless ``fail_fast``, the other inputs still run. Inputs already
done by an earlier run (``--skip-existing``) are reported as skipped and count as progress.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed

import torch

from geocmid.errors import InputError
from geocmid.inference.devices import resolve_device
from geocmid.progress import progress_bar

#: Builds the function that runs one job, on the device given (called once per process).
type RunnerFactory[J, R] = Callable[[torch.device], Callable[[J], R]]

#: Called with the input's name and its error when a job fails and ``fail_fast`` is off.
type ErrorHandler = Callable[[str, InputError], None]

#: Called with the name of each input skipped because its outputs are complete already.
type SkipHandler = Callable[[str], None]

# The runner of a worker process, built by _start_worker, or why it could not be built.
_runner: Callable[[object], object] | None = None
_failure: Exception | None = None


def run_jobs[J, R](
    jobs: Mapping[str, J],
    runner: RunnerFactory[J, R],
    *,
    devices: Sequence[torch.device | str] = ('auto',),
    fail_fast: bool = True,
    on_error: ErrorHandler | None = None,
    skipped: Sequence[str] = (),
    on_skip: SkipHandler | None = None,
    progress: bool = True,
    unit: str = 'scene',
) -> dict[str, R]:
    """Run one job per input, in this process or spread over worker processes.

    Args:
        jobs: the job of each input, by the input's name.
        runner: builds the job function for a device. With more than one device it is called
            in each worker process, so it must be picklable (a module-level function or a
            :func:`functools.partial` of one) and so must the jobs and their results.
        devices: one device: jobs run here, in order; several: one worker process per entry
            (the same device may be listed twice, e.g. two CPU workers).
        fail_fast: stop at the first bad input; otherwise report it to ``on_error`` and go on.
        on_error: called with the input's name and its error when ``fail_fast`` is False.
        skipped: inputs left out because their outputs are complete already; they are reported
            to ``on_skip`` and counted as done by the progress bar.
        on_skip: called with the name of each skipped input, before any job runs.
        progress: show a progress bar over the inputs.
        unit: what an input is, for the progress bar.

    Returns:
        The result of each job that succeeded, by name, in the order of ``jobs``.

    Raises:
        InputError: with ``fail_fast`` (or without ``on_error``), the first bad input; an
            error that names no input is attributed to the job's name.
    """
    if not devices:
        raise InputError('--devices', 'no device given')
    results: dict[str, R] = {}

    def failed(name: str, exc: InputError) -> None:
        error = exc if exc.source is not None else InputError(name, exc.problem)
        if fail_fast or on_error is None:
            raise error from None
        on_error(name, error)

    for name in skipped:
        if on_skip is not None:
            on_skip(name)
    bar = progress_bar(
        total=len(jobs) + len(skipped), initial=len(skipped), unit=unit, desc=f'{unit}s',
        disable=not progress, postfix={'skipped': len(skipped)} if skipped else None,
    )  # fmt: skip
    with bar:
        if len(devices) == 1:
            run = runner(resolve_device(devices[0]))
            for name, job in jobs.items():
                try:
                    results[name] = run(job)
                except InputError as exc:
                    failed(name, exc)
                bar.update()
        else:
            for name, outcome in _run_on_workers(jobs, runner, devices):
                if isinstance(outcome, InputError):
                    failed(name, outcome)
                else:
                    results[name] = outcome
                bar.update()
    return {name: results[name] for name in jobs if name in results}


def _run_on_workers[J, R](
    jobs: Mapping[str, J], runner: RunnerFactory[J, R], devices: Sequence[torch.device | str]
) -> Iterator[tuple[str, R | InputError]]:
    """Yield ``(name, result or InputError)`` as the workers finish the jobs.

    Leaving the generator early (the caller raising on a bad input) cancels the jobs not yet
    started; those running finish, and their outputs are written completely or not at all.
    """
    # CUDA cannot be used in a forked child, so workers start fresh ('spawn').
    context = multiprocessing.get_context('spawn')
    queue = context.Queue()
    for device in devices:
        queue.put(str(resolve_device(device)))
    pool = ProcessPoolExecutor(
        max_workers=len(devices), mp_context=context, initializer=_start_worker,
        initargs=(queue, runner),
    )  # fmt: skip
    try:
        futures: dict[Future[R], str] = {
            pool.submit(_run_job, job): name for name, job in jobs.items()
        }
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except InputError as exc:
                yield futures[future], exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        queue.close()


def _start_worker(devices: multiprocessing.Queue, runner: RunnerFactory) -> None:
    """Pin this worker process to the next free device and build its runner."""
    global _runner, _failure
    device = torch.device(devices.get())
    try:
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        _runner = runner(device)
    except Exception as exc:  # noqa: BLE001 - re-raised by every job of this worker
        # An initializer that raises breaks the whole pool with a bare BrokenProcessPool;
        # raised from the jobs instead, the error itself reaches the caller.
        _failure = exc


def _run_job(job: object) -> object:
    """Run one job in a worker process."""
    if _failure is not None:
        raise _failure
    assert _runner is not None, 'worker started without a runner'
    return _runner(job)
