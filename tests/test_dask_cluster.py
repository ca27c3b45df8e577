"""Many scenes on Dask: a real scheduler and workers, a worker killed mid-run, manifests, shards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import timm
import torch
from conftest import SAMPLE_DATA, write_geotiff
from rasterio.windows import Window

from geocmid.errors import InputError
from geocmid.inference.manifest import parse_shard, read_manifest, take_shard
from geocmid.inference.products.change import detect_changes
from geocmid.inference.products.embed import embed
from geocmid.inference.products.segment import segment_scenes
from geocmid.io.cards import ModelCard, write_card
from geocmid.io.cog import validate_cog
from geocmid.models.weights import save_encoder
from geocmid.runs.segmentation import SegmentConfig, train_segmentation
from geocmid_cli.main import main

SPACENET = SAMPLE_DATA / 'spacenet' / 'buildings.tif'
BIN = Path(sys.executable).parent

#: Every process of these tests runs torch on one thread: the machine has few cores.
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-band building model (resnet18 U-Net) trained for 2 steps: fast, and enough to run."""
    output = tmp_path_factory.mktemp('spacenet') / 'run'
    config = SegmentConfig(
        rasters=SPACENET, labels=SAMPLE_DATA / 'spacenet' / 'buildings.geojson', output=output,
        backbone='resnet18', patch_size=64, batch_size=2, max_steps=2, val_fraction=0.0, seed=0,
    )  # fmt: skip
    return train_segmentation(config, progress=False).run_dir


def scenes(folder: Path, count: int, size: int = 192) -> list[Path]:
    """``count`` crops of the SpaceNet tile, each on its own grid."""
    paths = []
    with rasterio.open(SPACENET) as src:
        data = src.read()
        for i in range(count):
            row, col = (37 * i) % (512 - size), (53 * i) % (512 - size)
            window = Window(col, row, size, size)
            crop = data[:, row : row + size, col : col + size]
            paths.append(write_geotiff(
                folder / f's{i}.tif', crop, crs=src.crs.to_string(),
                transform=src.window_transform(window), nodata=src.nodata,
            ))  # fmt: skip
    return paths


def encoder1(folder: Path) -> Path:
    """A 1-band resnet18 encoder with its card (random weights)."""
    torch.manual_seed(0)
    network = timm.create_model('resnet18', in_chans=1, num_classes=0)
    path = save_encoder(folder / 'encoder.pt', network.state_dict())
    card = ModelCard(
        method='random', backbone='resnet18', bands=['b1'], band_indices=[1], mean=[300.0],
        std=[150.0], patch_size=32,
    )  # fmt: skip
    write_card(path, card)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def run(argv: list) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return int(exit_info.value.code)


def stop(process: subprocess.Popen) -> None:
    """Kill a process this test started, and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[tuple[str, dict[str, subprocess.Popen]]]:
    """A `dask scheduler` and two single-threaded `dask worker` processes on 127.0.0.1."""
    from distributed import Client

    address = f'tcp://127.0.0.1:{free_port()}'
    started: list[subprocess.Popen] = []
    logs = tmp_path / 'logs'
    logs.mkdir()

    def start(name: str, *argv: str) -> subprocess.Popen:
        log = open(logs / f'{name}.log', 'wb')  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([BIN / 'dask', *argv], env=ENV, stdout=log, stderr=log)
        started.append(process)
        return process

    try:
        start('scheduler', 'scheduler', '--host', '127.0.0.1', '--port', address.rsplit(':')[-1],
              '--no-dashboard')  # fmt: skip
        workers = {
            f'w{i}': start(f'worker{i}', 'worker', address, '--nthreads', '1', '--no-nanny',
                           '--no-dashboard', '--name', f'w{i}', '--death-timeout', '60')
            for i in range(2)
        }  # fmt: skip
        with Client(address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, workers
    finally:
        for process in reversed(started):
            stop(process)


def complete(out: Path, name: str) -> None:
    """The scene's outputs exist and are valid: a COG on its grid, a readable GeoPackage."""
    assert validate_cog(out / f'{name}.tif') == []
    frame = gpd.read_file(out / f'{name}.gpkg', layer='predictions')
    assert frame.crs == 'EPSG:32616'


