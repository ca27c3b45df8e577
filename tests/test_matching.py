"""Tests for geocmid.models.matching: token cell centres and matching by true crop overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geocmid.errors import InputError
from geocmid.models.matching import cell_centres, gather_tokens, match_tokens
from geocmid.transforms.augment import TwoViewAugmentation


def centres(box: list[float], flipped: bool = False, grid_size: int = 7) -> torch.Tensor:
    """Cell centres of one crop, as a batch of one."""
    return cell_centres(torch.tensor([box]), torch.tensor([flipped]), grid_size)


def reference_matches(
    centres_a: np.ndarray, centres_b: np.ndarray, num_matches: int
) -> tuple[list[int], list[int]]:
    """Spec 7.2 for one image, written with explicit loops."""
    nearest = []
    for i, (ya, xa) in enumerate(centres_a):
        best_j, best_d = -1, float('inf')
        for j, (yb, xb) in enumerate(centres_b):
            d = ((ya - yb) ** 2 + (xa - xb) ** 2) ** 0.5
            if d < best_d:
                best_j, best_d = j, d
        nearest.append((best_d, i, best_j))
    kept = sorted(nearest)[:num_matches]
    kept.sort(key=lambda entry: entry[1])
    return [i for _, i, _ in kept], [j for _, _, j in kept]


def test_cell_centres_of_a_known_box() -> None:
    got = centres([10.0, 20.0, 74.0, 52.0], grid_size=2)
    # Rows at 20 + (0.5, 1.5) * 32 / 2, columns at 10 + (0.5, 1.5) * 64 / 2; (y, x), raster order.
    expected = torch.tensor([[[28.0, 26.0], [28.0, 58.0], [44.0, 26.0], [44.0, 58.0]]])
    torch.testing.assert_close(got, expected)


def test_cell_centres_of_a_flipped_box_reverse_the_columns() -> None:
    got = centres([10.0, 20.0, 74.0, 52.0], flipped=True, grid_size=2)
    expected = torch.tensor([[[28.0, 58.0], [28.0, 26.0], [44.0, 58.0], [44.0, 26.0]]])
    torch.testing.assert_close(got, expected)


def test_identical_crops_match_the_diagonal() -> None:
    box = [5.0, 3.0, 229.0, 227.0]
    idx_a, idx_b = match_tokens(centres(box), centres(box), num_matches=20)
    # All 49 distances are zero: ties keep the first 20 tokens in raster order.
    assert idx_a.tolist() == [list(range(20))]
    assert idx_b.tolist() == [list(range(20))]


def test_crop_shifted_by_one_cell_matches_the_shifted_index() -> None:
    # 224 px crops on a 7 x 7 grid: one cell is 32 px; crop b starts one cell to the right.
    idx_a, idx_b = match_tokens(
        centres([0.0, 0.0, 224.0, 224.0]), centres([32.0, 0.0, 256.0, 224.0]), num_matches=20
    )
    # Column l of a coincides with column l - 1 of b for l >= 1 (distance 0); column 0 of a is a
    # cell away from everything. The first 20 zero-distance tokens in raster order:
    expected_a = [k * 7 + col for k in range(4) for col in range(1, 7)][:20]
    assert idx_a.tolist() == [expected_a]
    assert idx_b.tolist() == [[i - 1 for i in expected_a]]


def test_crop_shifted_down_by_one_cell_matches_the_row_below() -> None:
    idx_a, idx_b = match_tokens(
        centres([0.0, 32.0, 224.0, 256.0]), centres([0.0, 0.0, 224.0, 224.0]), num_matches=7
    )
    # Row k of a sits on row k + 1 of b; all of a's rows overlap, the first 7 tokens are row 0.
    assert idx_a.tolist() == [list(range(7))]
    assert idx_b.tolist() == [list(range(7, 14))]


def test_flipped_crop_matches_mirrored_columns() -> None:
    box = [0.0, 0.0, 224.0, 224.0]
    idx_a, idx_b = match_tokens(centres(box), centres(box, flipped=True), num_matches=20)
    assert idx_a.tolist() == [list(range(20))]
    assert idx_b.tolist() == [[(i // 7) * 7 + 6 - i % 7 for i in range(20)]]


def test_crop_offsets_matter_unlike_the_official_code() -> None:
    # Same size, cut at different places (docs/cmid.md#deviations): token 0 of a must not
    # match token 0 of b.
    idx_a, idx_b = match_tokens(
        centres([0.0, 0.0, 64.0, 64.0], grid_size=2),
        centres([32.0, 32.0, 96.0, 96.0], grid_size=2),
        num_matches=1,
    )
    # a's bottom-right cell (centre 48, 48) coincides with b's top-left cell.
    assert idx_a.tolist() == [[3]]
    assert idx_b.tolist() == [[0]]


def test_disjoint_far_crops_still_return_the_nearest_pairs() -> None:
    ca = centres([0.0, 0.0, 64.0, 64.0], grid_size=2)
    cb = centres([200.0, 200.0, 264.0, 264.0], grid_size=2)
    idx_a, idx_b = match_tokens(ca, cb, num_matches=20)
    # n is capped at the 4 tokens; every token of a is nearest to b's top-left cell.
    assert idx_a.tolist() == [[0, 1, 2, 3]]
    assert idx_b.tolist() == [[0, 0, 0, 0]]
    distances = (ca[0, idx_a[0]] - cb[0, idx_b[0]]).norm(dim=-1)
    assert bool((distances > 150).all())
    # With 2 pairs: the bottom-right cell, then the tie between 1 and 2 goes to the lower index.
    idx_a, idx_b = match_tokens(ca, cb, num_matches=2)
    assert idx_a.tolist() == [[1, 3]]
    assert idx_b.tolist() == [[0, 0]]


def test_match_tokens_agrees_with_a_loop_reference_on_random_crops() -> None:
    generator = torch.Generator().manual_seed(3)
    batch, grid = 6, 7
    origin = torch.rand(batch, 2, generator=generator) * 100
    size = 60 + torch.rand(batch, 2, generator=generator) * 160
    boxes = torch.cat([origin, origin + size], dim=1).double()
    other_origin = torch.rand(batch, 2, generator=generator) * 100
    other_size = 60 + torch.rand(batch, 2, generator=generator) * 160
    other = torch.cat([other_origin, other_origin + other_size], dim=1).double()
    flips_a = torch.tensor([False, True, False, True, False, True])
    flips_b = torch.tensor([False, False, True, True, True, False])
    ca = cell_centres(boxes, flips_a, grid)
    cb = cell_centres(other, flips_b, grid)
    idx_a, idx_b = match_tokens(ca, cb, num_matches=20)
    assert idx_a.shape == idx_b.shape == (batch, 20)
    for b in range(batch):
        expected_a, expected_b = reference_matches(ca[b].numpy(), cb[b].numpy(), 20)
        assert idx_a[b].tolist() == expected_a
        assert idx_b[b].tolist() == expected_b


def test_num_matches_must_be_positive() -> None:
    ca = centres([0.0, 0.0, 64.0, 64.0], grid_size=2)
    with pytest.raises(InputError, match='num_matches'):
        match_tokens(ca, ca, num_matches=0)


def test_gather_tokens_picks_raster_indexed_tokens() -> None:
    feature_map = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    idx = torch.tensor([[0, 3], [2, 1]])
    got = gather_tokens(feature_map, idx)
    assert got.shape == (2, 2, 3)
    for b in range(2):
        for n in range(2):
            row, col = divmod(int(idx[b, n]), 2)
            torch.testing.assert_close(got[b, n], feature_map[b, :, row, col])


def test_cell_centres_describe_the_augmented_crops() -> None:
    # End to end: on an image whose bands are its own pixel coordinates, the mean of each 32 px
    # token cell of crop A is that cell's centre as cell_centres places it in the patch.
    torch.manual_seed(7)
    size, out = 128, 64
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing='ij')
    image = torch.stack([ys, xs])[None].repeat(8, 1, 1, 1)
    view, _ = TwoViewAugmentation(out, [0.0, 0.0], [1.0, 1.0])(image)
    cell_means = F.avg_pool2d(view.image, 32).flatten(2).transpose(1, 2)
    expected = cell_centres(view.geometry.boxes, view.geometry.flipped, out // 32)
    torch.testing.assert_close(cell_means, expected, atol=1e-3, rtol=0)
    assert view.geometry.flipped.any() and not view.geometry.flipped.all()
