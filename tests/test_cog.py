"""COG outputs (layout, palette, class names, dtypes, probabilities) and atomic writes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rio_cogeo.cogeo import cog_validate
from torch import Tensor

from geocmid.errors import InputError
from geocmid.inference.engine import predict_scene
from geocmid.io.atomic import atomic_output, partial_path
from geocmid.io.cards import ClassInfo
from geocmid.io.cog import PredictionWriter, default_classes, label_encoding, validate_cog
from geocmid.raster.scene import SceneReader

TRANSFORM = from_origin(500003.37, 3997641.11, 0.3, 0.3)
CLASSES = [
    ClassInfo('background', (0, 0, 0)),
    ClassInfo('water', (0, 0, 255)),
    ClassInfo('crop', (0, 200, 0)),
]


def by_value(batch: Tensor) -> Tensor:
    """Class 1 where band 1 is high, class 2 where it is low, class 0 in between."""
    x = batch[:, :1]
    return torch.cat([torch.zeros_like(x), 4 * (x - 1), 4 * (-x - 1)], dim=1)


def segment(scene: Path, labels: Path, probabilities: Path | None = None, **kwargs: object) -> None:
    with SceneReader(scene, mean=[100], std=[50], bands=[1]) as reader:
        with PredictionWriter(
            reader,
            labels,
            classes=CLASSES,
            probabilities_path=probabilities,
            **kwargs,  # type: ignore[arg-type]
        ) as writer:
            predict_scene(
                reader, by_value, writer, num_classes=3, tile=64, batch_size=8, progress=False
            )


@pytest.fixture
def scene(make_geotiff: Callable[..., Path]) -> Path:
    """A 600 x 530 scene (more than 512 px, so overviews are required) with nodata."""
    rows, cols = np.mgrid[0:600, 0:530]
    data = (100 + 90 * np.sin(rows / 40) * np.cos(cols / 30)).astype('uint8')
    data[:30, :] = 0
    return make_geotiff('scene.tif', np.stack([data, data]), transform=TRANSFORM, nodata=0)


def test_labels_and_probabilities_are_valid_cogs(scene: Path, tmp_path: Path) -> None:
    labels, probabilities = tmp_path / 'labels.tif', tmp_path / 'probabilities.tif'
    segment(scene, labels, probabilities, tags={'MODEL': 'test-model'})
    assert validate_cog(labels) == []
    assert validate_cog(probabilities) == []
    with rasterio.open(labels) as out:
        assert out.overviews(1) and out.block_shapes == [(512, 512)]
        assert out.compression.name == 'deflate'
        assert out.tags(ns='IMAGE_STRUCTURE')['OVERVIEW_RESAMPLING'] in ('MODE', 'NEAREST')
    with rasterio.open(probabilities) as out:
        assert out.tags(ns='IMAGE_STRUCTURE')['OVERVIEW_RESAMPLING'] == 'AVERAGE'
    # Nothing left behind but the outputs and the label sidecar.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'labels.tif',
        'labels.tif.aux.xml',
        'probabilities.tif',
        'scene.tif',
    ]


def test_validate_cog_reports_plain_geotiffs(
    scene: Path, make_geotiff: Callable[..., Path]
) -> None:
    tiled = make_geotiff('tiled.tif', np.ones((1, 600, 600), 'uint8'), tiled=True)
    errors = validate_cog(tiled)
    assert 'GDAL does not report LAYOUT=COG' in errors
    assert any('include internal overviews' in error for error in errors)
    assert validate_cog(scene)  # a striped input is no COG either


def test_validate_cog_is_rio_cogeo_plus_the_cog_layout(
    tmp_path: Path, make_geotiff: Callable[..., Path]
) -> None:
    """rio-cogeo judges the structure; a small plain GeoTIFF passes it but is no COG output."""
    data = np.arange(600 * 700, dtype=np.uint32).reshape(1, 600, 700) % 251
    cog = tmp_path / 'cog.tif'
    with rasterio.open(
        cog, 'w', driver='COG', width=700, height=600, count=1, dtype='uint8',
        crs='EPSG:32633', transform=TRANSFORM, blocksize=256,
    ) as dst:  # fmt: skip
        dst.write(data.astype('uint8'))
    assert cog_validate(cog, strict=True, quiet=True)[0] and validate_cog(cog) == []
    small = make_geotiff(
        'small.tif', data[:, :256, :256].astype('uint8'), tiled=True, blocksize=128
    )
    assert cog_validate(small, strict=True, quiet=True)[0]
    assert validate_cog(small) == ['GDAL does not report LAYOUT=COG']
    late = make_geotiff('late.tif', data[:, :, :600].astype('uint8'), tiled=True)
    with rasterio.open(late, 'r+') as dst:
        dst.build_overviews([2, 4], Resampling.average)  # overviews written after the data
    problems = validate_cog(late)
    assert not cog_validate(late, strict=True, quiet=True)[0]
    assert any('overview' in problem for problem in problems)


def test_label_palette_names_and_nodata(scene: Path, tmp_path: Path) -> None:
    labels = tmp_path / 'labels.tif'
    segment(scene, labels, tags={'MODEL': 'test-model'})
    with rasterio.open(labels) as out, rasterio.open(scene) as src:
        assert out.dtypes == ('uint8',) and out.nodata == 255
        colormap = out.colormap(1)
        assert [colormap[i] for i in range(3)] == [(*c.color, 255) for c in CLASSES]
        assert colormap[255][3] == 0  # nodata is transparent
        assert json.loads(out.tags()['CLASS_NAMES']) == ['background', 'water', 'crop']
        assert out.tags()['MODEL'] == 'test-model'
        assert out.descriptions == ('class_id',)
        result, valid = out.read(1), src.read(1) != 0
    assert np.array_equal(result == 255, ~valid)
    assert set(np.unique(result[valid])) == {0, 1, 2}
    band = ET.parse(f'{labels}.aux.xml').getroot().find('PAMRasterBand')
    assert [c.text for c in band.find('CategoryNames')] == ['background', 'water', 'crop']
    rows = band.find('GDALRasterAttributeTable').findall('Row')
    assert [[f.text for f in row] for row in rows][1] == ['1', 'water', '0', '0', '255', '255']


def test_probabilities_are_quantised_with_scale(scene: Path, tmp_path: Path) -> None:
    labels, probabilities = tmp_path / 'labels.tif', tmp_path / 'probabilities.tif'
    segment(scene, labels, probabilities)
    with (
        rasterio.open(probabilities) as out,
        rasterio.open(labels) as lab,
        rasterio.open(scene) as src,
    ):
        assert out.count == 3 and out.dtypes == ('uint8',) * 3 and out.nodata == 255
        assert out.descriptions == ('background', 'water', 'crop')
        assert out.scales == (1 / 254,) * 3
        values, label, valid = out.read(), lab.read(1), src.read(1) != 0
        x = (src.read(1).astype(np.float64) - 100) / 50
    assert (values[:, ~valid] == 255).all() and (values[:, valid] <= 254).all()
    logits = np.stack([np.zeros_like(x), 4 * (x - 1), 4 * (-x - 1)])
    expected = np.exp(logits) / np.exp(logits).sum(axis=0)
    assert np.abs(values[:, valid] / 254 - expected[:, valid]).max() <= 0.5 / 254 + 1e-5
    assert np.array_equal(label[valid], values[:, valid].argmax(axis=0)) or (
        (label[valid] != values[:, valid].argmax(axis=0)).mean() < 1e-3  # quantisation ties
    )


def test_float32_probabilities_use_nan(scene: Path, tmp_path: Path) -> None:
    labels, probabilities = tmp_path / 'labels.tif', tmp_path / 'probabilities.tif'
    segment(scene, labels, probabilities, probability_dtype='float32')
    assert validate_cog(probabilities) == []
    with rasterio.open(probabilities) as out, rasterio.open(scene) as src:
        values, valid = out.read(), src.read(1) != 0
        assert out.dtypes == ('float32',) * 3 and np.isnan(out.nodata)
    assert np.isnan(values[:, ~valid]).all()
    np.testing.assert_allclose(values[:, valid].sum(axis=0), 1.0, atol=1e-5)


def test_binary_model_writes_two_classes(make_geotiff: Callable[..., Path], tmp_path: Path) -> None:
    data = np.zeros((1, 40, 40), 'uint8')
    data[:, :, 20:] = 200
    scene = make_geotiff('scene.tif', data, transform=TRANSFORM)
    labels, probabilities = tmp_path / 'labels.tif', tmp_path / 'p.tif'
    classes = [ClassInfo('unchanged', (0, 0, 0)), ClassInfo('changed', (255, 0, 0))]
    with SceneReader(scene, mean=[100], std=[10]) as reader:
        with PredictionWriter(
            reader, labels, classes=classes, probabilities_path=probabilities
        ) as writer:
            predict_scene(reader, lambda b: b, writer, num_classes=1, tile=16, progress=False)
    with rasterio.open(labels) as out, rasterio.open(probabilities) as p:
        assert (out.read(1)[:, :20] == 0).all() and (out.read(1)[:, 20:] == 1).all()
        assert p.count == 1 and p.descriptions == ('changed',)


def test_label_dtype_widens_beyond_255_classes() -> None:
    assert label_encoding(2) == ('uint8', 255)
    assert label_encoding(255) == ('uint8', 255)
    assert label_encoding(256) == ('uint16', 65535)
    with pytest.raises(InputError, match='do not fit'):
        label_encoding(70000)


def test_uint16_labels_are_valid_cogs(make_geotiff: Callable[..., Path], tmp_path: Path) -> None:
    scene = make_geotiff('scene.tif', np.ones((1, 24, 24), 'uint8'), transform=TRANSFORM)
    labels = tmp_path / 'labels.tif'

    def model(batch: Tensor) -> Tensor:
        logits = torch.zeros(batch.shape[0], 300, *batch.shape[2:])
        logits[:, 299] = 1.0
        return logits

    with (
        SceneReader(scene) as reader,
        PredictionWriter(reader, labels, classes=default_classes(300)) as writer,
    ):
        predict_scene(reader, model, writer, num_classes=300, tile=16, progress=False)
    assert validate_cog(labels) == []
    with rasterio.open(labels) as out:
        assert out.dtypes == ('uint16',) and out.nodata == 65535
        assert (out.read(1) == 299).all()
        assert out.colormap(1)[299] == (*default_classes(300)[299].color, 255)


def test_existing_output_is_refused_before_any_work(scene: Path, tmp_path: Path) -> None:
    labels = tmp_path / 'labels.tif'
    labels.write_bytes(b'old')
    with SceneReader(scene) as reader:
        with pytest.raises(InputError, match='labels.tif: exists; use --overwrite'):
            PredictionWriter(reader, labels, classes=CLASSES)
    assert labels.read_bytes() == b'old'
    segment(scene, labels, overwrite=True)
    assert validate_cog(labels) == []


def test_failure_during_inference_leaves_nothing(scene: Path, tmp_path: Path) -> None:
    labels, probabilities = tmp_path / 'labels.tif', tmp_path / 'probabilities.tif'
    calls = []

    def failing(batch: Tensor) -> Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError('out of memory')
        return by_value(batch)

    with pytest.raises(RuntimeError, match='out of memory'):
        with SceneReader(scene, mean=[100], std=[50], bands=[1]) as reader:
            with PredictionWriter(
                reader, labels, classes=CLASSES, probabilities_path=probabilities
            ) as writer:
                predict_scene(
                    reader, failing, writer, num_classes=3, tile=64, batch_size=4, progress=False
                )
    assert sorted(p.name for p in tmp_path.iterdir()) == ['scene.tif']


# Atomic outputs -------------------------------------------------------------------------------


def test_atomic_output_renames_on_success(tmp_path: Path) -> None:
    target = tmp_path / 'out.txt'
    with atomic_output(target) as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith('.')
        temporary.write_text('new')
        assert not target.exists()
    assert target.read_text() == 'new' and not temporary.exists()


def test_atomic_output_removes_everything_on_error(tmp_path: Path) -> None:
    target = tmp_path / 'out.tif'
    with pytest.raises(KeyError):
        with atomic_output(target) as temporary:
            temporary.write_text('partial')
            Path(f'{temporary}.aux.xml').write_text('<PAMDataset/>')
            raise KeyError('boom')
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_moves_sidecars_and_replaces_leftovers(tmp_path: Path) -> None:
    target = tmp_path / 'out.tif'
    partial_path(target).write_text('left by a killed run')
    with atomic_output(target) as temporary:
        assert not temporary.exists()
        temporary.write_text('raster')
        Path(f'{temporary}.aux.xml').write_text('sidecar')
    assert target.read_text() == 'raster'
    assert Path(f'{target}.aux.xml').read_text() == 'sidecar'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.tif', 'out.tif.aux.xml']


def test_atomic_output_refuses_existing_and_unwritable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / 'out.txt'
    target.write_text('old')
    with pytest.raises(InputError, match=r'out.txt: exists; use --overwrite'):
        with atomic_output(target):
            pass
    with atomic_output(target, overwrite=True) as temporary:
        temporary.write_text('new')
    assert target.read_text() == 'new'
    with pytest.raises(InputError, match='does not exist'):
        with atomic_output(tmp_path / 'missing' / 'out.txt'):
            pass
    (tmp_path / 'plain').write_text('a file, not a folder')
    with pytest.raises(InputError, match='plain is a file, not a folder'):
        with atomic_output(tmp_path / 'plain' / 'other.txt'):
            pass


def test_reruns_are_bit_identical_and_replace_leftovers(scene: Path, tmp_path: Path) -> None:
    first, second = tmp_path / 'first', tmp_path / 'second'
    first.mkdir()
    second.mkdir()
    segment(scene, first / 'labels.tif', first / 'p.tif')
    # What a killed run leaves behind: hidden partial and stream files.
    for name in ('.labels.partial.tif', '.labels.partial.stream.tif', '.p.partial.stream.tif'):
        (second / name).write_bytes(b'left by a killed run')
    segment(scene, second / 'labels.tif', second / 'p.tif')
    assert sorted(p.name for p in second.iterdir()) == ['labels.tif', 'labels.tif.aux.xml', 'p.tif']
    for name in ('labels.tif', 'labels.tif.aux.xml', 'p.tif'):
        assert (first / name).read_bytes() == (second / name).read_bytes()
