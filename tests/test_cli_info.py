"""`geocmid info` end to end: output for good rasters, exit code 2 and one line for bad input.

The command runs in-process through ``geocmid_cli.main.main`` (which maps errors to exit codes
and calls ``sys.exit``); one case also goes through a real subprocess, as a user would run it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_geotiff

from geocmid_cli.main import main


def run_main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``geocmid info ARGS``."""
    with pytest.raises(SystemExit) as exit_:
        main(['info', *map(str, args)])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_info_describes_every_raster_in_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = np.arange(2 * 16 * 24, dtype='uint16').reshape(2, 16, 24)
    write_geotiff(tmp_path / 'a.tif', data, nodata=0)
    write_geotiff(tmp_path / 'sub' / 'nocrs.tif', data, crs=None)
    code, out, err = run_main(capsys, tmp_path, '--stats')
    assert code == 0, err
    assert str(tmp_path / 'a.tif') in out and str(tmp_path / 'sub' / 'nocrs.tif') in out
    assert '24 x 16 px, 2 band(s), uint16' in out
    assert 'crs         EPSG:32631' in out and 'crs         none' in out
    assert 'resolution  1 x 1' in out
    assert 'bounds      left 500000, bottom 3999984, right 500024, top 4000000' in out
    valid = data[0][data.all(axis=0)]  # pixel 0 is nodata in a.tif
    assert f'mean {valid.mean():.6g}' in out
    assert 'max 383' in out and 'stats       383 valid pixels (all pixels)' in out


def bad_input(tmp_path: Path, case: str) -> tuple[Path, Path]:
    """(path given to info, path the error must name) for each kind of bad input."""
    if case == 'missing':
        return tmp_path / 'nowhere', tmp_path / 'nowhere'
    if case == 'empty':
        (tmp_path / 'empty').mkdir()
        return tmp_path / 'empty', tmp_path / 'empty'
    if case == 'text':
        (tmp_path / 'readme.tif').write_text('this is text, not a GeoTIFF')
        return tmp_path, tmp_path / 'readme.tif'
    good = write_geotiff(tmp_path / 'src' / 'good.tif', np.ones((3, 300, 300), 'uint8'),
                         tiled=True, blocksize=64)  # fmt: skip
    cut = tmp_path / 'cut.tif'
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return cut, cut


@pytest.mark.parametrize('case', ['missing', 'empty', 'text', 'truncated'])
def test_info_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    target, named = bad_input(tmp_path, case)
    code, out, err = run_main(capsys, target)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: {named}: ')
    assert out == ''


def test_info_subprocess_exit_code(tmp_path: Path) -> None:
    target, named = bad_input(tmp_path, 'text')
    command = [sys.executable, '-m', 'geocmid_cli.main', 'info', str(target)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    reason = 'not recognized as being in a supported file format'
    expected = f'error: {named}: not a readable raster ({reason})'
    assert result.stderr.strip().splitlines() == [expected]