def test_a_killed_worker_loses_no_scene(
    run_dir: Path, tmp_path: Path, dask_cluster: tuple[str, dict[str, subprocess.Popen]]
) -> None:
    from distributed import Client

    address, workers = dask_cluster
    inputs = scenes(tmp_path / 'in', 6)
    out = tmp_path / 'maps'
    command = [BIN / 'geocmid', 'segment', tmp_path / 'in', '-o', out, '--model', run_dir,
               '--cluster', address, '--tile', '64', '--quiet']  # fmt: skip
    process = subprocess.Popen(
        [str(arg) for arg in command], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    killed, lost = None, None
    try:
        with Client(address, timeout=60, set_as_default=False) as client:
            names = {a: w['name'] for a, w in client.scheduler_info()['workers'].items()}
            deadline = time.monotonic() + 300
            # Once the first scene is written, kill a worker in the middle of the next.
            while killed is None and time.monotonic() < deadline and process.poll() is None:
                if any(out.glob('*.gpkg')):
                    for worker, keys in client.processing().items():
                        if keys and worker in names:
                            killed, lost = worker, str(keys[0]).rsplit('-', 1)[0]
                            workers[names[worker]].send_signal(signal.SIGKILL)
                            break
                time.sleep(0.1)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        stop(process)

    assert killed is not None, 'no worker was busy once the first scene was written'
    assert process.returncode == 0, stderr.decode()
    assert len(stdout.decode().strip().splitlines()) == 6
    names = [path.stem for path in inputs]
    for name in names:
        complete(out, name)
    # Nothing partial or stray: the outputs, their sidecars and the run table only.
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith('.'))
    expected = [f'{n}{suffix}' for n in names for suffix in ('.gpkg', '.tif', '.tif.aux.xml')]
    assert visible == sorted([*expected, 'run.parquet'])
    assert not list(out.glob('.*.partial*'))

    table = pd.read_parquet(out / 'run.parquet')
    assert list(table.columns) == ['name', 'input', 'status', 'error', 'seconds', 'worker',
                                   'outputs']  # fmt: skip
    assert table['name'].tolist() == names
    assert (table['status'] == 'done').all() and (table['error'] == '').all()
    assert (table['seconds'] > 0).all()
    assert table['worker'].str.startswith('tcp://127.0.0.1:').all()
    # The scene of the killed worker was run again on the other one.
    assert table.set_index('name')['worker'][lost] not in ('', killed)
    assert [list(files) for files in table['input']] == [[str(p)] for p in inputs]
    assert [list(files) for files in table['outputs']] == [
        [str(out / f'{n}.gpkg'), str(out / f'{n}.tif')] for n in names
    ]


def test_api_takes_a_client(
    run_dir: Path, tmp_path: Path, dask_cluster: tuple[str, dict[str, subprocess.Popen]]
) -> None:
    from distributed import Client

    address, _ = dask_cluster
    inputs = scenes(tmp_path / 'in', 3, size=96)
    here = segment_scenes(inputs, run_dir, tmp_path / 'here', tile=64, progress=False)
    with Client(address, set_as_default=False) as client:
        there = segment_scenes(
            inputs, run_dir, tmp_path / 'there', tile=64, client=client, progress=False
        )
        assert client.status == 'running'  # the caller's client stays open

    assert list(there) == list(here) == ['s0', 's1', 's2']
    for name in here:
        with rasterio.open(here[name].raster) as a, rasterio.open(there[name].raster) as b:
            np.testing.assert_array_equal(a.read(), b.read())
            assert b.transform == a.transform

    # Label-free change of pairs and tile embeddings: the same on the workers as here.
    encoder = encoder1(tmp_path)
    pairs = [(inputs[0], inputs[1]), (inputs[1], inputs[2])]
    options = {'encoder': encoder, 'method': 'features', 'tile': 64}
    near = detect_changes(pairs, out_dir=tmp_path / 'chg_here', progress=False, **options)
    with Client(address, set_as_default=False) as client:
        far = detect_changes(
            pairs, out_dir=tmp_path / 'chg_there', client=client, progress=False, **options
        )
        embedded = embed(inputs, encoder, tmp_path / 'emb.parquet', tile=48, client=client)
    assert list(far) == list(near)
    for name in near:
        assert far[name].threshold == pytest.approx(near[name].threshold)
    assert pd.read_parquet(tmp_path / 'chg_there' / 'run.parquet')['status'].tolist() == [
        'done',
        'done',
    ]
    local = embed(inputs, encoder, tile=48)
    assert embedded['source'].tolist() == local['source'].tolist()
    np.testing.assert_allclose(
        np.stack(embedded['embedding']), np.stack(local['embedding']), rtol=1e-4, atol=1e-5
    )
    assert pd.read_parquet(tmp_path / 'emb.run.parquet')['worker'].str.startswith('tcp://').all()


