"""Label-free change scores of an image pair, per pixel, window by window.

Four methods (docs/change.md compares them on labelled pairs):

- ``cva``: change vector analysis, the classical anchor: the per-band difference standardised
  over the scene, and its magnitude.
- ``irmad``: iteratively reweighted multivariate alteration detection (Nielsen 2007): canonical
  correlation of the two dates finds the band combinations that stay alike where nothing
  changed, which removes the radiometric difference between the dates (sun, season, sensor
  gain); the score is the chi-square statistic of the standardised alteration variates.
- ``features``: how much a pretrained encoder's features differ, from the fine stages
  (stride 2 to 8) as well as the coarse ones, each standardised over the scene, brought to the
  pixel grid.
- ``fusion``: the standardised ``irmad`` score plus half the standardised ``features`` score.

Every score is fitted once on a sample of the pair (:class:`ScoreFit`: IR-MAD's canonical
vectors and each score's scene mean and spread), then computed window by window by
:class:`LabelFreeScore`, so a scene is never held whole. Scores are lightly smoothed
(Gaussian, sigma 0.7 px) to suppress single-pixel misregistration noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from geocmid.errors import InputError
from geocmid.inference.change_methods import CHANGE_METHODS, ChangeMethod

__all__ = (
    'CHANGE_METHODS',
    'ChangeMethod',
    'IrMad',
    'LabelFreeScore',
    'ScoreFit',
    'fit_irmad',
    'fit_scores',
)

#: Encoder stages compared by ``features``: timm's intermediates of stride 2, 4 and 8 (adding the
#: last stage, stride 32, lowered F1 on the labelled Landsat pairs; docs/change.md).
FEATURE_STAGES = (0, 1, 2)
#: Weight of the standardised feature score in ``fusion``.
FEATURE_WEIGHT = 0.5
#: Gaussian smoothing of every score, in pixels.
SMOOTHING_SIGMA = 0.7
#: Reweighting iterations of IR-MAD.
IRMAD_ITERATIONS = 10
#: Scores leave the network divided by this, as logits; see :meth:`LabelFreeScore.forward`.
LOGIT_SCALE = 8.0


@dataclass(frozen=True)
class IrMad:
    """Fitted IR-MAD: canonical vectors and the alteration variates' variances.

    Attributes:
        mean_before: (C,) weighted band means of the first date.
        mean_after: (C,) of the second date.
        a: (C, C) canonical vectors of the first date (columns).
        b: (C, C) of the second date, signed so that each pair correlates positively.
        variance: (C,) variance of each alteration variate under no change, ``2 (1 - rho)``.
    """

    mean_before: np.ndarray
    mean_after: np.ndarray
    a: np.ndarray
    b: np.ndarray
    variance: np.ndarray

    def chi_square(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        """Sum of squared standardised alteration variates of pixels ``(N, C)`` x 2 -> ``(N,)``."""
        mad = (before - self.mean_before) @ self.a - (after - self.mean_after) @ self.b
        return (mad**2 / self.variance).sum(axis=1)


def _chi_square_survival(chi: np.ndarray, dof: int) -> np.ndarray:
    """P(X > chi) for X chi-square with ``dof`` degrees of freedom (no-change probability)."""
    tail = torch.special.gammaincc(torch.tensor(dof / 2.0), torch.from_numpy(chi / 2.0))
    return tail.numpy()


def fit_irmad(before: np.ndarray, after: np.ndarray, iterations: int = IRMAD_ITERATIONS) -> IrMad:
    """Fit IR-MAD on valid pixels of both dates, ``(N, C)`` each.

    Hand-written: no maintained Python library implements IR-MAD; it is a weighted canonical
    correlation analysis repeated with weights that favour pixels likely unchanged.

    Raises:
        InputError: Too few pixels, or bands without variance (a constant band).
    """
    x = before.astype(np.float64)
    y = after.astype(np.float64)
    pixels, bands = x.shape
    if pixels < 10 * bands:
        raise InputError(None, f'too few valid pixels ({pixels}) to fit IR-MAD on {bands} bands')
    weights = np.ones(pixels)
    fitted: IrMad | None = None
    for _ in range(iterations):
        total = weights.sum()
        mean_x = weights @ x / total
        mean_y = weights @ y / total
        xc, yc = x - mean_x, y - mean_y
        sxx = (weights[:, None] * xc).T @ xc / total
        syy = (weights[:, None] * yc).T @ yc / total
        sxy = (weights[:, None] * xc).T @ yc / total
        try:
            lower = np.linalg.cholesky(sxx)
            syy_inv = np.linalg.inv(syy)
        except np.linalg.LinAlgError:
            raise InputError(None, 'a band has no variance; IR-MAD cannot be fitted') from None
        lower_inv = np.linalg.inv(lower)
        squared_rho, vectors = np.linalg.eigh(lower_inv @ sxy @ syy_inv @ sxy.T @ lower_inv.T)
        a = lower_inv.T @ vectors
        b = syy_inv @ sxy.T @ a
        a /= np.sqrt(np.einsum('ij,jk,ki->i', a.T, sxx, a))
        b /= np.sqrt(np.einsum('ij,jk,ki->i', b.T, syy, b))
        b *= np.sign(np.einsum('ij,jk,ki->i', a.T, sxy, b))
        rho = np.sqrt(np.clip(squared_rho, 0.0, 1.0))
        variance = np.maximum(2.0 * (1.0 - rho), 1e-12)
        fitted = IrMad(mean_x, mean_y, a, b, variance)
        weights = _chi_square_survival(fitted.chi_square(x, y), bands)
        if weights.sum() < bands + 1:  # almost everything changed: keep the last fit
            break
    assert fitted is not None
    return fitted


@dataclass
class ScoreFit:
    """What a label-free score needs to know about the whole pair, fitted on a sample.

    Attributes:
        method: the method.
        difference_mean: (C,) scene mean of the per-band difference (``cva``).
        difference_std: (C,) its standard deviation.
        irmad: fitted IR-MAD (``irmad``, ``fusion``).
        centre: scene mean of each component score, by name (``features``, ``irmad``).
        dates: per-date band mean and standard deviation (``before_mean``, ``before_std``,
            ``after_mean``, ``after_std``), for the encoder's relative normalisation.
        spread: scene standard deviation of each component score.
    """

    method: ChangeMethod
    difference_mean: np.ndarray
    difference_std: np.ndarray
    irmad: IrMad | None = None
    dates: dict[str, np.ndarray] = field(default_factory=dict)
    centre: dict[str, float] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)


def _smooth(scores: Tensor, sigma: float = SMOOTHING_SIGMA) -> Tensor:
    """Separable Gaussian smoothing of ``(B, 1, h, w)`` scores, edges reflected."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=scores.dtype, device=scores.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    if min(scores.shape[-2:]) <= radius:
        return scores
    padded = nn.functional.pad(scores, (radius, radius, radius, radius), mode='reflect')
    rows = nn.functional.conv2d(padded, kernel.view(1, 1, 1, -1))
    return nn.functional.conv2d(rows, kernel.view(1, 1, -1, 1))


