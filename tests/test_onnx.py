"""ONNX export and inference: the card inside the file, agreement with torch, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import rasterio
import torch
from conftest import SAMPLE_DATA
from PIL import Image

from geocmid.errors import InputError
from geocmid.inference.onnx_model import OnnxNetwork, load_model, read_onnx_card
from geocmid.inference.products.change import detect_change
from geocmid.inference.products.classify import classify_folder
from geocmid.inference.products.segment import segment_scene
from geocmid.io.cards import CHANGE_CLASSES, ClassInfo, ModelCard, read_card, write_card
from geocmid.models.networks import (
    change_network,
    classification_network,
    segmentation_network,
)
from geocmid.models.weights import load_encoder, save_encoder, sha256_file
from geocmid.runs.export import (
    CARD_KEY,
    MULTIPLE_KEY,
    TASK_KEY,
    VERSION_KEY,
    WEIGHTS_KEY,
    export_onnx,
    read_metadata,
)
from geocmid.runs.segmentation import SegmentConfig, train_segmentation
from geocmid_cli.main import main

SPACENET = SAMPLE_DATA / 'spacenet' / 'buildings.tif'
LANDSAT = SAMPLE_DATA / 'landsat' / 'RGB.byte.tif'
NAIP = SAMPLE_DATA / 'naip'
CLASSES = [ClassInfo('background', (0, 0, 0)), ClassInfo('roof', (230, 25, 75))]


def fake_run(folder: Path, task: str, bands: list[str], patch: int) -> Path:
    """A run folder as `geocmid train` writes it, with random weights (fast to make)."""
    torch.manual_seed(0)
    count = len(bands)
    if task == 'segmentation':
        hparams = {'model': 'unet', 'backbone': 'resnet18', 'in_channels': count, 'num_classes': 2}
        network = segmentation_network('unet', 'resnet18', count, 2)
    elif task == 'change':
        hparams = {'model': 'fcsiamdiff', 'backbone': 'resnet18', 'in_channels': count}
        network = change_network('fcsiamdiff', 'resnet18', count)
    else:
        hparams = {'model': 'resnet18', 'in_channels': count, 'num_classes': 2}
        network = classification_network('resnet18', count, 2)
    folder.mkdir(parents=True)
    state = {f'model.{key}': value for key, value in network.state_dict().items()}
    torch.save({'hyper_parameters': hparams, 'state_dict': state}, folder / 'model.ckpt')
    card = ModelCard(
        method='random', backbone='resnet18', bands=bands, band_indices=list(range(1, count + 1)),
        mean=[90.0] * count, std=[40.0] * count, patch_size=patch, task=task,
        classes=list(CHANGE_CLASSES) if task == 'change' else CLASSES, tile_size=64,
    )  # fmt: skip
    write_card(folder, card)
    return folder


@pytest.fixture(scope='module')
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1-band building model trained for 2 steps on the SpaceNet sample, and its export."""
    root = tmp_path_factory.mktemp('trained')
    config = SegmentConfig(
        rasters=SPACENET, labels=SAMPLE_DATA / 'spacenet' / 'buildings.geojson',
        output=root / 'run', backbone='resnet18', patch_size=64, batch_size=2, max_steps=2,
        val_fraction=0.0, seed=0,
    )  # fmt: skip
    run = train_segmentation(config, progress=False).run_dir
    return run, export_onnx(run, root / 'model.onnx')


@pytest.fixture(scope='module')
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('runs')
    return {
        'segmentation': fake_run(root / 'seg', 'segmentation', ['red', 'green', 'blue'], 64),
        'change': fake_run(root / 'change', 'change', ['red', 'green', 'blue', 'nir'], 64),
        'classification': fake_run(root / 'cls', 'classification', ['r', 'g', 'b'], 16),
    }


def test_card_and_provenance_are_inside_the_file(trained: tuple[Path, Path]) -> None:
    run, path = trained
    proto = onnx.load_model(path)
    onnx.checker.check_model(proto, full_check=True)
    metadata = read_metadata(path)
    assert ModelCard.from_json(metadata[CARD_KEY]) == read_card(run)
    assert metadata[WEIGHTS_KEY] == sha256_file(run / 'model.ckpt')
    assert metadata[TASK_KEY] == 'segmentation'
    assert metadata[VERSION_KEY] and metadata[MULTIPLE_KEY] == '32'
    image = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in image] == ['batch', '', 'height', 'width']
    assert image[1].dim_value == 1
    assert read_onnx_card(OnnxNetwork(path)) == read_card(run)


