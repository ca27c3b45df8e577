"""Defaults that spare flags: chip bands for a random encoder, RGB bands for GeRSP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import REPO, SAMPLE_DATA
from PIL import Image

from geocmid.datasets.geo_raster import GeoRasterDataset
from geocmid_cli.main import main

TINY_GERSP = REPO / 'configs' / 'gersp_tiny_test.yaml'


def run(argv: list[object]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return int(exit_info.value.code)


def test_random_encoder_on_rgb_chips_needs_no_bands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    for k in range(8):
        name, level = ('bright', 200) if k % 2 else ('dark', 50)
        (tmp_path / name).mkdir(exist_ok=True)
        pixels = np.clip(level + rng.normal(0, 10, (16, 16, 3)), 0, 255).astype(np.uint8)
        suffix = '.jpg' if k < 4 else '.png'
        Image.fromarray(pixels).save(tmp_path / name / f'{k}{suffix}')

    code = run(['evaluate', 'knn', '--encoder', 'random:resnet18', '--images', tmp_path,
                '--size', 32, '--split', 0.5])  # fmt: skip

    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith('k-NN top-1: ')


def test_colour_interpretation_names_the_bands() -> None:
    with rasterio.open(SAMPLE_DATA / 'landsat' / 'RGB.byte.tif') as src:
        assert src.descriptions == (None, None, None)  # only GDAL's colour interpretation
    assert GeoRasterDataset(SAMPLE_DATA / 'landsat' / 'RGB.byte.tif').band_names == (
        'red', 'green', 'blue'
    )  # fmt: skip


@pytest.fixture
def natural(tmp_path: Path) -> Path:
    root = tmp_path / 'natural'
    for index, name in enumerate(('bird', 'boat')):
        (root / name).mkdir(parents=True)
        for k in range(2):
            Image.new('RGB', (40, 40), (90 * index, 40 * k, 90)).save(root / name / f'{k}.png')
    return root


def test_gersp_on_unnamed_four_bands_asks_for_rgb_bands(
    tmp_path: Path, natural: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    rasters = tmp_path / 'rasters'
    rasters.mkdir()
    with rasterio.open(SAMPLE_DATA / 'naip' / 'naip_2012.tif') as src:
        window = ((0, 160), (0, 160))
        profile = {**src.profile, 'height': 160, 'width': 160, 'photometric': 'MINISBLACK'}
        profile['transform'] = src.window_transform(window)
        with rasterio.open(rasters / 'naip.tif', 'w', **profile) as dst:
            dst.write(src.read(window=window))  # no band names, no colour interpretation
    common = ['pretrain', '--config', TINY_GERSP, '--rasters', rasters, '--natural-images',
              natural, '--max-steps', 1, '--quiet']  # fmt: skip

    assert run([*common, '-o', tmp_path / 'refused']) == 2
    err = capfd.readouterr().err
    assert err.count('\n') == 1 and 'task.rgb_bands' in err and '--rgb-bands 1,2,3' in err
    assert not (tmp_path / 'refused').exists()

    assert run([*common, '-o', tmp_path / 'run', '--rgb-bands', '1,2,3']) == 0
    assert (tmp_path / 'run' / 'encoder.pt').is_file()
    assert capfd.readouterr().err == ''  # --quiet: no bar, no Lightning banner, no warning
