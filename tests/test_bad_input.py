"""Every command on every kind of bad input: exit 2, one line naming the input, nothing written.

The promise of the command line (README, "Errors"): bad input ends the command with exit status
2 and exactly one line on stderr that names the input (a file, a folder or an option), without
a traceback and before anything is written. This module pins it as one table: each row runs a
command through :func:`geocmid_cli.main.main` on one bad input.

A new command must add its rows: to :data:`COMMANDS` (how to run it with valid inputs and an
output), and to the tables of the options it takes (:data:`BATCH_SIZE`, :data:`TILE`,
:data:`TRAINING`) and of the checkpoints it reads (:func:`checkpoint_cases`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_geotiff
from PIL import Image

from geocmid.io.cards import ClassInfo, ModelCard, write_card
from geocmid.models.weights import load_encoder, save_encoder
from geocmid_cli.main import main


@dataclass(frozen=True)
class World:
    """Valid inputs, and bad checkpoints beside them, shared by every row."""

    root: Path
    scene: Path
    scene2: Path
    labels: Path  # class-id raster of scene
    pairs: Path
    chips: Path
    encoder: Path
    file: Path

    def bad(self, name: str) -> Path:
        return self.root / name


class Evil:
    """Unpickling this runs a shell command: a checkpoint holding it must be refused."""

    def __reduce__(self) -> tuple[Callable[..., int], tuple[str]]:
        return (os.system, ('touch PWNED',))


def _bad_files(folder: Path, name: str) -> dict[str, Path]:
    """``garbage`` (random bytes) and ``evil`` (a pickled shell command) versions of ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    garbage = folder / f'garbage-{name}'
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    evil = folder / f'evil-{name}'
    torch.save({'state_dict': Evil()}, evil)
    return {'garbage': garbage, 'evil': evil}


