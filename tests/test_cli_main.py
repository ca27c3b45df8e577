"""The command group: lazy commands, one-line errors, quiet libraries."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import click
import pytest

from geocmid_cli.main import COMMANDS, exit_on_terminate, main, quiet_libraries

HEAVY = ('torch', 'lightning', 'timm', 'rasterio')


def test_help_lists_every_command_without_importing_torch() -> None:
    code = (
        'import sys\n'
        'from geocmid_cli.main import main\n'
        'try:\n'
        "    main(['--help'])\n"
        'except SystemExit:\n'
        '    pass\n'
        f'print([m for m in {HEAVY!r} if m in sys.modules])\n'
    )
    out = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[-1] == '[]'
    for name in COMMANDS:
        assert f'\n  {name} ' in out


@pytest.mark.parametrize('name', COMMANDS)
def test_help_line_is_the_start_of_the_docstring(name: str) -> None:
    module, attribute = COMMANDS[name][0].split(':')
    command: click.Command = getattr(importlib.import_module(f'geocmid_cli.{module}'), attribute)
    first = ' '.join((command.help or '').split('\n\n')[0].split())
    assert first.startswith(COMMANDS[name][1].removesuffix('...'))


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(['segment', 'a.tif', '--model', 'm', '-o', 'x.gpkg', '--nonsense'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: No such option '--nonsense'.\n"


def test_library_warnings_and_logs_are_hidden(capfd: pytest.CaptureFixture[str]) -> None:
    import lightning.pytorch  # noqa: F401 - adds Lightning's own console handler

    # Lightning's handler keeps the stderr of whichever test imported it first; a handler of
    # this test's own sees what would reach any stream, in every test order.
    logger = logging.getLogger('lightning.pytorch.utilities.rank_zero')
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        with quiet_libraries(debug=False):
            warnings.warn('torch says something', UserWarning, stacklevel=1)
            logging.getLogger('rasterio._env').warning('CPLE_AppDefined in GDAL')
            logger.info('GPU available: False')
        assert capfd.readouterr().err == '' and seen == []
        with quiet_libraries(debug=True):
            with pytest.warns(UserWarning):
                warnings.warn('torch says something', UserWarning, stacklevel=1)
            logger.info('GPU available: False')
        assert seen == ['GPU available: False']
    finally:
        logger.removeHandler(handler)


def test_internal_errors_are_one_line_unless_debugging(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: str, stats: bool) -> None:
        raise RuntimeError('first line\nsecond line')

    monkeypatch.setattr('geocmid.raster.files.describe_rasters', broken)
    monkeypatch.delenv('GEOCMID_DEBUG', raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(['info', 'x.tif'])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'RuntimeError: first line second line' in err
    monkeypatch.setenv('GEOCMID_DEBUG', '1')
    with pytest.raises(RuntimeError):
        main(['info', 'x.tif'])


def test_sigterm_unwinds_so_that_temporaries_are_removed(tmp_path: Path) -> None:
    cleaned = []
    with pytest.raises(SystemExit) as exit_info, exit_on_terminate():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal arrives at once; this is never finished
        finally:
            cleaned.append(True)
    assert exit_info.value.code == 128 + signal.SIGTERM and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
