"""ExtentIndex: the files a box overlaps, against a brute-force check of every file."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from geocmid.raster.extent_index import Extent, ExtentIndex


def brute_force(extents: list[Extent], box: Extent) -> list[int]:
    """Files overlapping ``box`` by a positive area, written as interval intersections."""
    xmin, ymin, xmax, ymax = box
    found = []
    for i, (left, bottom, right, top) in enumerate(extents):
        width = min(right, xmax) - max(left, xmin)
        height = min(top, ymax) - max(bottom, ymin)
        if width > 0 and height > 0:
            found.append(i)
    return found


#: Boxes on a 0.5-unit lattice, so edges often coincide exactly (touching is not overlapping).
boxes = st.tuples(
    st.integers(-40, 40), st.integers(-40, 40), st.integers(1, 30), st.integers(1, 30)
).map(lambda b: (b[0] / 2, b[1] / 2, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2))


@settings(max_examples=200, deadline=None)
@given(files=st.lists(boxes, min_size=1, max_size=12), queries=st.lists(boxes, max_size=10))
def test_overlapping_matches_brute_force(files: list[Extent], queries: list[Extent]) -> None:
    index = ExtentIndex(files)
    for query in queries:
        assert index.overlapping(*query) == brute_force(files, query)


def test_touching_outside_and_huge_boxes() -> None:
    # Four 10 x 10 tiles in a 2 x 2 block, a fifth far away, a sixth over the first two.
    files = [(0, 10, 10, 20), (10, 10, 20, 20), (0, 0, 10, 10), (10, 0, 20, 10),
             (1000, 1000, 1010, 1010), (5, 12, 15, 18)]  # fmt: skip
    index = ExtentIndex(files)
    assert index.overlapping(2, 12, 8, 18) == [0, 5]
    assert index.overlapping(8, 8, 12, 13) == [0, 1, 2, 3, 5]
    assert index.overlapping(8, 8, 12, 12) == [0, 1, 2, 3]  # touches 5 along y = 12 only
    assert index.overlapping(10, 0, 12, 10) == [3]  # touches tile 2 along x = 10 only
    assert index.overlapping(20, 0, 30, 20) == []  # touches tiles 1 and 3 only
    assert index.overlapping(-50, -50, -40, -40) == []
    # Larger than the data: spans more bins than there are, so every file is checked.
    assert index.overlapping(-1e6, -1e6, 1e6, 1e6) == [0, 1, 2, 3, 4, 5]
    assert index.overlapping(5, 5, 1005, 1005) == [0, 1, 2, 3, 4, 5]
