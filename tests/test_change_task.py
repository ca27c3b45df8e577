"""Change-detection training: masked loss, siamese task, pair data module, `train change`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import timm
import torch
from rasterio.errors import NotGeoreferencedWarning

from geocmid.datamodules.change import ChangeDataModule
from geocmid.errors import InputError
from geocmid.io.cards import ModelCard, write_card
from geocmid.models.weights import save_encoder
from geocmid.runs.artefacts import load_change_model
from geocmid.runs.change import ChangeConfig, train_change
from geocmid.tasks.finetune.change import IGNORE_INDEX, Change, MaskedBCEWithLogitsLoss


def write_png(path: Path, data: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', NotGeoreferencedWarning)
        with rasterio.open(
            path, 'w', driver='PNG', width=data.shape[2], height=data.shape[1],
            count=data.shape[0], dtype=data.dtype,
        ) as dst:  # fmt: skip
            dst.write(data)


def make_pairs(root: Path, count: int = 3, size: int = 64, seed: int = 0) -> Path:
    """SZTAKI-layout pairs: noise before, a bright square after, the square labelled 255."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f'p{i}'
        folder.mkdir(parents=True)
        before = rng.integers(0, 100, (3, size, size)).astype(np.uint8)
        after = before.copy()
        gt = np.zeros((1, size, size), np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        after[:, top : top + size // 3, left : left + size // 3] = 250
        gt[0, top : top + size // 3, left : left + size // 3] = 255
        write_png(folder / 'im1.png', before)
        write_png(folder / 'im2.png', after)
        write_png(folder / 'gt.png', gt)
    return root


def make_encoder(folder: Path, bands: int = 3) -> Path:
    torch.manual_seed(0)
    encoder = timm.create_model('resnet18', in_chans=bands, num_classes=0)
    path = save_encoder(folder / 'encoder.pt', encoder.state_dict())
    card = ModelCard(
        method='random', backbone='resnet18', bands=[f'b{i}' for i in range(bands)],
        band_indices=list(range(1, bands + 1)), mean=[50.0] * bands, std=[40.0] * bands,
        patch_size=64,
    )  # fmt: skip
    write_card(path, card)
    return path


def test_masked_bce_matches_an_explicit_computation() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]]]])
    target = torch.tensor([[[[1, 0], [IGNORE_INDEX, 0]]]])
    loss = MaskedBCEWithLogitsLoss(pos_weight=2.0)(logits, target)
    # Reference: -[w y log s(x) + (1 - y) log(1 - s(x))] averaged over the 3 kept pixels.
    terms = []
    for x, y in ((2.0, 1), (-1.0, 0), (3.0, 0)):
        p = 1 / (1 + np.exp(-x))
        terms.append(-(2.0 * y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-6)
    all_ignored = torch.full_like(target, IGNORE_INDEX)
    logits.requires_grad_(True)
    zero = MaskedBCEWithLogitsLoss()(logits, all_ignored)
    zero.backward()
    assert zero.item() == 0.0 and logits.grad is not None


def test_task_loads_encoder_weights_into_the_shared_encoder() -> None:
    encoder = timm.create_model('resnet18', in_chans=4, num_classes=0)
    weights = encoder.state_dict()
    task = Change(backbone='resnet18', in_channels=4, weights=weights, freeze_backbone=True)
    torch.testing.assert_close(task.model.encoder.model.conv1.weight, encoder.conv1.weight)
    assert not any(p.requires_grad for p in task.model.encoder.parameters())
    assert any(p.requires_grad for p in task.model.decoder.parameters())
    pairs = torch.randn(2, 2, 4, 64, 64)
    assert task(pairs).shape == (2, 1, 64, 64)
    # Swapping the dates changes an FC-Siam-diff prediction only through the after image's
    # features, so identical dates give the same output whichever comes first.
    same = torch.stack([pairs[:, 0], pairs[:, 0]], dim=1)
    task.eval()
    torch.testing.assert_close(task(same), task(same.flip(1)))


def test_data_module_batches_normalise_and_augment_both_dates(tmp_path: Path) -> None:
    data = ChangeDataModule(
        make_pairs(tmp_path / 'pairs'), mean=[50.0] * 3, std=[40.0] * 3, patch_size=32,
        batch_size=4, val_fraction=0.34,
    )  # fmt: skip
    assert data.in_channels == 3
    assert (len(data.train_regions), len(data.val_regions)) == (2, 1)
    data.setup('fit')
    assert len(data.val_dataset) == 4  # 64 x 64 px in 32 px patches
    batch = next(iter(data.train_dataloader()))
    batch['valid'][0, 0, 0] = False  # nodata: the model must see the neutral 0 there
    batch['mask'][0, 0, 0, 0] = IGNORE_INDEX
    data.trainer = SimpleNamespace(training=True)  # type: ignore[assignment]
    batch = data.on_after_batch_transfer(batch, 0)
    image, mask = batch['image'], batch['mask'][:, 0]
    assert image.shape == (4, 2, 3, 32, 32) and mask.shape == (4, 32, 32)
    assert 'valid' not in batch
    ignored = mask == IGNORE_INDEX
    assert ignored.sum() == 1
    assert image.permute(0, 3, 4, 1, 2)[ignored].abs().max() < 1e-4
    # Change pixels are where the after image is bright, (250 - 50) / 40 = 5 in every band,
    # wherever flips and rotations moved them.
    bright = torch.isclose(image[:, 1], torch.tensor(5.0), atol=1e-4).all(dim=1)
    assert torch.equal(bright[~ignored], (mask == 1)[~ignored])


def test_data_module_statistics_and_bad_bands(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / 'pairs', count=2)
    data = ChangeDataModule(pairs, bands=[3, 1], patch_size=32, val_fraction=0.5)
    data.setup('fit')
    assert data.mean.shape == (2,) and 40 < float(data.mean[0]) < 100
    with pytest.raises(InputError, match=r'--bands: \[4\] not in 1\.\.3'):
        ChangeDataModule(pairs, bands=[4])


def test_train_change_writes_a_loadable_run(tmp_path: Path) -> None:
    encoder = make_encoder(tmp_path)
    config = ChangeConfig(
        pairs=make_pairs(tmp_path / 'pairs'), output=tmp_path / 'run', encoder=encoder,
        patch_size=32, batch_size=4, max_steps=2, val_fraction=0.34, accelerator='cpu',
        log_every_n_steps=1,
    )  # fmt: skip
    result = train_change(config, progress=False)
    assert result.global_step == 2
    assert {'val_OverallF1Score', 'val_OverallJaccardIndex'} <= set(result.metrics)
    card = json.loads((tmp_path / 'run' / 'model_card.json').read_text())
    assert card['task'] == 'change' and card['tile_size'] == 32
    assert [c['name'] for c in card['classes']] == ['no_change', 'change']
    assert card['mean'] == [50.0] * 3 and card['bands'] == ['b0', 'b1', 'b2']
    assert card['provenance']['encoder']['card']['backbone'] == 'resnet18'
    assert [p['name'] for p in card['data']['split']['val']] == ['p2']
    assert card['resolution'] is None
    network, loaded = load_change_model(tmp_path / 'run')
    assert loaded.task == 'change'
    assert network(torch.zeros(1, 2, 3, 32, 32)).shape == (1, 1, 32, 32)
    with pytest.raises(InputError, match='not empty; use --resume or --overwrite'):
        train_change(config, progress=False)


def test_train_change_learns_an_obvious_change(tmp_path: Path) -> None:
    config = ChangeConfig(
        pairs=make_pairs(tmp_path / 'pairs', count=4), output=tmp_path / 'run',
        backbone='resnet18', patch_size=32, batch_size=4, max_steps=20, lr=3e-3,
        val_fraction=0.25, accelerator='cpu', log_every_n_steps=1,
    )  # fmt: skip
    result = train_change(config, progress=False)
    assert result.metrics['val_OverallF1Score'] > 0.6


def test_train_change_bad_input(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / 'pairs', count=2)
    encoder = make_encoder(tmp_path, bands=4)
    with pytest.raises(InputError, match=r'encoder takes 4 band\(s\) .* but the pairs give 3'):
        config = ChangeConfig(pairs=pairs, output=tmp_path / 'run', encoder=encoder)
        train_change(config, progress=False)
    assert not (tmp_path / 'run').exists()
    csv = tmp_path / 'pairs.csv'
    csv.write_text('before,after\np0/im1.png,p0/im2.png\n')
    with pytest.raises(InputError, match=r'pairs\.csv: missing column\(s\) label'):
        train_change(ChangeConfig(pairs=csv, output=tmp_path / 'run'), progress=False)
    csv.write_text('before,after,label\npairs/p0/im1.png,pairs/p0/missing.png,pairs/p0/gt.png\n')
    with pytest.raises(InputError, match=r'pairs\.csv:2: after file .*missing\.png not found'):
        train_change(ChangeConfig(pairs=csv, output=tmp_path / 'run'), progress=False)
    with pytest.raises(InputError, match='--pairs: is required'):
        train_change(ChangeConfig(output=tmp_path / 'run'), progress=False)
