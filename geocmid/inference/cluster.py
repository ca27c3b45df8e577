"""Where the inputs of a many-input run go: this process, an embedded Dask cluster, or a scheduler.

``--cluster`` takes three kinds of value:

* ``none``: the inputs run one after the other in this process;
* ``local``: an embedded Dask cluster of worker processes on this machine, one per GPU, each
  pinned to its device by ``CUDA_VISIBLE_DEVICES``, or ``--workers N`` CPU workers with one
  torch thread each;
* ``tcp://HOST:PORT``: the scheduler of an existing Dask cluster (``dask scheduler`` and
  ``dask worker`` on any machines, or a dask-jobqueue / dask-kubernetes cluster).

Dask (not a home-made pool) schedules each input to the next free worker, reschedules the input
of a worker that dies on another worker, and reports where each input ran.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from geocmid.errors import InputError
from geocmid.inference.devices import resolve_device

if TYPE_CHECKING:  # distributed is imported only when a cluster is used: it is slow to import
    from distributed import Client

#: Seconds a scheduler address has to answer before the run is refused.
CONNECT_TIMEOUT = 10

#: Environment of a local worker: its device and torch threads, read by the jobs it runs.
DEVICE_VARIABLE = 'GEOCMID_WORKER_DEVICE'
THREADS_VARIABLE = 'GEOCMID_WORKER_THREADS'

#: What ``--cluster`` takes besides a scheduler address.
CLUSTER_CHOICES = ('local', 'none')


@dataclass(frozen=True)
class Placement:
    """Where a run's jobs go.

    Attributes:
        client: the Dask client, or None to run in this process.
        device: the device each job runs on (a worker's own, set at its start, wins).
    """

    client: Client | None
    device: str = 'auto'


def default_cluster(inputs: int) -> str:
    """``local`` for more than one input, ``none`` for one."""
    return 'local' if inputs > 1 else 'none'


def check_cluster(value: str) -> str:
    """``--cluster`` checked for its form: ``local``, ``none`` or a scheduler address.

    Raises:
        InputError: anything else.
    """
    if value in CLUSTER_CHOICES or '://' in value:
        return value
    problem = (
        f"expected 'local', 'none' or a scheduler address such as tcp://host:8786, got {value!r}"
    )
    raise InputError('--cluster', problem)


def local_workers(
    devices: Sequence[str] = (), workers: int | None = None, inputs: int | None = None
) -> list[str]:
    """The device of each worker of an embedded cluster.

    Args:
        devices: the devices asked for (``--devices``); several: one worker each.
        workers: ``--workers``: that many CPU workers.
        inputs: the number of inputs, so that no more CPU workers start than there is work.

    Returns:
        ``cuda:<i>`` per GPU or ``cpu`` per CPU worker: the devices given; N CPU workers; one
        worker per visible GPU; else one CPU worker per core (at most one per input).

    Raises:
        InputError: both ``devices`` and ``workers``, or ``workers`` below 1.
    """
    if workers is not None:
        if len(devices) > 1:
            raise InputError('--workers', 'give either --workers or several --devices, not both')
        if workers < 1:
            raise InputError('--workers', f'must be at least 1, got {workers}')
        return ['cpu'] * workers
    if len(devices) > 1:
        return list(devices)
    if len(devices) == 1 and devices[0] not in ('auto', 'cuda'):
        one = resolve_device(devices[0])
        if one.type == 'cpu':
            return ['cpu'] * _cpu_workers(inputs)
        return [str(one)]
    if torch.cuda.is_available():
        return [f'cuda:{index}' for index in range(torch.cuda.device_count())]
    return ['cpu'] * _cpu_workers(inputs)


def _cpu_workers(inputs: int | None) -> int:
    """One CPU worker per core this process may use, at most one per input."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(1, min(cores or 1, inputs or cores or 1))


def start_local_cluster(devices: Sequence[str]) -> Client:
    """An embedded Dask cluster: one single-threaded worker process per device given.

    A GPU worker sees only its GPU (``CUDA_VISIBLE_DEVICES``); a CPU worker runs torch on one
    thread, so that N workers use N cores without oversubscribing them.
    """
    from dask.config import set as config_set
    from distributed import Client, Nanny, Scheduler, SpecCluster

    visible = os.environ.get('CUDA_VISIBLE_DEVICES')
    physical = [item.strip() for item in visible.split(',')] if visible else None
    workers = {}
    for index, device in enumerate(devices):
        resolved = torch.device(device)
        env = {THREADS_VARIABLE: '1', 'OMP_NUM_THREADS': '1'}
        if resolved.type == 'cuda':
            gpu = resolved.index or 0
            env |= {
                'CUDA_VISIBLE_DEVICES': physical[gpu] if physical else str(gpu),
                DEVICE_VARIABLE: 'cuda:0',
            }
        else:
            env |= {DEVICE_VARIABLE: str(resolved)}
        options = {
            'nthreads': 1, 'env': env, 'host': '127.0.0.1', 'dashboard': False,
            'silence_logs': logging.ERROR, 'name': f'{resolved.type}-{index}',
        }  # fmt: skip
        workers[f'{resolved.type}-{index}'] = {'cls': Nanny, 'options': options}
    scheduler = {
        'cls': Scheduler,
        'options': {'host': '127.0.0.1', 'port': 0, 'dashboard': False, 'dashboard_address': ':0'},
    }
    with config_set({'distributed.nanny.pre-spawn-environ': _pre_spawn_environ()}):
        cluster = SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR)
    return Client(cluster, set_as_default=False)