def test_manifest_with_a_missing_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = scenes(tmp_path / 'in', 2, size=64)
    manifest = tmp_path / 'list.txt'
    # Relative to the manifest's folder; comments and blank lines are ignored.
    manifest.write_text('# scenes\nin/s0.tif\n\nin/gone.tif\n' + f'{inputs[1]}\n')
    out = tmp_path / 'maps'

    code = run(['segment', '--inputs', manifest, '-o', out, '--model', run_dir,
                '--cluster', 'none', '--quiet'])  # fmt: skip

    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f'error: {tmp_path / "in" / "gone.tif"}: no such file'
    assert err[-1] == f'error: {out}: 1 of 3 scene(s) failed (see above)'
    complete(out, 's0')
    complete(out, 's1')
    table = pd.read_parquet(out / 'run.parquet')
    assert table['name'].tolist() == ['s0', 'gone', 's1']
    assert table['status'].tolist() == ['done', 'failed', 'done']
    assert 'gone.tif' in table['error'][1]

    # --fail-fast: the missing file stops the run before any scene is segmented.
    again = tmp_path / 'again'
    code = run(['segment', '--inputs', manifest, '-o', again, '--model', run_dir,
                '--cluster', 'none', '--quiet', '--fail-fast'])  # fmt: skip
    assert code == 2 and list(again.iterdir()) == []

    # --skip-existing resumes: the done scenes are skipped and keep their record.
    capsys.readouterr()
    code = run(['segment', '--inputs', manifest, '-o', out, '--model', run_dir,
                '--cluster', 'none', '--quiet', '--skip-existing'])  # fmt: skip
    assert code == 2
    resumed = pd.read_parquet(out / 'run.parquet')
    assert resumed['status'].tolist() == ['skipped', 'failed', 'skipped']
    assert resumed['worker'][0] == table['worker'][0]


def test_shards_split_a_manifest(run_dir: Path, tmp_path: Path) -> None:
    inputs = scenes(tmp_path / 'in', 5, size=64)
    manifest = tmp_path / 'list.csv'
    pd.DataFrame({'path': [str(p) for p in inputs]}).to_csv(manifest, index=False)
    out = tmp_path / 'maps'

    for index in range(2):
        code = run(['segment', '--inputs', manifest, '-o', out, '--model', run_dir,
                    '--shard', f'{index}/2', '--cluster', 'none', '--quiet'])  # fmt: skip
        assert code == 0

    first = pd.read_parquet(out / 'run-0-of-2.parquet')
    second = pd.read_parquet(out / 'run-1-of-2.parquet')
    assert first['name'].tolist() == ['s0', 's2', 's4']
    assert second['name'].tolist() == ['s1', 's3']
    for name in (f's{i}' for i in range(5)):
        complete(out, name)


def test_shard_and_manifest_parsing(tmp_path: Path) -> None:
    assert parse_shard('1/3') == (1, 3) and parse_shard(None) is None
    assert take_shard({'a': 1, 'b': 2, 'c': 3, 'd': 4}, (1, 3)) == {'b': 2}
    for value, problem in (
        ('3/2', '--shard: 3/2: the shard must be 0 to 1'),
        ('0/0', '--shard: 0/0: the number of shards must be at least 1'),
        ('1of2', "--shard: expected I/N such as 0/4 (I from 0 to N-1), got '1of2'"),
    ):
        with pytest.raises(InputError) as info:
            parse_shard(value)
        assert str(info.value) == problem
    empty = tmp_path / 'empty.txt'
    empty.write_text('# nothing\n\n')
    with pytest.raises(InputError, match='empty.txt: the manifest lists no input'):
        read_manifest(empty)
    with pytest.raises(InputError, match='nope.txt: cannot read the manifest'):
        read_manifest(tmp_path / 'nope.txt')
    listed = tmp_path / 'scenes.csv'
    listed.write_text('id,scene\n1,a.tif\n2,/data/b.tif\n')
    assert read_manifest(listed) == [tmp_path / 'a.tif', Path('/data/b.tif')]


@pytest.mark.parametrize('shard', ['3/2', '0/0'])
def test_bad_shard_exits_2(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, shard: str
) -> None:
    inputs = scenes(tmp_path / 'in', 2, size=64)
    code = run(['segment', *inputs, '-o', tmp_path / 'maps', '--model', run_dir, '--shard',
                shard, '--quiet'])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f'error: --shard: {shard}: ')
    assert not (tmp_path / 'maps' / 'run.parquet').exists()


def test_a_cluster_that_does_not_answer(run_dir: Path, tmp_path: Path) -> None:
    inputs = scenes(tmp_path / 'in', 2, size=64)
    address = f'tcp://127.0.0.1:{free_port()}'  # nothing listens there
    command = [BIN / 'geocmid', 'segment', *inputs, '-o', tmp_path / 'maps', '--model', run_dir,
               '--cluster', address, '--quiet']  # fmt: skip
    # Bounded: the scheduler address is given up on well within 30 s.
    done = subprocess.run(
        [str(arg) for arg in command], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert err[-1].startswith(f'error: --cluster: no Dask scheduler answers at {address}')
    assert not any((tmp_path / 'maps').glob('*.gpkg'))
    with pytest.raises(InputError, match="--cluster: expected 'local', 'none' or a scheduler"):
        segment_scenes(inputs, run_dir, tmp_path / 'maps', client='localhost')