class LabelFreeScore(nn.Module):
    """The engine's network for label-free change: stacked pairs in, score logits out.

    Args:
        fit: the scene-level fit (:func:`fit_scores`).
        encoder: a timm encoder with ``forward_intermediates``; needed by ``features`` and
            ``fusion``.
    """

    def __init__(self, fit: ScoreFit, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.fit = fit
        self.encoder = encoder
        if fit.method in ('features', 'fusion') and encoder is None:
            raise InputError('--method', f'{fit.method} needs an encoder (--encoder)')

    def components(self, pairs: Tensor) -> dict[str, Tensor]:
        """Unsmoothed, unstandardised component scores ``(B, 1, h, w)`` of ``(B, 2C, h, w)``."""
        before, after = pairs.float().chunk(2, dim=1)
        out: dict[str, Tensor] = {}
        method = self.fit.method
        if method == 'cva':
            mean = torch.as_tensor(self.fit.difference_mean, dtype=pairs.dtype)
            std = torch.as_tensor(self.fit.difference_std, dtype=pairs.dtype)
            difference = (after - before - mean.view(1, -1, 1, 1).to(pairs)) / std.view(
                1, -1, 1, 1
            ).to(pairs)
            out['cva'] = difference.pow(2).sum(1, keepdim=True).sqrt()
        if method in ('irmad', 'fusion'):
            assert self.fit.irmad is not None
            bsz, channels, height, width = before.shape
            flat = [t.permute(0, 2, 3, 1).reshape(-1, channels).double() for t in (before, after)]
            irmad = self.fit.irmad
            mad = (flat[0] - torch.from_numpy(irmad.mean_before).to(flat[0])) @ torch.from_numpy(
                irmad.a
            ).to(flat[0]) - (flat[1] - torch.from_numpy(irmad.mean_after).to(flat[1])) @ (
                torch.from_numpy(irmad.b).to(flat[1])
            )
            chi = (mad**2 / torch.from_numpy(irmad.variance).to(mad)).sum(1)
            out['irmad'] = chi.sqrt().float().view(bsz, height, width)[:, None]
        if method in ('features', 'fusion'):
            out['features'] = self._feature_distance(before, after)
        return out

    def stage_distances(self, before: Tensor, after: Tensor) -> list[Tensor]:
        """Cosine distance of each used stage's features, at pixel resolution, ``(B, 1, h, w)``.

        Used stages: those of stride 8 or finer, where changes of a few pixels still show, and
        the last (see :data:`FEATURE_STAGES`).
        """
        assert self.encoder is not None
        # Relative radiometric normalisation: each date standardised by its own statistics.
        before = (before - self._date_stat('before_mean', before)) / self._date_stat(
            'before_std', before
        )
        after = (after - self._date_stat('after_mean', after)) / self._date_stat('after_std', after)
        # nn.Module types attributes as Tensor | Module; timm encoders define this method.
        stages = self.encoder.forward_intermediates(  # type: ignore[operator]
            torch.cat([before, after]), intermediates_only=True
        )
        used = [stages[i] for i in FEATURE_STAGES if -len(stages) <= i < len(stages)]
        distances = []
        for stage in used:
            a, b = stage.float().chunk(2)
            distance = 1.0 - nn.functional.cosine_similarity(a, b, dim=1, eps=1e-6)[:, None]
            distances.append(
                nn.functional.interpolate(
                    distance, size=before.shape[-2:], mode='bilinear', align_corners=False
                )
            )
        return distances

    def _feature_distance(self, before: Tensor, after: Tensor) -> Tensor:
        """Mean over the used stages of their distance standardised over the scene."""
        distances = self.stage_distances(before, after)
        total = torch.zeros_like(distances[0])
        for index, distance in enumerate(distances):
            name = f'stage{index}'
            total += (distance - self.fit.centre[name]) / self.fit.spread[name]
        return total / len(distances)

    def raw(self, pairs: Tensor) -> Tensor:
        """The method's score ``(B, 1, h, w)`` (smoothed; standardised components for fusion)."""
        parts = {name: _smooth(value) for name, value in self.components(pairs).items()}
        method = self.fit.method
        if method != 'fusion':
            return parts[method]
        return self._standard(parts, 'irmad') + FEATURE_WEIGHT * self._standard(parts, 'features')

    def _date_stat(self, name: str, like: Tensor) -> Tensor:
        return torch.as_tensor(self.fit.dates[name], dtype=like.dtype).view(1, -1, 1, 1).to(like)

    def _standard(self, parts: dict[str, Tensor], name: str) -> Tensor:
        return (parts[name] - self.fit.centre[name]) / self.fit.spread[name]

    def forward(self, pairs: Tensor) -> Tensor:
        """The score divided by :data:`LOGIT_SCALE`, as a logit for the engine's sigmoid.

        The engine blends ``sigmoid(score / LOGIT_SCALE)``; that monotone map keeps every
        threshold on the raw score equivalent to one on the blended value.
        """
        return self.raw(pairs) / LOGIT_SCALE


def fit_scores(
    method: ChangeMethod,
    samples: Iterable[tuple[np.ndarray, np.ndarray]],
    encoder: nn.Module | None = None,
) -> ScoreFit:
    """Fit ``method`` on sample windows of a pair.

    Args:
        method: the label-free method.
        samples: ``(pairs (2C, h, w) normalised, valid (h, w))`` windows of the pair.
        encoder: for ``features`` and ``fusion``.

    Raises:
        InputError: No valid pixel in the samples, or IR-MAD cannot be fitted.
    """
    windows = [(np.asarray(p, dtype=np.float32), np.asarray(v, dtype=bool)) for p, v in samples]
    pixels = [p[:, v].T for p, v in windows if v.any()]
    if not pixels:
        raise InputError(None, 'no valid pixel in the overlap of the pair')
    stacked = np.concatenate(pixels)
    bands = stacked.shape[1] // 2
    before, after = stacked[:, :bands], stacked[:, bands:]
    difference = after - before
    std = difference.std(axis=0)
    fit = ScoreFit(method, difference.mean(axis=0), np.where(std > 0, std, 1.0))
    for name, values in (('before', before), ('after', after)):
        spread = values.std(axis=0)
        fit.dates[f'{name}_mean'] = values.mean(axis=0)
        fit.dates[f'{name}_std'] = np.where(spread > 0, spread, 1.0)
    if method in ('irmad', 'fusion'):
        fit.irmad = fit_irmad(before, after)
    scorer = LabelFreeScore(fit, encoder)
    with torch.no_grad():
        if method in ('features', 'fusion'):
            _standardise(fit, windows, lambda x: scorer.stage_distances(*x.chunk(2, dim=1)))
        if method == 'fusion':
            _standardise(
                fit,
                windows,
                lambda x: [_smooth(v) for v in scorer.components(x).values()],
                names=['irmad', 'features'],  # the order components() gives them for fusion
            )
    return fit


def _standardise(
    fit: ScoreFit,
    windows: list[tuple[np.ndarray, np.ndarray]],
    scores: Callable[[Tensor], list[Tensor]],
    names: list[str] | None = None,
) -> None:
    """Store the scene mean and spread of each of ``scores`` over the valid sample pixels."""
    values: list[list[np.ndarray]] = []
    for window, valid in windows:
        outputs = scores(torch.from_numpy(window)[None].float())
        values = values or [[] for _ in outputs]
        for chunks, output in zip(values, outputs, strict=True):
            chunks.append(output[0, 0].numpy()[valid])
    for index, chunks in enumerate(values):
        name = names[index] if names else f'stage{index}'
        joined = np.concatenate(chunks)
        fit.centre[name] = float(joined.mean())
        fit.spread[name] = float(joined.std()) or 1.0


def no_change_probability(chi: np.ndarray, bands: int) -> np.ndarray:
    """IR-MAD's no-change probability of chi-square statistics (for reports and tests)."""
    return _chi_square_survival(np.asarray(chi, dtype=np.float64), bands)


def logit_to_score(probabilities: np.ndarray) -> np.ndarray:
    """Invert the engine's sigmoid of :meth:`LabelFreeScore.forward`: blended raw scores."""
    clipped = np.clip(probabilities.astype(np.float64), 1e-12, 1 - 1e-12)
    return LOGIT_SCALE * np.log(clipped / (1 - clipped))


def score_to_probability(score: float) -> float:
    """The engine's value of raw ``score`` (the threshold the writer applies)."""
    return 1.0 / (1.0 + math.exp(-score / LOGIT_SCALE))
