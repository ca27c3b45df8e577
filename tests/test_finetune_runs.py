"""The one fine-tuning runner, the meaning of --freeze-encoder, and Lightning-free artefacts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import torch
from conftest import write_geotiff
from lightning import LightningModule
from test_change_task import make_encoder, make_pairs
from test_classification import make_chips
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from geocmid.datamodules.classification import labelled_chips
from geocmid.errors import InputError
from geocmid.io.cards import ModelCard, write_card
from geocmid.runs.artefacts import (
    MODEL_NAME,
    load_change_model,
    load_classifier,
    load_segmentation_model,
)
from geocmid.runs.change import ChangeConfig, train_change
from geocmid.runs.classification import ClassifyConfig, train_classification
from geocmid.runs.segmentation import SegmentConfig, train_segmentation
from geocmid.tasks.finetune.change import Change
from geocmid.tasks.finetune.classification import SceneClassification
from geocmid.tasks.finetune.segmentation import Segmentation

TASKS = {
    'segmentation': (
        lambda: Segmentation(backbone='resnet18', in_channels=3, freeze_backbone=True),
        lambda task: task.model.encoder,
        torch.randn(2, 3, 32, 32),
    ),
    'change': (
        lambda: Change(backbone='resnet18', in_channels=3, freeze_backbone=True),
        lambda task: task.model.encoder,
        torch.randn(2, 2, 3, 32, 32),
    ),
    'classification': (
        lambda: SceneClassification(model='resnet18', in_channels=3, freeze_backbone=True),
        lambda task: nn.ModuleList(m for n, m in task.model.named_children() if n != 'fc'),
        torch.randn(2, 3, 32, 32),
    ),
}


@pytest.mark.parametrize('name', TASKS)
def test_freeze_encoder_means_no_grads_and_fixed_batchnorm(name: str) -> None:
    make, encoder_of, batch = TASKS[name]
    task = make()
    encoder = encoder_of(task)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}

    task.train()  # what Lightning calls at the start of each training epoch
    norms = [m for m in encoder.modules() if isinstance(m, _BatchNorm)]
    assert norms and not any(m.training for m in norms)
    assert not any(p.requires_grad for p in encoder.parameters())
    trained = [p for n, p in task.model.named_parameters() if p.requires_grad]
    assert trained  # the head
    assert any(m.training for m in task.model.modules() if m not in set(encoder.modules()))
    task(batch)  # a training-mode forward pass

    after = encoder.state_dict()
    for key, value in before.items():  # running statistics included
        assert torch.equal(after[key], value), key
    task.eval()
    task.train()
    assert not any(m.training for m in norms)


@pytest.mark.parametrize('name', TASKS)
def test_unfrozen_encoder_trains_batchnorm(name: str) -> None:
    make, encoder_of, _ = TASKS[name]
    task = make()
    task.hparams['freeze_backbone'] = False  # same network, not frozen
    task.configure_models()
    task.train()
    encoder = encoder_of(task)
    assert all(m.training for m in encoder.modules() if isinstance(m, _BatchNorm))
    assert all(p.requires_grad for p in encoder.parameters())


@pytest.fixture(scope='module')
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny trained run folder per task."""
    root = tmp_path_factory.mktemp('runs')
    common = {'accelerator': 'cpu', 'batch_size': 4, 'log_every_n_steps': 1}

    rng = np.random.default_rng(0)
    image = rng.integers(50, 60, size=(3, 64, 64)).astype(np.uint16)
    image[:, 8:32, 8:32] += 150
    raster = write_geotiff(root / 'scene.tif', image)
    with rasterio.open(raster) as src:
        left, top = src.transform.c, src.transform.f
    labels = root / 'labels.gpkg'
    box = shapely.box(left + 8, top - 32, left + 32, top - 8)
    gpd.GeoDataFrame({'kind': ['roof']}, geometry=[box], crs=src.crs).to_file(labels)
    train_segmentation(
        SegmentConfig(
            rasters=raster,
            labels=labels,
            output=root / 'segmentation',
            backbone='resnet18',
            patch_size=32,
            max_steps=2,
            val_fraction=0.0,
            **common,
        ),
        progress=False,
    )
    (root / 'enc').mkdir()
    train_change(
        ChangeConfig(
            pairs=make_pairs(root / 'pairs'),
            output=root / 'change',
            encoder=make_encoder(root / 'enc'),
            patch_size=32,
            max_steps=2,
            val_fraction=0.34,
            **common,
        ),
        progress=False,
    )
    train_classification(
        ClassifyConfig(
            images=make_chips(root / 'chips'),
            output=root / 'classification',
            backbone='resnet18',
            split=0.5,
            patch_size=16,
            max_steps=3,
            **common,
        ),
        progress=False,
    )
    return {name: root / name for name in ('segmentation', 'change', 'classification')}


LOADERS = {
    'segmentation': (load_segmentation_model, Segmentation, (1, 3, 32, 32)),
    'change': (load_change_model, Change, (1, 2, 3, 32, 32)),
    'classification': (load_classifier, SceneClassification, (1, 3, 16, 16)),
}


