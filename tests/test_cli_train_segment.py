"""`geocmid train segment`: run folder, model card, model loading and every bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
import timm
import torch
import yaml

from geocmid.errors import InputError
from geocmid.io.cards import ModelCard, read_card, write_card
from geocmid.io.cog import default_classes
from geocmid.models.weights import save_encoder
from geocmid.runs.artefacts import load_segmentation_model
from geocmid.runs.finetune import RUN_OUTPUTS
from geocmid.runs.folders import prepare_run_dir
from geocmid.runs.segmentation import parse_classes
from geocmid_cli.main import main

X0, Y0 = 500000.0, 4000000.0  # upper-left corner of conftest's rasters (1 m pixels)


def run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return int(exit_info.value.code)


@pytest.fixture
def scene(make_geotiff, tmp_path: Path) -> tuple[Path, Path]:
    """A 2-band 128 px scene with bright roofs and pools, and their polygons."""
    rng = np.random.default_rng(0)
    image = rng.integers(50, 60, size=(2, 128, 128)).astype(np.uint16)
    polygons, kinds = [], []
    for k, (row, col) in enumerate([(8, 8), (8, 80), (70, 20), (72, 90), (40, 50)]):
        image[:, row : row + 24, col : col + 24] += 200 if k % 2 else 100
        polygons.append(shapely.box(X0 + col, Y0 - row - 24, X0 + col + 24, Y0 - row))
        kinds.append('pool' if k % 2 else 'roof')
    raster = make_geotiff('scene.tif', image)
    labels = tmp_path / 'labels.gpkg'
    gpd.GeoDataFrame({'kind': kinds}, geometry=polygons, crs='EPSG:32631').to_file(labels)
    return raster, labels


@pytest.fixture
def encoder(tmp_path: Path) -> Path:
    """A 2-band resnet18 encoder.pt with its model card, as `geocmid pretrain` writes them."""
    torch.manual_seed(1)
    weights = timm.create_model('resnet18', in_chans=2, num_classes=0).state_dict()
    (tmp_path / 'encoder').mkdir()
    path = save_encoder(tmp_path / 'encoder' / 'encoder.pt', weights)
    card = ModelCard(
        method='cmid',
        backbone='resnet18',
        bands=['b1', 'b2'],
        band_indices=[1, 2],
        mean=[55.0, 56.0],
        std=[40.0, 41.0],
        patch_size=32,
    )
    write_card(path, card)
    return path


def common(raster: Path, labels: Path, output: Path) -> list[str]:
    return [
        'train',
        'segment',
        '--rasters',
        raster,
        '--labels',
        labels,
        '-o',
        output,
        '--label-field',
        'kind',
        '--max-steps',
        '3',
        '--batch-size',
        '2',
        '--quiet',
    ]


def test_writes_model_and_complete_card(scene: tuple[Path, Path], tmp_path: Path) -> None:
    raster, labels = scene
    config = tmp_path / 'run.yaml'
    # From the YAML file: decoder, backbone, patch and block size; --max-steps 3 (CLI) wins
    # over the file's 50.
    config.write_text(
        yaml.safe_dump(
            {
                'decoder': 'fpn',
                'backbone': 'resnet18',
                'patch_size': 32,
                'block_size': 64,
                'max_steps': 50,
                'lr': 0.01,
            }
        )
    )
    output = tmp_path / 'run'

    code = run(
        [
            *common(raster, labels, output),
            '--classes',
            'background,pool:#0000ff,roof',
            '--config',
            config,
        ]
    )

    assert code == 0
    assert {p.name for p in output.iterdir()} == set(RUN_OUTPUTS)
    card = read_card(output)
    assert card.task == 'segmentation'
    assert [(c.name, c.color) for c in card.classes] == [
        ('background', default_classes(3)[0].color),
        ('pool', (0, 0, 255)),
        ('roof', default_classes(3)[2].color),
    ]
    assert card.backbone == 'resnet18' and card.bands == ['band_1', 'band_2']
    assert card.band_indices == [1, 2]
    assert card.tile_size == 32 and card.patch_size == 32 and card.resolution == 1.0
    assert card.config['decoder'] == 'fpn' and card.config['max_steps'] == 3
    assert card.provenance == {'decoder': 'fpn'}  # random initialisation: no encoder
    # Without an encoder, normalisation comes from the data (valid pixels of both bands).
    assert 50 < card.mean[0] < card.mean[1] < 120 and all(s > 1 for s in card.std)
    assert card.data['rasters'] == [str(raster)] and card.data['label_field'] == 'kind'

    model, loaded_card = load_segmentation_model(output)
    assert not model.training
    assert loaded_card == card
    logits = model(torch.zeros(2, 2, 32, 32))
    assert logits.shape == (2, 3, 32, 32)
    checkpoint = torch.load(output / 'model.ckpt', map_location='cpu', weights_only=True)
    assert 'optimizer_states' not in checkpoint  # weights only
    assert checkpoint['hyper_parameters']['model'] == 'fpn'
    metrics = (output / 'logs' / 'version_0' / 'metrics.csv').read_text()
    assert 'val_AverageJaccardIndex' in metrics and 'val_ClasswiseJaccardIndex_pool' in metrics


def test_no_validation_split_trains_past_one_epoch(
    scene: tuple[Path, Path], tmp_path: Path
) -> None:
    raster, labels = scene
    config = tmp_path / 'run.yaml'
    config.write_text(
        yaml.safe_dump(
            {'backbone': 'resnet18', 'patch_size': 32, 'val_fraction': 0, 'samples_per_epoch': 4}
        )
    )
    output = tmp_path / 'run'
    argv = [*common(raster, labels, output), '--config', config]
    argv[argv.index('--max-steps') + 1] = '5'  # 2 patches a step, 4 an epoch: 3 epochs
    assert run(argv) == 0
    assert (output / 'model.ckpt').is_file()


def test_frozen_encoder_round_trip(scene: tuple[Path, Path], encoder: Path, tmp_path: Path) -> None:
    raster, labels = scene
    output = tmp_path / 'run'

    code = run(
        [
            *common(raster, labels, output),
            '--encoder',
            encoder,
            '--freeze-encoder',
            '--patch-size',
            '32',
            '--decoder',
            'unet',
            '--seed',
            '5',
        ]
    )

    assert code == 0
    card = read_card(output)
    encoder_card = read_card(encoder)
    assert card.mean == encoder_card.mean and card.std == encoder_card.std
    assert card.classes[1].name == 'pool' and card.classes[2].name == 'roof'
    provenance = card.provenance['encoder']
    assert provenance['path'] == str(encoder.resolve())
    assert provenance['sha256'] == hashlib.sha256(encoder.read_bytes()).hexdigest()
    assert provenance['card']['method'] == 'cmid'
    # A frozen encoder (weights and BatchNorm statistics) comes back exactly as loaded.
    model, _ = load_segmentation_model(output)
    original = torch.load(encoder, weights_only=True)
    trained = model.encoder.state_dict()
    for key, value in original.items():
        assert torch.equal(trained[f'model.{key}'], value), key


def write_labels(path: Path, box: shapely.Polygon, **columns: list) -> Path:
    gpd.GeoDataFrame(columns, geometry=[box], crs='EPSG:32631').to_file(path)
    return path


@pytest.mark.parametrize('case', ['no_crs', 'encoder_bands', 'no_labels', 'label_field', 'exists'])
def test_bad_input_exits_2(
    case: str, make_geotiff, encoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raster = make_geotiff('scene.tif', np.ones((2, 64, 64), np.uint16))
    labels = write_labels(tmp_path / 'l.gpkg', shapely.box(X0, Y0 - 32, X0 + 32, Y0), kind=['a'])
    output = tmp_path / 'run'
    extra: list = ['--label-field', 'kind']
    match case:
        case 'no_crs':
            raster = make_geotiff('nocrs.tif', np.ones((2, 64, 64), np.uint16), crs=None)
            culprit, problem = raster, 'CRS'
        case 'encoder_bands':
            raster = make_geotiff('three.tif', np.ones((3, 64, 64), np.uint16))
            extra += ['--encoder', encoder]
            culprit, problem = encoder, 'encoder takes 2 band(s) (b1, b2) but the rasters give 3'
        case 'no_labels':
            far = shapely.box(X0 + 1e4, Y0 - 9, X0 + 1e4 + 9, Y0)
            labels = write_labels(tmp_path / 'far.gpkg', far, kind=['a'])
            culprit, problem = raster, 'scene does not intersect any label'
        case 'label_field':
            extra = ['--label-field', 'class']
            culprit, problem = labels, "no field 'class'"
        case 'exists':
            output.mkdir()
            (output / 'notes.txt').write_text('keep me')
            culprit, problem = output, 'use --resume or --overwrite'

    code = run(
        [
            'train',
            'segment',
            '--rasters',
            raster,
            '--labels',
            labels,
            '-o',
            output,
            '--patch-size',
            '32',
            '--quiet',
            *extra,
        ]
    )

    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'error: {culprit}'), err
    assert problem in err[0]
    if case == 'exists':
        assert [p.name for p in output.iterdir()] == ['notes.txt']
    else:
        assert not output.exists()


def test_overwrite_removes_only_run_outputs(tmp_path: Path) -> None:
    run_dir = tmp_path / 'run'
    (run_dir / 'logs' / 'version_0').mkdir(parents=True)
    for name in ('model.ckpt', 'model_card.json', 'config.yaml', 'notes.txt'):
        (run_dir / name).write_text('old')

    prepare_run_dir(run_dir, RUN_OUTPUTS, overwrite=True)

    assert [p.name for p in run_dir.iterdir()] == ['notes.txt']


def test_parse_classes() -> None:
    assert parse_classes(['bg', ' water : #00FF80 ']) == [('bg', None), ('water', (0, 255, 128))]
    for specs, problem in [
        (['bg', 'x:#12345'], 'must be #rrggbb'),
        (['bg', 'bg'], 'duplicate'),
        (['only'], 'at least 2'),
        (['bg', ':#000000'], 'empty class name'),
    ]:
        with pytest.raises(InputError, match=problem):
            parse_classes(specs)
