"""Reading official checkpoints safely, and `geocmid import-weights` end to end."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import types
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from torch import Tensor

from geocmid.errors import InputError
from geocmid.models.weights import import_weights, load_encoder, read_checkpoint
from geocmid_cli.import_weights import import_weights_command


def resnet50_state(seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    return timm.create_model('resnet50', num_classes=0).state_dict()


@pytest.fixture(scope='module')
def student() -> dict[str, Tensor]:
    return resnet50_state(0)


def fake_official_classes() -> tuple[type, type]:
    """Stand-ins for the official trainer's MetricStroge and HistoryBuffer, same module paths."""

    class HistoryBuffer:
        def __init__(self) -> None:
            self._history: deque = deque(maxlen=20)
            self._count = 0
            self._sum = 0.0

        def update(self, value: float) -> None:
            self._history.append(value)
            self._count += 1
            self._sum += value

    class MetricStroge(dict):
        def __init__(self) -> None:
            super().__init__()
            self._window_size = 20
            self._history = self  # as the original: the dict is its own history
            self._smooth: dict[str, bool] = {}

        def update(self, **values: float) -> None:
            for key, value in values.items():
                self._smooth.setdefault(key, True)
                self.setdefault(key, HistoryBuffer()).update(value)

    HistoryBuffer.__module__ = 'Exploring.utils.history_buffer'
    MetricStroge.__module__ = 'Exploring.utils.metric'
    HistoryBuffer.__qualname__ = 'HistoryBuffer'
    MetricStroge.__qualname__ = 'MetricStroge'
    return MetricStroge, HistoryBuffer


def save_with_fake_modules(
    obj: object, path: Path, monkeypatch: pytest.MonkeyPatch, classes: tuple[type, ...]
) -> None:
    """torch.save ``obj`` while the fake Exploring modules are importable, then remove them."""
    with monkeypatch.context() as patch:
        for cls in classes:
            parts = cls.__module__.split('.')
            for depth in range(1, len(parts) + 1):
                name = '.'.join(parts[:depth])
                module = sys.modules.get(name) or types.ModuleType(name)
                patch.setitem(sys.modules, name, module)
            setattr(sys.modules[cls.__module__], cls.__qualname__, cls)
        torch.save(obj, path)
    assert 'Exploring' not in sys.modules


@pytest.fixture
def full_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, student: dict[str, Tensor]
) -> Path:
    """A CMID full pre-training checkpoint as the official trainer writes it (docs/cmid.md)."""
    storage_cls, buffer_cls = fake_official_classes()
    storage = storage_cls()
    storage.update(loss=np.float64(1.5), lr=0.001)
    storage.update(loss=np.float64(1.25), lr=0.001)
    checkpoint = {
        'epoch': 199,
        'num_gpus': 4,
        'model': {
            'online_encoder.mask_token': torch.zeros(1, 64, 1, 1),
            **{f'online_encoder.model.{k}': v for k, v in student.items()},
            **{f'branch_encoder.{k}': torch.zeros_like(v) for k, v in student.items()},
            'queue': torch.randn(256, 128),
            'queue_ptr': torch.zeros(1, dtype=torch.long),
        },
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.001, 'params': [0, 1]}]},
        'metric_storage': storage,
    }
    path = tmp_path / 'CMID_ResNet50_full_200ep.pth'
    save_with_fake_modules(checkpoint, path, monkeypatch, (storage_cls, buffer_cls))
    return path


def test_full_checkpoint_needs_the_restricted_unpickler(
    full_checkpoint: Path, student: dict[str, Tensor]
) -> None:
    # PyTorch's weights_only loader refuses the pickled trainer object...
    with pytest.raises(pickle.UnpicklingError, match='Exploring.utils.metric.MetricStroge'):
        torch.load(full_checkpoint, weights_only=True)
    # ...and the restricted unpickler reads everything else without the repository's classes.
    checkpoint = read_checkpoint(full_checkpoint)
    assert checkpoint['epoch'] == 199
    conv1 = checkpoint['model']['online_encoder.model.conv1.weight']
    assert torch.equal(conv1, student['conv1.weight'])
    assert dict(checkpoint['metric_storage']).keys() == {'loss', 'lr'}


