"""Run machinery shared by every training command."""

import pytest
import torch

from geocmid.runs.folders import resolve_precision


def test_auto_precision_is_full_precision_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_precision('auto') == '32'


@pytest.mark.parametrize(('bf16', 'expected'), [(True, 'bf16-mixed'), (False, '16-mixed')])
def test_auto_precision_is_mixed_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: bf16)
    assert resolve_precision('auto') == expected
    assert resolve_precision('auto', accelerator='cpu') == '32'  # asked for the CPU


@pytest.mark.parametrize('precision', ['32', 'bf16-mixed', '16-mixed'])
def test_explicit_precision_is_kept(precision: str) -> None:
    assert resolve_precision(precision) == precision  # type: ignore[arg-type]
