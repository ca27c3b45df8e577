"""Label-free change scores: CVA, IR-MAD, encoder features and their fusion."""

import numpy as np
import pytest
import timm
import torch

from geocmid.errors import InputError
from geocmid.inference.change_methods import check_method
from geocmid.inference.change_scores import (
    LabelFreeScore,
    fit_irmad,
    fit_scores,
    logit_to_score,
    score_to_probability,
)


def pair_with_radiometric_shift(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pair with a sensor shift between the dates, a changed square, and its mask.

    Before is (4, 64, 64) noise; after is a per-band gain, offset and band mixing of before,
    plus noise, with a 16x16 square of other ground seen through the same shift.
    """
    rng = np.random.default_rng(seed)
    before = rng.normal(0, 1, (4, 64, 64)).astype(np.float32)
    mixing = np.eye(4) * np.array([1.8, 0.6, 1.2, 2.5]) + 0.2 * rng.normal(0, 1, (4, 4))
    after = np.einsum('ij,jhw->ihw', mixing, before) + np.array([3, -2, 1, 5])[:, None, None]
    after += rng.normal(0, 0.05, after.shape)
    changed = np.zeros((64, 64), bool)
    changed[20:36, 30:46] = True
    # Changed pixels: what the same sensor shift would show of other ground.
    other = rng.normal(0, 1, (4, int(changed.sum())))
    after[:, changed] = mixing @ other + np.array([3, -2, 1, 5])[:, None]
    return before, after.astype(np.float32), changed


def test_irmad_sees_through_a_radiometric_shift_that_fools_cva() -> None:
    before, after, changed = pair_with_radiometric_shift()
    pixels = [x.reshape(4, -1).T for x in (before, after)]
    chi = fit_irmad(*pixels).chi_square(*pixels).reshape(64, 64)
    # The changed square stands far above every unchanged pixel's alteration.
    assert np.quantile(chi[changed], 0.05) > np.quantile(chi[~changed], 0.99)
    # CVA on the same pair: the gain change makes unchanged pixels differ as much as changed.
    difference = after - before
    standard = (difference - difference.mean((1, 2), keepdims=True)) / difference.std(
        (1, 2), keepdims=True
    )
    magnitude = np.sqrt((standard**2).sum(0))
    assert np.quantile(magnitude[changed], 0.05) < np.quantile(magnitude[~changed], 0.99)


@pytest.mark.parametrize('method', ['cva', 'irmad'])
def test_window_scores_equal_the_whole_scene_inside_the_window(method: str) -> None:
    before, after, _ = pair_with_radiometric_shift(1)
    stacked = np.concatenate([before, after])
    valid = np.ones((64, 64), bool)
    scorer = LabelFreeScore(fit_scores(method, [(stacked, valid)]))  # type: ignore[arg-type]
    with torch.no_grad():
        whole = scorer.raw(torch.from_numpy(stacked)[None])[0, 0]
        window = scorer.raw(torch.from_numpy(stacked[:, 8:40, 16:48].copy())[None])[0, 0]
    # Away from the window's edge (smoothing radius 2), a window sees what the scene sees.
    assert torch.allclose(window[3:-3, 3:-3], whole[11:37, 19:45], atol=1e-4)


def test_fusion_ranks_the_changed_square_above_the_rest() -> None:
    before, after, changed = pair_with_radiometric_shift(2)
    stacked = np.concatenate([before, after])
    torch.manual_seed(0)
    encoder = timm.create_model('resnet18', pretrained=False, in_chans=4).eval()
    fit = fit_scores('fusion', [(stacked, np.ones((64, 64), bool))], encoder)
    assert set(fit.centre) == {'stage0', 'stage1', 'stage2', 'irmad', 'features'}
    with torch.no_grad():
        score = LabelFreeScore(fit, encoder).raw(torch.from_numpy(stacked)[None])[0, 0].numpy()
    assert np.median(score[changed]) > np.quantile(score[~changed], 0.9)


@pytest.mark.parametrize('method', ['features', 'fusion'])
def test_encoder_methods_without_an_encoder_are_an_input_error(method: str) -> None:
    before, after, _ = pair_with_radiometric_shift()
    with pytest.raises(InputError, match='needs an encoder'):
        fit_scores(method, [(np.concatenate([before, after]), np.ones((64, 64), bool))])  # type: ignore[arg-type]


def test_unknown_method_names_the_option() -> None:
    with pytest.raises(InputError, match="--method: unknown method 'pca'"):
        check_method('pca')
    assert check_method('irmad') == 'irmad'


def test_no_valid_pixel_is_an_input_error() -> None:
    with pytest.raises(InputError, match='no valid pixel'):
        fit_scores('cva', [(np.zeros((8, 16, 16), np.float32), np.zeros((16, 16), bool))])


def test_constant_band_cannot_fit_irmad() -> None:
    rng = np.random.default_rng(0)
    before = rng.normal(0, 1, (500, 3))
    before[:, 1] = 7.0
    with pytest.raises(InputError, match='no variance'):
        fit_irmad(before, rng.normal(0, 1, (500, 3)))


def test_logit_round_trip_keeps_scores() -> None:
    scores = np.array([-5.0, 0.0, 3.5, 40.0])
    probabilities = np.array([score_to_probability(s) for s in scores], dtype=np.float32)
    assert np.allclose(logit_to_score(probabilities), scores, atol=1e-3 * 40)
