"""Streaming prediction: blending, seams, nodata, memory bound, georeferencing of the outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from torch import Tensor

from geocmid.errors import InputError
from geocmid.inference.engine import predict_scene
from geocmid.inference.tiling import BLENDS
from geocmid.io.cog import PredictionWriter, default_classes, validate_cog
from geocmid.raster.scene import SceneReader

#: A sub-metre grid whose origin float32 cannot hold (500003.375, 3997641.0 in float32).
ORIGIN = (500003.37, 3997641.11)
TRANSFORM = from_origin(*ORIGIN, 0.3, 0.3)


class ArraySink:
    """Collects finished blocks into full-scene arrays (fine for tiny test scenes)."""

    def __init__(self, num_classes: int, height: int, width: int) -> None:
        self.probabilities = np.full((num_classes, height, width), np.nan, dtype=np.float32)
        self.valid = np.zeros((height, width), dtype=bool)
        self.written = np.zeros((height, width), dtype=np.int32)
        self.next_row: dict[int, int] = {}
        self.max_rows = 0

    def write_block(
        self, row_off: int, col_off: int, probabilities: np.ndarray, valid: np.ndarray
    ) -> None:
        assert row_off == self.next_row.get(col_off, 0), 'rows of a strip must arrive in order'
        rows, cols = valid.shape
        self.probabilities[:, row_off : row_off + rows, col_off : col_off + cols] = probabilities
        self.valid[row_off : row_off + rows, col_off : col_off + cols] = valid
        self.written[row_off : row_off + rows, col_off : col_off + cols] += 1
        self.next_row[col_off] = row_off + rows
        self.max_rows = max(self.max_rows, rows)


def run(
    path: Path, model: Callable[[Tensor], Tensor], num_classes: int, **kwargs: object
) -> tuple[ArraySink, object]:
    reader_keys = ('mean', 'std', 'resolution', 'nodata', 'bands')
    reader_args = {k: kwargs.pop(k) for k in reader_keys if k in kwargs}
    with SceneReader(path, **reader_args) as reader:  # type: ignore[arg-type]
        sink = ArraySink(num_classes, reader.height, reader.width)
        stats = predict_scene(
            reader,
            model,
            sink,
            num_classes=num_classes,
            progress=False,
            **kwargs,  # type: ignore[arg-type]
        )
    assert (sink.written == 1).all(), 'every pixel must be handed over exactly once'
    return sink, stats


def constant_model(logits: tuple[float, ...]) -> Callable[[Tensor], Tensor]:
    values = torch.tensor(logits)[None, :, None, None]

    def predict(batch: Tensor) -> Tensor:
        return values.expand(batch.shape[0], -1, *batch.shape[2:]).clone()

    return predict


def pointwise_model(batch: Tensor) -> Tensor:
    """Logits that depend only on the pixel's own value: positions must line up exactly."""
    x = batch[:, :1]
    return torch.cat([x, -x, 0.5 * x], dim=1)