class RunsCode:
    """An object whose unpickling would create a directory (stands in for arbitrary code)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.target),)


def test_other_pickled_objects_are_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'payload': RunsCode(marker)}, path)
    with pytest.raises(InputError, match=r'evil.pth: refusing to unpickle (posix|nt).mkdir'):
        read_checkpoint(path)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / 'notes.pth'
    text.write_text('these are not weights\n')
    with pytest.raises(InputError, match='notes.pth: not a PyTorch checkpoint'):
        read_checkpoint(text)
    listing = tmp_path / 'list.pth'
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(InputError, match='list.pth: not a checkpoint: holds a list'):
        read_checkpoint(listing)
    with pytest.raises(InputError, match='missing.pth: no such file'):
        read_checkpoint(tmp_path / 'missing.pth')


def test_import_full_checkpoint_writes_encoder_and_card(
    full_checkpoint: Path, tmp_path: Path, student: dict[str, Tensor]
) -> None:
    out = tmp_path / 'out'
    out.mkdir()
    encoder_path, card = import_weights(full_checkpoint, 'cmid-resnet50', out)
    assert encoder_path == out / 'encoder.pt'
    assert sorted(p.name for p in out.iterdir()) == ['encoder.pt', 'model_card.json']

    saved = torch.load(encoder_path, weights_only=True)
    assert saved.keys() == student.keys()
    assert all(torch.equal(saved[k], student[k]) for k in student)

    model, loaded = load_encoder(out)
    assert loaded == card
    assert (loaded.method, loaded.backbone, loaded.in_chans) == ('cmid', 'resnet50', 3)
    assert loaded.bands == ['red', 'green', 'blue']
    assert loaded.band_indices == [1, 2, 3]
    assert loaded.patch_size == 224
    # The official RS statistics (docs/cmid.md#views-and-augmentations), in 8-bit units.
    np.testing.assert_allclose(loaded.mean, np.array([0.33797, 0.3605, 0.3348]) * 255, rtol=1e-6)
    np.testing.assert_allclose(loaded.std, np.array([0.1359, 0.1352, 0.1407]) * 255, rtol=1e-6)
    digest = hashlib.sha256(full_checkpoint.read_bytes()).hexdigest()
    assert loaded.provenance == {
        'checkpoint': str(full_checkpoint.resolve()),
        'sha256': digest,
        'format': 'cmid-resnet50',
    }
    assert model.conv1.weight.shape == (64, 3, 7, 7)


def test_import_gersp_uses_imagenet_statistics(tmp_path: Path, student: dict[str, Tensor]) -> None:
    path = tmp_path / 'gersp_100ep.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in student.items()}}, path)
    _, card = import_weights(path, 'gersp-resnet50', tmp_path / 'encoder.pt')
    assert card.method == 'gersp'
    np.testing.assert_allclose(card.mean, np.array([0.485, 0.456, 0.406]) * 255, rtol=1e-6)
    np.testing.assert_allclose(card.std, np.array([0.229, 0.224, 0.225]) * 255, rtol=1e-6)


def test_import_into_missing_folder_fails_cleanly(
    tmp_path: Path, student: dict[str, Tensor]
) -> None:
    path = tmp_path / 'gersp.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in student.items()}}, path)
    with pytest.raises(InputError, match='does not exist'):
        import_weights(path, 'gersp-resnet50', tmp_path / 'nowhere' / 'encoder.pt')


def test_cli_command_success_and_overwrite(full_checkpoint: Path, tmp_path: Path) -> None:
    target = tmp_path / 'encoder.pt'
    runner = CliRunner()
    args = [str(full_checkpoint), '--format', 'cmid-resnet50', '-o', str(target)]
    result = runner.invoke(import_weights_command, args, standalone_mode=False)
    assert result.exception is None, result.output
    assert f'wrote {target} (resnet50, 3 bands, method cmid)' in result.output
    assert (tmp_path / 'model_card.json').is_file()
    before = target.stat().st_mtime_ns

    again = runner.invoke(import_weights_command, args, standalone_mode=False)
    assert isinstance(again.exception, InputError)
    assert 'exists; use --overwrite' in str(again.exception)
    assert target.stat().st_mtime_ns == before

    forced = runner.invoke(import_weights_command, [*args, '--overwrite'], standalone_mode=False)
    assert forced.exception is None, forced.output


def test_cli_command_errors(tmp_path: Path, student: dict[str, Tensor]) -> None:
    runner = CliRunner()
    resnet = tmp_path / 'resnet.pth'
    torch.save(student, resnet)
    cases = {
        str(tmp_path / 'missing.pth'): ('cmid-resnet50', 'missing.pth: no such file'),
        str(resnet): ('cmid-swin-b', 'not a cmid-swin-b checkpoint'),
    }
    for checkpoint, (fmt, message) in cases.items():
        out = tmp_path / 'out.pt'
        args = [checkpoint, '--format', fmt, '-o', str(out)]
        result = runner.invoke(import_weights_command, args, standalone_mode=False)
        assert isinstance(result.exception, InputError), result.output
        assert message in str(result.exception)
        assert not out.exists() and not (tmp_path / 'model_card.json').exists()
    usage = runner.invoke(import_weights_command, [str(resnet), '--format', 'vit', '-o', 'x.pt'])
    assert usage.exit_code == 2


def test_cli_exit_codes(tmp_path: Path, student: dict[str, Tensor]) -> None:
    resnet = tmp_path / 'resnet.pth'
    torch.save(student, resnet)
    text = tmp_path / 'notes.pth'
    text.write_text('not weights')

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        main = 'from geocmid_cli.main import main; main()'
        command = [sys.executable, '-c', main, 'import-weights', *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    wrong = run(str(resnet), '--format', 'cmid-swin-b', '-o', str(tmp_path / 'a.pt'))
    assert wrong.returncode == 2
    errors = [line for line in wrong.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1
    assert f'{resnet}: not a cmid-swin-b checkpoint' in errors[0]
    garbage = run(str(text), '--format', 'cmid-resnet50', '-o', str(tmp_path / 'b.pt'))
    assert garbage.returncode == 2 and 'not a PyTorch checkpoint' in garbage.stderr
    ok = run(str(resnet), '--format', 'cmid-resnet50', '-o', str(tmp_path / 'c.pt'))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / 'model_card.json').is_file()
