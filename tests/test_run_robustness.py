"""Crash-safe, preemptible and multi-node training runs (pretraining through the CLI)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from geocmid.datamodules.pretrain import PretrainDataModule
from geocmid.errors import InputError
from geocmid.runs.folders import checkpoint_interval
from geocmid.runs.pretrain import load_pretrain_config, run_pretraining
from geocmid_cli.main import cli

REPO = Path(__file__).resolve().parents[1]
NAIP = REPO / 'sample_data' / 'naip'
TINY_CONFIG = REPO / 'configs' / 'cmid_tiny_test.yaml'
BIN = Path(sys.executable).parent
#: Six steps of one batch each: every step ends an epoch, so every checkpoint is at an epoch
#: boundary, where the patch sampler restarts exactly (see docs/cluster.md).
RUN_ARGS = ('--max-steps', '6', '--samples-per-epoch', '4', '--checkpoint-every', '2')
#: Six steps in one epoch of six batches: every checkpoint but the last is taken mid-epoch.
MID_EPOCH_ARGS = ('--max-steps', '6', '--samples-per-epoch', '24', '--checkpoint-every', '2')
TIMEOUT = 120


@pytest.fixture(scope='module')
def rasters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The NAIP sample, copied (statistics sidecars are written beside the data)."""
    if not NAIP.is_dir():
        pytest.skip('sample_data/naip is missing')
    target = tmp_path_factory.mktemp('data') / 'naip'
    shutil.copytree(NAIP, target)
    return target


def command(rasters: Path, run_dir: Path, *extra: str) -> list[str]:
    """The `geocmid pretrain` command line of a tiny CPU run."""
    return [
        str(BIN / 'geocmid'), 'pretrain', '--config', str(TINY_CONFIG), '--rasters', str(rasters),
        '-o', str(run_dir), '--quiet', '--accelerator', 'cpu', '--backbone', 'resnet10t', *extra,
    ]  # fmt: skip


def environment() -> dict[str, str]:
    return os.environ | {'OMP_NUM_THREADS': '1'}


def losses(run_dir: Path, version: int) -> dict[int, float]:
    """Step -> train_loss logged by one invocation of the run (one CSV version)."""
    with (run_dir / 'logs' / f'version_{version}' / 'metrics.csv').open() as file:
        return {int(row['step']): float(row['train_loss']) for row in csv.DictReader(file)}


def checkpoint_step(run_dir: Path) -> int:
    checkpoint = torch.load(run_dir / 'checkpoints' / 'last.ckpt', weights_only=True)
    return int(checkpoint['global_step'])


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert process.poll() is None, 'the run ended before it could be interrupted'
        assert time.monotonic() < deadline, 'the run did not get going'
        time.sleep(0.05)


def uninterrupted(rasters: Path, run_dir: Path, args: tuple[str, ...]) -> dict[int, float]:
    """Per-step losses of an uninterrupted six-step run."""
    subprocess.run(command(rasters, run_dir, *args), check=True, env=environment(), timeout=TIMEOUT)
    assert checkpoint_step(run_dir) == 6
    result = losses(run_dir, 0)
    assert sorted(result) == list(range(6))
    return result


