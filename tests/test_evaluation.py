"""Tests for geocmid.evaluation (k-NN, linear probe) and `geocmid evaluate` on tiny chip folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from geocmid.errors import InputError
from geocmid.evaluation.evaluate import (
    evaluate,
    evaluate_knn,
    evaluate_linear,
    per_class_accuracy,
)
from geocmid.evaluation.knn import knn_predict
from geocmid.evaluation.linear import fit_linear_probe
from geocmid.io.cards import ModelCard, write_card
from geocmid.models.weights import save_encoder

SIZE = 32  # every chip is resized to this; resnet18 at 32 px keeps each evaluation < 1 s


def make_chips(
    root: Path, per_class: int = 30, *, shuffled: bool = False, bands: int = 3, seed: int = 0
) -> Path:
    """Two classes of 16 px PNG chips: 'bright' (mean 190) and 'dark' (mean 60), with noise.

    With ``shuffled`` the folder an image lands in is drawn at random, independent of its
    brightness, so the labels carry no information about the pixels.
    """
    rng = np.random.default_rng(seed)
    brightness = np.repeat([190, 60], per_class)
    folders = np.repeat(['bright', 'dark'], per_class)
    if shuffled:
        folders = rng.permutation(folders)
    for i, (level, folder) in enumerate(zip(brightness, folders, strict=True)):
        pixels = np.clip(level + rng.normal(0, 25, (16, 16, bands)), 0, 255).astype(np.uint8)
        path = root / folder / f'{i:03d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[..., 0] if bands == 1 else pixels).save(path)
    return root


def save_resnet18(folder: Path, *, bands: int = 3, seed: int = 1) -> Path:
    """A resnet18 ``encoder.pt`` with its model card (3 bands, patch 32, 8-bit normalisation)."""
    torch.manual_seed(seed)
    model = timm.create_model('resnet18', in_chans=bands, num_classes=0)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = save_encoder(folder / 'encoder.pt', model.state_dict())
    names = ['red', 'green', 'blue', 'nir'][:bands]
    card = ModelCard(
        method='test',
        backbone='resnet18',
        bands=names,
        band_indices=list(range(1, bands + 1)),
        mean=[120.0] * bands,
        std=[60.0] * bands,
        patch_size=SIZE,
    )
    write_card(encoder, card)
    return encoder


# --- k-NN against an independent loop ---------------------------------------------------------


def knn_reference(
    train: np.ndarray, labels: np.ndarray, test: np.ndarray, classes: int, k: int, t: float
) -> list[int]:
    """DINO's weighted vote written with explicit loops over numpy arrays."""
    predictions = []
    for query in test:
        sims = []
        for row, label in zip(train, labels, strict=True):
            cosine = float(np.dot(query, row) / (np.linalg.norm(query) * np.linalg.norm(row)))
            sims.append((cosine, int(label)))
        sims.sort(key=lambda pair: -pair[0])
        votes = [0.0] * classes
        for cosine, label in sims[:k]:
            votes[label] += np.exp(cosine / t)
        predictions.append(int(np.argmax(votes)))
    return predictions


def test_knn_matches_loop_reference() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(50, 8))
    labels = rng.integers(0, 4, 50)
    test = rng.normal(size=(17, 8))
    for k, t in ((1, 0.07), (5, 0.07), (20, 0.5), (50, 1.0)):
        got = knn_predict(
            torch.from_numpy(train).float(),
            torch.from_numpy(labels),
            torch.from_numpy(test).float(),
            4,
            k=k,
            temperature=t,
            chunk_size=5,  # chunks smaller than the test set
        )
        assert got.tolist() == knn_reference(train, labels, test, 4, k, t), (k, t)


def test_knn_votes_are_weighted_by_similarity() -> None:
    # One very close neighbour of class 0 outweighs two distant ones of class 1 at T = 0.07
    # (exp(0.99 / 0.07) > 2 exp(0.5 / 0.07)); an unweighted majority would say class 1.
    train = torch.tensor([[1.0, 0.0], [0.5, 0.866], [0.5, -0.866], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[0.99, np.sqrt(1 - 0.99**2)]], dtype=torch.float32)
    assert knn_predict(train, labels, query, 2, k=3, temperature=0.07).tolist() == [0]
    # With a very high temperature the weights become equal and the majority wins.
    assert knn_predict(train, labels, query, 2, k=3, temperature=1e6).tolist() == [1]


def test_knn_k_larger_than_training_set_and_bad_parameters() -> None:
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    query = torch.tensor([[1.0, 0.1]])
    assert knn_predict(train, labels, query, 2, k=20).tolist() == [0]
    with pytest.raises(InputError, match='--k'):
        knn_predict(train, labels, query, 2, k=0)
    with pytest.raises(InputError, match='--temperature'):
        knn_predict(train, labels, query, 2, temperature=0.0)