@pytest.fixture(scope='module')
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp('world')
    scene = root / 'scene.tif'
    data = np.random.default_rng(0).integers(1, 255, (3, 300, 600), dtype=np.uint8)
    write_geotiff(scene, data, nodata=0)
    scene2 = write_geotiff(root / 'scene2.tif', data[:, ::-1].copy(), nodata=0)
    pairs = root / 'pairs.csv'
    label = write_geotiff(root / 'label.tif', (data[:1] > 128).astype(np.uint8))
    pairs.write_text(f'before,after,label\n{scene},{scene2},{label}\n')
    chips = root / 'chips'
    for k, name in enumerate(['a', 'b', 'a', 'b']):
        (chips / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(chips / name / f'{k}.png')
    encoder_dir = root / 'encoder'
    encoder_dir.mkdir()
    network, card = load_encoder('random:resnet18', in_chans=3)
    encoder = save_encoder(encoder_dir, network.state_dict())
    write_card(encoder, card)
    file = root / 'file.txt'
    file.write_text('a regular file')
    bad_files = _bad_files(root / 'files', 'checkpoint.pt')
    for kind, path in bad_files.items():
        # A bad encoder.pt with a valid card beside it.
        (root / f'{kind}-encoder').mkdir()
        shutil.copy(path, root / f'{kind}-encoder' / 'encoder.pt')
        shutil.copy(encoder_dir / 'model_card.json', root / f'{kind}-encoder')
        shutil.copy(path, root / f'{kind}.pt')
        # Bad model.ckpt files of each task, with a valid card beside them.
        for task in ('segmentation', 'change', 'classification'):
            run = root / f'{kind}-{task}'
            run.mkdir()
            shutil.copy(path, run / 'model.ckpt')
            classes = [ClassInfo('background', (0, 0, 0)), ClassInfo('thing', (255, 0, 0))]
            task_card = ModelCard(
                method='supervised', backbone='resnet18', bands=['red', 'green', 'blue'],
                band_indices=[1, 2, 3], mean=[0.0] * 3, std=[1.0] * 3, patch_size=32,
                task=task, classes=classes, tile_size=32,
            )  # fmt: skip
            write_card(run / 'model.ckpt', task_card)
    return World(
        root=root, scene=scene, scene2=scene2, labels=label,
        pairs=pairs, chips=chips, encoder=encoder_dir, file=file,
    )  # fmt: skip


# --- the commands, run with valid inputs -----------------------------------------------------

#: Command -> (argv with valid inputs writing to OUTPUT, whether OUTPUT is a folder, its suffix).
Argv = Callable[[World, Path], list[object]]
COMMANDS: dict[str, tuple[Argv, str]] = {
    'pretrain': (
        lambda w, o: [
            'pretrain',
            '--rasters',
            w.scene,
            '-o',
            o,
            '--patch-size',
            32,
            '--max-steps',
            1,
            '--quiet',
        ],
        '/',
    ),
    'train segment': (
        lambda w, o: [
            'train',
            'segment',
            '--rasters',
            w.scene,
            '--labels',
            w.labels,
            '-o',
            o,
            '--max-steps',
            1,
            '--quiet',
        ],
        '/',
    ),
    'train change': (
        lambda w, o: ['train', 'change', '--pairs', w.pairs, '-o', o, '--max-steps', 1, '--quiet'],
        '/',
    ),
    'train classify': (
        lambda w, o: [
            'train',
            'classify',
            '--images',
            w.chips,
            '-o',
            o,
            '--max-steps',
            1,
            '--quiet',
        ],
        '/',
    ),
    'segment': (
        lambda w, o: [
            'segment',
            w.scene,
            '-o',
            o,
            '--model',
            w.bad('garbage-segmentation'),
            '--quiet',
        ],
        '.gpkg',
    ),
    'change': (
        lambda w, o: ['change', w.scene, w.scene2, '-o', o, '--encoder', w.encoder, '--quiet'],
        '.gpkg',
    ),
    'classify': (
        lambda w, o: ['classify', w.chips, '--model', w.bad('garbage-classification'), '-o', o],
        '.csv',
    ),
    'embed': (
        lambda w, o: ['embed', '--rasters', w.scene, '--encoder', w.encoder, '-o', o, '--quiet'],
        '.parquet',
    ),
    'evaluate knn': (
        lambda w, o: ['evaluate', 'knn', '--encoder', w.encoder, '--images', w.chips, '--json', o],
        '.json',
    ),
    'evaluate linear': (
        lambda w, o: [
            'evaluate',
            'linear',
            '--encoder',
            w.encoder,
            '--images',
            w.chips,
            '--json',
            o,
        ],
        '.json',
    ),
    'import-weights': (
        lambda w, o: ['import-weights', w.bad('garbage.pt'), '--format', 'cmid-resnet50', '-o', o],
        '.pt',
    ),
}

#: Commands that take --batch-size, --tile, and --epochs/--max-steps.
BATCH_SIZE = [name for name in COMMANDS if name != 'import-weights']
TILE = ['segment', 'change', 'embed']
TRAINING = ['pretrain', 'train segment', 'train change', 'train classify']


@dataclass(frozen=True)
class Case:
    """One row: a command line (given the world and an empty output folder) and what it names."""

    argv: Callable[[World, Path], list[object]]
    names: Callable[[World, Path], str]


def output_name(command: str, output: Path) -> Path:
    """The output path ``command`` is given inside ``output`` (a folder or a file)."""
    suffix = COMMANDS[command][1]
    return output / ('run' if suffix == '/' else f'out{suffix}')


def option_cases() -> dict[str, Case]:
    """Counts that must be positive: 0 and negative values are usage errors."""
    cases = {}
    rows = [(c, '--batch-size', v) for c in BATCH_SIZE for v in ('0', '-3')]
    rows += [(c, '--tile', '0') for c in TILE]
    rows += [(c, option, '0') for c in TRAINING for option in ('--epochs', '--max-steps')]
    for command, option, value in rows:
        build = COMMANDS[command][0]
        cases[f'{command} {option} {value}'] = Case(
            argv=lambda w, o, b=build, c=command, x=option, v=value: [
                *b(w, output_name(c, o)),
                x,
                v,
            ],
            names=lambda w, o, x=option: x,
        )
    return cases


def output_cases() -> dict[str, Case]:
    """Outputs that cannot be written: under a regular file, in /proc, in read-only /sys."""
    cases = {}
    places = {
        'under a file': lambda w: w.file,
        'in /proc': lambda w: Path('/proc/geocmid-test'),
        'read-only': lambda w: Path('/sys'),
    }
    for command, (build, _) in COMMANDS.items():
        for place, folder in places.items():
            cases[f'{command} output {place}'] = Case(
                argv=lambda w, o, b=build, c=command, f=folder: b(w, output_name(c, f(w))),
                names=lambda w, o, c=command, f=folder: str(output_name(c, f(w))),
            )
    return cases


def checkpoint_cases() -> dict[str, Case]:
    """Garbage and malicious checkpoints for --model, --encoder, --resume and import-weights."""
    cases = {}
    for kind in ('garbage', 'evil'):
        models = {'segment': 'segmentation', 'classify': 'classification'}
        for command, task in models.items():
            build = COMMANDS[command][0]
            cases[f'{command} --model {kind}'] = Case(
                argv=lambda w, o, b=build, c=command, t=task, k=kind: [
                    *b(w, output_name(c, o)),
                    '--model',
                    w.bad(f'{k}-{t}'),
                ],
                names=lambda w, o, t=task, k=kind: str(w.bad(f'{k}-{t}')),
            )
        cases[f'change --model {kind}'] = Case(
            argv=lambda w, o, k=kind: ['change', w.scene, w.scene2, '-o', o / 'c.gpkg',
                                       '--model', w.bad(f'{k}-change')],
            names=lambda w, o, k=kind: str(w.bad(f'{k}-change')),
        )  # fmt: skip
        for command in ('change', 'embed', 'evaluate knn', 'evaluate linear', 'train segment'):
            build = COMMANDS[command][0]
            cases[f'{command} --encoder {kind}'] = Case(
                argv=lambda w, o, b=build, c=command, k=kind: [
                    *b(w, output_name(c, o)),
                    '--encoder',
                    w.bad(f'{k}-encoder'),
                ],
                names=lambda w, o, k=kind: str(w.bad(f'{k}-encoder')),
            )
        cases[f'import-weights {kind}'] = Case(
            argv=lambda w, o, k=kind: ['import-weights', w.bad(f'{k}.pt'), '--format',
                                       'cmid-resnet50', '-o', o / 'encoder.pt'],
            names=lambda w, o, k=kind: str(w.bad(f'{k}.pt')),
        )  # fmt: skip
        cases[f'pretrain --resume {kind}'] = Case(argv=_resume_argv(kind), names=_resume_name)
    return cases


def _resume_argv(kind: str) -> Callable[[World, Path], list[object]]:
    def argv(w: World, o: Path) -> list[object]:
        # A run folder whose last.ckpt is bad; made here, so it is part of "before".
        checkpoints = o / 'run' / 'checkpoints'
        checkpoints.mkdir(parents=True)
        shutil.copy(w.bad(f'{kind}.pt'), checkpoints / 'last.ckpt')
        return [*COMMANDS['pretrain'][0](w, o / 'run'), '--resume']

    return argv


def _resume_name(w: World, o: Path) -> str:
    return str(o / 'run' / 'checkpoints' / 'last.ckpt')


CASES = {**option_cases(), **output_cases(), **checkpoint_cases()}


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob('*')}


@pytest.mark.parametrize('case', CASES.values(), ids=CASES.keys())
def test_bad_input(
    case: Case,
    world: World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # where the malicious checkpoint would leave PWNED
    monkeypatch.delenv('GEOCMID_DEBUG', raising=False)
    argv = [str(arg) for arg in case.argv(world, tmp_path)]
    before = files_under(tmp_path), files_under(world.root)

    with pytest.raises(SystemExit) as exit_info:
        main(argv)

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(lines) == 1, err
    assert 'Traceback' not in err and 'weights_only=False' not in err
    assert case.names(world, tmp_path) in lines[0], err
    assert (files_under(tmp_path), files_under(world.root)) == before