def softmax_np(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


@pytest.mark.parametrize('blend', BLENDS)
def test_constant_model_gives_constant_output(
    make_geotiff: Callable[..., Path], blend: str
) -> None:
    data = np.random.default_rng(0).integers(1, 200, (2, 70, 90)).astype('uint8')
    path = make_geotiff('scene.tif', data, transform=TRANSFORM)
    model = constant_model((0.3, 1.2, -0.5))
    sink, stats = run(path, model, 3, tile=32, overlap=8, blend=blend, batch_size=3)
    expected = softmax_np(np.array([0.3, 1.2, -0.5]))[:, None, None]
    assert sink.valid.all()
    np.testing.assert_allclose(
        sink.probabilities, np.broadcast_to(expected, sink.probabilities.shape), atol=1e-6
    )
    assert stats.predicted == stats.windows == 12  # 3 rows x 4 columns of windows


@pytest.mark.parametrize('blend', BLENDS)
def test_smooth_field_has_no_seam(make_geotiff: Callable[..., Path], blend: str) -> None:
    rows, cols = np.mgrid[0:75, 0:83]
    field = (np.sin(rows / 9.0) + np.cos(cols / 7.0)).astype('float32')
    path = make_geotiff('scene.tif', field, transform=TRANSFORM)
    sink, _ = run(path, pointwise_model, 3, tile=32, overlap=8, blend=blend)
    expected = softmax_np(np.stack([field, -field, 0.5 * field]))
    # Tile borders are at rows/cols 24, 48, ...: any misplaced window or wrong weight shows.
    np.testing.assert_allclose(sink.probabilities, expected, atol=2e-6)


def test_blending_spreads_tile_border_jumps(make_geotiff: Callable[..., Path]) -> None:
    def tile_ramp(batch: Tensor) -> Tensor:  # output varies smoothly inside a tile only
        ramp = torch.linspace(-3, 3, batch.shape[-1]).expand(batch.shape[0], 1, *batch.shape[2:])
        return ramp.clone()

    path = make_geotiff('scene.tif', np.ones((1, 32, 200), 'uint8'), transform=TRANSFORM)
    steps = {}
    for blend in ('none', 'cosine'):
        sink, _ = run(path, tile_ramp, 1, tile=32, overlap=16, blend=blend)
        steps[blend] = np.abs(np.diff(sink.probabilities[0], axis=1)).max()
    assert steps['cosine'] < steps['none'] / 3


def test_results_do_not_depend_on_batch_size(make_geotiff: Callable[..., Path]) -> None:
    data = np.random.default_rng(1).normal(size=(1, 61, 77)).astype('float32')
    path = make_geotiff('scene.tif', data, transform=TRANSFORM)
    first, _ = run(path, pointwise_model, 3, tile=24, overlap=6, batch_size=1)
    second, _ = run(path, pointwise_model, 3, tile=24, overlap=6, batch_size=5)
    assert np.array_equal(first.probabilities, second.probabilities)


def test_accumulator_does_not_grow_with_height(make_geotiff: Callable[..., Path]) -> None:
    shapes, largest = [], []
    for height in (40, 400):
        data = np.ones((1, height, 50), 'uint8')
        path = make_geotiff(f'scene_{height}.tif', data, transform=TRANSFORM)
        sink, stats = run(path, constant_model((0.0, 1.0)), 2, tile=32, overlap=8)
        shapes.append(stats.buffer_shape)
        largest.append(sink.max_rows)
    assert shapes == [(2, 32, 50), (2, 32, 50)]
    assert max(largest) <= 32


def test_nodata_is_skipped_and_stays_nodata(make_geotiff: Callable[..., Path]) -> None:
    data = np.full((2, 64, 96), 50, 'uint16')
    data[:, :40, :40] = 0  # whole windows of nodata at the top left
    data[1, 50, 70] = 0  # one pixel invalid in one band only
    path = make_geotiff('scene.tif', data, transform=TRANSFORM, nodata=0)
    seen = []

    def model(batch: Tensor) -> Tensor:
        seen.append(batch.clone())
        return constant_model((1.0, 0.0))(batch)

    sink, stats = run(path, model, 2, tile=16, overlap=4, mean=[40, 40], std=[10, 10])
    expected_valid = (data != 0).all(axis=0)
    assert np.array_equal(sink.valid, expected_valid)
    # Windows start every 12 px; those at rows and columns 0, 12, 24 lie inside the nodata block.
    assert stats.skipped == 9 and stats.predicted == stats.windows - 9
    images = torch.cat(seen)
    assert len(images) == stats.predicted
    assert (images.flatten(1).ne(0).any(dim=1)).all()  # no all-nodata window reached the model
    assert set(images.unique().tolist()) == {0.0, 1.0}  # valid pixels (50 - 40) / 10, invalid 0


def test_all_nodata_scene_is_an_error(make_geotiff: Callable[..., Path], tmp_path: Path) -> None:
    path = make_geotiff('empty.tif', np.zeros((1, 20, 20), 'uint8'), transform=TRANSFORM, nodata=0)
    out = tmp_path / 'labels.tif'
    with pytest.raises(InputError, match='empty.tif: no valid pixel'):
        with (
            SceneReader(path) as reader,
            PredictionWriter(reader, out, classes=default_classes(2)) as writer,
        ):
            model = constant_model((0.0, 1.0))
            predict_scene(reader, model, writer, num_classes=2, tile=16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['empty.tif']


def test_wrong_model_output_is_an_input_error(make_geotiff: Callable[..., Path]) -> None:
    path = make_geotiff('scene.tif', np.ones((1, 20, 20), 'uint8'), transform=TRANSFORM)
    message = r'model: returned logits of shape \(4, 3, 16, 16\), expected \(4, 2, 16, 16\)'
    with pytest.raises(InputError, match=message):
        run(path, constant_model((0.0, 1.0, 2.0)), 2, tile=16, overlap=4)


def test_bad_options_are_input_errors(make_geotiff: Callable[..., Path]) -> None:
    path = make_geotiff('scene.tif', np.ones((1, 20, 20), 'uint8'), transform=TRANSFORM)
    with pytest.raises(InputError, match="unknown blend 'hann'"):
        run(path, constant_model((0.0, 1.0)), 2, tile=16, blend='hann')
    with pytest.raises(InputError, match=r'overlap must be in \[0, tile\), got 16 for tile 16'):
        run(path, constant_model((0.0, 1.0)), 2, tile=16, overlap=16)


def test_scene_smaller_than_tile_is_padded(make_geotiff: Callable[..., Path]) -> None:
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    shapes = []

    def model(batch: Tensor) -> Tensor:
        shapes.append(tuple(batch.shape))
        return conv(batch)

    data = np.random.default_rng(2).integers(0, 9, (2, 13, 21)).astype('uint8')
    sink, stats = run(make_geotiff('small.tif', data, transform=TRANSFORM), model, 3, tile=32)
    assert shapes == [(1, 2, 32, 32)] and stats.windows == 1
    assert sink.valid.all() and np.isfinite(sink.probabilities).all()


def test_binary_model_uses_sigmoid(make_geotiff: Callable[..., Path]) -> None:
    path = make_geotiff('scene.tif', np.ones((1, 20, 30), 'uint8'), transform=TRANSFORM)
    sink, _ = run(path, constant_model((0.7,)), 1, tile=16, overlap=4)
    np.testing.assert_allclose(sink.probabilities, 1 / (1 + np.exp(-0.7)), atol=1e-6)


def test_outputs_keep_the_exact_float64_grid(
    make_geotiff: Callable[..., Path], tmp_path: Path
) -> None:
    assert float(np.float32(ORIGIN[0])) != ORIGIN[0]  # the test would catch a float32 round trip
    data = np.random.default_rng(3).integers(1, 255, (3, 45, 67)).astype('uint8')
    path = make_geotiff('scene.tif', data, crs='EPSG:32633', transform=TRANSFORM)
    labels, probabilities = tmp_path / 'labels.tif', tmp_path / 'probabilities.tif'
    with (
        SceneReader(path) as reader,
        PredictionWriter(
            reader, labels, classes=default_classes(3), probabilities_path=probabilities
        ) as writer,
    ):
        predict_scene(reader, pointwise_model, writer, num_classes=3, tile=32, progress=False)
    with rasterio.open(path) as src:
        for output in (labels, probabilities):
            with rasterio.open(output) as out:
                assert out.crs == src.crs
                assert out.transform == src.transform  # exact float64 equality
                assert (out.width, out.height) == (src.width, src.height)


def test_model_resolution_is_warped_back_to_the_scene_grid(
    make_geotiff: Callable[..., Path], tmp_path: Path
) -> None:
    rows, cols = np.mgrid[0:60, 0:80]
    data = (cols < 40).astype('uint8')[None] * 100 + 1
    path = make_geotiff('scene.tif', data, transform=from_origin(*ORIGIN, 1.0, 1.0))
    labels = tmp_path / 'labels.tif'
    shapes = []

    def model(batch: Tensor) -> Tensor:
        shapes.append(tuple(batch.shape))
        return torch.cat([-batch, batch], dim=1)

    with SceneReader(path, mean=[50], std=[10], resolution=2.0) as reader:
        assert (reader.height, reader.width) == (30, 40) and reader.warped
        with PredictionWriter(
            reader, labels, classes=default_classes(2), output_grid=reader.scene
        ) as writer:
            predict_scene(reader, model, writer, num_classes=2, tile=16, overlap=4, progress=False)
    # Windows on the 30 x 40 model grid: 3 x 3 of them, in batches of 4.
    assert shapes == [(4, 1, 16, 16), (4, 1, 16, 16), (1, 1, 16, 16)]
    assert validate_cog(labels) == []
    with rasterio.open(labels) as out, rasterio.open(path) as src:
        assert (out.transform, out.shape, out.crs) == (src.transform, src.shape, src.crs)
        assert 'CLASS_NAMES' in out.tags()  # metadata survives the warp back
        assert out.colormap(1)[1][:3] == default_classes(2)[1].color
        result = out.read(1)
    assert (result[:, :38] == 1).all() and (result[:, 42:] == 0).all()


def test_reader_rejects_bad_scenes(make_geotiff: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match='missing.tif: no such file'):
        SceneReader(tmp_path / 'missing.tif')
    (tmp_path / 'junk.tif').write_text('not a raster')
    with pytest.raises(InputError, match='junk.tif: not a readable raster'):
        SceneReader(tmp_path / 'junk.tif')
    no_crs = make_geotiff('nocrs.tif', np.ones((1, 8, 8), 'uint8'), crs=None)
    with pytest.raises(InputError, match='nocrs.tif: raster has no CRS'):
        SceneReader(no_crs)
    scene = make_geotiff('scene.tif', np.ones((2, 8, 8), 'uint8'))
    with pytest.raises(InputError, match='band 3 out of range'):
        SceneReader(scene, bands=[1, 3])
    with pytest.raises(InputError, match='2 band'):
        SceneReader(scene, mean=[0.0], std=[1.0])


def test_reader_normalises_and_masks(make_geotiff: Callable[..., Path]) -> None:
    data = np.array([[[10, 20], [0, 40]], [[5, 5], [5, 0]]], dtype='uint8')
    scene = make_geotiff('scene.tif', data, nodata=0)
    with SceneReader(scene, bands=[2, 1], mean=[5, 10], std=[2, 10]) as reader:
        image, valid = reader.read(rasterio.windows.Window(0, 0, 2, 2), (3, 3))
    assert image.shape == (2, 3, 3) and valid.shape == (3, 3)
    assert valid.tolist() == [[True, True, False], [False, False, False], [False, False, False]]
    np.testing.assert_allclose(image[:, 0, :2], [[0.0, 0.0], [0.0, 1.0]])
    assert (image[:, ~valid] == 0).all()


def test_nodata_override(make_geotiff: Callable[..., Path]) -> None:
    data = np.array([[[7, 1], [1, 1]]], dtype='uint8')
    with SceneReader(make_geotiff('scene.tif', data), nodata=7) as reader:
        _, valid = reader.read(rasterio.windows.Window(0, 0, 2, 2), (2, 2))
    assert valid.tolist() == [[False, True], [True, True]]


def test_real_scene_with_nodata_collar(shared_data: Path, tmp_path: Path) -> None:
    scene = shared_data / 'landsat' / 'RGB.byte.tif'
    conv = torch.nn.Conv2d(3, 2, 1)
    labels = tmp_path / 'labels.tif'
    with SceneReader(scene, mean=[60, 60, 60], std=[40, 40, 40]) as reader:
        with PredictionWriter(reader, labels, classes=default_classes(2)) as writer:
            stats = predict_scene(
                reader, conv, writer, num_classes=2, tile=128, batch_size=8, progress=False
            )
        valid = (reader.scene.read() != 0).all(axis=0)  # valid only where every band is
        transform, crs = reader.transform, reader.crs
    assert stats.skipped > 0  # windows in the collar corners
    with rasterio.open(labels) as out:
        assert (out.transform, out.crs) == (transform, crs)
        result = out.read(1)
    assert np.array_equal(result != 255, valid)


def test_strips_bound_memory_on_wide_scenes_with_identical_results(
    make_geotiff: Callable[..., Path],
) -> None:
    data = np.random.default_rng(4).normal(size=(1, 40, 300)).astype('float32')
    data[0, 10:20, 100:120] = np.nan  # nodata across a strip border
    path = make_geotiff('wide.tif', data, transform=TRANSFORM, nodata=float('nan'))
    whole, whole_stats = run(path, pointwise_model, 3, tile=32, overlap=8)
    strips, strip_stats = run(path, pointwise_model, 3, tile=32, overlap=8, max_width=80)
    assert whole_stats.buffer_shape == (3, 32, 300)
    assert strip_stats.buffer_shape[:2] == (3, 32) and strip_stats.buffer_shape[2] <= 80
    assert strip_stats.windows > whole_stats.windows  # halo windows are computed twice
    assert np.array_equal(whole.valid, strips.valid)
    assert np.array_equal(whole.probabilities, strips.probabilities)


def test_writer_accepts_strips(make_geotiff: Callable[..., Path], tmp_path: Path) -> None:
    data = np.random.default_rng(5).integers(1, 255, (1, 300, 700)).astype('uint8')
    path = make_geotiff('wide.tif', data, transform=TRANSFORM)
    outputs = []
    for max_width in (8192, 200):
        labels = tmp_path / f'labels_{max_width}.tif'
        with SceneReader(path, mean=[128], std=[60]) as reader:
            with PredictionWriter(reader, labels, classes=default_classes(3)) as writer:
                predict_scene(
                    reader, pointwise_model, writer, num_classes=3, tile=64, max_width=max_width,
                    progress=False,
                )  # fmt: skip
        with rasterio.open(labels) as out:
            outputs.append(out.read(1))
    assert np.array_equal(outputs[0], outputs[1])
