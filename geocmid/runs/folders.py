"""Run folders: the machinery every training run shares, pretraining and fine-tuning alike.

A run folder holds the resolved settings (``config.yaml``), CSV logs (``logs/``) and what the run
exports; :mod:`geocmid.runs.pretrain` and :mod:`geocmid.runs.segmentation` name the exports of their runs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import lightning
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from pyproj import CRS

from geocmid.errors import InputError
from geocmid.io.atomic import atomic_output
from geocmid.runs.config import to_plain

Precision = Literal['auto', '32', 'bf16-mixed', '16-mixed']


def resolve_precision(precision: Precision, accelerator: str = 'auto') -> str:
    """Lightning's precision for ``precision``: 'auto' is mixed precision where a GPU runs.

    'auto' gives 'bf16-mixed' on GPUs that support bfloat16 (no loss scaling needed),
    '16-mixed' (dynamic loss scaling) on older GPUs, and '32' on the CPU.
    """
    if precision != 'auto':
        return precision
    if accelerator in ('auto', 'gpu', 'cuda') and torch.cuda.is_available():
        return 'bf16-mixed' if torch.cuda.is_bf16_supported() else '16-mixed'
    return '32'


def check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool | None = None) -> None:
    """Fail before any work if ``run_dir`` cannot become a run folder.

    Args:
        run_dir: The run folder.
        overwrite: Whether a non-empty folder may be reused.
        resume: Whether the run continues the folder's previous run; None for runs that
            cannot resume (the error then does not suggest ``--resume``).

    Raises:
        InputError: ``run_dir`` is a file, or a non-empty folder that is neither overwritten
            nor resumed.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(run_dir, 'exists and is not a folder')
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (overwrite or resume):
        flags = '--overwrite' if resume is None else '--resume or --overwrite'
        raise InputError(run_dir, f'run folder exists and is not empty; use {flags}')


def prepare_run_dir(
    run_dir: Path, outputs: Iterable[str], *, overwrite: bool, resume: bool | None = None
) -> None:
    """Create the run folder; unless resuming, remove a previous run's ``outputs`` first.

    Only ``outputs`` are removed, so a mistyped path cannot wipe unrelated files.

    Raises:
        InputError: See :func:`check_run_dir`, or the folder cannot be created.
    """
    check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    if not resume:
        for name in outputs:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(run_dir, f'cannot create run folder ({exc.strerror})') from None


def write_run_config(run_dir: Path, config: Any) -> None:
    """Write the resolved settings (a config dataclass) to ``run_dir/config.yaml`` atomically."""
    with atomic_output(run_dir / 'config.yaml', overwrite=True) as tmp:
        Path(tmp).write_text(yaml.safe_dump(to_plain(config), sort_keys=False))


def build_trainer(
    run_dir: Path,
    *,
    epochs: int | None,
    max_steps: int | None,
    default_epochs: int = 20,
    devices: int = 1,
    accelerator: str = 'auto',
    precision: Precision = 'auto',
    sync_batchnorm: bool = False,
    log_every_n_steps: int = 10,
    validate: bool = True,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> lightning.Trainer:
    """The Lightning trainer of a run, logging CSV into ``run_dir/logs``.

    Args:
        run_dir: The run folder.
        epochs: Epoch limit (``default_epochs`` when neither limit is set).
        max_steps: Step limit.
        default_epochs: Epochs trained when neither limit is set.
        devices: Number of devices; more than one trains with DDP.
        accelerator: Lightning accelerator.
        precision: Lightning precision, or 'auto' (see :func:`resolve_precision`).
        sync_batchnorm: Synchronise BatchNorm statistics across devices.
        log_every_n_steps: Training-loss logging interval.
        validate: Run validation each epoch (False when nothing is held out).
        checkpoint_dir: Where ``last.ckpt`` is saved each epoch, for resuming; None saves none.
        progress: Show a progress bar.
    """
    if epochs is None:
        epochs = -1 if max_steps is not None else default_epochs
    callbacks: list[lightning.Callback] = []
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=0, save_last=True))
    if progress:
        callbacks.append(TQDMProgressBar())
    return lightning.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy='ddp' if devices > 1 else 'auto',
        # The training samplers shard patches by rank themselves (TorchGeo #305).
        use_distributed_sampler=False,
        sync_batchnorm=sync_batchnorm,
        precision=resolve_precision(precision, accelerator),
        max_epochs=epochs,
        max_steps=max_steps if max_steps is not None else -1,
        logger=CSVLogger(run_dir, name='logs'),
        callbacks=callbacks,
        enable_checkpointing=checkpoint_dir is not None,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=log_every_n_steps,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
        plugins=[AtomicCheckpointIO()],
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes beside the target and renames into place.

    An interrupted save never leaves a truncated checkpoint (one ``--resume`` would fail on)
    at the final path.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        """Save ``checkpoint`` to ``path`` atomically."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, overwrite=True) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def metres_per_pixel(crs: CRS, res: float) -> float | None:
    """The ground resolution when the CRS is in metres; None for degrees or other units."""
    unit = crs.axis_info[0].unit_name if crs.axis_info else None
    return float(res) if unit in ('metre', 'meter') else None