@pytest.fixture(scope='module')
def reference(rasters: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Per-step losses of the uninterrupted run."""
    return uninterrupted(rasters, tmp_path_factory.mktemp('reference') / 'run', RUN_ARGS)


def resume_and_compare(
    rasters: Path,
    run_dir: Path,
    reference: dict[int, float],
    saved_step: int,
    args: tuple[str, ...] = RUN_ARGS,
) -> None:
    """Resume to the final step: the losses continue those of the uninterrupted run."""
    killed = losses(run_dir, 0)
    assert killed == pytest.approx({step: reference[step] for step in killed}, rel=1e-6)
    subprocess.run(
        command(rasters, run_dir, *args, '--resume'),
        check=True,
        env=environment(),
        timeout=TIMEOUT,
    )
    assert checkpoint_step(run_dir) == 6
    resumed = losses(run_dir, 1)
    assert sorted(resumed) == list(range(saved_step, 6))
    assert resumed == pytest.approx({step: reference[step] for step in resumed}, rel=1e-6)
    assert (run_dir / 'encoder.pt').is_file()


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_losses(
    rasters: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    run_dir = tmp_path / 'run'
    last = run_dir / 'checkpoints' / 'last.ckpt'
    process = subprocess.Popen(
        command(rasters, run_dir, *RUN_ARGS), env=environment(), stderr=subprocess.DEVNULL
    )
    try:
        wait_for(last.is_file, process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(TIMEOUT)
    assert process.returncode == -signal.SIGKILL
    saved = checkpoint_step(run_dir)  # complete despite the kill: written atomically
    assert 2 <= saved < 6
    assert not (run_dir / 'encoder.pt').exists()
    resume_and_compare(rasters, run_dir, reference, saved)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_continues_the_patches(rasters: Path, tmp_path: Path) -> None:
    """A checkpoint taken mid-epoch resumes the epoch's patch sequence where it stood."""
    expected = uninterrupted(rasters, tmp_path / 'reference', MID_EPOCH_ARGS)
    run_dir = tmp_path / 'run'
    last = run_dir / 'checkpoints' / 'last.ckpt'
    process = subprocess.Popen(
        command(rasters, run_dir, *MID_EPOCH_ARGS), env=environment(), stderr=subprocess.DEVNULL
    )
    try:
        wait_for(last.is_file, process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(TIMEOUT)
    saved = checkpoint_step(run_dir)
    assert saved in (2, 4)  # every 2 steps, inside the one six-batch epoch
    resume_and_compare(rasters, run_dir, expected, saved, MID_EPOCH_ARGS)


@pytest.mark.slow
def test_sigterm_saves_at_a_step_boundary_and_resumes(
    rasters: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    run_dir = tmp_path / 'run'
    args = (*RUN_ARGS[:-1], '100')  # only the SIGTERM (and the end) write last.ckpt
    process = subprocess.Popen(
        command(rasters, run_dir, *args), env=environment(), stdout=subprocess.PIPE, text=True
    )
    try:
        # Lightning handles SIGTERM from just before training starts, when the run prints its
        # learning-rate rule (hparams.yaml is written a moment before the handler is set).
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith('learning rate:'):
                break
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=TIMEOUT)
    finally:
        process.wait(TIMEOUT)
    assert process.returncode == 128 + signal.SIGTERM
    saved = checkpoint_step(run_dir)
    assert 1 <= saved < 6
    assert not (run_dir / 'encoder.pt').exists()
    resume_and_compare(rasters, run_dir, reference, saved)


def test_export_encoder_from_a_checkpoint(rasters: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / 'run'
    run = CliRunner().invoke(
        cli, command(rasters, run_dir, '--max-steps', '1')[1:], catch_exceptions=False
    )
    assert run.exit_code == 0, run.output
    encoder, card = run_dir / 'encoder.pt', run_dir / 'model_card.json'
    trained = torch.load(encoder, weights_only=True)
    card_text = card.read_text()
    encoder.unlink()
    card.unlink()

    result = CliRunner().invoke(cli, ['export-encoder', str(run_dir)])
    assert result.exit_code == 0, result.output
    exported = torch.load(encoder, weights_only=True)
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[key], trained[key]) for key in trained)
    assert json.loads(card.read_text()) == json.loads(card_text)

    again = CliRunner().invoke(cli, ['export-encoder', str(run_dir)])
    assert again.exit_code != 0 and isinstance(again.exception, InputError)
    assert 'encoder.pt' in str(again.exception) and '--overwrite' in str(again.exception)


def test_export_encoder_without_checkpoint(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ['export-encoder', str(tmp_path)])
    assert isinstance(result.exception, InputError)
    assert 'last.ckpt' in str(result.exception)


@pytest.mark.parametrize(
    ('key', 'option'),
    [('max_steps', '--max-steps'), ('epochs', '--epochs'), ('num_nodes', '--num-nodes')],
)
def test_zero_limits_are_refused(rasters: Path, tmp_path: Path, key: str, option: str) -> None:
    config = load_pretrain_config(TINY_CONFIG, rasters=rasters, output=tmp_path / 'run', **{key: 0})
    with pytest.raises(InputError, match=option):
        run_pretraining(config, progress=False)
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
    ('value', 'expected'),
    [
        ('500', 500),
        (7, 7),
        ('10min', timedelta(minutes=10)),
        ('90s', timedelta(seconds=90)),
        ('1h30min', timedelta(minutes=90)),
        (None, None),
    ],
)
def test_checkpoint_interval(value: str | int | None, expected: object) -> None:
    assert checkpoint_interval(value) == expected