@pytest.mark.parametrize('name', LOADERS)
def test_artefact_loader_matches_the_lightning_task(runs: dict[str, Path], name: str) -> None:
    load, task_class, shape = LOADERS[name]
    network, card = load(runs[name])
    assert card.task == name and not network.training
    task: LightningModule = task_class.load_from_checkpoint(
        runs[name] / MODEL_NAME, map_location='cpu'
    )
    reference = task.model.eval()
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    with torch.no_grad():
        assert torch.equal(network(x), reference(x))
    for key, value in reference.state_dict().items():
        assert torch.equal(network.state_dict()[key], value), key


def test_artefacts_and_inference_do_not_import_lightning() -> None:
    code = (
        'import sys, geocmid.runs.artefacts, geocmid.inference.products.classify; '
        "assert 'lightning' not in sys.modules, 'lightning imported'"
    )
    subprocess.run([sys.executable, '-c', code], check=True)


def test_runs_do_not_import_evaluation() -> None:
    """Runs sit below evaluation in the layers: no run module may import it."""
    code = (
        'import sys, importlib, pkgutil, geocmid.runs; '
        '[importlib.import_module(m.name) for m in pkgutil.walk_packages(geocmid.runs.__path__, '
        "'geocmid.runs.')]; "
        "assert not [m for m in sys.modules if m.startswith('geocmid.evaluation')], 'imported'"
    )
    subprocess.run([sys.executable, '-c', code], check=True)


def test_classification_validates_the_final_model(runs: dict[str, Path]) -> None:
    # 8 training chips in batches of 4: epoch-end validation ran after step 2, and the model
    # took one more step; the logged validation loss must be the exported model's.
    run = runs['classification']
    network, card = load_classifier(run)
    chips = labelled_chips(run.parent / 'chips', split=0.5, seed=0, size=16)
    images = torch.stack([chips.test[i]['image'] for i in range(len(chips.test))])
    targets = chips.test_labels
    mean = torch.tensor(card.mean)[:, None, None]
    std = torch.tensor(card.std)[:, None, None]
    with torch.no_grad():
        loss = nn.functional.cross_entropy(network((images - mean) / std), targets)
    metrics = pd.read_csv(run / 'logs' / 'version_0' / 'metrics.csv')
    validated = metrics.dropna(subset=['val_loss'])
    assert validated['step'].max() == 3
    assert validated['val_loss'].iloc[-1] == pytest.approx(float(loss), rel=1e-4)


def write_run(folder: Path, checkpoint: bytes | None = None) -> Path:
    """A segmentation run folder whose model.ckpt holds ``checkpoint``."""
    folder.mkdir()
    card = ModelCard(
        method='supervised', backbone='resnet18', bands=['a'], band_indices=[1], mean=[0.0],
        std=[1.0], patch_size=32, task='segmentation',
    )  # fmt: skip
    write_card(folder, card)
    if checkpoint is not None:
        (folder / MODEL_NAME).write_bytes(checkpoint)
    return folder


class Evil:
    """Unpickling this would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), 'w'))


class Shell(Evil):
    """Unpickling this would run a shell command creating ``path`` (its module is blocked)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:  # type: ignore[override]
        return (os.system, (f'touch {self.path}',))


def test_garbage_or_malicious_checkpoint_is_an_input_error(tmp_path: Path) -> None:
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.ckpt'
    torch.save({'state_dict': {}, 'hyper_parameters': {'x': Evil(marker)}}, evil)
    shell = tmp_path / 'shell.ckpt'
    torch.save({'state_dict': Shell(marker)}, shell)
    plain = tmp_path / 'plain.ckpt'
    torch.save({'epoch': 1}, plain)
    broken = tmp_path / 'broken.ckpt'
    torch.save({'state_dict': {'model.x': torch.zeros(1)}, 'hyper_parameters': {}}, broken)
    cases = {
        'garbage': (b'not a checkpoint at all', 'is not a readable checkpoint'),
        'evil': (evil.read_bytes(), 'objects other than tensors'),
        'shell': (shell.read_bytes(), 'objects other than tensors'),
        'plain': (plain.read_bytes(), 'no hyper_parameters/state_dict'),
        'broken': (broken.read_bytes(), 'does not hold a segmentation model'),
    }
    for name, (content, problem) in cases.items():
        run = write_run(tmp_path / name, content)
        with pytest.raises(InputError) as info:
            load_segmentation_model(run)
        message = str(info.value)
        assert message.startswith(str(run / MODEL_NAME)) and problem in message, message
        assert '\n' not in message and 'weights_only' not in message, message
    assert not marker.exists()
    with pytest.raises(InputError, match=f'no {MODEL_NAME} in this folder'):
        load_segmentation_model(write_run(tmp_path / 'empty'))
    with pytest.raises(InputError, match='not a change model'):
        load_change_model(tmp_path / 'garbage')