def test_segment_with_onnx_gives_the_torch_map(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, path = trained
    outputs = {}
    for name, model in (('torch', run), ('onnx', path)):
        outputs[name] = (tmp_path / f'{name}.tif', tmp_path / f'{name}_p.tif')
        segment_scene(
            SPACENET, model, raster=outputs[name][0], probabilities=outputs[name][1],
            probability_dtype='float32', device='cpu', progress=False,
        )  # fmt: skip
    with rasterio.open(outputs['torch'][0]) as a, rasterio.open(outputs['onnx'][0]) as b:
        assert (a.crs, a.transform, a.shape, a.nodata) == (b.crs, b.transform, b.shape, b.nodata)
        labels_a, labels_b = a.read(1), b.read(1)
    valid = labels_a != 255
    assert valid.any() and np.array_equal(valid, labels_b != 255)
    assert (labels_a[valid] == labels_b[valid]).mean() >= 0.999
    with rasterio.open(outputs['torch'][1]) as a, rasterio.open(outputs['onnx'][1]) as b:
        assert (a.crs, a.transform) == (b.crs, b.transform)
        difference = np.abs(a.read(masked=True) - b.read(masked=True))
    assert float(difference.max()) <= 1e-3


def test_change_with_onnx_gives_the_torch_map(runs: dict[str, Path], tmp_path: Path) -> None:
    path = export_onnx(runs['change'], tmp_path / 'change.onnx')
    assert [i.name for i in onnx.load_model(path).graph.input] == ['before', 'after']
    scores = {}
    for name, model in (('torch', runs['change']), ('onnx', path)):
        scores[name] = tmp_path / f'{name}.tif'
        detect_change(
            NAIP / 'naip_2012.tif', NAIP / 'naip_2016.tif', model, probabilities=scores[name],
            probability_dtype='float32', tile=128, device='cpu', progress=False,
        )  # fmt: skip
    with rasterio.open(scores['torch']) as a, rasterio.open(scores['onnx']) as b:
        assert (a.crs, a.transform) == (b.crs, b.transform)
        first, second = a.read(1, masked=True), b.read(1, masked=True)
    assert np.array_equal(first.mask, second.mask)
    assert float(np.abs(first - second).max()) <= 1e-3


def test_classify_with_onnx_gives_the_torch_table(runs: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / 'chips').mkdir(exist_ok=True)
        pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / 'chips' / f'{i}.png')
    path = export_onnx(runs['classification'], tmp_path / 'cls.onnx')
    first = classify_folder(runs['classification'], tmp_path / 'chips', device='cpu')
    second = classify_folder(path, tmp_path / 'chips', device='cpu')
    assert list(first['class']) == list(second['class'])
    assert np.abs(first['p_roof'] - second['p_roof']).max() <= 1e-3
    # Without its card, the file classifies only when --bands and --classes say what it takes.
    bare = tmp_path / 'bare.onnx'
    proto = onnx.load_model(path)
    del proto.metadata_props[:]
    onnx.save_model(proto, bare)
    with pytest.raises(InputError, match='--bands and --classes'):
        classify_folder(bare, tmp_path / 'chips', device='cpu')
    named = classify_folder(
        bare, tmp_path / 'chips', device='cpu', bands=[1, 2, 3], classes=['ground', 'roof']
    )
    assert set(named['class']) <= {'ground', 'roof'} and len(named) == 4
    assert list(named.columns[-2:]) == ['p_ground', 'p_roof']


def test_encoder_export_gives_its_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    import timm

    encoder = timm.create_model('resnet18', in_chans=2, num_classes=0)
    weights = save_encoder(tmp_path / 'encoder.pt', encoder.state_dict())
    write_card(weights, ModelCard('cmid', 'resnet18', ['a', 'b'], [1, 2], patch_size=32))
    path = export_onnx(weights, tmp_path / 'encoder.onnx')
    network, card = load_encoder(weights)
    x = torch.randn(3, 2, 48, 40)
    with torch.no_grad():
        expected = network(x)
    found = OnnxNetwork(path)(x)
    assert found.shape == (3, 512)
    assert torch.allclose(found, expected, atol=1e-4)
    assert read_metadata(path)[TASK_KEY] == 'encoder'


def test_fp16_keeps_float32_inputs_and_the_card(runs: dict[str, Path], tmp_path: Path) -> None:
    path = export_onnx(runs['classification'], tmp_path / 'half.onnx', fp16=True)
    proto = onnx.load_model(path)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    loaded = load_model(path, 'classification')
    assert loaded.card == read_card(runs['classification'])
    x = torch.randn(2, 3, 16, 16)
    reference = load_model(runs['classification'], 'classification').network
    with torch.no_grad():
        assert torch.allclose(loaded.network(x), reference(x), atol=0.05)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return int(exit_info.value.code), capsys.readouterr().err


