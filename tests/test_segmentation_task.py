"""The segmentation task (encoder loading, freezing, loss, metrics) and its data module."""

from __future__ import annotations

import shutil
from pathlib import Path

import geopandas as gpd
import lightning
import numpy as np
import pytest
import shapely
import timm
import torch
from conftest import SAMPLE_DATA
from torch.utils.data import DataLoader
from torchgeo.datasets import stack_samples

from geocmid.datamodules.segmentation import SegmentationDataModule
from geocmid.datasets.labels import IGNORE_INDEX
from geocmid.errors import InputError
from geocmid.models.networks import load_timm_state_dict
from geocmid.tasks.finetune.segmentation import Segmentation

SPACENET = SAMPLE_DATA / 'spacenet'


def quiet_trainer(**kwargs: object) -> lightning.Trainer:
    return lightning.Trainer(
        accelerator='cpu',
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


@pytest.mark.parametrize('decoder', ['unet', 'fpn', 'upernet'])
def test_encoder_weights_load_into_smp(decoder: str) -> None:
    timm_model = timm.create_model('resnet18', in_chans=3, num_classes=0)
    weights = timm_model.state_dict()

    task = Segmentation(model=decoder, backbone='resnet18', weights=weights, in_channels=3)

    loaded = task.model.encoder.state_dict()
    assert len(loaded) == len(weights)
    for key, value in weights.items():
        assert torch.equal(loaded[f'model.{key}'], value), key
    assert task(torch.zeros(2, 3, 64, 64)).shape == (2, 2, 64, 64)


def test_flattened_timm_keys_are_mapped() -> None:
    # timm's features_only ConvNeXt names its stages stages_0..., and drops the final norm.
    weights = timm.create_model('convnext_atto', in_chans=2, num_classes=0).state_dict()

    task = Segmentation(backbone='convnext_atto', weights=weights, in_channels=2)

    loaded = task.model.encoder.state_dict()
    key = 'stages.1.blocks.0.conv_dw.weight'
    assert torch.equal(loaded[f'model.{key.replace(".", "_", 1)}'], weights[key])


def test_incomplete_encoder_weights_fail() -> None:
    weights = timm.create_model('resnet18', in_chans=3, num_classes=0).state_dict()
    del weights['layer1.0.conv1.weight']
    with pytest.raises(RuntimeError, match='layer1.0.conv1.weight'):
        Segmentation(backbone='resnet18', weights=weights, in_channels=3)
    task = Segmentation(backbone='resnet18', in_channels=3)
    with pytest.raises(RuntimeError, match='Missing'):
        load_timm_state_dict(task.model.encoder, {})


def test_freeze_backbone_keeps_encoder_fixed() -> None:
    task = Segmentation(backbone='resnet18', in_channels=1, freeze_backbone=True)
    task.train()
    assert not any(p.requires_grad for p in task.model.encoder.parameters())
    assert all(p.requires_grad for p in task.model.decoder.parameters())
    # BatchNorm statistics must not drift either: the frozen encoder stays in eval mode.
    assert not task.model.encoder.training and task.model.decoder.training


def test_loss_ignores_nodata_pixels() -> None:
    torch.manual_seed(0)
    task = Segmentation(backbone='resnet18', in_channels=1, num_classes=3).eval()
    image = torch.randn(2, 1, 32, 32)
    mask = torch.randint(0, 3, (2, 32, 32))
    mask[:, :8] = IGNORE_INDEX
    with torch.no_grad():
        logits = task(image)
        loss = task.criterion(logits, mask)

    # Reference: mean negative log-softmax over the labelled pixels, in float64 numpy.
    z = logits.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
    target = mask.numpy().reshape(-1)
    keep = target != IGNORE_INDEX
    log_softmax = z - z.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    expected = -log_softmax[keep, target[keep]].mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def squares(batches: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Batches of dark images with one bright square each: the square is class 1."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        image = 0.1 * torch.randn(2, 1, 64, 64, generator=generator)
        mask = torch.zeros(2, 64, 64, dtype=torch.long)
        for b in range(2):
            row, col = torch.randint(0, 40, (2,), generator=generator).tolist()
            image[b, :, row : row + 24, col : col + 24] += 2
            mask[b, row : row + 24, col : col + 24] = 1
        mask[:, :, :2] = IGNORE_INDEX
        out.append({'image': image, 'mask': mask})
    return out


def test_learns_bright_squares_and_logs_iou() -> None:
    lightning.seed_everything(0, verbose=False)
    task = Segmentation(
        backbone='resnet18', in_channels=1, num_classes=2, labels=['background', 'square'], lr=1e-2
    )
    losses: list[float] = []

    class Record(lightning.Callback):
        def on_train_batch_end(self, *args: object) -> None:
            outputs = args[2]  # (trainer, module, outputs, batch, batch_idx)
            losses.append(float(outputs['loss']))  # type: ignore[index]

    trainer = quiet_trainer(max_epochs=1, callbacks=[Record()])
    train = DataLoader(squares(8, 0), batch_size=None)
    trainer.fit(task, train, DataLoader(squares(2, 1), batch_size=None))

    assert len(losses) == 8
    assert np.mean(losses[-2:]) < 0.5 * np.mean(losses[:2])
    metrics = trainer.callback_metrics
    for name in (
        'val_AverageJaccardIndex',
        'val_ClasswiseJaccardIndex_background',
        'val_ClasswiseJaccardIndex_square',
    ):
        assert 0 <= float(metrics[name]) <= 1, name
    assert float(metrics['val_ClasswiseJaccardIndex_square']) > 0.3


@pytest.fixture
def spacenet(tmp_path: Path) -> Path:
    """The sample SpaceNet tile and footprints, copied so that statistics sidecars land in tmp."""
    folder = tmp_path / 'spacenet'
    shutil.copytree(SPACENET, folder)
    return folder


def test_split_blocks_never_overlap(spacenet: Path) -> None:
    data = SegmentationDataModule(
        spacenet / 'buildings.tif',
        spacenet / 'buildings.geojson',
        patch_size=32,
        block_size=64,
        val_fraction=0.3,
        seed=3,
    )
    data.setup('fit')

    val = [shapely.box(x.start, y.start, x.stop, y.stop) for x, y in data.val_sampler]
    train = [shapely.box(x.start, y.start, x.stop, y.stop) for x, y in data.train_sampler]
    # 512 px tile: 64 blocks of 64 px, 30 % held out = 19 blocks of 4 patches each.
    assert len(val) == 19 * 4
    assert shapely.union_all(val).area == pytest.approx(19 * (64 * 0.5) ** 2)
    assert max(v.intersection(t).area for v in val for t in train) == 0
    assert all(p.within(data.train_roi) for p in train)


def test_datamodule_normalises_and_fills_nodata(make_geotiff, tmp_path: Path) -> None:
    image = np.full((2, 64, 64), 10, dtype=np.uint16)
    image[1] = 30
    image[:, :, :8] = 0  # nodata strip
    raster = make_geotiff('scene.tif', image, nodata=0)
    x0, y0 = 500000.0, 4000000.0
    labels = tmp_path / 'l.gpkg'
    square = shapely.box(x0 + 16, y0 - 48, x0 + 48, y0 - 16)
    gpd.GeoDataFrame(geometry=[square], crs='EPSG:32631').to_file(labels)
    data = SegmentationDataModule(
        raster, labels, mean=[10, 20], std=[2, 5], patch_size=32, block_size=32, batch_size=2
    )
    data.setup('validate')
    # The left patch holds the nodata strip; without a trainer the hook only fills nodata,
    # so the validation augmentation (normalisation) is applied as Lightning would.
    batch = stack_samples([data.dataset[x0 : x0 + 32, y0 - 32 : y0]] * 2)
    out = data.aug(data.on_after_batch_transfer(batch, 0))

    valid = out['mask'] != IGNORE_INDEX
    assert 'valid' not in out
    assert torch.allclose(out['image'][:, 0][valid], torch.tensor(0.0))
    assert torch.allclose(out['image'][:, 1][valid], torch.tensor(2.0))
    assert (out['image'][:, :, :, :8] == 0).all()  # nodata: the band mean, 0 once normalised
    assert (out['mask'][:, :, :8] == IGNORE_INDEX).all()


def test_bad_split_settings(spacenet: Path) -> None:
    tif, labels = spacenet / 'buildings.tif', spacenet / 'buildings.geojson'
    with pytest.raises(InputError, match='not a multiple of the patch size'):
        SegmentationDataModule(tif, labels, patch_size=64, block_size=100)
    with pytest.raises(InputError, match='cannot hold out'):
        SegmentationDataModule(tif, labels, patch_size=256, block_size=512)
    with pytest.raises(InputError, match=r'must be in \[0, 1\)'):
        SegmentationDataModule(tif, labels, val_fraction=1.0)
    data = SegmentationDataModule(tif, labels, patch_size=64, mean=[1, 2], std=[1, 1])
    with pytest.raises(InputError, match='mean has 2 value'):
        data.setup('fit')


def test_trains_on_spacenet(spacenet: Path) -> None:
    data = SegmentationDataModule(
        spacenet / 'buildings.tif',
        spacenet / 'buildings.geojson',
        patch_size=64,
        batch_size=2,
        length=6,
    )
    task = Segmentation(
        backbone='resnet18',
        in_channels=data.in_channels,
        num_classes=2,
        labels=list(data.class_names),
    )
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=2, use_distributed_sampler=False)
    trainer.fit(task, datamodule=data)

    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics['train_loss'])
    assert 0 <= float(trainer.callback_metrics['val_ClasswiseJaccardIndex_foreground']) <= 1
    assert data.mean.shape == (1,) and data.mean.item() > 100  # uint16 statistics, not /255
