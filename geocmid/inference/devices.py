"""Where models run: device names checked up front, GPU lists for workers, mixed precision."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geocmid.errors import InputError


def resolve_device(device: torch.device | str = 'auto', option: str = '--device') -> torch.device:
    """``'auto'``: the first CUDA device when there is one, else the CPU; others as given.

    A CUDA device is checked here, before any model is loaded or any output written, so that a
    typo or a missing GPU is a bad input rather than a crash in the middle of a run.

    Args:
        device: ``'auto'``, ``'cpu'``, ``'cuda'``, ``'cuda:1'``... or a torch device.
        option: the option that named the device, for messages.

    Raises:
        InputError: an unknown device name, or a CUDA device this machine does not have.
    """
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(option, f"unknown device {device!r}; try 'cpu' or 'cuda'") from None
    if resolved.type == 'cuda':
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            raise InputError(option, f"{device!r}: no CUDA device is visible; use 'cpu'")
        if resolved.index is not None and resolved.index >= visible:
            raise InputError(option, f'{device!r}: only {visible} CUDA device(s) are visible')
    return resolved


def cuda_devices(count: int) -> list[torch.device]:
    """The first ``count`` CUDA devices, each to be given its own worker process.

    Raises:
        InputError: fewer CUDA devices are visible (in particular on CPU-only machines).
    """
    if count < 1:
        raise InputError('--devices', f'must be at least 1, got {count}')
    visible = torch.cuda.device_count()
    if count > visible:
        raise InputError(
            '--devices', f'{count} GPUs requested but {visible} CUDA device(s) are visible'
        )
    return [torch.device('cuda', index) for index in range(count)]


def parse_devices(value: str) -> int | list[str]:
    """``--devices`` as given on the command line: a number of GPUs, or a comma-separated list."""
    if value.strip().isdigit():
        return int(value)
    return [item.strip() for item in value.split(',') if item.strip()]


def worker_devices(
    devices: int | str | Sequence[str | torch.device], device: torch.device | str = 'auto'
) -> list[str]:
    """One device per worker: N GPUs for an integer above 1, the list given, else ``device``.

    Args:
        devices: a number of GPUs (``cuda:0`` ... ``cuda:N-1``) or the devices themselves
            (``['cuda:1', 'cuda:3']``; ``['cpu', 'cpu']`` for two CPU workers); 1: ``device``.
        device: the device of a single-device run.

    Raises:
        InputError: no device, an unknown or missing device, too few GPUs, or several
            ``devices`` together with a ``device``.
    """
    if isinstance(devices, str | torch.device):  # one name, not a sequence of letters
        devices = [devices]
    if isinstance(devices, int):
        if devices == 1:
            return [str(resolve_device(device))]
        workers = [str(d) for d in cuda_devices(devices)]
    else:
        workers = [str(resolve_device(d, '--devices')) for d in devices]
        if not workers:
            raise InputError('--devices', 'no device given')
    if device != 'auto':
        raise InputError('--device', 'give either one --device or several --devices, not both')
    return workers


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed precision models run in on ``device``, as in training; None for float32.

    CUDA runs in bfloat16 where the GPU supports it (no overflow risk), else in float16; other
    devices run in float32, since CPU autocast is slower than float32 for most models.
    """
    if device.type != 'cuda':
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