def test_cli_export_then_segment(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / 'seg.onnx'
    assert run_cli(['export', runs['segmentation'], '-o', path], capsys)[0] == 0
    code, err = run_cli(['export', runs['segmentation'], '-o', path], capsys)
    assert code == 2 and err.count('\n') == 1 and 'exists; use --overwrite' in err
    code, _ = run_cli(
        ['segment', LANDSAT, '--model', path, '-o', tmp_path / 'a.gpkg', '--raster', '--quiet'],
        capsys,
    )
    assert code == 0
    with rasterio.open(tmp_path / 'a.tif') as out, rasterio.open(LANDSAT) as scene:
        assert (out.crs, out.transform, out.shape) == (scene.crs, scene.transform, scene.shape)


def test_bad_onnx_files_are_one_line_errors(
    runs: dict[str, Path], trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    corrupt = tmp_path / 'corrupt.onnx'
    corrupt.write_bytes(b'\x08\x07not a model at all' * 50)
    bare = tmp_path / 'bare.onnx'
    proto = onnx.load_model(trained[1])
    del proto.metadata_props[:]
    onnx.save_model(proto, bare)
    cases = {
        corrupt: f'{corrupt}: is not a readable ONNX model',
        bare: f'{bare}: holds no geocmid model card',
        tmp_path / 'missing.onnx': 'missing.onnx: no such file',
        trained[1]: f'{LANDSAT}: has 3 band(s) but the model takes 1',  # the card's bands
    }
    for model, message in cases.items():
        output = tmp_path / f'{model.stem}.gpkg'
        code, err = run_cli(['segment', LANDSAT, '--model', model, '-o', output], capsys)
        assert code == 2 and err.count('\n') == 1 and message in err, err
        assert not output.exists()
    with pytest.raises(InputError, match='--bands and --classes'):
        load_model(bare, 'segmentation')
    with pytest.raises(InputError, match='not a change model'):
        load_model(trained[1], 'change')


def test_export_refuses_a_run_without_its_model(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = fake_run(tmp_path / 'missing', 'segmentation', ['a', 'b', 'c'], 32)
    (missing / 'model.ckpt').unlink()
    other = fake_run(tmp_path / 'other', 'segmentation', ['a', 'b', 'c'], 32)
    (other / 'model.ckpt').write_bytes((runs['change'] / 'model.ckpt').read_bytes())
    for run, message in ((missing, 'no model.ckpt'), (other, 'does not hold a segmentation')):
        output = tmp_path / f'{run.name}.onnx'
        code, err = run_cli(['export', run, '-o', output], capsys)
        assert code == 2 and err.count('\n') == 1 and message in err, err
        assert not output.exists() and not list(tmp_path.glob('.*partial*'))


def test_bad_tta_is_a_usage_error(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (
        ['segment', LANDSAT, '--model', runs['segmentation'], '-o', tmp_path / 'a.gpkg'],
        ['change', NAIP / 'naip_2012.tif', NAIP / 'naip_2016.tif', '--model', runs['change'],
         '-o', tmp_path / 'b.gpkg'],
        ['classify', tmp_path, '--model', runs['classification'], '-o', tmp_path / 'c.csv'],
    ):  # fmt: skip
        code, err = run_cli([*command, '--tta', 'bogus'], capsys)
        assert code == 2 and err.count('\n') == 1 and "'bogus' is not one of" in err, err
    assert not list(tmp_path.iterdir())


def test_a_file_without_card_needs_bands_and_classes(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / 'bare.onnx'
    proto = onnx.load_model(trained[1])
    del proto.metadata_props[:]
    onnx.save_model(proto, bare)
    command = [
        'segment',
        SPACENET,
        '--model',
        bare,
        '-o',
        tmp_path / 'a.gpkg',
        '--raster',
        '--quiet',
    ]
    code, err = run_cli([*command, '--bands', '1'], capsys)
    assert code == 2 and err.count('\n') == 1 and err.endswith('or give --classes\n'), err
    code, err = run_cli([*command, '--bands', '1', '--classes', 'background,building'], capsys)
    assert code == 0, err
    with rasterio.open(tmp_path / 'a.tif') as out, rasterio.open(SPACENET) as scene:
        assert (out.crs, out.transform, out.shape) == (scene.crs, scene.transform, scene.shape)
    with pytest.raises(InputError, match='or give --bands$'):
        load_model(bare, 'change')
