"""Data-parallel training: per-rank random streams, SyncBN, per-rank shards of every data module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import Tensor, nn

from geocmid.datamodules.change import ChangeDataModule
from geocmid.datamodules.classification import ChipClassificationDataModule, labelled_chips
from geocmid.datamodules.segmentation import SegmentationDataModule
from geocmid.errors import InputError
from geocmid.models.matching import cell_centres, gather_tokens, match_tokens
from geocmid.samplers.shard import EpochIndexSampler, ShardedSampler
from geocmid.tasks import CMID
from geocmid.tasks.ssl.gersp import GeRSP
from geocmid.transforms.streams import RandomStreams

TINY = {
    'queue_size': 64,
    'projection_hidden_dim': 32,
    'projection_dim': 16,
    'num_prototypes': 32,
    'local_hidden_dim': 32,
    'local_bottleneck_dim': 16,
    'num_matches': 3,
    'warmup_epochs': 0,
}


def fake_trainer(rank: int, world_size: int, device: str = 'cpu') -> Any:
    """What the tasks and data modules read from a Lightning trainer."""
    strategy = SimpleNamespace(root_device=torch.device(device))
    return SimpleNamespace(global_rank=rank, world_size=world_size, strategy=strategy)


def cmid(**kwargs: Any) -> CMID:
    arguments = {'backbone': 'resnet18', 'in_channels': 3, 'patch_size': 64, **TINY}
    return CMID(**(arguments | kwargs))


def has_sync_bn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())


def make_pairs(root: Path, count: int = 3, size: int = 64) -> Path:
    """SZTAKI-layout pairs of random PNGs (before, after, change label)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f'p{i}'
        folder.mkdir(parents=True)
        for name in ('im1.png', 'im2.png'):
            pixels = rng.integers(0, 250, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name)
        label = np.zeros((size, size), np.uint8)
        label[: size // 3, : size // 3] = 255
        Image.fromarray(label).save(folder / 'gt.png')
    return root


def make_chips(root: Path, per_class: int = 8) -> Path:
    """Two classes of 16 px RGB PNGs."""
    rng = np.random.default_rng(0)
    for name in ('bright', 'dark'):
        for i in range(per_class):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            path = root / name / f'{i:02d}.png'
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


# Random streams ----------------------------------------------------------------------------


def test_streams_differ_by_rank_and_resume_where_they_stopped() -> None:
    def draws(streams: RandomStreams) -> Tensor:
        with streams(torch.device('cpu')):
            return torch.rand(4)

    ranks = []
    for rank in (0, 1):
        streams = RandomStreams()
        streams.start(7, rank)
        ranks.append(streams)
    assert not torch.equal(draws(ranks[0]), draws(ranks[1]))
    # seed + rank, as the official code seeds its ranks.
    assert ranks[1].seed == 8

    # The global generator is left as it was.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    draws(ranks[0])
    assert torch.equal(torch.rand(3), expected)

    saved = ranks[0].state_dict()
    following = draws(ranks[0])
    resumed = RandomStreams()
    resumed.load_state_dict(saved)
    resumed.start(7, 0)  # setup after a restore keeps the restored stream
    assert torch.equal(draws(resumed), following)


def test_task_setup_seeds_the_stream_with_seed_plus_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv('PL_GLOBAL_SEED', '322')
    boxes = []
    for rank in (0, 1):
        task = cmid()
        task._trainer = fake_trainer(rank, 2)
        task.setup('fit')
        assert task.streams.seed == 322 + rank
        with task.streams(torch.device('cpu')):
            view_a, _ = task.augmentation(torch.randn(4, 3, 64, 64))
        boxes.append(view_a.geometry.boxes)
    assert not torch.equal(boxes[0], boxes[1])


def test_checkpoint_carries_the_stream_of_every_rank() -> None:
    task = cmid()
    task._trainer = fake_trainer(0, 1)
    task.setup('fit')
    checkpoint: dict[str, Any] = {}
    task.on_save_checkpoint(checkpoint)
    with task.streams(torch.device('cpu')):
        following = torch.rand(5)

    resumed = cmid()
    resumed._trainer = fake_trainer(0, 1)
    resumed.on_load_checkpoint(checkpoint)  # Lightning restores before setup
    resumed.setup('fit')
    with resumed.streams(torch.device('cpu')):
        assert torch.equal(torch.rand(5), following)


# SyncBN and the local head -----------------------------------------------------------------


def test_cmid_converts_every_batchnorm_to_syncbn_under_ddp() -> None:
    task = cmid()
    task._trainer = fake_trainer(0, 2, device='cuda')
    task.setup('fit')
    for module in (task.student, task.teacher, task.local_head, task.teacher['local_head']):
        assert has_sync_bn(module)
    assert not any(type(m) is nn.BatchNorm2d for m in task.modules())

    off = cmid(sync_batchnorm=False)
    off._trainer = fake_trainer(0, 2, device='cuda')
    off.setup('fit')
    assert not has_sync_bn(off)

    single = cmid()
    single._trainer = fake_trainer(0, 1, device='cuda')
    single.setup('fit')
    assert not has_sync_bn(single)


def test_cmid_keeps_batchnorm_where_torch_cannot_sync_it() -> None:
    task = cmid()
    task._trainer = fake_trainer(0, 2, device='cpu')
    with pytest.warns(UserWarning, match='task.sync_batchnorm'):
        task.setup('fit')
    assert not has_sync_bn(task)


def test_gersp_keeps_shuffle_bn() -> None:
    task = GeRSP(
        backbone='resnet18', patch_size=32, num_classes=2, queue_size=16,
        projection_hidden_dim=16, projection_dim=8,
    )  # fmt: skip
    task._trainer = fake_trainer(0, 2, device='cuda')
    task.setup('fit')
    assert not has_sync_bn(task)


def test_local_head_runs_once_per_direction() -> None:
    task = cmid()
    calls: list[int] = []
    task.local_head.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    image = torch.randn(4, 3, 64, 64)
    torch.manual_seed(0)
    view_a, view_b = task.augmentation(image)
    student = (task.student(view_a.image), task.student(view_b.image))
    with torch.no_grad():
        teacher = (task.teacher['encoder'](view_a.image), task.teacher['encoder'](view_b.image))
    student_logits, teacher_logits = task._local_logits(view_a, view_b, student, teacher)
    assert calls == [4, 4]
    assert student_logits.shape == teacher_logits.shape == (8, 3, TINY['num_prototypes'])
    # Each direction is normalised with its own BatchNorm statistics: the A->B logits are what
    # the head gives for the A->B tokens alone.
    centres = [
        cell_centres(view.geometry.boxes, view.geometry.flipped, student[0].shape[-1])
        for view in (view_a, view_b)
    ]
    index_a, _ = match_tokens(centres[0], centres[1], TINY['num_matches'])
    alone = task.local_head(gather_tokens(student[0], index_a))
    torch.testing.assert_close(student_logits[:4], alone)


# Settings are checked before training -------------------------------------------------------


@pytest.mark.parametrize(
    ('key', 'value'),
    [('mask_ratio', 1.0), ('mask_ratio', 0), ('queue_size', 0), ('lr_scaling', 'cubic'),
     ('mask_patch_size', 24), ('base_momentum', 1.5)],
)  # fmt: skip
def test_bad_cmid_settings_name_their_task_key(key: str, value: Any) -> None:
    with pytest.raises(InputError, match=f'^task.{key}: '):
        cmid(**{key: value})
    with pytest.raises(InputError, match=f'^task.{key}: '):
        CMID.validate_settings({'patch_size': 64, key: value})


def test_cli_rejects_a_bad_mask_ratio_before_training(tmp_path: Path) -> None:
    config = tmp_path / 'bad.yaml'
    config.write_text(yaml.safe_dump({'backbone': 'resnet18', 'task': {'mask_ratio': 1.5}}))
    sample = Path(__file__).resolve().parents[1] / 'sample_data' / 'naip'
    run = tmp_path / 'run'
    geocmid = Path(sys.executable).parent / 'geocmid'
    done = subprocess.run(
        [geocmid, 'pretrain', '--config', config, '--rasters', sample, '-o', run],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        'error: task.mask_ratio: must be between 0 and 1 (exclusive), got 1.5'
    )
    assert not run.exists()


# Every data module shards by global rank -----------------------------------------------------


def test_sharded_sampler_splits_without_repeats() -> None:
    shares = [list(ShardedSampler(range(7), rank, 3)) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(ShardedSampler(7, rank, 3)) for rank in range(3)] == [3, 2, 2]


def test_epoch_index_sampler_is_disjoint_across_ranks_and_epochs() -> None:
    samplers = [EpochIndexSampler(10, rank, 2) for rank in (0, 1)]
    epoch0 = [set(s) for s in samplers]
    for sampler in samplers:
        sampler.set_epoch(1)
    epoch1 = [set(s) for s in samplers]
    assert [len(s) for s in samplers] == [5, 5]
    everything = [*epoch0, *epoch1]
    assert sum(len(s) for s in everything) == len(set().union(*everything)) == 20


def loader_items(loader: Any, key: str) -> list[bytes]:
    return [item.numpy().tobytes() for batch in loader for item in batch[key]]


def test_change_data_module_shards_train_and_val(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / 'pairs', count=3, size=64)
    shares = []
    for rank in (0, 1):
        data = ChangeDataModule(
            pairs, mean=[50.0] * 3, std=[40.0] * 3, patch_size=16, batch_size=2,
            val_fraction=0.34, length=16,
        )  # fmt: skip
        data.trainer = fake_trainer(rank, 2)
        data.setup('fit')
        train, val = data.train_dataloader(), data.val_dataloader()
        assert len(train) == 16 // 2 // 2  # the epoch is divided by the world size
        shares.append((loader_items(train, 'image'), loader_items(val, 'image')))
    (train0, val0), (train1, val1) = shares
    assert not set(train0) & set(train1)
    assert not set(val0) & set(val1)
    assert len(val0) + len(val1) == len(data.val_dataset)  # every patch evaluated once


def test_classification_data_module_shards_train_and_val(tmp_path: Path) -> None:
    chips = labelled_chips(make_chips(tmp_path / 'chips'), size=16, split=0.5)
    indices = []
    for rank in (0, 1):
        data = ChipClassificationDataModule(chips, [100.0] * 3, [50.0] * 3, batch_size=1)
        data.trainer = fake_trainer(rank, 2)
        data.setup('fit')
        train, val = data.train_dataloader(), data.val_dataloader()
        indices.append((list(train.sampler), list(val.sampler)))
        assert len(train) == len(chips.train) // 2
    (train0, val0), (train1, val1) = indices
    assert not set(train0) & set(train1)
    assert sorted(val0 + val1) == list(range(len(chips.test)))


# Two real processes (gloo) ---------------------------------------------------------------------

DDP_SCRIPT = """
import sys
from pathlib import Path

import lightning
import torch

torch.set_num_threads(1)
import geocmid.tasks.ssl.cmid as cmid_module
from geocmid.datamodules.pretrain import PretrainDataModule

rasters, out = Path(sys.argv[1]), Path(sys.argv[2])
lightning.seed_everything(7, workers=True, verbose=False)
data = PretrainDataModule(rasters=rasters, patch_size=64, batch_size=2, samples_per_epoch=8,
                          num_workers=0)
task = cmid_module.CMID(backbone='resnet18', in_channels=data.in_channels, patch_size=64,
                        mean=data.mean.tolist(), std=data.std.tolist(), samples_per_epoch=8,
                        **TINY)
record = {'boxes': [], 'cells': [], 'images': []}


class Recorder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, image, valid=None):
        a, b = self.inner(image, valid)
        record['boxes'].append(torch.cat([a.geometry.boxes, b.geometry.boxes]))
        record['images'].append(image.clone())
        return a, b


real_block_mask = cmid_module.block_mask


def block_mask(*args, **kwargs):
    cells = real_block_mask(*args, **kwargs)
    record['cells'].append(cells.clone())
    return cells


task.augmentation = Recorder(task.augmentation)
cmid_module.block_mask = block_mask
trainer = lightning.Trainer(
    accelerator='cpu', devices=2, strategy='ddp', max_epochs=1, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    use_distributed_sampler=False,
)
trainer.fit(task, datamodule=data)
trainer.save_checkpoint(out / 'last.ckpt')
record['batches'] = trainer.num_training_batches
torch.save(record, out / f'rank{trainer.global_rank}.pt')
"""


@pytest.mark.slow
def test_two_processes_draw_different_crops_masks_and_patches(
    make_geotiff: Callable[..., Path], tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    for name in ('a.tif', 'b.tif'):
        make_geotiff(f'rasters/{name}', rng.integers(1, 255, (3, 96, 96), dtype=np.uint8))
    script = tmp_path / 'ddp.py'
    script.write_text(f'TINY = {TINY!r}\n' + DDP_SCRIPT)
    out = tmp_path / 'out'
    out.mkdir()
    done = subprocess.run(
        [sys.executable, script, tmp_path / 'rasters', out],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env=os.environ | {'OMP_NUM_THREADS': '1'},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out / f'rank{rank}.pt', weights_only=False) for rank in (0, 1)]
    # 8 patches per epoch over 2 ranks in batches of 2: 2 steps per rank.
    assert [r['batches'] for r in ranks] == [2, 2]
    for key in ('boxes', 'cells'):
        for step in range(2):
            assert not torch.equal(ranks[0][key][step], ranks[1][key][step]), key
    patches = [{p.numpy().tobytes() for batch in r['images'] for p in batch} for r in ranks]
    assert len(patches[0]) == len(patches[1]) == 4
    assert not patches[0] & patches[1]
    checkpoint = torch.load(out / 'last.ckpt', weights_only=False)
    assert [state['seed'] for state in checkpoint['random_streams']] == [7, 8]


def test_fine_tuning_augmentation_differs_by_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv('PL_GLOBAL_SEED', '3')
    chips = labelled_chips(make_chips(tmp_path / 'chips'), size=16, split=0.5)
    image = torch.arange(8 * 3 * 16 * 16, dtype=torch.float32).reshape(8, 3, 16, 16)
    augmented = []
    for rank in (0, 1):
        data = ChipClassificationDataModule(chips, [0.0] * 3, [1.0] * 3, batch_size=8)
        data.trainer = fake_trainer(rank, 2)
        data.trainer.training = True
        batch = {'image': image.clone(), 'label': torch.zeros(8, dtype=torch.long)}
        torch.manual_seed(0)  # every rank's global generator is seeded alike
        augmented.append(data.on_after_batch_transfer(batch, 0)['image'])
    assert not torch.equal(augmented[0], augmented[1])


def test_segmentation_data_module_shards_train_and_val(tmp_path: Path) -> None:
    spacenet = Path(__file__).resolve().parents[1] / 'sample_data' / 'spacenet'
    folder = tmp_path / 'spacenet'  # statistics sidecars land in tmp
    shutil.copytree(spacenet, folder)
    shares = []
    for rank in (0, 1):
        data = SegmentationDataModule(
            folder / 'buildings.tif', folder / 'buildings.geojson', patch_size=32,
            block_size=64, val_fraction=0.3, seed=3, length=40,
        )  # fmt: skip
        data.trainer = fake_trainer(rank, 2)
        data.setup('fit')
        assert len(data.train_sampler) == 20  # the epoch is divided by the world size
        boxes = [
            [(x.start, y.start) for x, y in sampler]
            for sampler in (data.train_sampler, data.val_sampler)
        ]
        shares.append(boxes)
    (train0, val0), (train1, val1) = shares
    assert not set(train0) & set(train1)
    # 19 held-out blocks of 4 patches, each evaluated by exactly one rank.
    assert not set(val0) & set(val1) and len(val0) + len(val1) == 19 * 4
