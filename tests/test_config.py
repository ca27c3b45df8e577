"""Tests for geocmid.runs.config: YAML loading, typed keys, and default < YAML < command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from geocmid.errors import InputError
from geocmid.runs.config import load_yaml, parse_values, resolve, signature_hints, to_plain

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    name: str = 'resnet50'
    size: int = 224
    rate: float = 0.5
    flag: bool = False
    where: Path | None = None
    bands: list[int | str] | None = None
    precision: Literal['32', 'bf16-mixed'] = '32'
    extra: dict[str, Any] = field(default_factory=dict)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / 'run.yaml'
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, 'size: 64\nrate: 1\nname: resnet18\nbands: [1, red]\n')
    settings = resolve(Settings, path, {'name': 'swin', 'size': None, 'flag': True})
    assert settings.name == 'swin'  # command line beats YAML
    assert settings.size == 64  # None on the command line keeps the YAML value
    assert settings.rate == 1.0 and isinstance(settings.rate, float)  # int accepted as float
    assert settings.flag is True
    assert settings.bands == [1, 'red']
    assert settings.precision == '32'  # default kept


def test_no_file_gives_defaults_and_paths_convert() -> None:
    settings = resolve(Settings, None, {'where': 'a/b'})
    assert settings == Settings(where=Path('a/b'))


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'size: 64\npatchsize: 32\n')
    with pytest.raises(InputError, match=r"run\.yaml: unknown config key 'patchsize'") as info:
        resolve(Settings, path)
    assert info.value.source == str(path)
    assert 'size' in info.value.problem  # the known keys are listed


@pytest.mark.parametrize(
    ('text', 'message'),
    [
        ('size: sixty\n', "'size': expected an integer"),
        ('size: true\n', "'size': expected an integer"),
        ('flag: 1\n', "'flag': expected true or false"),
        ('bands: 3\n', "'bands': expected a list"),
        ('precision: 16\n', "'precision': expected one of"),
        ('extra: [1]\n', "'extra': expected a mapping"),
    ],
)
def test_badly_typed_values(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        resolve(Settings, write(tmp_path, text))


def test_literal_accepts_number_for_string_choice(tmp_path: Path) -> None:
    assert resolve(Settings, write(tmp_path, 'precision: 32\n')).precision == '32'


@pytest.mark.parametrize(
    ('text', 'message'),
    [('- a\n- b\n', 'must be a mapping'), ('size: [1\n', 'not valid YAML')],
)
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_yaml(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match='config file not found'):
        load_yaml(tmp_path / 'nope.yaml')


def test_empty_file_is_empty_mapping(tmp_path: Path) -> None:
    assert load_yaml(write(tmp_path, '# nothing\n')) == {}


def test_signature_hints_and_sections() -> None:
    def build(
        self: object, lr: float = 1.0, mode: Literal['a', 'b'] = 'a', backbone: str = 'x'
    ) -> None:
        del self, lr, mode, backbone

    hints = signature_hints(build, exclude=('backbone',))
    assert set(hints) == {'lr', 'mode'}
    assert parse_values({'lr': 2}, hints, 'f.yaml', section='task') == {'lr': 2.0}
    with pytest.raises(InputError, match=r"f\.yaml: unknown config key 'task\.backbone'"):
        parse_values({'backbone': 'y'}, hints, 'f.yaml', section='task')
    with pytest.raises(InputError, match=r"'task\.mode': expected one of 'a', 'b'"):
        parse_values({'mode': 'c'}, hints, 'f.yaml', section='task')


def test_to_plain_round_trips_through_resolve(tmp_path: Path) -> None:
    settings = Settings(where=Path('x/y'), bands=[2, 'nir'], extra={'a': 1})
    plain = to_plain(settings)
    assert plain['where'] == 'x/y'
    path = write(tmp_path, yaml.safe_dump(plain))
    assert resolve(Settings, path) == settings


@pytest.mark.parametrize(
    'name', ['cmid_resnet50.yaml', 'cmid_swin_base.yaml', 'cmid_tiny_test.yaml']
)
def test_shipped_configs_resolve(name: str) -> None:
    from geocmid.runs.pretrain import load_pretrain_config

    config = load_pretrain_config(REPO / 'configs' / name, rasters='somewhere')
    assert config.method == 'cmid'
    assert str(config.rasters) == 'somewhere'
    if name != 'cmid_tiny_test.yaml':
        # The paper's settings (docs/cmid.md#optimisation): 4 x 64 at 224 px, Adan lr 0.001 x 4,
        # wd 0.02.
        assert (config.devices, config.batch_size, config.patch_size) == (4, 64, 224)
        assert config.task['lr'] == pytest.approx(0.004)
        assert config.task['weight_decay'] == pytest.approx(0.02)
        assert config.task['queue_size'] == 65536
        assert config.task['warmup_epochs'] == 10


def test_task_section_rejects_run_level_keys(tmp_path: Path) -> None:
    from geocmid.runs.pretrain import load_pretrain_config

    path = write(tmp_path, 'task:\n  backbone: resnet18\n')
    with pytest.raises(InputError, match=r"unknown config key 'task\.backbone'"):
        load_pretrain_config(path)
    path = write(tmp_path, 'task:\n  lr: fast\n')
    with pytest.raises(InputError, match=r"'task\.lr': expected a number"):
        load_pretrain_config(path)
