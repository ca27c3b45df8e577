"""Run folders: the machinery every training run shares, pretraining and fine-tuning alike.

A run folder holds the resolved settings (``config.yaml``), CSV logs (``logs/``) and what the run
exports; :mod:`geocmid.runs.pretrain` and :mod:`geocmid.runs.finetune` write the exports of their
runs, and :mod:`geocmid.runs.artefacts` names them.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning
import numpy as np
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from geocmid.errors import InputError
from geocmid.io.atomic import atomic_output
from geocmid.models.weights import load_tensors
from geocmid.runs.config import to_plain
from geocmid.runs.progress import progress_callback

Precision = Literal['auto', '32', 'bf16-mixed', '16-mixed']

#: The checkpoint file a run resumes from, inside its checkpoint folder.
LAST_CHECKPOINT = 'last.ckpt'

#: Default cadence of ``last.ckpt``: this much training time, or each epoch, whichever comes first.
#: Epoch-end checkpoints closer together than this are skipped (see :class:`EpochCheckpoint`).
MIN_EPOCH_CHECKPOINT_SECONDS = 60.0

DEFAULT_CHECKPOINT_TIME = timedelta(minutes=10)

_DURATION = re.compile(r'(\d+)\s*(sec|min|s|m|h)')
_SECONDS = {'s': 1, 'sec': 1, 'm': 60, 'min': 60, 'h': 3600}


def checkpoint_interval(
    value: str | int | None, source: str = '--checkpoint-every'
) -> int | timedelta | None:
    """Parse a checkpoint cadence: a number of steps (``500``) or a duration (``10min``).

    Durations take ``s``, ``min`` (or ``m``) and ``h``, e.g. ``90s``, ``1h30min``.

    Args:
        value: The cadence; None for the default (:data:`DEFAULT_CHECKPOINT_TIME` or each epoch).
        source: The option or config key named in errors.

    Returns:
        Steps as an int, a duration as a timedelta, or None.

    Raises:
        InputError: For anything else, zero or negative.
    """
    if value is None:
        return None
    text = str(value).strip().lower()
    if text.isdigit() and int(text) > 0:
        return int(text)
    parts = _DURATION.findall(text)
    seconds = sum(int(number) * _SECONDS[unit] for number, unit in parts)
    if not parts or _DURATION.sub('', text).strip() or seconds <= 0:
        raise InputError(
            source,
            f"expected a positive number of steps ('500') or a duration ('10min'), got {value!r}",
        )
    return timedelta(seconds=seconds)


def check_positive(value: int | None, source: str) -> None:
    """Fail unless ``value`` is unset or at least 1 (no silent fallback to a default).

    Raises:
        InputError: Naming ``source`` when ``value`` is below 1.
    """
    if value is not None and value < 1:
        raise InputError(source, f'must be at least 1, got {value}')


def resolve_precision(
    precision: Precision, accelerator: str = 'auto'
) -> Literal['32', 'bf16-mixed', '16-mixed']:
    """Lightning's precision for ``precision``: 'auto' is mixed precision where a GPU runs.

    'auto' gives 'bf16-mixed' on GPUs that support bfloat16 (no loss scaling needed),
    '16-mixed' (dynamic loss scaling) on older GPUs, and '32' on the CPU.
    """
    if precision != 'auto':
        return precision
    if accelerator in ('auto', 'gpu', 'cuda') and torch.cuda.is_available():
        return 'bf16-mixed' if torch.cuda.is_bf16_supported() else '16-mixed'
    return '32'


def resume_checkpoint(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a run resumes from, checked before any work; None when not resuming.

    The file is read once here with ``torch.load(weights_only=True)`` (:func:`load_tensors`), so
    a garbage or malicious ``last.ckpt`` is refused as bad input naming the file, before
    Lightning reads it again.

    Raises:
        InputError: ``resume`` and ``run_dir/checkpoints/last.ckpt`` is missing, unreadable,
            pickles anything but tensors and containers, or is not a training checkpoint.
    """
    if not resume:
        return None
    checkpoint = run_dir / 'checkpoints' / LAST_CHECKPOINT
    if not checkpoint.is_file():
        raise InputError(checkpoint, 'no checkpoint to resume from')
    contents = load_tensors(checkpoint, 'a training checkpoint')
    missing = [key for key in ('state_dict', 'global_step', 'loops') if key not in contents]
    if missing:
        raise InputError(checkpoint, f'not a training checkpoint (no {", ".join(missing)})')
    return checkpoint


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
    num_nodes: int = 1,
    checkpoint_every: str | int | None = None,
    extra_callbacks: Iterable[lightning.Callback] = (),
) -> lightning.Trainer:
    """The Lightning trainer of a run, logging CSV into ``run_dir/logs``.

    Args:
        run_dir: The run folder.
        epochs: Epoch limit (``default_epochs`` when neither limit is set).
        max_steps: Step limit.
        default_epochs: Epochs trained when neither limit is set.
        devices: Number of devices per node; more than one device in all trains with DDP.
        accelerator: Lightning accelerator.
        precision: Lightning precision, or 'auto' (see :func:`resolve_precision`).
        sync_batchnorm: Synchronise BatchNorm statistics across devices.
        log_every_n_steps: Training-loss logging interval.
        validate: Run validation each epoch (False when nothing is held out).
        checkpoint_dir: Where ``last.ckpt`` is saved for resuming (see ``checkpoint_every``;
            also at the end and on SIGTERM); None saves none.
        progress: Show a progress bar.
        num_nodes: Number of machines; Lightning finds the others through its cluster
            environments (SLURM, torchrun/TorchElastic).
        checkpoint_every: Cadence of ``last.ckpt`` (see :func:`checkpoint_interval`).
        extra_callbacks: The run's own callbacks, added to the shared ones.
    """
    if epochs is None:
        epochs = -1 if max_steps is not None else default_epochs
    check_positive(num_nodes, '--num-nodes')
    callbacks: list[lightning.Callback] = [LearningRateReport()]
    if checkpoint_dir is not None:
        callbacks += checkpoint_callbacks(checkpoint_dir, checkpoint_interval(checkpoint_every))
    if progress:
        callbacks.append(progress_callback())
    callbacks += extra_callbacks
    return lightning.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy='ddp' if devices * num_nodes > 1 else 'auto',
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


