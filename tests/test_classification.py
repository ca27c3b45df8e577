"""Tests for scene classification: the task, `train classify` run folders and `classify` CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from PIL import Image

from geocmid.datamodules.classification import ChipClassificationDataModule, labelled_chips
from geocmid.errors import InputError
from geocmid.inference.products.classify import classify_folder
from geocmid.io.cards import ModelCard, read_card, write_card
from geocmid.models.networks import load_encoder_weights
from geocmid.models.weights import save_encoder
from geocmid.runs.artefacts import load_classifier
from geocmid.runs.classification import ClassifyConfig, train_classification
from geocmid.tasks.finetune.classification import SceneClassification


def make_chips(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """Two classes of 16 px RGB PNGs: 'bright' and 'dark'."""
    rng = np.random.default_rng(seed)
    for cls, level in (('bright', 190), ('dark', 60)):
        for i in range(per_class):
            pixels = np.clip(level + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            path = root / cls / f'{i:02d}.png'
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


@pytest.fixture
def encoder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model('resnet18', in_chans=3, num_classes=0)
    (tmp_path / 'pretrained').mkdir()
    path = save_encoder(tmp_path / 'pretrained' / 'encoder.pt', model.state_dict())
    write_card(
        path,
        ModelCard(
            method='test',
            backbone='resnet18',
            bands=['red', 'green', 'blue'],
            band_indices=[1, 2, 3],
            mean=[120.0] * 3,
            std=[60.0] * 3,
            patch_size=32,
        ),
    )
    return path


def test_task_loads_encoder_weights_strictly(encoder: Path) -> None:
    state = torch.load(encoder, weights_only=True)
    task = SceneClassification(model='resnet18', weights=state, num_classes=5)
    for key, value in state.items():
        assert torch.equal(task.model.state_dict()[key], value), key
    assert task.model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    assert 'weights' not in task.hparams  # the checkpoint carries them in its state dict
    broken = {k: v for k, v in state.items() if k != 'conv1.weight'}
    with pytest.raises(RuntimeError, match='conv1.weight'):
        load_encoder_weights(timm.create_model('resnet18', num_classes=5), broken)
    frozen = SceneClassification(
        model='resnet18', weights=state, num_classes=2, freeze_backbone=True
    )
    trainable = {name for name, p in frozen.model.named_parameters() if p.requires_grad}
    assert trainable == {'fc.weight', 'fc.bias'}


def test_data_module_normalises_and_keeps_labels(tmp_path: Path) -> None:
    chips = labelled_chips(make_chips(tmp_path / 'chips'), size=16, split=0.5)
    data = ChipClassificationDataModule(chips, [100.0] * 3, [50.0] * 3, batch_size=4)
    data.setup('fit')
    batch = next(iter(data.val_dataloader()))
    expected = (batch['image'] - 100.0) / 50.0
    out = data.aug(dict(batch))
    torch.testing.assert_close(out['image'], expected)
    assert torch.equal(out['label'], batch['label'])


def test_train_then_classify(tmp_path: Path, encoder: Path) -> None:
    images = make_chips(tmp_path / 'chips')
    config = ClassifyConfig(
        images=images,
        output=tmp_path / 'run',
        encoder=encoder.parent,
        split=0.5,
        epochs=1,
        batch_size=4,
        accelerator='cpu',
    )
    result = train_classification(config, progress=False)
    assert result.global_step == 2  # 8 training chips, batch 4, one epoch
    logged = set(result.metrics)
    assert {'train_loss', 'val_OverallAccuracy', 'val_ClasswiseAccuracy_dark'} <= logged
    assert {p.name for p in (tmp_path / 'run').iterdir()} == {
        'checkpoints',  # last.ckpt, for --resume
        'config.yaml',
        'logs',
        'model.ckpt',
        'model_card.json',
    }
    card = read_card(tmp_path / 'run')
    assert card.task == 'classification' and card.backbone == 'resnet18'
    assert [c.name for c in card.classes] == ['bright', 'dark']
    assert card.patch_size == 32 and card.mean == [120.0] * 3 and card.band_indices == [1, 2, 3]
    assert card.provenance['encoder']['path'] == str(encoder.resolve())

    model, _ = load_classifier(tmp_path / 'run')
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)

    out = tmp_path / 'predictions.csv'
    table = classify_folder(tmp_path / 'run', images, out)
    assert list(table.columns) == ['path', 'class', 'probability', 'p_bright', 'p_dark']
    assert table['path'].iloc[0] == 'bright/00.png' and len(table) == 16
    np.testing.assert_allclose(table['p_bright'] + table['p_dark'], 1.0, atol=1e-9)
    assert (table['probability'] == table[['p_bright', 'p_dark']].max(axis=1)).all()
    pd.testing.assert_frame_equal(pd.read_csv(out), table, atol=1e-6)
    with pytest.raises(InputError, match='exists; use --overwrite'):
        classify_folder(tmp_path / 'run', images, out)
    with pytest.raises(InputError, match='run folder exists and is not empty'):
        train_classification(config, progress=False)


def test_bad_input(tmp_path: Path, encoder: Path) -> None:
    images = make_chips(tmp_path / 'chips', per_class=2)
    with pytest.raises(InputError, match='--output'):
        train_classification(ClassifyConfig(images=images))
    one = make_chips(tmp_path / 'one', per_class=2)
    for path in (one / 'dark').iterdir():
        path.unlink()
    with pytest.raises(InputError, match='at least 2'):
        train_classification(ClassifyConfig(images=one, output=tmp_path / 'r1'))
    with pytest.raises(InputError, match='encoder takes 3 band'):
        train_classification(
            ClassifyConfig(images=images, output=tmp_path / 'r2', encoder=encoder, bands=[1, 2])
        )
    with pytest.raises(InputError, match='not a classification model'):
        classify_folder(encoder.parent, images)  # an encoder, not a classifier
    assert not (tmp_path / 'r1').exists() and not (tmp_path / 'r2').exists()


def test_cli_train_classify_and_classify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from geocmid_cli.main import main

    images = make_chips(tmp_path / 'chips', per_class=4)

    def run(*args: str) -> int:
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        return int(exit_info.value.code)

    run_dir = tmp_path / 'run'
    assert (
        run(
            'train',
            'classify',
            '--images',
            str(images),
            '-o',
            str(run_dir),
            '--backbone',
            'resnet18',
            '--patch-size',
            '32',
            '--max-steps',
            '1',
            '--batch-size',
            '4',
            '--accelerator',
            'cpu',
            '--quiet',
        )
        == 0
    )
    assert 'step 1: train_loss' in capsys.readouterr().out
    settings = yaml.safe_load((run_dir / 'config.yaml').read_text())
    assert settings['patch_size'] == 32 and settings['max_steps'] == 1
    assert settings['backbone'] == 'resnet18'
    out = tmp_path / 'p.csv'
    assert run('classify', str(images), '--model', str(run_dir), '-o', str(out)) == 0
    assert '8 chips classified' in capsys.readouterr().out and out.is_file()
    assert (
        run(
            'classify',
            str(tmp_path / 'missing'),
            '--model',
            str(run_dir),
            '-o',
            str(tmp_path / 'q.csv'),
        )
        == 2
    )
    assert 'folder does not exist' in capsys.readouterr().err