def _pre_spawn_environ() -> dict[str, object]:
    """Dask's environment for new worker processes, less its ``MALLOC_TRIM_THRESHOLD_``.

    Setting that variable turns off glibc's adaptive mmap threshold, so every large tensor is
    allocated and freed by mmap: the U-Net of bench/scale.py then runs 1.9 times slower on a
    worker than in this process (BENCHMARKS.md, "Many scenes on a Dask cluster").
    """
    from dask.config import get as config_get

    environ = dict(config_get('distributed.nanny.pre-spawn-environ', {}))
    environ.pop('MALLOC_TRIM_THRESHOLD_', None)
    return environ


def connect(address: str, timeout: float = CONNECT_TIMEOUT) -> Client:
    """A client of the scheduler at ``address``.

    Raises:
        InputError: no scheduler answers there within ``timeout`` seconds.
    """
    from distributed import Client

    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        problem = f'no Dask scheduler answers at {address} within {timeout:g} s ({reason})'
        raise InputError('--cluster', problem) from None


@contextmanager
def placement(
    cluster: str | Client | None,
    *,
    devices: Sequence[str] = (),
    workers: int | None = None,
    device: str = 'auto',
    inputs: int | None = None,
) -> Iterator[Placement]:
    """Open where a run's jobs go, and close what was started for it.

    Args:
        cluster: a Dask client (kept open), ``local``, ``none`` or a scheduler address; None:
            ``local`` for several ``devices`` or ``workers``, else in this process.
        devices: the devices of an embedded cluster's workers (``--devices``).
        workers: ``--workers``: CPU workers of an embedded cluster.
        device: the device of the jobs in this process or on a scheduler's workers.
        inputs: the number of inputs, which bounds the number of CPU workers started.

    Raises:
        InputError: a bad ``--cluster`` or worker setting, or a scheduler that does not answer.
    """
    if cluster is None:
        cluster = 'local' if len(devices) > 1 or workers is not None else 'none'
    if not isinstance(cluster, str):  # a client of the caller's cluster
        yield Placement(cluster, device)
        return
    cluster = check_cluster(cluster)
    if cluster == 'none':
        if len(devices) > 1 or workers is not None:
            problem = 'runs in this process on one --device; use --cluster local for workers'
            raise InputError('--cluster none', problem)
        yield Placement(None, str(resolve_device(devices[0] if devices else device)))
        return
    if cluster == 'local':
        one = [device] if device != 'auto' and not devices else devices
        client = start_local_cluster(local_workers(one, workers, inputs))
    else:
        if len(devices) > 1 or workers is not None:
            problem = (
                "--devices and --workers start a local cluster; a scheduler's workers are its own"
            )
            raise InputError('--cluster', problem)
        client = connect(cluster)
    try:
        yield Placement(client, device)
    finally:
        close(client)


def close(client: Client) -> None:
    """Close a client and the embedded cluster it started, without logging the shutdown."""
    quiet = logging.getLogger('distributed')
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()
    finally:
        quiet.setLevel(level)
