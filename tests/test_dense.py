"""The dense-product pipeline shared by segment and change: devices, mixed precision, layering."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import timm
import torch
from conftest import REPO
from rasterio.transform import from_origin
from rasterio.windows import Window
from torch import Tensor

import geocmid.api
from geocmid.errors import InputError
from geocmid.inference import devices, engine
from geocmid.inference.devices import autocast_dtype, resolve_device, worker_devices
from geocmid.inference.engine import predict_scene
from geocmid.io.cards import ModelCard, write_card
from geocmid.models.weights import save_encoder
from geocmid_cli.main import main


def run_cli(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    """Run the CLI in this process: exit code, stdout and the lines of stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code), out, err.strip().splitlines()


@pytest.fixture(scope='module')
def encoder3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-band resnet18 encoder with its card."""
    torch.manual_seed(0)
    network = timm.create_model('resnet18', in_chans=3, num_classes=0)
    path = save_encoder(tmp_path_factory.mktemp('encoder') / 'encoder.pt', network.state_dict())
    card = ModelCard(
        method='random', backbone='resnet18', bands=['b1', 'b2', 'b3'], band_indices=[1, 2, 3],
        mean=[100.0] * 3, std=[50.0] * 3, patch_size=32,
    )  # fmt: skip
    write_card(path, card)
    return path


@pytest.fixture
def pairs(make_geotiff) -> list[tuple[Path, Path]]:
    """Two 3-band pairs, each with a bright square added in the after image."""
    rng = np.random.default_rng(0)
    transform = from_origin(500000.0, 4000000.0, 2.0, 2.0)
    result = []
    for index in range(2):
        before = rng.integers(60, 90, (3, 48, 56)).astype(np.uint8)
        after = before.copy()
        after[:, 10 + index : 26 + index, 20:36] = 250
        result.append(
            (
                make_geotiff(f'before{index}.tif', before, transform=transform, nodata=0),
                make_geotiff(f'after{index}.tif', after, transform=transform, nodata=0),
            )
        )
    return result


# Layering --------------------------------------------------------------------------------------


def test_inference_imports_no_lightning() -> None:
    """Inference loads trained networks with torch alone: no Lightning, no training runners."""
    code = (
        'import sys, geocmid.inference, pkgutil, importlib; '
        '[importlib.import_module(m.name) for m in '
        "pkgutil.walk_packages(geocmid.inference.__path__, 'geocmid.inference.')]; "
        "assert 'lightning' not in sys.modules"
    )
    completed = subprocess.run(
        [sys.executable, '-c', code], check=False, capture_output=True, text=True, cwd=REPO
    )
    assert completed.returncode == 0, completed.stderr


def test_one_device_resolver() -> None:
    """Devices are resolved in one place (evaluation had a copy that let typos through)."""
    defined = [
        path.relative_to(REPO).as_posix()
        for path in sorted((REPO / 'geocmid').rglob('*.py'))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name == 'resolve_device'
    ]
    assert defined == ['geocmid/inference/devices.py']


# Devices ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['cdua', 'cuda:x', 'gpu'])
def test_unknown_device_is_a_bad_input(name: str) -> None:
    with pytest.raises(InputError, match=f"--device: unknown device '{name}'"):
        resolve_device(name)


def test_missing_cuda_device_is_a_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(InputError, match="--device: 'cuda': no CUDA device is visible"):
        resolve_device('cuda')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert resolve_device('cuda:1') == torch.device('cuda', 1)
    with pytest.raises(InputError, match="--devices: 'cuda:2': only 2 CUDA device"):
        resolve_device('cuda:2', '--devices')
    assert resolve_device('auto') == torch.device('cuda')


def test_worker_devices() -> None:
    assert worker_devices(1, 'cpu') == ['cpu']
    assert worker_devices(['cpu', 'cpu']) == ['cpu', 'cpu']
    assert worker_devices('cpu') == ['cpu']
    with pytest.raises(InputError, match="--devices: unknown device 'cdua'"):
        worker_devices(['cpu', 'cdua'])
    with pytest.raises(InputError, match='--devices: no device given'):
        worker_devices([])
    with pytest.raises(InputError, match='--device: give either one'):
        worker_devices(['cpu', 'cpu'], 'cpu')


@pytest.mark.parametrize(
    'argv',
    [
        ['embed', '--rasters', '{scene}', '--encoder', '{encoder}', '-o', '{out}/e.parquet'],
        ['change', '{scene}', '{scene}', '--encoder', '{encoder}', '-o', '{out}/c.gpkg'],
    ],
    ids=['embed', 'change'],
)
def test_cli_bad_device_exits_2(
    argv: list[str], pairs, encoder3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt device is a bad input (exit 2, one line naming it), not an internal error."""
    out = tmp_path / 'out'
    out.mkdir()
    given = {'scene': pairs[0][0], 'encoder': encoder3, 'out': out}
    args = [arg.format(**given) for arg in argv]

    code, _, err = run_cli([*args, '--device', 'cdua', '--quiet'], capsys)

    assert code == 2
    assert err == ["error: --device: unknown device 'cdua'; try 'cpu' or 'cuda'"]
    assert list(out.iterdir()) == []