# --- linear probe ---------------------------------------------------------------------------------


def test_linear_probe_reaches_the_regularised_optimum() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 3
    labels = np.repeat(np.arange(3), 20)
    features = centres[labels] + rng.normal(size=(60, 6))
    l2 = 0.01
    probe = fit_linear_probe(torch.from_numpy(features), torch.from_numpy(labels), 3, l2=l2)

    # Independent check of optimality: the gradient of mean cross-entropy + l2/2 |W|^2,
    # written out in numpy (softmax minus one-hot), vanishes at the returned weights.
    mean, std = features.mean(0), features.std(0)
    x = (features - mean) / std
    w, b = probe.weight.numpy(), probe.bias.numpy()
    scores = x @ w.T + b
    p = np.exp(scores - scores.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = p - np.eye(3)[labels]
    grad_w = residual.T @ x / len(x) + l2 * w
    grad_b = residual.mean(0)
    assert np.abs(grad_w).max() < 1e-6
    assert np.abs(grad_b).max() < 1e-6
    np.testing.assert_allclose(probe.mean.numpy(), mean)
    assert (probe.predict(torch.from_numpy(features)).numpy() == labels).mean() == 1.0


def test_linear_probe_is_deterministic_and_handles_constant_features() -> None:
    rng = np.random.default_rng(1)
    features = torch.from_numpy(rng.normal(size=(40, 5)))
    features[:, 2] = 7.0  # a constant feature must not divide by zero
    labels = torch.from_numpy(rng.integers(0, 2, 40))
    first = fit_linear_probe(features, labels, 2)
    second = fit_linear_probe(features, labels, 2)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert torch.isfinite(first.weight).all()
    assert first.std[2] == 1.0
    with pytest.raises(InputError, match='--l2'):
        fit_linear_probe(features, labels, 2, l2=-1.0)


def test_per_class_accuracy() -> None:
    predictions = torch.tensor([0, 0, 1, 1, 0])
    labels = torch.tensor([0, 1, 1, 1, 0])
    assert per_class_accuracy(predictions, labels, ['a', 'b', 'c']) == {
        'a': 1.0,
        'b': 2 / 3,
        'c': None,
    }


# --- end to end on chip folders -------------------------------------------------------------------


def test_knn_separable_classes_score_high(tmp_path: Path) -> None:
    images = make_chips(tmp_path / 'chips')
    result = evaluate_knn('random:resnet18', images, bands=[1, 2, 3], size=SIZE, split=0.5)
    assert result.protocol == 'knn'
    assert result.classes == ['bright', 'dark']
    assert (result.num_train, result.num_test) == (30, 30)
    assert result.top1 >= 0.95
    assert set(result.per_class) == {'bright', 'dark'}
    assert result.settings['normalisation'] == 'training chips'
    assert result.settings['k'] == 20 and result.settings['feature_dim'] == 512


def test_knn_shuffled_labels_score_near_chance(tmp_path: Path) -> None:
    images = make_chips(tmp_path / 'chips', per_class=40, shuffled=True)
    result = evaluate_knn('random:resnet18', images, bands=[1, 2, 3], size=SIZE, split=0.5)
    assert result.num_test == 40
    assert 0.25 <= result.top1 <= 0.75


def test_same_encoder_gives_the_same_accuracy_twice(tmp_path: Path) -> None:
    images = make_chips(tmp_path / 'chips', per_class=20)
    encoder = save_resnet18(tmp_path / 'run')
    for protocol in ('knn', 'linear'):
        first = evaluate(protocol, encoder, images)
        second = evaluate(protocol, tmp_path / 'run', images)  # the run folder works too
        assert first.top1 == second.top1
        assert first.predictions == second.predictions
        assert first.settings['size'] == SIZE  # the card's patch size
        assert first.settings['normalisation'] == 'model card'
        assert first.settings['mean'] == [120.0] * 3
    # A random encoder is initialised from the seed: the baseline is reproducible too.
    runs = [evaluate_linear('random:resnet18', images, bands=[1, 2, 3], size=SIZE) for _ in '12']
    assert runs[0].predictions == runs[1].predictions


def test_train_and_test_folders(tmp_path: Path) -> None:
    train = make_chips(tmp_path / 'train', per_class=10, seed=1)
    test = make_chips(tmp_path / 'test', per_class=5, seed=2)
    result = evaluate_knn(
        'random:resnet18', train=train, test=test, bands=[1, 2, 3], size=SIZE, k=5
    )
    assert (result.num_train, result.num_test) == (20, 10)
    assert result.settings['train'] == str(train) and result.settings['k'] == 5
    (test / 'extra').mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(test / 'extra' / 'x.png')
    with pytest.raises(InputError, match='classes differ.*extra: extra'):
        evaluate_knn('random:resnet18', train=train, test=test, bands=[1, 2, 3], size=SIZE)
    with pytest.raises(InputError, match='not both'):
        evaluate_knn('random:resnet18', train, train=train, test=test, bands=[1, 2, 3])


@pytest.mark.filterwarnings('ignore::rasterio.errors.NotGeoreferencedWarning')
def test_band_selection_feeds_an_rgb_encoder_from_4_band_tiffs(tmp_path: Path) -> None:
    import rasterio

    rng = np.random.default_rng(0)
    for cls, level in (('bright', 190), ('dark', 60)):
        for i in range(8):
            data = np.clip(level + rng.normal(0, 20, (4, 16, 16)), 0, 255).astype(np.uint8)
            path = tmp_path / 'tifs' / cls / f'{i}.tif'
            path.parent.mkdir(parents=True, exist_ok=True)
            profile = {'driver': 'GTiff', 'width': 16, 'height': 16, 'count': 4, 'dtype': 'uint8'}
            with rasterio.open(path, 'w', **profile) as dst:
                dst.write(data)
    encoder = save_resnet18(tmp_path / 'rgb')
    with pytest.raises(InputError, match='images have 4 band.*encoder takes 3.*--bands'):
        evaluate_knn(encoder, tmp_path / 'tifs')
    result = evaluate_knn(encoder, tmp_path / 'tifs', bands=[1, 2, 3])
    assert result.settings['bands'] == [1, 2, 3] and result.top1 == 1.0
    with pytest.raises(InputError, match='band.*5.*4 band'):
        evaluate_knn('random:resnet18', tmp_path / 'tifs', bands=[1, 2, 5])


# --- bad input --------------------------------------------------------------------------------


def test_folder_with_one_class_is_an_input_error(tmp_path: Path) -> None:
    images = make_chips(tmp_path / 'chips', per_class=4)
    for path in (images / 'dark').iterdir():
        path.unlink()
    (images / 'dark').rmdir()
    with pytest.raises(InputError, match='1 class sub-folder.*at least 2'):
        evaluate_knn('random:resnet18', images, bands=[1, 2, 3])


def test_mixed_band_counts_are_an_input_error(tmp_path: Path) -> None:
    images = make_chips(tmp_path / 'chips', per_class=3)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(images / 'dark' / 'gray.png')
    with pytest.raises(InputError, match='gray.png: has 1 band'):
        evaluate_knn('random:resnet18', images, bands=[1, 2, 3])


def test_random_encoder_without_bands_takes_all_bands_of_the_chips(tmp_path: Path) -> None:
    images = make_chips(tmp_path / 'chips', per_class=4)
    result = evaluate_knn('random:resnet18', images, size=SIZE, split=0.5)
    assert result.settings['bands'] == [1, 2, 3] and result.num_test == 4


def test_encoder_without_card_is_an_input_error(tmp_path: Path) -> None:
    images = make_chips(tmp_path / 'chips', per_class=3)
    encoder = save_resnet18(tmp_path / 'run')
    (tmp_path / 'run' / 'model_card.json').unlink()
    with pytest.raises(InputError, match='no model_card.json'):
        evaluate_knn(encoder, images, bands=[1, 2, 3])


# --- command line -------------------------------------------------------------------------------


def run_cli(args: list[str]) -> int:
    """Run `geocmid` through its entry point; return the exit code."""
    from geocmid_cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code)


