"""GeRSP task: losses against independent computations, EMA, queue, band mapping, shuffle-BN."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from geocmid.errors import InputError
from geocmid.tasks.ssl import gersp as gersp_module
from geocmid.tasks.ssl.gersp import GeRSP, natural_band_mixing

BANDS = ['red', 'green', 'blue', 'nir']
SIZE = 32
BATCH = 4


def make_task(**kwargs: Any) -> GeRSP:
    """A tiny GeRSP: resnet18 on 4 bands at 32 px, 8-d keys, 16 negatives, 3 classes."""
    settings: dict[str, Any] = {
        'backbone': 'resnet18',
        'in_channels': 4,
        'patch_size': SIZE,
        'band_names': BANDS,
        'num_classes': 3,
        'queue_size': 16,
        'projection_hidden_dim': 32,
        'projection_dim': 8,
    }
    return GeRSP(**(settings | kwargs))


def make_batch(seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        'image': torch.randn(BATCH, 4, SIZE, SIZE, generator=generator),
        'natural_image': torch.randn(BATCH, 3, SIZE, SIZE, generator=generator),
        'natural_label': torch.tensor([0, 2, 1, 2]),
    }


def numpy_infonce(q: np.ndarray, k: np.ndarray, queue: np.ndarray, tau: float) -> float:
    """-log(exp(q.k / tau) / (exp(q.k / tau) + sum_j exp(q.Q_j / tau))), averaged, by loops."""
    losses = []
    for i in range(len(q)):
        positive = float(np.dot(q[i], k[i])) / tau
        negatives = [float(np.dot(q[i], queue[:, j])) / tau for j in range(queue.shape[1])]
        denominator = math.exp(positive) + sum(math.exp(value) for value in negatives)
        losses.append(-positive + math.log(denominator))
    return float(np.mean(losses))


def numpy_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    losses = []
    for row, label in zip(logits, labels, strict=True):
        losses.append(-row[label] + math.log(sum(math.exp(value) for value in row)))
    return float(np.mean(losses))


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x**2).sum(axis=1, keepdims=True))


def test_losses_match_independent_computation() -> None:
    torch.manual_seed(0)
    task = make_task(
        augmentation=nn.Identity(), natural_augmentation=nn.Identity(), temperature=0.2
    )
    batch = make_batch()
    terms, keys = task.losses(batch)
    terms = {name: value.detach() for name, value in terms.items()}

    # Reference: natural RGB in bands 1-3 and zeros (the mean) in NIR; one encoder pass over
    # [patches ; natural images]; projections and the classifier done with numpy.
    natural = torch.cat([batch['natural_image'], torch.zeros(BATCH, 1, SIZE, SIZE)], dim=1)
    with torch.no_grad():
        pooled = task.student(torch.cat([batch['image'], natural])).double().numpy()
        teacher_pooled = task.teacher['encoder'](batch['image']).double().numpy()
    pooled_rs, pooled_natural = pooled[:BATCH], pooled[BATCH:]

    def project(mlp: nn.Sequential, x: np.ndarray) -> np.ndarray:
        w1, b1 = mlp[0].weight.detach().double().numpy(), mlp[0].bias.detach().double().numpy()
        w2, b2 = mlp[2].weight.detach().double().numpy(), mlp[2].bias.detach().double().numpy()
        return unit_rows(np.maximum(x @ w1.T + b1, 0) @ w2.T + b2)

    q = project(task.projector.mlp, pooled_rs)
    k = project(task.teacher['projector'].mlp, teacher_pooled)
    queue = task.queue.keys.double().numpy()
    np.testing.assert_allclose(keys.double().numpy(), k, atol=1e-5)
    expected_contrastive = numpy_infonce(q, k, queue, tau=0.2)
    assert float(terms['loss_contrastive']) == pytest.approx(expected_contrastive, rel=1e-4)

    weight = task.classifier.weight.detach().double().numpy()
    bias = task.classifier.bias.detach().double().numpy()
    logits = pooled_natural @ weight.T + bias
    labels = batch['natural_label'].numpy()
    assert float(terms['loss_supervised']) == pytest.approx(
        numpy_cross_entropy(logits, labels), rel=1e-4
    )
    assert float(terms['natural_accuracy']) == pytest.approx(
        float(np.mean(logits.argmax(axis=1) == labels))
    )


def test_student_batchnorm_mixes_both_sources() -> None:
    # One student pass over patches and natural images: BatchNorm statistics are shared, so the
    # contrastive loss changes with the natural images although they are not in it.
    torch.manual_seed(0)
    task = make_task(augmentation=nn.Identity(), natural_augmentation=nn.Identity())
    batch = make_batch()
    first, _ = task.losses(batch)
    changed = batch | {'natural_image': batch['natural_image'] * 3 + 1}
    second, _ = task.losses(changed)
    assert float(first['loss_contrastive']) != pytest.approx(float(second['loss_contrastive']))


def test_teacher_starts_as_exact_copy_without_gradients() -> None:
    task = make_task()
    teacher = dict(task.teacher.named_parameters())
    student = {f'encoder.{name}': p for name, p in task.student.named_parameters()}
    student |= {f'projector.{name}': p for name, p in task.projector.named_parameters()}
    assert teacher.keys() == student.keys()
    for name, parameter in teacher.items():
        assert torch.equal(parameter, student[name]), name
        assert not parameter.requires_grad
    # The teacher is not optimised; the classifier has no teacher counterpart.
    optimised = {id(p) for p in task.trainable_modules().parameters()}
    assert not optimised & {id(p) for p in task.teacher.parameters()}
    assert all(id(p) in optimised for p in task.classifier.parameters())


def test_ema_updates_key_encoder_and_key_projector() -> None:
    task = make_task(moco_momentum=0.9)
    before = {name: p.detach().clone() for name, p in task.teacher.named_parameters()}
    buffers = {name: b.clone() for name, b in task.teacher.named_buffers()}
    with torch.no_grad():
        for parameter in [*task.student.parameters(), *task.projector.parameters()]:
            parameter.add_(torch.randn_like(parameter))
    task.update_teacher(0)

    students = dict(task.student.named_parameters())
    projector = dict(task.projector.named_parameters())
    for name, parameter in task.teacher.named_parameters():
        part, _, rest = name.partition('.')
        student = (students if part == 'encoder' else projector)[rest].detach()
        expected = 0.9 * before[name] + 0.1 * student
        torch.testing.assert_close(parameter, expected, rtol=0, atol=1e-6)
    # The key projector moved (the official code froze it, docs/gersp.md#deviations).
    key_projector = task.teacher['projector'].mlp[0].weight
    assert not torch.equal(key_projector, before['projector.mlp.0.weight'])
    for name, buffer in task.teacher.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


class Batches(Dataset[dict[str, Tensor]]):
    """Normalised merged batches as the data module delivers them (one per index)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        batch = make_batch(seed=index)
        return {key: value[0] for key, value in batch.items()}


