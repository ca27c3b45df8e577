"""Tests for `geocmid pretrain`: outputs, resume, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner, Result

from geocmid.errors import InputError
from geocmid_cli.pretrain import pretrain

REPO = Path(__file__).resolve().parents[1]
NAIP = REPO / 'sample_data' / 'naip'
TINY_CONFIG = REPO / 'configs' / 'cmid_tiny_test.yaml'


@pytest.fixture
def rasters(tmp_path: Path, make_geotiff: Callable[..., Path]) -> Path:
    """The NAIP sample, else generated 4-band rasters.

    The sample is copied: the statistics sidecar is written beside the data.
    """
    target = tmp_path / 'naip'
    if NAIP.is_dir():
        shutil.copytree(NAIP, target)
    else:
        rng = np.random.default_rng(0)
        for year in (2012, 2016):
            make_geotiff(f'naip/naip_{year}.tif', rng.integers(1, 255, (4, 128, 128), np.uint8))
    return target


def invoke(*args: str | Path) -> Result:
    """Run the command in-process; exceptions (InputError included) stay in the result."""
    return CliRunner().invoke(pretrain, [str(arg) for arg in args], catch_exceptions=True)


def tiny_run(rasters: Path, run_dir: Path, *extra: str | Path) -> Result:
    return invoke('--config', TINY_CONFIG, '--rasters', rasters, '-o', run_dir, '--quiet', *extra)


def test_run_writes_checkpoint_encoder_and_card(rasters: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / 'run'
    result = tiny_run(rasters, run_dir, '--max-steps', '2', '--backbone', 'resnet18')
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert 'step 2:' in result.output

    checkpoint = torch.load(run_dir / 'checkpoints' / 'last.ckpt', weights_only=False)
    assert checkpoint['global_step'] == 2
    assert checkpoint['hyper_parameters']['band_names'] == ['red', 'green', 'blue', 'nir']

    model = timm.create_model('resnet18', in_chans=4, num_classes=0)
    model.load_state_dict(torch.load(run_dir / 'encoder.pt', weights_only=True), strict=True)

    card = json.loads((run_dir / 'model_card.json').read_text())
    assert card['method'] == 'cmid'
    assert card['backbone'] == 'resnet18'
    assert card['in_chans'] == 4
    assert card['bands'] == ['red', 'green', 'blue', 'nir']
    assert card['band_indices'] == [1, 2, 3, 4]
    assert card['patch_size'] == 64
    assert card['resolution'] == pytest.approx(5.0)  # NAIP sample: 5 m, EPSG:26914
    assert card['data']['crs'] == 'EPSG:26914' and card['data']['files'] == 3
    assert len(card['mean']) == len(card['std']) == 4 and min(card['std']) > 0
    assert card['config']['max_steps'] == 2 and card['config']['task']['queue_size'] == 64
    assert card['geocmid_version']

    metrics = (run_dir / 'logs' / 'version_0' / 'metrics.csv').read_text().splitlines()
    header = metrics[0].split(',')
    for key in ('train_loss', 'loss_mim', 'loss_global', 'loss_local', 'lr', 'momentum'):
        assert key in header
    assert len(metrics) == 3  # header + one row per step (log_every_n_steps 1)


def test_resume_continues_at_the_same_step(rasters: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / 'run'
    assert tiny_run(rasters, run_dir, '--max-steps', '2').exit_code == 0
    before = torch.load(run_dir / 'checkpoints' / 'last.ckpt', weights_only=False)
    # The run's own config.yaml repeats its settings; the command line raises the step limit.
    result = invoke('--config', run_dir / 'config.yaml', '--max-steps', '3', '--resume', '--quiet')
    assert result.exit_code == 0, result.output + repr(result.exception)
    after = torch.load(run_dir / 'checkpoints' / 'last.ckpt', weights_only=False)
    assert (before['global_step'], after['global_step']) == (2, 3)
    # The queue went on from the saved one: one more step of 2 x 4 keys.
    pointers = [int(checkpoint['state_dict']['queue.ptr']) for checkpoint in (before, after)]
    assert pointers[1] == (pointers[0] + 8) % 16
    assert (run_dir / 'logs' / 'version_1' / 'metrics.csv').is_file()  # earlier logs kept


def test_overwrite_replaces_a_run(rasters: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'old.txt').write_text('x')
    result = tiny_run(rasters, run_dir, '--max-steps', '1')
    assert isinstance(result.exception, InputError)
    assert 'not empty; use --resume or --overwrite' in str(result.exception)
    assert tiny_run(rasters, run_dir, '--max-steps', '1', '--overwrite').exit_code == 0
    assert (run_dir / 'encoder.pt').is_file() and (run_dir / 'old.txt').is_file()


@pytest.mark.parametrize(
    ('make_args', 'names', 'problem'),
    [
        (lambda r, t: ['--rasters', t / 'empty'], 'empty', 'no rasters found'),
        (lambda r, t: ['--rasters', r, '--bands', '1,7'], 'naip', 'band'),
        (lambda r, t: ['--rasters', r, '--patch-size', '1024'], 'naip', 'larger than every raster'),
        (
            lambda r, t: ['--rasters', r, '--backbone', 'swin_base_patch4_window7_224'],
            '--patch-size',
            'window',
        ),
        (lambda r, t: ['--rasters', r, '--resume'], 'last.ckpt', 'no checkpoint to resume from'),
        (lambda r, t: ['--rasters', r, '--images', r], '--rasters/--images', 'exactly one'),
        (lambda r, t: ['--images', t / 'empty'], 'empty', 'no images'),
        (lambda r, t: ['--rasters', t / 'corrupt'], 'bad.tif', ''),
    ],
)
def test_bad_input(
    rasters: Path,
    tmp_path: Path,
    make_args: Callable[[Path, Path], list[str | Path]],
    names: str,
    problem: str,
) -> None:
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'corrupt').mkdir()
    (tmp_path / 'corrupt' / 'bad.tif').write_text('not a raster')
    result = invoke('--config', TINY_CONFIG, '-o', tmp_path / 'run', *make_args(rasters, tmp_path))
    assert isinstance(result.exception, InputError), repr(result.exception)
    assert names in str(result.exception) and problem in str(result.exception)
    assert not (tmp_path / 'run' / 'checkpoints').exists()  # failed before training


def test_unknown_config_key(rasters: Path, tmp_path: Path) -> None:
    config = tmp_path / 'bad.yaml'
    config.write_text('backbone: resnet18\nlearning_rate: 0.1\n')
    result = invoke('--config', config, '--rasters', rasters, '-o', tmp_path / 'run')
    assert isinstance(result.exception, InputError)
    assert str(result.exception).startswith(f"{config}: unknown config key 'learning_rate'")


def test_command_line_overrides_config(rasters: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / 'run'
    result = tiny_run(rasters, run_dir, '--max-steps', '1', '--batch-size', '2')
    assert result.exit_code == 0, repr(result.exception)
    saved = (run_dir / 'config.yaml').read_text()
    assert 'batch_size: 2' in saved and 'max_steps: 1' in saved and 'backbone: resnet18' in saved


def test_exit_codes_through_main(rasters: Path, tmp_path: Path) -> None:
    command = [sys.executable, '-c', 'from geocmid_cli.main import main; main()', 'pretrain']
    bad = subprocess.run(
        [*command, '--rasters', tmp_path / 'missing', '-o', tmp_path / 'run'],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith(f'error: {tmp_path / "missing"}')


def test_python_api_runs_with_a_nodata_override(tmp_path: Path, make_geotiff) -> None:
    """`geocmid.pretrain` is the CLI's run from Python; `nodata` reaches the data layer."""
    import geocmid

    rng = np.random.default_rng(0)
    image = rng.integers(1, 255, (3, 96, 96), dtype=np.uint8)
    image[:, :, :40] = 7  # a stripe of the overriding nodata value: excluded from statistics
    make_geotiff('data/a.tif', image)
    run = geocmid.pretrain(
        tmp_path / 'run', config=TINY_CONFIG, rasters=tmp_path / 'data', backbone='resnet18',
        max_steps=1, nodata=7, progress=False,
    )  # fmt: skip
    assert run.global_step == 1
    encoder, card = geocmid.load_encoder(run.run_dir)
    assert card.in_chans == 3 and card.config['nodata'] == 7
    # Sampled statistics: close to the valid pixels' mean, far from the mean with the stripe.
    valid = image[:, :, 40:].reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(card.mean, valid.mean(axis=1), rtol=0.02)
    assert (np.asarray(card.mean) - image.reshape(3, -1).mean(axis=1) > 30).all()