@rank_zero_only
def announce(message: str) -> None:
    """Print a line the user should see whatever the log level (once, on the first rank)."""
    print(message, flush=True)


def fit(trainer: lightning.Trainer, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit``, ending a SIGTERM-stopped run with exit status 143 (128 + SIGTERM).

    The checkpoint is saved by then (:class:`PreemptionCheckpoint`); a job scheduler sees the
    job as terminated, not finished, and nothing is exported from the unfinished run.
    """
    try:
        trainer.fit(*args, **kwargs)
    except SIGTERMException:
        announce(f'stopped by SIGTERM at step {trainer.global_step}; --resume continues')
        raise SIGTERMException(128 + signal.SIGTERM) from None


def checkpoint_callbacks(
    checkpoint_dir: Path, every: int | timedelta | None
) -> list[lightning.Callback]:
    """Callbacks keeping ``checkpoint_dir/last.ckpt`` current, so a crash loses little.

    ``last.ckpt`` is replaced (atomically, see :class:`AtomicCheckpointIO`) every ``every``
    steps or that much training time; by default every :data:`DEFAULT_CHECKPOINT_TIME` or each
    epoch, whichever comes first. It is also written when training ends and at the step
    boundary after a SIGTERM (:class:`PreemptionCheckpoint`). The random streams travel with it
    (:class:`RandomStates`).
    """

    def last(**trigger: Any) -> ModelCheckpoint:
        # Lightning's `save_last` writes only when training ends if nothing else is kept, so the
        # one kept checkpoint is named `last` instead and replaced in place.
        return ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename=Path(LAST_CHECKPOINT).stem,
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
            **trigger,
        )

    if every is None:
        each_epoch = EpochCheckpoint(
            dirpath=checkpoint_dir, filename=Path(LAST_CHECKPOINT).stem, monitor=None,
            save_top_k=1, enable_version_counter=False, every_n_epochs=1,
        )  # fmt: skip
        triggers = [last(train_time_interval=DEFAULT_CHECKPOINT_TIME), each_epoch]
    elif isinstance(every, timedelta):
        triggers = [last(train_time_interval=every)]
    else:
        triggers = [last(every_n_train_steps=every)]
    return [*triggers, PreemptionCheckpoint(checkpoint_dir / LAST_CHECKPOINT), RandomStates()]


class EpochCheckpoint(ModelCheckpoint):
    """``last.ckpt`` at the end of each epoch, but not within a minute of the previous one.

    Short epochs (a few steps on a small dataset) would otherwise spend their time writing
    checkpoints: a CMID checkpoint with its key queue and Adan state is hundreds of megabytes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_save = -math.inf

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: Any) -> None:
        """Save unless a save happened less than :data:`MIN_EPOCH_CHECKPOINT_SECONDS` ago."""
        now = time.monotonic()
        if now - self._last_save < MIN_EPOCH_CHECKPOINT_SECONDS:
            return
        self._last_save = now
        super().on_train_epoch_end(trainer, pl_module)