@pytest.mark.parametrize('value', ['0', '-5', '0min', 'soon', '10parsecs', '10 min later'])
def test_checkpoint_interval_refuses(value: str) -> None:
    with pytest.raises(InputError, match='--checkpoint-every'):
        checkpoint_interval(value)


def test_card_crs_is_the_target_crs(make_geotiff: Callable[..., Path], tmp_path: Path) -> None:
    """The first file is in EPSG:32632, the other two (the majority, the target) in 32631."""
    rng = np.random.default_rng(0)
    for name, crs in (('a.tif', 'EPSG:32632'), ('b.tif', 'EPSG:32631'), ('c.tif', 'EPSG:32631')):
        make_geotiff(f'rasters/{name}', rng.integers(1, 255, (3, 96, 96), np.uint8), crs=crs)
    data = PretrainDataModule(rasters=tmp_path / 'rasters', patch_size=32, batch_size=2)
    assert data.summary()['crs'] == 'EPSG:32631'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_on_localhost(rasters: Path, tmp_path: Path) -> None:
    """Two torchrun 'nodes' on localhost (gloo on the CPU) write one complete run folder."""
    run_dir = tmp_path / 'run'
    port = free_port()
    args = ('--max-steps', '2', '--num-nodes', '2', '--devices', '1')
    nodes = [
        subprocess.Popen(
            [
                str(BIN / 'torchrun'),
                '--nnodes',
                '2',
                '--nproc-per-node',
                '1',
                '--node-rank',
                str(rank),
                '--master-addr',
                '127.0.0.1',
                '--master-port',
                str(port),
                *command(rasters, run_dir, *args),
            ],
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=TIMEOUT)[0].decode())
    finally:
        for node in nodes:
            node.kill() if node.poll() is None else None
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert 'x 1 device(s) x 2 node(s)' in outputs[0]  # the learning-rate rule
    assert checkpoint_step(run_dir) == 2
    assert (run_dir / 'encoder.pt').is_file() and (run_dir / 'config.yaml').is_file()
    card = json.loads((run_dir / 'model_card.json').read_text())
    assert card['config']['num_nodes'] == 2
    assert sorted(losses(run_dir, 0)) == [0, 1]
    assert [path.name for path in (run_dir / 'logs').iterdir()] == ['version_0']


@pytest.fixture
def scene(make_geotiff: Callable[..., Path], tmp_path: Path) -> tuple[Path, Path]:
    """A 2-band 128 px scene with two kinds of bright squares, and their polygons."""
    import geopandas as gpd
    import shapely

    rng = np.random.default_rng(0)
    image = rng.integers(50, 60, size=(2, 128, 128)).astype(np.uint16)
    polygons, kinds = [], []
    x0, y0 = 500000.0, 4000000.0  # conftest's rasters: 1 m pixels from here
    for k, (row, col) in enumerate([(8, 8), (8, 80), (70, 20), (72, 90)]):
        image[:, row : row + 24, col : col + 24] += 200 if k % 2 else 100
        polygons.append(shapely.box(x0 + col, y0 - row - 24, x0 + col + 24, y0 - row))
        kinds.append('pool' if k % 2 else 'roof')
    labels = tmp_path / 'labels.gpkg'
    gpd.GeoDataFrame({'kind': kinds}, geometry=polygons, crs='EPSG:32631').to_file(labels)
    return make_geotiff('scene.tif', image), labels


