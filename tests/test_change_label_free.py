"""Label-free change through the CLI and API: methods, threshold rules and their bad input."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from test_change_detection import write_encoder

from geocmid.api import detect_change
from geocmid.errors import InputError
from geocmid.inference.products.change import ChangeModel
from geocmid_cli.main import main

TRANSFORM = from_origin(500000.0, 4000000.0, 2.0, 2.0)


@pytest.fixture
def pair(make_geotiff) -> tuple[Path, Path]:
    """A 3-band pair: after is a brighter, higher-contrast view of before with a changed square."""
    rng = np.random.default_rng(0)
    before = rng.integers(40, 120, (3, 64, 80)).astype(np.float64)
    after = 1.4 * before + 10  # a radiometric shift, no change
    after[:, 20:36, 30:46] = rng.integers(40, 120, (3, 16, 16)) * 1.4 + 10 + 60
    return (
        make_geotiff('before.tif', before.astype(np.uint8), transform=TRANSFORM, nodata=0),
        make_geotiff('after.tif', np.clip(after, 1, 255).astype(np.uint8), transform=TRANSFORM,
                     nodata=0),
    )  # fmt: skip


@pytest.fixture(scope='module')
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_encoder(tmp_path_factory.mktemp('encoder'), 3)


def run(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code), out, err


@pytest.mark.parametrize('method', ['fusion', 'irmad', 'features', 'cva'])
def test_every_method_finds_the_changed_square(pair, encoder: Path, tmp_path: Path, method) -> None:
    before, after = pair
    result = detect_change(
        before, after, ChangeModel.from_encoder(encoder), method=method,
        raster=tmp_path / 'change.tif', probabilities=tmp_path / 'score.tif', progress=False,
    )  # fmt: skip
    assert result.method == method and result.threshold_rule == 'ki'
    with rasterio.open(tmp_path / 'change.tif') as src:
        changed = src.read(1) == 1
        assert src.crs == rasterio.open(before).crs and src.transform == TRANSFORM
        assert src.tags()['MODEL_KIND'] == f'label-free {method}'
    square = np.zeros_like(changed)
    square[20:36, 30:46] = True
    assert changed[square].mean() > 0.8  # the square is found
    assert changed[~square].mean() < 0.5  # and most of the rest is not
    if method == 'irmad':  # IR-MAD sees through the brightening entirely
        assert changed[~square].mean() < 0.05


def test_change_fraction_cuts_the_stated_share(pair, encoder: Path, tmp_path: Path) -> None:
    before, after = pair
    result = detect_change(
        before, after, ChangeModel.from_encoder(encoder, 'irmad'), change_fraction=0.2,
        raster=tmp_path / 'change.tif', progress=False,
    )  # fmt: skip
    assert result.threshold_rule == 'fraction'
    with rasterio.open(tmp_path / 'change.tif') as src:
        labels = src.read(1)
    share = (labels == 1).sum() / (labels != 255).sum()
    assert share == pytest.approx(0.2, abs=0.02)


def test_cli_reports_method_and_rule(pair, encoder: Path, tmp_path: Path, capsys) -> None:
    before, after = pair
    code, out, err = run(
        ['change', before, after, '-o', tmp_path / 'c.gpkg', '--encoder', encoder,
         '--method', 'irmad', '--threshold', 'otsu', '--quiet'], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert 'label-free irmad, threshold' in out and '(otsu)' in out


@pytest.mark.parametrize(
    ('extra', 'message'),
    [
        (['--method', 'pca'], "'pca'"),
        (['--change-fraction', '1.5'], '--change-fraction: must be in (0, 1), got 1.5'),
        (['--change-fraction', '0'], '--change-fraction: must be in (0, 1), got 0.0'),
        (['--change-fraction', '0.1', '--threshold', '3'], '--change-fraction: conflicts'),
        (['--threshold', 'fraction'], "--threshold: 'fraction' needs --change-fraction"),
        (['--threshold', 'median'], '--threshold: must be a number or one of ki, otsu, fraction'),
    ],
)
def test_bad_label_free_settings_exit_2_with_one_line(
    pair, encoder: Path, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    before, after = pair
    code, out, err = run(
        ['change', before, after, '-o', tmp_path / 'c.gpkg', '--encoder', encoder, '--quiet',
         *extra], capsys,
    )  # fmt: skip
    assert code == 2
    assert message in err and 'Traceback' not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['after.tif', 'before.tif']


def test_bands_of_different_meaning_are_refused_unless_bands_aligns_them(
    make_geotiff, encoder: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(1, 255, (3, 64, 80)).astype(np.uint8)
    before = make_geotiff('b.tif', data, transform=TRANSFORM, nodata=0)
    after = make_geotiff('a.tif', data[::-1].copy(), transform=TRANSFORM, nodata=0)
    for path, names in ((before, ('red', 'green', 'blue')), (after, ('blue', 'green', 'red'))):
        with rasterio.open(path, 'r+') as dst:
            dst.descriptions = names
    model = ChangeModel.from_encoder(encoder, 'cva')
    with pytest.raises(InputError, match=r"band 1 is 'blue' here but 'red' in .*--bands"):
        detect_change(before, after, model, progress=False)
    result = detect_change(before, after, model, bands=[1, 2, 3], progress=False)
    assert result.method == 'cva'


def test_method_with_a_trained_model_is_refused() -> None:
    from geocmid.inference.products.change import change_model

    with pytest.raises(InputError, match='--method: chooses a label-free method'):
        change_model('run', method='irmad')


def test_band_descriptions_that_are_not_common_names_are_not_compared(
    make_geotiff, encoder: Path
) -> None:
    """Landsat ENVI headers name bands after their metadata files, which differ by date."""
    data = np.random.default_rng(2).integers(1, 255, (3, 64, 80)).astype(np.uint8)
    before = make_geotiff('b.tif', data, transform=TRANSFORM, nodata=0)
    after = make_geotiff('a.tif', data, transform=TRANSFORM, nodata=0)
    for path, date in ((before, '20000317'), (after, '20030206')):
        with rasterio.open(path, 'r+') as dst:
            dst.descriptions = [f'Band {i} (L71119038_{date}_MTL.txt)' for i in (1, 2, 3)]
    result = detect_change(before, after, ChangeModel.from_encoder(encoder, 'cva'), progress=False)
    assert result.method == 'cva'


def test_detect_changes_takes_method_and_change_fraction(pair, encoder: Path, tmp_path) -> None:
    import geocmid

    before, after = pair
    results = geocmid.detect_changes(
        [(before, after)], encoder=encoder, method='cva', change_fraction=0.1,
        out_dir=tmp_path / 'out', raster=True, progress=False,
    )  # fmt: skip
    (result,) = results.values()
    assert (result.method, result.threshold_rule) == ('cva', 'fraction')


def test_random_encoder_takes_its_channels_from_bands(pair, tmp_path: Path, capsys) -> None:
    """A random encoder has no card: --bands says how many channels it takes."""
    before, after = pair
    code, out, err = run(
        ['change', before, after, '-o', tmp_path / 'c.gpkg', '--encoder', 'random:resnet18',
         '--bands', '1,2,3', '--quiet'], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert 'label-free fusion' in out