class PreemptionCheckpoint(Checkpoint):
    """Saves ``last.ckpt`` when training stops on SIGTERM, and when it ends.

    Lightning turns a SIGTERM (what SLURM sends before killing a job) into a
    :class:`SIGTERMException` at the next step boundary on every rank; the checkpoint written
    then resumes at the step after it.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def on_exception(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        exception: BaseException,
    ) -> None:
        """Save on SIGTERM only: other exceptions may leave a step half done."""
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            rank_zero_info(f'SIGTERM: saved {self.path} at step {trainer.global_step}')

    def on_train_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """Save the final state, whatever the cadence, so the run can be exported or extended."""
        trainer.save_checkpoint(self.path)


class RandomStates(lightning.Callback):
    """Carries every rank's random generators (torch, CUDA, NumPy, Python) in checkpoints.

    Lightning restores model, optimiser, scheduler and loop state but not the random streams;
    without them a resumed run draws different augmentations than an uninterrupted one.
    """

    def __init__(self) -> None:
        self._loaded: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Every rank's generator states (gathered to the rank that writes the checkpoint)."""
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        # NumPy's uint32 key as an int64 tensor, which loads with weights_only=True and
        # pickles across ranks (torch's uint32 storages do not).
        kind, key, *rest = states['numpy']
        states['numpy'] = [kind, torch.from_numpy(key.astype(np.int64)), *rest]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            return {'ranks': gathered}
        return {'ranks': [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the states; they are applied when training starts, after all other set-up."""
        self._loaded = state_dict.get('ranks')

    def on_train_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """Apply this rank's saved states (only when the world size is unchanged)."""
        if self._loaded and len(self._loaded) == trainer.world_size:
            states = dict(self._loaded[trainer.global_rank])
            kind, key, *rest = states['numpy']
            states['numpy'] = (kind, key.numpy().astype(np.uint32), *rest)
            _set_rng_states(states)
        self._loaded = None


class LearningRateReport(lightning.Callback):
    """Prints the learning-rate rule a run applies, once, when training starts.

    Multi-node users see the peak learning rate, the total batch it was scaled to (per-device
    batch x devices x nodes x accumulation) and the scaling rule (``lr_scaling`` of the task).
    """

    def on_train_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """Log the rule on the first rank."""
        if not trainer.optimizers:
            return
        group = trainer.optimizers[0].param_groups[0]
        peak = group.get('initial_lr', group['lr'])
        loader = trainer.train_dataloader
        if isinstance(loader, dict):
            loader = next(iter(loader.values()))
        per_device = getattr(loader, 'batch_size', None)
        devices = trainer.num_devices
        nodes = trainer.num_nodes
        accumulate = trainer.accumulate_grad_batches
        hparams = pl_module.hparams
        rule = hparams.get('lr_scaling', 'none')
        base = hparams.get('lr')
        total = per_device * devices * nodes * accumulate if per_device else None
        reference = getattr(pl_module, 'reference_batch', 256)
        scaled = (
            f'lr {base:g} at a batch of {reference}, {rule} scaling'
            if rule != 'none'
            else 'unscaled'
        )
        announce(
            f'learning rate: peak {peak:.4g} ({scaled}) for a total batch of {total} = '
            f'{per_device} per device x {devices} device(s) x {nodes} node(s) x '
            f'{accumulate} accumulation'
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
