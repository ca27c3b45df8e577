"""Progress: redrawn bars on a terminal, a plain line per 10 % or 30 s anywhere else."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from tqdm import tqdm

from geocmid.progress import LINE_SECONDS, LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_tqdm_and_a_log_gets_lines() -> None:
    assert type(progress_bar(total=3, file=Terminal())) is tqdm
    assert type(progress_bar(total=3, file=io.StringIO())) is LineProgress


def test_lines_every_tenth_of_the_work() -> None:
    log = io.StringIO()
    with progress_bar(total=1000, desc='inference', unit='win', file=log) as bar:
        for _ in range(1000):
            bar.update()
    text = log.getvalue()
    assert '\r' not in text
    lines = text.splitlines()
    counts = [line.split('|')[2].split()[0] for line in lines]
    assert counts == [f'{n}/1000' for n in range(0, 1001, 100)]
    assert all(line.startswith('inference:') for line in lines)


def test_lines_every_30_seconds_when_the_work_is_slow() -> None:
    log = io.StringIO()
    bar = LineProgress(total=1000, file=log)
    now = [bar.start_t]
    bar._time = lambda: now[0]  # a fake clock: 1 item per minute, far below 10 %
    for _ in range(3):
        now[0] += 2 * LINE_SECONDS
        bar.update()
    bar.close()
    counts = [line.split('|')[2].split()[0] for line in log.getvalue().splitlines()]
    assert counts == ['0/1000', '1/1000', '2/1000', '3/1000']


def test_iterating_and_closing_early_show_the_last_count() -> None:
    log = io.StringIO()
    for _ in progress_bar(range(5), file=log):
        pass
    assert log.getvalue().splitlines()[-1].split('|')[2].split()[0] == '5/5'
    log = io.StringIO()
    with progress_bar(total=100, file=log) as bar:
        bar.update(3)  # an error stops the work early
    assert log.getvalue().splitlines()[-1].split('|')[2].split()[0] == '3/100'


def test_disabled_bar_prints_nothing() -> None:
    log = io.StringIO()
    for _ in progress_bar(range(5), file=log, disable=True):
        pass
    assert log.getvalue() == ''


def test_lightning_bar_in_a_log_prints_lines(capfd: pytest.CaptureFixture[str]) -> None:
    import lightning
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from geocmid.runs.progress import LineProgressBar, progress_callback

    class Tiny(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    assert isinstance(progress_callback(), LineProgressBar)  # pytest's stdout is no terminal
    data = DataLoader(TensorDataset(torch.zeros(20, 2)), batch_size=1)
    trainer = lightning.Trainer(
        max_epochs=2, callbacks=[LineProgressBar()], logger=False, enable_checkpointing=False,
        enable_model_summary=False, accelerator='cpu',
    )  # fmt: skip
    trainer.fit(Tiny(), data)
    err = capfd.readouterr().err
    epochs = [line for line in err.splitlines() if line.startswith('Epoch')]
    assert '\r' not in err
    counts = [line.split('|')[2].split()[0] for line in epochs]
    assert counts.count('20/20') == 2  # each epoch ends with a line
    assert {'2/20', '10/20', '18/20'} <= set(counts) and len(counts) <= 2 * 11


def test_huge_header_with_no_data_shows_the_real_window_count(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import rasterio
    from rasterio.transform import from_origin

    from geocmid_cli.main import main

    scene = tmp_path / 'huge.tif'
    profile = {
        'driver': 'GTiff', 'width': 20000, 'height': 20000, 'count': 1, 'dtype': 'uint8',
        'crs': 'EPSG:32616', 'transform': from_origin(500000, 4000000, 0.5, 0.5), 'nodata': 0,
        'tiled': True, 'blockxsize': 512, 'blockysize': 512, 'SPARSE_OK': 'TRUE',
    }  # fmt: skip
    with rasterio.open(scene, 'w', **profile):
        pass  # a 400-megapixel header over a file of a few kilobytes: no tile is written
    assert scene.stat().st_size < 100_000
    output = tmp_path / 'embeddings.parquet'

    with pytest.raises(SystemExit) as exit_info:
        main(['embed', '--rasters', str(scene), '--encoder', 'random:resnet18', '--bands', '1',
              '-o', str(output), '--tile', '2000'])  # fmt: skip

    assert exit_info.value.code == 0
    captured = capfd.readouterr()
    lines = captured.err.splitlines()
    assert '\r' not in captured.err and lines[-1].startswith('huge.tif: 100%')
    assert all('/100 ' in line for line in lines)  # 10 x 10 windows of 2000 px
    assert captured.out.startswith('0 embeddings')