def test_queue_receives_teacher_keys_after_each_step() -> None:
    torch.manual_seed(0)
    task = make_task(queue_size=16)
    initial = task.queue.keys.clone()
    seen_queues: list[Tensor] = []
    keys_per_step: list[Tensor] = []
    losses, teacher_keys = task.losses, task.teacher_keys

    def recording_losses(batch: dict[str, Tensor]) -> Any:
        seen_queues.append(task.queue.keys.clone())
        return losses(batch)

    def recording_keys(view: Tensor) -> Tensor:
        keys = teacher_keys(view)
        keys_per_step.append(keys.clone())
        return keys

    task.losses = recording_losses  # type: ignore[method-assign]
    task.teacher_keys = recording_keys  # type: ignore[method-assign]
    trainer = lightning.Trainer(
        accelerator='cpu',
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, DataLoader(Batches(), batch_size=2))

    assert torch.equal(seen_queues[0], initial)  # step 1 used the queue from before it
    first, second = keys_per_step
    torch.testing.assert_close(seen_queues[1][:, :2], first.T)  # step 2 saw step 1's keys
    torch.testing.assert_close(task.queue.keys[:, :2], first.T)
    torch.testing.assert_close(task.queue.keys[:, 2:4], second.T)
    assert torch.equal(task.queue.keys[:, 4:], initial[:, 4:])
    assert int(task.queue.ptr) == 4
    assert math.isfinite(float(trainer.callback_metrics['train_loss']))
    # lr logged from SGD: 0.007 scaled linearly from a total batch of 256 to 2.
    assert float(trainer.callback_metrics['lr']) == pytest.approx(0.007 * 2 / 256)


def test_queue_is_capped_at_one_key_per_patch_and_epoch() -> None:
    with pytest.warns(UserWarning, match='capped from 16'):
        task = make_task(queue_size=16, samples_per_epoch=6)
    assert task.queue.keys.shape == (8, 6)


