"""Change detection on pairs: sources, models, Otsu, outputs, the Python API and the CLI."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import timm
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

import geocmid.api
from geocmid.datasets.pairs import align_pair
from geocmid.errors import InputError
from geocmid.inference.change_scores import LabelFreeScore, fit_scores
from geocmid.inference.products.change import (
    ChangeModel,
    PairSource,
    StackedPair,
    detect_change,
    otsu_threshold,
)
from geocmid.io.cards import ModelCard, write_card
from geocmid.io.cog import validate_cog
from geocmid.models.weights import save_encoder
from geocmid_cli.main import main

NAIP = Path(__file__).resolve().parents[1] / 'sample_data' / 'naip'


def write_encoder(folder: Path, bands: int, mean: float | None = 100.0) -> Path:
    torch.manual_seed(0)
    encoder = timm.create_model('resnet18', in_chans=bands, num_classes=0)
    path = save_encoder(folder / 'encoder.pt', encoder.state_dict())
    card = ModelCard(
        method='random', backbone='resnet18', bands=[f'b{i}' for i in range(1, bands + 1)],
        band_indices=list(range(1, bands + 1)), mean=None if mean is None else [mean] * bands,
        std=None if mean is None else [50.0] * bands, patch_size=64,
    )  # fmt: skip
    write_card(path, card)
    return path


@pytest.fixture(scope='module')
def encoder3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_encoder(tmp_path_factory.mktemp('encoder3'), 3)


@pytest.fixture(scope='module')
def encoder4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_encoder(tmp_path_factory.mktemp('encoder4'), 4)


@pytest.fixture
def scene_pair(make_geotiff) -> tuple[Path, Path]:
    """A 3-band pair with a bright 16 x 16 px square added in the after image."""
    rng = np.random.default_rng(0)
    before = rng.integers(60, 90, (3, 64, 80)).astype(np.uint8)
    after = before.copy()
    after[:, 20:36, 30:46] = 250
    transform = from_origin(500000.0, 4000000.0, 2.0, 2.0)
    return (
        make_geotiff('before.tif', before, transform=transform, nodata=0),
        make_geotiff('after.tif', after, transform=transform, nodata=0),
    )


def test_otsu_matches_a_brute_force_search() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.2, 0.05, 700), rng.normal(0.7, 0.08, 300)]).clip(0, 1)
    counts, edges = np.histogram(values, bins=64, range=(0, 1))
    threshold = otsu_threshold(counts, edges)
    # Reference: try every bin edge, minimising the weighted within-class variance of the
    # bin centres (equivalent to maximising the between-class variance).
    centres = (edges[:-1] + edges[1:]) / 2
    best, best_cut = np.inf, None
    for cut in range(1, len(counts)):
        low, high = counts[:cut], counts[cut:]
        if low.sum() == 0 or high.sum() == 0:
            continue
        within = 0.0
        for part, x in ((low, centres[:cut]), (high, centres[cut:])):
            mean = (part * x).sum() / part.sum()
            within += (part * (x - mean) ** 2).sum()
        if within < best - 1e-12:
            best, best_cut = within, cut
    assert threshold == pytest.approx(edges[best_cut])
    assert 0.35 < threshold < 0.55
    single = np.zeros(8, np.int64)
    single[3] = 5
    assert otsu_threshold(single, np.linspace(0, 1, 9)) == pytest.approx(0.5)


def test_stage_distances_are_zero_for_identical_dates_and_grow_with_change() -> None:
    torch.manual_seed(0)
    encoder = timm.create_model('resnet18', in_chans=2, num_classes=0).eval()
    image = torch.randn(1, 2, 64, 64)
    changed = image.clone()
    changed[..., 16:48, 16:48] += 3.0
    valid = np.ones((64, 64), bool)

    def scorer(after: torch.Tensor) -> LabelFreeScore:
        pixels = np.concatenate([image[0].numpy(), after[0].numpy()])
        return LabelFreeScore(fit_scores('features', [(pixels, valid)], encoder), encoder)

    with torch.no_grad():
        same = scorer(image).stage_distances(image, image)
        stages = scorer(changed).stage_distances(image, changed)
    assert len(stages) == 3 and all(s.shape == (1, 1, 64, 64) for s in stages)
    assert max(float(s.abs().max()) for s in same) < 1e-5
    for stage in stages:
        assert stage[..., 24:40, 24:40].mean() > stage[..., :4, :4].mean()


def test_stacked_pair_splits_the_channels_into_dates() -> None:
    seen = []
    network = StackedPair(lambda pairs: seen.append(pairs) or pairs[:, 1, :1] - pairs[:, 0, :1])
    stacked = torch.arange(2 * 6 * 2 * 2, dtype=torch.float32).reshape(2, 6, 2, 2)
    out = network(stacked)
    assert seen[0].shape == (2, 2, 3, 2, 2)
    torch.testing.assert_close(seen[0][:, 1], stacked[:, 3:])
    torch.testing.assert_close(out, stacked[:, 3:4] - stacked[:, :1])


def test_pair_source_stacks_normalised_dates_with_union_validity(scene_pair) -> None:
    before, after = scene_pair
    with rasterio.open(after, 'r+') as dst:
        data = dst.read()
        data[:, 5, 7] = 0  # nodata in the after image only
        dst.write(data)
    with align_pair(before, after) as pair:
        source = PairSource(pair, (3, 1), np.array([10.0, 20.0]), np.array([2.0, 4.0]))
        image, valid = source.read(Window(0, 0, 40, 30), (48, 48))
        a, b, _ = pair.read(Window(0, 0, 40, 30), indexes=(3, 1))
    assert image.shape == (4, 48, 48) and valid.shape == (48, 48)
    assert not valid[5, 7] and valid[:30, :40].sum() == 30 * 40 - 1 and not valid[30:].any()
    inside = valid[:30, :40]
    np.testing.assert_allclose(image[0, :30, :40][inside], ((a[0] - 10.0) / 2.0)[inside])
    np.testing.assert_allclose(image[3, 10, 10], (b[1, 10, 10] - 20.0) / 4.0)
    assert (image[:, 5, 7] == 0).all() and (image[:, 30:] == 0).all()


# Whole pairs --------------------------------------------------------------------------------


def test_label_free_change_on_a_real_naip_pair(tmp_path: Path, encoder4: Path) -> None:
    model = ChangeModel.from_encoder(encoder4)
    result = detect_change(
        NAIP / 'naip_2012.tif', NAIP / 'naip_2016.tif', model, vector=tmp_path / 'change.gpkg',
        raster=tmp_path / 'change.tif', probabilities=tmp_path / 'score.tif', progress=False,
    )  # fmt: skip
    assert result.method == 'fusion' and result.threshold_rule == 'ki'
    with rasterio.open(NAIP / 'naip_2012.tif') as src:
        grid = (src.crs, src.transform, src.width, src.height)
    for path in (result.raster, result.probabilities):
        assert validate_cog(path) == []
        with rasterio.open(path) as out:
            assert (out.crs, out.transform, out.width, out.height) == grid
            assert out.tags()['MODEL_KIND'] == 'label-free fusion'
            assert out.tags()['THRESHOLD_RULE'] == 'ki'
            assert float(out.tags()['THRESHOLD']) == pytest.approx(result.threshold, rel=1e-5)
    with rasterio.open(result.probabilities) as out:
        # The score COG carries the score the threshold was applied to, unquantised.
        assert out.dtypes[0] == 'float32' and np.isnan(out.nodata)
        scores = out.read(1)
    with rasterio.open(result.raster) as out:
        labels = out.read(1)
    assert set(np.unique(labels)) <= {0, 1, 255} and (labels == 1).any() and (labels == 0).any()
    np.testing.assert_array_equal(labels == 1, scores >= result.threshold)
    layer = gpd.read_file(result.vector, layer='changes')
    assert layer.crs == rasterio.open(NAIP / 'naip_2012.tif').crs
    assert len(layer) == len(result.polygons) > 0
    assert layer.geometry.is_valid.all() and (layer.class_name == 'change').all()
    assert (layer.mean_score >= result.threshold - 1e-6).all()
    assert result.changed_area_m2 == pytest.approx(25.0 * (labels == 1).sum())


def test_band_rule_is_the_one_segment_follows(tmp_path: Path, encoder3: Path) -> None:
    """An RGB encoder on RGBN images: refused unless --bands picks three bands."""
    model = ChangeModel.from_encoder(encoder3)
    before, after = NAIP / 'naip_2012.tif', NAIP / 'naip_2016.tif'
    with pytest.raises(InputError, match='has 4 band.*pick them with --bands'):
        detect_change(before, after, model, vector=tmp_path / 'a.gpkg', progress=False)
    assert not (tmp_path / 'a.gpkg').exists()
    result = detect_change(
        before, after, model, vector=tmp_path / 'b.gpkg', bands=[1, 2, 3], progress=False
    )
    assert result.vector is not None and result.vector.exists()


def test_trained_model_with_partial_overlap_writes_the_before_grid(
    make_geotiff, tmp_path: Path
) -> None:
    grid = from_origin(0, 400, 2, 2)
    before = make_geotiff('a.tif', np.full((3, 40, 40), 50, np.uint8), transform=grid)
    after_data = np.full((3, 20, 40), 50, np.uint8)
    after_data[:, 5:15, 10:20] = 200
    after = make_geotiff('b.tif', after_data, transform=from_origin(0, 380, 2, 2))  # rows 10-29
    change = torch.nn.Conv2d(3, 1, 1)  # logit: 10 x (after - before) summed over bands, - 1
    with torch.no_grad():
        change.weight.fill_(10.0)
        change.bias.fill_(-1.0)

    class Difference(torch.nn.Module):
        def forward(self, pairs: torch.Tensor) -> torch.Tensor:
            return change(pairs[:, 1] - pairs[:, 0])

    card = ModelCard(
        method='supervised', backbone='resnet18', bands=['r', 'g', 'b'], band_indices=[1, 2, 3],
        mean=[0.0] * 3, std=[255.0] * 3, task='change', tile_size=16,
    )  # fmt: skip
    weights = tmp_path / 'model.ckpt'
    weights.write_bytes(b'weights')
    model = ChangeModel(StackedPair(Difference()), card, weights, label_free=False)
    result = detect_change(
        before, after, model, vector=tmp_path / 'c.gpkg', raster=tmp_path / 'c.tif',
        probabilities=tmp_path / 's.tif', probability_dtype='float32', progress=False,
    )  # fmt: skip
    assert result.threshold == 0.5
    with rasterio.open(tmp_path / 'c.tif') as out:
        assert (out.width, out.height, out.transform) == (40, 40, from_origin(0, 400, 2, 2))
        labels = out.read(1)
    expected = np.full((40, 40), 255, np.uint8)
    expected[10:30] = 0
    expected[15:25, 10:20] = 1
    np.testing.assert_array_equal(labels, expected)
    with rasterio.open(tmp_path / 's.tif') as out:
        scores = out.read(1)
        assert out.tags()['MODEL_SHA256'] and out.descriptions == ('change',)
    assert np.isnan(scores[:10]).all() and np.isnan(scores[30:]).all()
    changed = 1 / (1 + np.exp(1 - 10 * 3 * 150 / 255))
    np.testing.assert_allclose(scores[15:25, 10:20], changed, rtol=1e-5)
    np.testing.assert_allclose(scores[10:15], 1 / (1 + np.exp(1)), rtol=1e-5)
    (polygon,) = result.polygons.geometry
    assert polygon.equals(shapely.box(20, 350, 40, 370))
    assert result.polygons.area_m2.tolist() == [400.0]


def test_change_errors_create_no_output(
    make_geotiff, scene_pair, encoder3: Path, encoder4: Path, tmp_path: Path
) -> None:
    before, after = scene_pair
    four_bands = ChangeModel.from_encoder(encoder4)
    bands = r'before\.tif: has 3 band\(s\) but the model takes 4 \(b1, b2, b3, b4'
    with pytest.raises(InputError, match=bands):
        detect_change(before, after, four_bands, vector=tmp_path / 'x.gpkg', progress=False)
    model = ChangeModel.from_encoder(encoder3)
    (tmp_path / 'exists.gpkg').write_text('')
    with pytest.raises(InputError, match=r'exists\.gpkg: exists; use --overwrite'):
        detect_change(before, after, model, vector=tmp_path / 'exists.gpkg', raster=tmp_path / 'r')
    with pytest.raises(InputError, match='--threshold'):
        detect_change(before, after, model, threshold='median')  # type: ignore[arg-type]
    with rasterio.open(before) as src:
        grid = src.transform
    empty = make_geotiff('empty.tif', np.zeros((3, 64, 80), np.uint8), transform=grid, nodata=0)
    with pytest.raises(InputError, match=r'empty\.tif and .*after\.tif: no valid pixel'):
        detect_change(empty, after, model, vector=tmp_path / 'x.gpkg', progress=False)
    inputs = ['after.tif', 'before.tif', 'empty.tif']
    assert sorted(p.name for p in tmp_path.iterdir()) == [*inputs, 'exists.gpkg']


def test_normalisation_falls_back_to_the_pair_statistics(scene_pair, tmp_path: Path) -> None:
    before, after = scene_pair
    model = ChangeModel.from_encoder(write_encoder(tmp_path, 3, mean=None))
    result = detect_change(before, after, model, threshold=0.3, progress=False)
    assert result.threshold == 0.3 and result.vector is None


# Python API and CLI -----------------------------------------------------------------------------


def test_detect_changes_over_several_pairs(scene_pair, encoder3: Path, tmp_path: Path) -> None:
    before, after = scene_pair
    results = geocmid.api.detect_changes(
        [(before, after), (after, before)], encoder=encoder3, out_dir=tmp_path / 'out',
        raster=True, threshold=0.05, progress=False,
    )  # fmt: skip
    assert list(results) == ['before_after', 'after_before']
    for name, result in results.items():
        assert result.vector == tmp_path / 'out' / f'{name}.gpkg' and result.vector.exists()
        assert (tmp_path / 'out' / f'{name}_change.tif').exists()
        assert result.changed_area_m2 > 0
    # Feature distances are symmetric: swapping the dates finds the same change.
    assert results['before_after'].changed_area_m2 == results['after_before'].changed_area_m2
    frames = geocmid.api.detect_changes([(before, after)], encoder=encoder3, progress=False)
    assert isinstance(frames['before_after'].polygons, gpd.GeoDataFrame)


def test_detect_changes_skip_existing_resumes(scene_pair, encoder3: Path, tmp_path: Path) -> None:
    before, after = scene_pair
    out = tmp_path / 'out'
    skipped: list[str] = []
    options = dict(
        encoder=encoder3, out_dir=out, raster=True, threshold=0.05, progress=False,
        skip_existing=True, on_skip=skipped.append,
    )  # fmt: skip
    pairs = [(before, after), (after, before)]
    assert list(geocmid.api.detect_changes(pairs, **options)) == ['before_after', 'after_before']
    outputs = sorted(out.glob('*_*.gpkg')) + sorted(out.glob('*_change.tif'))
    assert len(outputs) == 4
    written = {path: path.stat().st_mtime_ns for path in outputs}

    assert geocmid.api.detect_changes(pairs, **options) == {}
    assert skipped == ['before_after', 'after_before']
    assert {path: path.stat().st_mtime_ns for path in outputs} == written

    # A change raster that is no COG (e.g. replaced by hand) makes its pair run again.
    rasterio.open(
        out / 'after_before_change.tif', 'w', driver='GTiff', width=600, height=600, count=1,
        dtype='uint8',
    ).close()  # fmt: skip
    skipped.clear()
    assert list(geocmid.api.detect_changes(pairs, **options)) == ['after_before']
    assert skipped == ['before_after']
    assert validate_cog(out / 'after_before_change.tif') == []
    assert (out / 'before_after.gpkg').stat().st_mtime_ns == written[out / 'before_after.gpkg']

    with pytest.raises(InputError, match='--skip-existing: cannot be combined with --overwrite'):
        geocmid.api.detect_changes(pairs, **options, overwrite=True)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code), out, err


def test_cli_single_pair(scene_pair, encoder3: Path, tmp_path: Path, capsys) -> None:
    before, after = scene_pair
    out = tmp_path / 'out.gpkg'
    code, stdout, _ = run_cli(
        ['change', before, after, '-o', out, '--encoder', encoder3, '--raster', '--probabilities',
         tmp_path / 'p.tif', '--threshold', '0.05', '--quiet'], capsys,
    )  # fmt: skip
    assert code == 0, stdout
    assert out.exists() and (tmp_path / 'out_change.tif').exists() and (tmp_path / 'p.tif').exists()
    assert stdout.startswith('out: ') and 'label-free fusion, threshold 0.05 ->' in stdout
    code, _, err = run_cli(['change', before, after, '-o', out, '--encoder', encoder3], capsys)
    assert code == 2 and err.strip().endswith('out.gpkg: exists; use --overwrite')


def test_cli_pairs_report_bad_pairs_and_finish_the_others(
    make_geotiff, scene_pair, encoder3: Path, tmp_path: Path, capsys
) -> None:
    before, after = scene_pair
    far = make_geotiff('far.tif', np.ones((3, 8, 8), np.uint8), transform=from_origin(0, 100, 2, 2))
    csv = tmp_path / 'pairs.csv'
    csv.write_text(
        f'before,after\n{before},{after}\n{before},missing.tif\n{before},{far}\n{after},{before}\n'
    )
    code, stdout, err = run_cli(
        ['change', '--pairs', csv, '-o', tmp_path / 'out', '--encoder', encoder3, '--quiet'], capsys
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith(f'error: {csv}:3: after file ')
    assert lines[0].endswith('missing.tif not found')
    assert lines[1].startswith(f'error: {csv}:4: ') and 'no overlap with' in lines[1]
    assert lines[2] == f'error: {csv}: 2 of 4 pair(s) failed (see above)'
    written = sorted(p.name for p in (tmp_path / 'out').iterdir())
    assert written == ['after_before.gpkg', 'before_after.gpkg', 'run.parquet']
    assert stdout.count('change polygon(s)') == 2
    code, _, err = run_cli(
        ['change', '--pairs', csv, '-o', tmp_path / 'out2', '--encoder', encoder3, '--fail-fast',
         '--quiet'], capsys,
    )  # fmt: skip
    # Every pair is checked before the first one runs, so nothing is computed at all.
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert list((tmp_path / 'out2').iterdir()) == []


def test_cli_usage_errors(scene_pair, encoder3: Path, tmp_path: Path, capsys) -> None:
    before, after = scene_pair
    csv = tmp_path / 'pairs.csv'
    csv.write_text('first,second\na.tif,b.tif\n')
    args = ['change', '--pairs', csv, '-o', tmp_path / 'o', '--encoder', encoder3]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and 'missing column(s) before, after' in err
    args = ['change', before, '-o', tmp_path / 'o.gpkg', '--encoder', encoder3]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and 'give BEFORE and AFTER, or --pairs' in err
    code, _, err = run_cli(['change', before, after, '-o', tmp_path / 'o.gpkg'], capsys)
    assert code == 2 and 'give exactly one of --model' in err


def test_cli_train_then_detect_with_the_trained_model(make_geotiff, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    rows = ['before,after,label']
    for i in range(2):
        before = rng.integers(0, 100, (3, 48, 48)).astype(np.uint8)
        after, label = before.copy(), np.zeros((1, 48, 48), np.uint8)
        after[:, 10:26, 12:28], label[:, 10:26, 12:28] = 250, 1
        transform = from_origin(600000.0 + 1000 * i, 5000000.0, 1.0, 1.0)
        for name, data in (('a', before), ('b', after), ('gt', label)):
            make_geotiff(f'{name}{i}.tif', data, transform=transform)
        rows.append(f'a{i}.tif,b{i}.tif,gt{i}.tif')
    (tmp_path / 'train.csv').write_text('\n'.join(rows) + '\n')
    code, stdout, err = run_cli(
        ['train', 'change', '--pairs', tmp_path / 'train.csv', '-o', tmp_path / 'run',
         '--backbone', 'resnet18', '--patch-size', '32', '--batch-size', '2', '--max-steps', '2',
         '--val-fraction', '0.5', '--accelerator', 'cpu', '--quiet'], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert 'val F1 (change)' in stdout and (tmp_path / 'run' / 'model.ckpt').exists()
    card = ModelCard.from_json((tmp_path / 'run' / 'model_card.json').read_text())
    assert card.resolution == 1.0 and card.tile_size == 32
    listed = 'before,after,name\na0.tif,b0.tif,first\na1.tif,b1.tif,second\n'
    (tmp_path / 'detect.csv').write_text(listed)
    code, stdout, err = run_cli(
        ['change', '--pairs', tmp_path / 'detect.csv', '-o', tmp_path / 'out', '--model',
         tmp_path / 'run', '--raster', '--quiet'], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert 'threshold 0.5' in stdout
    names = sorted(p.name for p in (tmp_path / 'out').iterdir())
    assert names == [
        'first.gpkg', 'first_change.tif', 'first_change.tif.aux.xml',  # class names for GIS
        'run.parquet', 'second.gpkg', 'second_change.tif', 'second_change.tif.aux.xml',
    ]  # fmt: skip
    with rasterio.open(tmp_path / 'out' / 'second_change.tif') as out:
        assert out.transform == from_origin(601000.0, 5000000.0, 1.0, 1.0)
        assert out.tags()['MODEL_KIND'] == 'trained'
    code, _, err = run_cli(
        ['change', tmp_path / 'a0.tif', tmp_path / 'b0.tif', '-o', tmp_path / 'x.gpkg', '--model',
         tmp_path / 'run', '--encoder', tmp_path / 'run'], capsys,
    )  # fmt: skip
    assert code == 2 and 'give exactly one of --model' in err