def fine_tune(scene: tuple[Path, Path], output: Path, *extra: str) -> int:
    from geocmid_cli.main import main

    config = output.parent / 'finetune.yaml'
    config.write_text('patch_size: 32\nblock_size: 64\n')
    argv = [
        'train', 'segment', '--rasters', str(scene[0]), '--labels', str(scene[1]),
        '-o', str(output), '--label-field', 'kind', '--batch-size', '2', '--backbone',
        'resnet18', '--accelerator', 'cpu', '--quiet', '--config', str(config), *extra,
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code)


def test_fine_tuning_keeps_a_last_checkpoint(scene: tuple[Path, Path], tmp_path: Path) -> None:
    output = tmp_path / 'run'
    assert fine_tune(scene, output, '--max-steps', '3', '--checkpoint-every', '2') == 0
    assert checkpoint_step(output) == 3  # every 2 steps, and at the end
    assert (output / 'model.ckpt').is_file()


@pytest.mark.parametrize(
    ('option', 'value'), [('--num-nodes', '0'), ('--checkpoint-every', '0min')]
)
def test_fine_tuning_bad_cluster_options(
    scene: tuple[Path, Path],
    tmp_path: Path,
    option: str,
    value: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / 'run'
    assert fine_tune(scene, output, '--max-steps', '1', option, value) == 2
    assert option in capsys.readouterr().err
    assert not output.exists()


def test_fine_tuning_resumes_to_a_later_step(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """A run that stopped at step 3 continues from its checkpoint to step 6."""
    output = tmp_path / 'run'
    assert fine_tune(scene, output, '--max-steps', '3', '--seed', '1') == 0
    assert fine_tune(scene, output, '--max-steps', '6', '--seed', '1', '--resume') == 0
    assert checkpoint_step(output) == 6
    logged = [
        sorted({int(row['step']) for row in csv.DictReader(path.open())})
        for path in sorted((output / 'logs').glob('version_*/metrics.csv'))
    ]
    assert logged[0][-1] == 3 and logged[1][0] > 3  # the second run goes on from step 3
    assert (output / 'model.ckpt').is_file()


@pytest.mark.parametrize(
    'argv',
    [
        ['train', 'segment', '--rasters', 'r.tif', '--labels', 'l.gpkg'],
        ['train', 'change', '--pairs', 'pairs.csv'],
        ['train', 'classify', '--images', 'chips'],
    ],
    ids=['segment', 'change', 'classify'],
)
def test_train_resume_without_checkpoint(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from geocmid_cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, '-o', str(tmp_path / 'run'), '--resume', '--quiet'])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and 'last.ckpt' in error[0] and 'no checkpoint' in error[0]


def test_epoch_end_checkpoints_are_at_most_one_a_minute(monkeypatch, tmp_path) -> None:
    """Short epochs must not spend their time writing (large) checkpoints."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from geocmid.runs import folders

    saves: list[float] = []
    monkeypatch.setattr(
        ModelCheckpoint, 'on_train_epoch_end', lambda self, trainer, module: saves.append(now[0])
    )
    now = [1000.0]
    monkeypatch.setattr(folders.time, 'monotonic', lambda: now[0])
    callback = folders.EpochCheckpoint(dirpath=tmp_path, every_n_epochs=1)
    for seconds in (0.0, 5.0, 30.0, 61.0, 62.0, 125.0):
        now[0] = 1000.0 + seconds
        callback.on_train_epoch_end(None, None)  # type: ignore[arg-type]
    assert saves == [1000.0, 1061.0, 1125.0]