def test_cli_knn_prints_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = make_chips(tmp_path / 'chips', per_class=10)
    out = tmp_path / 'knn.json'
    args = [
        'evaluate',
        'knn',
        '--encoder',
        'random:resnet18',
        '--images',
        str(images),
        '--bands',
        '1,2,3',
        '--size',
        str(SIZE),
        '--json',
        str(out),
        '--verbose',
    ]
    assert run_cli(args) == 0
    printed = capsys.readouterr().out
    body = json.loads(out.read_text())
    assert f'k-NN top-1: {body["top1"]:.4f}' in printed
    assert '  bright: ' in printed and '  dark: ' in printed
    assert body['protocol'] == 'knn' and body['num_test'] == 4
    assert body['settings']['k'] == 16  # k = 20 capped at the 16 training chips
    assert run_cli(args) == 2  # the JSON exists: no silent overwrite
    assert 'exists; use --overwrite' in capsys.readouterr().err
    assert run_cli([*args, '--overwrite']) == 0


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = make_chips(tmp_path / 'chips', per_class=3)
    # (A random encoder without --bands takes all bands of the chips: tests/test_cli_defaults.py)
    assert (
        run_cli(
            [
                'evaluate',
                'knn',
                '--encoder',
                'random:resnet18',
                '--images',
                str(images),
                '--bands',
                '1,x',
            ]
        )
        == 2
    )
