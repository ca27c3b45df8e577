"""`geocmid segment`: one scene to a GeoPackage, many scenes to a folder, and every bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import REPO, SAMPLE_DATA, write_geotiff
from rasterio.windows import Window

from geocmid.io.cog import validate_cog
from geocmid_cli.main import main

SPACENET = SAMPLE_DATA / 'spacenet' / 'buildings.tif'


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-band building model trained for 2 steps by `geocmid train segment`."""
    output = tmp_path_factory.mktemp('spacenet') / 'run'
    code = run([
        'train', 'segment', '--rasters', SPACENET, '--labels',
        SAMPLE_DATA / 'spacenet' / 'buildings.geojson', '-o', output, '--backbone', 'resnet18',
        '--patch-size', '64', '--batch-size', '2', '--max-steps', '2', '--quiet',
    ])  # fmt: skip
    assert code == 0
    return output


def run(argv: list) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return int(exit_info.value.code)


def tile(target: Path, row: int = 0, col: int = 0, size: int = 64, **overrides: object) -> Path:
    """A small crop of the SpaceNet tile on its own grid."""
    window = Window(col, row, size, size)
    with rasterio.open(SPACENET) as src:
        options = {'crs': src.crs.to_string(), 'transform': src.window_transform(window),
                   'nodata': src.nodata, **overrides}  # fmt: skip
        return write_geotiff(target, src.read(window=window), **options)  # type: ignore[arg-type]


