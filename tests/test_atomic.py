"""Output checks by trying, and scratch folders that outlive a killed run only until the next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from geocmid.errors import InputError
from geocmid.io.atomic import (
    OWNER_NAME,
    check_folder_writable,
    check_writable,
    remove_stale_scratch,
    scratch_folder,
)


@pytest.mark.parametrize('folder', [Path('/proc'), Path('/sys')], ids=['proc', 'sys'])
def test_unwritable_folders_are_found_by_trying(folder: Path) -> None:
    # os.access(folder, os.W_OK) is True for root, yet nothing can be created there.
    with pytest.raises(InputError, match=f'^{folder}/out.tif: cannot write in {folder} '):
        check_writable(folder / 'out.tif')
    with pytest.raises(InputError, match=f'^{folder}/run/a: cannot write in {folder} '):
        check_folder_writable(folder / 'run' / 'a')


def test_output_under_a_regular_file(tmp_path: Path) -> None:
    file = tmp_path / 'file.txt'
    file.write_text('x')
    with pytest.raises(InputError, match=f'out.tif: cannot be written: {file} is a file'):
        check_writable(file / 'out.tif')
    with pytest.raises(InputError, match=f'{file} is a file, not a folder'):
        check_folder_writable(file / 'run' / 'deeper')
    with pytest.raises(InputError, match=f'^{file}: cannot be written: is a file'):
        check_folder_writable(file)
    assert sorted(tmp_path.iterdir()) == [file]


def test_writable_checks_leave_nothing(tmp_path: Path) -> None:
    assert check_writable(tmp_path / 'out.tif') == tmp_path / 'out.tif'
    assert check_folder_writable(tmp_path / 'a' / 'run') == tmp_path / 'a' / 'run'
    assert list(tmp_path.iterdir()) == []


def test_scratch_folder_is_removed_on_exit_and_on_error(tmp_path: Path) -> None:
    with scratch_folder(tmp_path, '.geocmid-test-') as scratch:
        assert scratch.parent == tmp_path and scratch.name.startswith('.geocmid-test-')
        (scratch / 'labels.tif').write_bytes(b'x')
        owner = (scratch / OWNER_NAME).read_text().split()
        assert int(owner[1]) == os.getpid()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), scratch_folder(tmp_path, '.geocmid-test-'):
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


KILLED = """
import os, sys, time
from geocmid.io.atomic import scratch_folder
with scratch_folder(sys.argv[1], '.geocmid-segment-') as scratch:
    print(scratch, flush=True)
    time.sleep(600)
"""


def test_the_next_run_removes_the_scratch_folder_of_a_killed_run(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, '-c', KILLED, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    leftover = Path(process.stdout.readline().strip())  # type: ignore[union-attr]
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()  # type: ignore[union-attr]
    assert leftover.is_dir()  # a killed run cannot clean up...
    other = tmp_path / '.geocmid-change-x'  # ...and another command's folder is not touched
    other.mkdir()
    (other / OWNER_NAME).write_text(leftover.joinpath(OWNER_NAME).read_text())

    with scratch_folder(tmp_path, '.geocmid-segment-') as scratch:
        assert not leftover.exists()  # ...but the next run does
        assert sorted(tmp_path.iterdir()) == sorted([scratch, other])


def test_scratch_of_a_live_process_or_without_owner_is_kept(tmp_path: Path) -> None:
    live = tmp_path / '.geocmid-segment-live'
    live.mkdir()
    (live / OWNER_NAME).write_text(f'{os.uname().nodename} {os.getppid()}\n')
    unowned = tmp_path / '.geocmid-segment-new'  # being created: its marker is not written yet
    unowned.mkdir()
    elsewhere = tmp_path / '.geocmid-segment-remote'
    elsewhere.mkdir()
    (elsewhere / OWNER_NAME).write_text('another-host 1\n')
    assert remove_stale_scratch(tmp_path, '.geocmid-segment-') == []
    assert sorted(tmp_path.iterdir()) == sorted([live, unowned, elsewhere])