def test_cli_cuda_without_a_gpu_exits_2(
    pairs, encoder3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    before, after = pairs[0]
    code, _, err = run_cli(
        ['change', before, after, '--encoder', encoder3, '-o', tmp_path / 'c.gpkg', '--device',
         'cuda', '--quiet'], capsys,
    )  # fmt: skip
    assert code == 2
    assert err == ["error: --device: 'cuda': no CUDA device is visible; use 'cpu'"]
    assert not (tmp_path / 'c.gpkg').exists()


# Mixed precision -------------------------------------------------------------------------------


def test_autocast_dtype_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 on CUDA GPUs that have it, float16 on older ones, float32 on the CPU."""
    assert autocast_dtype(torch.device('cpu')) is None
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: True)
    assert autocast_dtype(torch.device('cuda', 0)) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: False)
    assert autocast_dtype(torch.device('cuda')) is torch.float16


class Source:
    """A 40 x 40 one-band source of ones, all valid."""

    height = width = 40

    def read(self, window: Window, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        return np.ones((1, *size), np.float32), np.ones(size, bool)


class Sink:
    """Takes the blocks and forgets them."""

    def write_block(
        self, row_off: int, col_off: int, probabilities: np.ndarray, valid: np.ndarray
    ) -> None:
        pass


def autocast_seen(**options: object) -> list[tuple[bool, torch.dtype]]:
    """Run the engine on the CPU; what autocast the model saw at each call."""
    seen: list[tuple[bool, torch.dtype]] = []

    def model(images: Tensor) -> Tensor:
        seen.append((torch.is_autocast_enabled('cpu'), torch.get_autocast_dtype('cpu')))
        return torch.zeros((images.shape[0], 2, *images.shape[-2:]))

    predict_scene(Source(), model, Sink(), num_classes=2, tile=32, progress=False, **options)
    return seen


def test_engine_runs_the_model_in_the_devices_mixed_precision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine asks :func:`autocast_dtype` by default, as if the CPU were a GPU here."""
    assert {enabled for enabled, _ in autocast_seen()} == {False}  # float32 on the CPU

    asked: list[torch.device] = []

    def bfloat16(device: torch.device) -> torch.dtype:
        asked.append(device)
        return torch.bfloat16

    monkeypatch.setattr(engine, 'autocast_dtype', bfloat16)
    assert set(autocast_seen()) == {(True, torch.bfloat16)}
    assert asked == [torch.device('cpu')]
    assert {enabled for enabled, _ in autocast_seen(amp=False)} == {False}
    assert devices.autocast_dtype is not bfloat16  # only the engine's lookup was replaced


# Change over several devices -------------------------------------------------------------------


def test_change_pairs_cli_takes_devices(
    pairs, encoder3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before, after = pairs[0]
    code, _, err = run_cli(
        ['change', before, after, '--encoder', encoder3, '-o', tmp_path / 'c.gpkg', '--devices',
         'cpu,cpu', '--quiet'], capsys,
    )  # fmt: skip
    assert code == 2
    assert err == ['error: --devices: spreads many pairs over devices; give one --device']
    assert not (tmp_path / 'c.gpkg').exists()

    csv = tmp_path / 'pairs.csv'
    csv.write_text('before,after\n' + ''.join(f'{b},{a}\n' for b, a in pairs))
    code, _, err = run_cli(
        ['change', '--pairs', csv, '--encoder', encoder3, '-o', tmp_path / 'maps', '--devices',
         '2', '--quiet'], capsys,
    )  # fmt: skip
    if torch.cuda.device_count() >= 2:
        assert code == 0, err
    else:
        visible = torch.cuda.device_count()
        message = f'2 GPUs requested but {visible} CUDA device(s) are visible'
        assert code == 2 and err == [f'error: --devices: {message}']


@pytest.mark.slow
def test_change_worker_processes_give_the_same_changes(
    pairs, encoder3: Path, tmp_path: Path
) -> None:
    """Two CPU worker processes stand in for two GPUs; each loads the encoder itself."""
    options = {'encoder': encoder3, 'raster': True, 'threshold': 'otsu', 'progress': False}
    here = geocmid.api.detect_changes(pairs, out_dir=tmp_path / 'here', tile=32, **options)
    spread = geocmid.api.detect_changes(
        pairs, out_dir=tmp_path / 'spread', tile=32, devices=['cpu', 'cpu'], **options
    )

    assert list(spread) == list(here) == ['before0_after0', 'before1_after1']
    for name in here:
        assert spread[name].threshold == here[name].threshold
        assert spread[name].stats == here[name].stats
        with rasterio.open(here[name].raster) as a, rasterio.open(spread[name].raster) as b:
            np.testing.assert_array_equal(a.read(), b.read())
            assert b.tags()['THRESHOLD'] == a.tags()['THRESHOLD']
        assert spread[name].changed_area_m2 == here[name].changed_area_m2 > 0
