"""Test-time augmentation: probabilities averaged over flips and rotations, undone per output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import SAMPLE_DATA
from test_onnx import fake_run
from torch import Tensor, nn

from geocmid.errors import InputError
from geocmid.inference.engine import probabilities_from_logits
from geocmid.inference.onnx_model import OnnxNetwork
from geocmid.inference.products.segment import segment_scene
from geocmid.inference.tta import TestTimeAugmentation, check_tta, with_tta
from geocmid.runs.artefacts import load_segmentation_model
from geocmid.runs.export import export_onnx

LANDSAT = SAMPLE_DATA / 'landsat' / 'RGB.byte.tif'


class Constant(nn.Module):
    """Logits that do not depend on the input: (B, K, H, W) or (B, K)."""

    def __init__(self, values: list[float], dense: bool = True) -> None:
        super().__init__()
        self.values = torch.tensor(values)
        self.dense = dense

    def forward(self, x: Tensor) -> Tensor:
        shape = (x.shape[0], len(self.values), *(x.shape[-2:] if self.dense else ()))
        view = (1, -1, 1, 1) if self.dense else (1, -1)
        return self.values.view(view).expand(shape).clone()


@pytest.mark.parametrize('mode', ['flips', 'd4'])
@pytest.mark.parametrize('values', [[0.3, -1.2, 2.0], [0.7]])
@pytest.mark.parametrize('dense', [True, False])
def test_a_constant_model_stays_constant(mode: str, values: list[float], dense: bool) -> None:
    model = Constant(values, dense)
    x = torch.randn(2, 3, 16, 16)
    found = probabilities_from_logits(TestTimeAugmentation(model, mode)(x))
    expected = probabilities_from_logits(model(x))
    assert found.shape == expected.shape
    flat = found.movedim(1, -1).reshape(-1, len(values))
    assert torch.equal(flat, flat[:1].expand_as(flat))  # exactly the same everywhere
    assert torch.allclose(found, expected, atol=1e-6)


@pytest.mark.parametrize('mode', ['flips', 'd4'])
@pytest.mark.parametrize('outputs', [1, 4])
def test_a_pixelwise_model_is_unchanged(mode: str, outputs: int) -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, outputs, kernel_size=1)  # commutes with every flip and rotation
    x = torch.randn(2, 3, 24, 20)  # not square: rotations change the shape and back
    with torch.no_grad():
        found = probabilities_from_logits(TestTimeAugmentation(model, mode)(x))
        expected = probabilities_from_logits(model(x))
    assert torch.allclose(found, expected, atol=1e-6)


def test_outputs_are_put_back_where_they_belong() -> None:
    """A model that sees only the top-left corner: TTA must undo each transform on its map."""

    class Corner(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            logits = torch.full((x.shape[0], 1, *x.shape[-2:]), -20.0)
            logits[:, :, :4, :4] = 20.0 * x[:, :1, :4, :4].sign()
            return logits

    x = torch.ones(1, 1, 12, 12)
    probabilities = probabilities_from_logits(TestTimeAugmentation(Corner(), 'd4')(x))[0, 0]
    # Each transform moves the top-left corner to another corner; undone, each corner of the
    # window gets 2 of the 8 votes, and the rest of the window none.
    for rows, cols in ((slice(0, 4), slice(0, 4)), (slice(8, 12), slice(8, 12)),
                       (slice(0, 4), slice(8, 12)), (slice(8, 12), slice(0, 4))):  # fmt: skip
        assert torch.allclose(probabilities[rows, cols], torch.tensor(0.25), atol=1e-6)
    assert float(probabilities[4:8].max()) < 1e-6 and float(probabilities[:, 4:8].max()) < 1e-6


def test_none_is_the_network_itself_and_bad_modes_fail() -> None:
    network = nn.Identity()
    assert with_tta(network, 'none') is network
    with pytest.raises(InputError, match="--tta: must be one of none, flips, d4, not 'bogus'"):
        check_tta('bogus')


def test_tta_works_on_an_onnx_model_as_on_torch(tmp_path: Path) -> None:
    run = fake_run(tmp_path / 'run', 'segmentation', ['red', 'green', 'blue'], 64)
    onnx_network = OnnxNetwork(export_onnx(run, tmp_path / 'model.onnx'))
    torch_network, _ = load_segmentation_model(run)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = TestTimeAugmentation(torch_network, 'd4')(x)
    found = TestTimeAugmentation(onnx_network, 'd4')(x)
    assert torch.allclose(probabilities_from_logits(found), probabilities_from_logits(expected),
                          atol=1e-4)  # fmt: skip


def test_tta_keeps_georeferencing_and_nodata(tmp_path: Path) -> None:
    run = fake_run(tmp_path / 'run', 'segmentation', ['red', 'green', 'blue'], 64)
    for mode in ('none', 'd4'):
        segment_scene(
            LANDSAT, run, raster=tmp_path / f'{mode}.tif', tta=mode, device='cpu', progress=False
        )
    with (
        rasterio.open(tmp_path / 'none.tif') as plain,
        rasterio.open(tmp_path / 'd4.tif') as augmented,
        rasterio.open(LANDSAT) as scene,
    ):
        assert (augmented.crs, augmented.transform, augmented.shape) == (
            scene.crs, scene.transform, scene.shape,
        )  # fmt: skip
        assert augmented.nodata == plain.nodata
        assert augmented.tags()['TTA'] == 'd4' and 'TTA' not in plain.tags()
        nodata = scene.dataset_mask() == 0
        assert nodata.any()
        labels, reference = augmented.read(1), plain.read(1)
    assert np.array_equal(labels == augmented.nodata, reference == plain.nodata)
    assert np.all(labels[nodata] == augmented.nodata)