def test_mixing_puts_natural_rgb_on_named_bands_and_zeros_elsewhere() -> None:
    expected = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    assert torch.equal(natural_band_mixing(4, BANDS), expected)
    # Sentinel-style order: nir, blue, green, red (names are case-insensitive).
    reordered = natural_band_mixing(4, ['NIR', 'B', 'G', 'R'])
    assert torch.equal(reordered, torch.tensor([[0.0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]]))
    # Explicit bands, by name or 1-based position; a band given for all three gets the gray level.
    explicit = natural_band_mixing(4, ['b8', 'b4', 'b3', 'b2'], ['b4', 3, 'B2'])
    assert torch.equal(explicit, torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]))
    panchromatic = natural_band_mixing(1, ['pan'], [1, 1, 1])
    torch.testing.assert_close(panchromatic, torch.full((1, 3), 1 / 3))

    task = make_task()
    natural = torch.randn(2, 3, SIZE, SIZE)
    mapped = task.natural_to_bands(natural)
    assert torch.equal(mapped[:, :3], natural)
    assert torch.equal(mapped[:, 3], torch.zeros(2, SIZE, SIZE))


def test_mixing_of_unnamed_bands() -> None:
    assert torch.equal(natural_band_mixing(3), torch.eye(3))  # three bands without names
    with pytest.warns(UserWarning, match='bands 1, 2, 3'):
        assert torch.equal(natural_band_mixing(3, ['band_1', 'band_2', 'band_3']), torch.eye(3))
    with pytest.raises(InputError, match='task.rgb_bands: cannot tell'):
        natural_band_mixing(2, ['vv', 'vh'])
    with pytest.raises(InputError, match='task.rgb_bands: needs 3 entries'):
        natural_band_mixing(4, BANDS, ['red', 'green'])
    with pytest.raises(InputError, match="'swir' is neither a band name nor 1 to 4"):
        natural_band_mixing(4, BANDS, ['red', 'green', 'swir'])
    with pytest.raises(InputError, match='neither'):
        natural_band_mixing(4, BANDS, [1, 2, 5])
    with pytest.raises(InputError, match='task.rgb_bands'):
        make_task(in_channels=2, band_names=['vv', 'vh'])


def test_natural_images_train_only_the_rgb_kernels_of_the_first_conv() -> None:
    task = make_task()
    features = task.student(task.natural_to_bands(torch.randn(4, 3, SIZE, SIZE)))
    features.sum().backward()
    gradient = task.student.conv1.weight.grad
    assert gradient is not None
    assert torch.count_nonzero(gradient[:, 3]) == 0  # NIR receives zeros from natural images
    assert torch.count_nonzero(gradient[:, :3]) > 0


def test_default_views_keep_shape_and_differ() -> None:
    torch.manual_seed(0)
    task = make_task()
    image = torch.randn(BATCH, 4, SIZE, SIZE)
    first, second = task.augmentation(image), task.augmentation(image)
    assert first.shape == second.shape == image.shape
    assert not torch.allclose(first, second)
    natural = task.natural_augmentation(torch.randn(BATCH, 3, SIZE, SIZE))
    assert natural.shape == (BATCH, 3, SIZE, SIZE)


def test_shuffle_bn_only_under_ddp_without_syncbn(monkeypatch: pytest.MonkeyPatch) -> None:
    task = make_task()
    assert not task._shuffles_bn()  # a single process
    monkeypatch.setattr(gersp_module.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(gersp_module.dist, 'get_world_size', lambda: 2)
    assert task._shuffles_bn()
    task.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(task.teacher)
    assert not task._shuffles_bn()  # SyncBatchNorm: statistics are global anyway


def test_shuffled_keys_come_back_in_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Shuffle-BN with lightly's helpers in a one-process gloo group: the permutation is real,
    # and train-mode BatchNorm is permutation invariant, so the keys must come back unchanged.
    torch.manual_seed(0)
    task = make_task()
    view = torch.randn(8, 4, SIZE, SIZE)
    expected = task.teacher_keys(view)
    permutations: list[Tensor] = []
    shuffle = gersp_module.batch_shuffle_distributed

    def recording_shuffle(batch: Tensor) -> tuple[Tensor, Tensor]:
        shuffled, restore = shuffle(batch)
        permutations.append(restore)
        return shuffled, restore

    monkeypatch.setattr(gersp_module, 'batch_shuffle_distributed', recording_shuffle)
    monkeypatch.setattr(task, '_shuffles_bn', lambda: True)
    torch.distributed.init_process_group(
        'gloo', init_method=f'file://{tmp_path / "rendezvous"}', rank=0, world_size=1
    )
    try:
        torch.manual_seed(1)
        keys = task.teacher_keys(view)
    finally:
        torch.distributed.destroy_process_group()
    assert len(permutations) == 1
    assert not torch.equal(permutations[0], torch.arange(8))
    torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-4)