def test_one_scene_to_geopackage_and_rasters(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    scene = tile(tmp_path / 'scene.tif', size=96)
    output = tmp_path / 'out' / 'buildings.gpkg'
    output.parent.mkdir()

    code = run(['segment', scene, '-o', output, '--model', run_dir, '--raster',
                '--probabilities', tmp_path / 'out' / 'p.tif', '--tile', '64', '--min-area', '1',
                '--quiet'])  # fmt: skip

    assert code == 0
    raster = tmp_path / 'out' / 'buildings.tif'  # --raster without a path: beside the .gpkg
    assert sorted(p.name for p in output.parent.iterdir()) == [
        'buildings.gpkg', 'buildings.tif', 'buildings.tif.aux.xml', 'p.tif'
    ]  # fmt: skip
    assert validate_cog(raster) == []
    with rasterio.open(scene) as src, rasterio.open(raster) as labels:
        assert (labels.crs, labels.transform, labels.shape) == (src.crs, src.transform, src.shape)
    frame = gpd.read_file(output)
    assert frame.crs == 'EPSG:32616' and (frame['area_m2'] >= 1).all()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith('scene: ')
    assert out[0].endswith(f'-> {output}, {raster}, {tmp_path / "out" / "p.tif"}')


def test_many_scenes_to_a_folder(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tile(tmp_path / 'in' / 'a.tif')
    tile(tmp_path / 'in' / 'b.tif', row=200, col=300)
    output = tmp_path / 'maps'

    # A quoted glob, expanded by geocmid itself.
    code = run(['segment', tmp_path / 'in' / '*.tif', '-o', output, '--model', run_dir,
                '--probabilities', '--blend', 'linear', '--quiet'])  # fmt: skip

    assert code == 0
    names = sorted(p.name for p in output.iterdir() if not p.name.endswith('.aux.xml'))
    assert names == ['a.gpkg', 'a.tif', 'a_probabilities.tif', 'b.gpkg', 'b.tif',
                     'b_probabilities.tif', 'run.parquet']  # fmt: skip
    with rasterio.open(output / 'b.tif') as labels:
        assert labels.tags()['BLEND'] == 'linear'
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split(':')[0] for line in out] == ['a', 'b']


def test_a_bad_scene_among_many_exits_2_after_the_others(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = tile(tmp_path / 'good.tif')
    bad = tile(tmp_path / 'nocrs.tif', crs=None)

    code = run(['segment', good, bad, '-o', tmp_path / 'maps', '--model', run_dir, '--quiet'])

    assert code == 2
    assert sorted(p.name for p in (tmp_path / 'maps').iterdir()) == [
        'good.gpkg', 'good.tif', 'good.tif.aux.xml', 'run.parquet'
    ]  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f'error: {bad}: raster has no CRS',
        f'error: {tmp_path / "maps"}: 1 of 2 scene(s) failed (see above)',
    ]


def invoke(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """Run the CLI in this process (as the entry point does); exit code and stderr lines."""
    capsys.readouterr()
    code = run(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    'case', ['no_crs', 'bands', 'unwritable', 'exists', 'no_card', 'gpkg_for_many', 'devices']
)
def test_bad_input_exits_2_without_output(
    case: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    scene = tile(tmp_path / 'scene.tif')
    out = tmp_path / 'out'
    out.mkdir()
    output, model, extra = out / 'scene.gpkg', run_dir, []
    match case:
        case 'no_crs':
            scene = tile(tmp_path / 'nocrs.tif', crs=None)
            culprit, problem = scene, 'raster has no CRS'
        case 'bands':
            rgb = np.ones((3, 32, 32), np.uint8)
            scene = write_geotiff(tmp_path / 'rgb.tif', rgb, crs='EPSG:32616')
            culprit, problem = scene, 'has 3 band(s) but the model takes 1 (band_1)'
        case 'unwritable':
            (tmp_path / 'file').write_text('a file, not a folder')
            output = tmp_path / 'file' / 'scene.gpkg'
            culprit, problem = output, 'is a file, not a folder'
        case 'exists':
            output.write_text('keep me')
            culprit, problem = output, 'exists; use --overwrite'
        case 'no_card':
            model = tmp_path / 'empty_run'
            model.mkdir()
            culprit, problem = model, 'no model_card.json in this folder'
        case 'gpkg_for_many':
            extra = [tile(tmp_path / 'other.tif')]
            culprit, problem = output, '2 scenes need an output folder, not a .gpkg'
        case 'devices':
            extra = ['--devices', '2']
            culprit, problem = '--devices', 'spreads many scenes over devices'
    before = sorted(out.iterdir())

    code, err = invoke(['segment', scene, *extra, '-o', output, '--model', model, '--raster',
                        out / 'labels.tif', '--quiet'], capsys)  # fmt: skip

    assert code == 2
    assert len(err) == 1 and err[0].startswith(f'error: {culprit}: '), err
    assert problem in err[0]
    assert sorted(out.iterdir()) == before  # nothing written, not even a partial file
    if case == 'exists':
        assert output.read_text() == 'keep me'


def test_entry_point_exits_2_on_bad_input(run_dir: Path, tmp_path: Path) -> None:
    """The same through a separate interpreter: the exit status the shell sees.

    One case only: each interpreter start imports torch, Lightning and TorchGeo (seconds);
    the other bad inputs run through the same ``main()`` in this process above.
    """
    scene = tile(tmp_path / 'nocrs.tif', crs=None)

    completed = subprocess.run(
        [sys.executable, '-c', 'from geocmid_cli.main import main; main()', 'segment', scene,
         '-o', tmp_path / 'out.gpkg', '--model', run_dir, '--quiet'],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip

    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip().splitlines() == [f'error: {scene}: raster has no CRS']
    assert not (tmp_path / 'out.gpkg').exists()


def test_unwritable_folder(run_dir: Path, tmp_path: Path) -> None:
    """An output folder that cannot be written.

    Here a regular file stands where it should be (a permission-based check cannot fail as root,
    who may write anywhere).
    """
    blocker = tmp_path / 'maps'
    blocker.write_text('not a folder')
    code = run(['segment', tile(tmp_path / 's.tif'), '-o', blocker / 's.gpkg', '--model',
                run_dir, '--quiet'])  # fmt: skip
    assert code == 2
    assert blocker.read_text() == 'not a folder'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['maps', 's.tif']


def test_skip_existing_resumes_a_run(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tile(tmp_path / 'in' / 'a.tif')
    tile(tmp_path / 'in' / 'b.tif', row=200, col=300)
    output = tmp_path / 'maps'
    argv = ['segment', tmp_path / 'in', '-o', output, '--model', run_dir, '--quiet',
            '--skip-existing']  # fmt: skip
    assert run(argv) == 0
    outputs = [output / name for name in ('a.gpkg', 'a.tif', 'b.gpkg', 'b.tif')]
    assert all(path.is_file() for path in outputs)
    written = {p: p.stat().st_mtime_ns for p in outputs}
    capsys.readouterr()

    # Everything complete: both scenes are skipped and no file is touched.
    assert run(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in outputs} == written
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ['a: skipped, outputs complete', 'b: skipped, outputs complete']

    # A missing GeoPackage and a leftover hidden temporary file: only scene b runs again.
    (output / 'b.gpkg').unlink()
    (output / '.b.partial.gpkg').write_bytes(b'killed mid-write')
    assert run(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == 'a: skipped, outputs complete' and out[1].startswith('b: ')
    assert len(out) == 2
    assert (output / 'a.tif').stat().st_mtime_ns == written[output / 'a.tif']
    assert (output / 'b.tif').stat().st_mtime_ns > written[output / 'b.tif']
    assert gpd.read_file(output / 'b.gpkg', layer='predictions').crs is not None
    assert validate_cog(output / 'b.tif') == []
    assert not (output / '.b.partial.gpkg').exists()


def test_skip_existing_conflicts(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    scene = tile(tmp_path / 'a.tif')
    code = run(['segment', scene, '-o', tmp_path / 'maps', '--model', run_dir, '--quiet',
                '--skip-existing', '--overwrite'])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == 'error: --skip-existing: cannot be combined with --overwrite'
    assert not (tmp_path / 'maps' / 'a.gpkg').exists()
    code = run(['segment', scene, '-o', tmp_path / 'a.gpkg', '--model', run_dir,
                '--skip-existing'])  # fmt: skip
    assert code == 2
    assert not (tmp_path / 'a.gpkg').exists()
