"""`geocmid pretrain --method gersp`: a run on the NAIP sample with generated natural images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner, Result
from PIL import Image

from geocmid.errors import InputError
from geocmid.runs.pretrain import load_pretrain_config
from geocmid_cli.pretrain import pretrain

REPO = Path(__file__).resolve().parents[1]
NAIP = REPO / 'sample_data' / 'naip'
TINY_CONFIG = REPO / 'configs' / 'gersp_tiny_test.yaml'


@pytest.fixture
def rasters(tmp_path: Path) -> Path:
    """The NAIP sample, copied (the statistics sidecar is written beside the data)."""
    return Path(shutil.copytree(NAIP, tmp_path / 'naip'))


@pytest.fixture
def natural(tmp_path: Path) -> Path:
    """Three classes of small RGB images (PNG and JPEG), two per class."""
    root = tmp_path / 'natural'
    for index, name in enumerate(('bird', 'boat', 'tree')):
        (root / name).mkdir(parents=True)
        colour = (60 * index, 255 - 60 * index, 90)
        Image.new('RGB', (80, 70), colour).save(root / name / 'one.png')
        Image.new('RGB', (70, 90), colour[::-1]).save(root / name / 'two.jpg')
    return root


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(pretrain, [str(arg) for arg in args], catch_exceptions=True)


def test_gersp_run_writes_encoder_card_and_resumes(
    rasters: Path, natural: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / 'run'
    common = ('--config', TINY_CONFIG, '--rasters', rasters, '--natural-images', natural)
    result = invoke(*common, '-o', run_dir, '--quiet', '--max-steps', '2')
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert 'step 2:' in result.output
    assert 'loss_contrastive' in result.output and 'loss_supervised' in result.output

    model = timm.create_model('resnet18', in_chans=4, num_classes=0)
    model.load_state_dict(torch.load(run_dir / 'encoder.pt', weights_only=True), strict=True)
    card = json.loads((run_dir / 'model_card.json').read_text())
    assert card['method'] == 'gersp'
    assert card['in_chans'] == 4 and card['bands'] == ['red', 'green', 'blue', 'nir']
    assert card['data']['natural_images']['classes'] == ['bird', 'boat', 'tree']

    checkpoint = torch.load(run_dir / 'checkpoints' / 'last.ckpt', weights_only=False)
    assert checkpoint['global_step'] == 2
    assert checkpoint['hyper_parameters']['num_classes'] == 3
    assert checkpoint['state_dict']['classifier.weight'].shape == (3, 512)
    header = (run_dir / 'logs' / 'version_0' / 'metrics.csv').read_text().splitlines()[0]
    for key in ('train_loss', 'loss_contrastive', 'loss_supervised', 'natural_accuracy', 'lr'):
        assert key in header.split(',')

    resumed = invoke(*common, '-o', run_dir, '--quiet', '--max-steps', '3', '--resume')
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    after = torch.load(run_dir / 'checkpoints' / 'last.ckpt', weights_only=False)
    assert after['global_step'] == 3
    # One more step of 4 keys went on from the saved queue of 8.
    saved = int(checkpoint['state_dict']['queue.ptr'])
    assert int(after['state_dict']['queue.ptr']) == (saved + 4) % 8


@pytest.mark.parametrize(
    ('extra', 'problem'),
    [
        ((), '--natural-images: GeRSP needs a folder'),
        (('--natural-images', 'MISSING'), 'folder does not exist'),
        (('--natural-images', 'ONE_CLASS'), 'at least 2 needed'),
        (('--natural-images', 'EMPTY'), 'no images found'),
    ],
)
def test_bad_natural_images(
    rasters: Path, natural: Path, tmp_path: Path, extra: tuple[str, ...], problem: str
) -> None:
    (tmp_path / 'empty' / 'cls').mkdir(parents=True)
    one_class = tmp_path / 'one_class'
    shutil.copytree(natural / 'bird', one_class / 'bird')
    folders = {'MISSING': tmp_path / 'missing', 'ONE_CLASS': one_class, 'EMPTY': tmp_path / 'empty'}
    arguments = [folders.get(value, value) for value in extra]
    result = invoke(
        '--config', TINY_CONFIG, '--rasters', rasters, '-o', tmp_path / 'run', *arguments
    )
    assert isinstance(result.exception, InputError), repr(result.exception)
    assert problem in str(result.exception)
    assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_natural_images_need_method_gersp(rasters: Path, natural: Path, tmp_path: Path) -> None:
    result = invoke(
        '--config',
        REPO / 'configs' / 'cmid_tiny_test.yaml',
        '--rasters',
        rasters,
        '--natural-images',
        natural,
        '-o',
        tmp_path / 'run',
    )
    assert isinstance(result.exception, InputError), repr(result.exception)
    assert '--natural-images' in str(result.exception) and 'gersp' in str(result.exception)


def test_paper_config_is_valid() -> None:
    config = load_pretrain_config(REPO / 'configs' / 'gersp_resnet50.yaml')
    assert (config.method, config.backbone, config.patch_size) == ('gersp', 'resnet50', 224)
    assert config.batch_size * config.devices == 256 and config.epochs == 100
    assert config.task['lr'] == 0.007 and config.task['min_lr'] == 0.001
    assert config.task['weight_decay'] == 5e-4 and config.task['moco_momentum'] == 0.999
    assert config.task['crop_scale'] == (0.2, 1.0)


def test_exit_code_2_through_main(rasters: Path, tmp_path: Path) -> None:
    command = [sys.executable, '-c', 'from geocmid_cli.main import main; main()', 'pretrain']
    bad = subprocess.run(
        [*command, '--method', 'gersp', '--rasters', rasters, '-o', tmp_path / 'run'],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith('error: --natural-images: GeRSP needs')
