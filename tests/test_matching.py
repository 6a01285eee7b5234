import pytest
import torch
import torch.nn.functional as F

from matching import location_grid, match_by_features, match_by_location, nearest_neighbors
from naive_loss import brute_force_nearest_neighbors


def test_location_grid_hand_derived():
    # Box (top 10, left 20, height 30, width 60) on a 3 x 4 map: cells are 10 px high and 15 px wide,
    # centres at rows 15, 25, 35 and columns 27.5, 42.5, 57.5, 72.5; flipped, the columns run backwards.
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [10.0, 20.0, 30.0, 60.0], [0.0, 5.0, 6.0, 2.0]])
    flips = torch.tensor([False, True, False])
    grid = location_grid(boxes, flips, (3, 4))
    assert grid.shape == (3, 3, 4, 2)
    rows, cols = [15.0, 25.0, 35.0], [27.5, 42.5, 57.5, 72.5]
    for r in range(3):
        for c in range(4):
            assert grid[0, r, c].tolist() == [rows[r], cols[c]]
            assert grid[1, r, c].tolist() == [rows[r], cols[3 - c]]
            # third box: 2 px per cell row, 0.5 px per cell column
            assert grid[2, r, c].tolist() == [1.0 + 2.0 * r, 5.25 + 0.5 * c]


def test_location_grid_rejects_bad_shapes():
    with pytest.raises(ValueError, match="boxes"):
        location_grid(torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool), (2, 2))
    with pytest.raises(ValueError, match="flips"):
        location_grid(torch.zeros(2, 4), torch.zeros(3, dtype=torch.bool), (2, 2))


@pytest.mark.parametrize("num_matches", [None, 1, 3, 7, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_neighbors_matches_brute_force(num_matches, dtype):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(4, 7, 5, generator=generator, dtype=dtype)
    candidates = torch.randn(4, 9, 5, generator=generator, dtype=dtype)
    query_idx, candidate_idx = nearest_neighbors(queries, candidates, num_matches)
    expected_query_idx, expected_candidate_idx = brute_force_nearest_neighbors(queries, candidates, num_matches)
    k = 7 if num_matches is None else min(num_matches, 7)
    assert query_idx.shape == candidate_idx.shape == (4, k)
    assert query_idx.dtype == candidate_idx.dtype == torch.long
    assert torch.equal(query_idx, expected_query_idx)
    assert torch.equal(candidate_idx, expected_candidate_idx)
    assert (query_idx.diff(dim=1) > 0).all()  # ascending cell-index order


def test_nearest_neighbors_ties_go_to_lower_index():
    # Integer points on a line: exact ties everywhere.
    queries = torch.tensor([[[0.0], [2.0], [4.0], [6.0]]])
    candidates = torch.tensor([[[1.0], [3.0], [5.0]]])
    # Every query is at distance 1 from its nearest candidate; query 1 is equidistant from candidates
    # 0 and 1 (takes 0), query 2 from 1 and 2 (takes 1). Keeping 2 of 4 equal distances keeps queries 0, 1.
    query_idx, candidate_idx = nearest_neighbors(queries, candidates, 2)
    assert query_idx.tolist() == [[0, 1]] and candidate_idx.tolist() == [[0, 0]]
    query_idx, candidate_idx = nearest_neighbors(queries, candidates)
    assert query_idx.tolist() == [[0, 1, 2, 3]] and candidate_idx.tolist() == [[0, 0, 1, 2]]


def test_nearest_neighbors_on_grids_with_ties_matches_brute_force():
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 20.0, 40.0, 40.0], [0.0, 0.0, 20.0, 40.0]])
    grid_a = location_grid(boxes, torch.tensor([False, True, False]), (4, 4)).flatten(1, 2)
    grid_b = location_grid(boxes.flip(0), torch.tensor([True, False, False]), (2, 2)).flatten(1, 2)
    for num_matches in (None, 3, 10):
        for queries, candidates in ((grid_a, grid_b), (grid_b, grid_a)):
            got = match_by_location(queries, candidates, num_matches)
            expected = brute_force_nearest_neighbors(queries, candidates, num_matches)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_nearest_neighbors_rejects_bad_num_matches():
    with pytest.raises(ValueError, match="num_matches"):
        nearest_neighbors(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), 0)


# --- geometry: a seed image whose pixels hold their own (row, col) coordinates -----------------------

def crop_cell_coordinates(coordinates, box, flip, view_size, map_size):
    """Cut the box out of the coordinate image, resize it to view_size, flip it, and average each of the
    map_size cells: the "feature" of a cell is the mean seed-image coordinate it shows. -> (h*w, 2)"""
    top, left, height, width = box
    crop = coordinates[:, top:top + height, left:left + width]  # (2, height, width)
    view = F.interpolate(crop[None], size=view_size, mode="bilinear", align_corners=False, antialias=True)[0]
    if flip:
        view = view.flip(dims=[2])
    cells = F.adaptive_avg_pool2d(view, map_size)  # (2, h, w)
    return cells.flatten(1).T  # (h*w, 2) row-major


def test_location_matching_pairs_cells_that_show_the_same_content():
    H, W = 120, 160
    rows, cols = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    coordinates = torch.stack([rows, cols]).double()  # (2, H, W): pixel centres
    box_a, box_b = (10, 20, 80, 96), (30, 50, 72, 108)
    map_a, map_b = (4, 6), (3, 4)  # non-square maps of different sizes
    content_a = crop_cell_coordinates(coordinates, box_a, False, (48, 48), map_a)  # (24, 2)
    content_b = crop_cell_coordinates(coordinates, box_b, True, (48, 48), map_b)  # (12, 2)
    cell_size = max(80 / 4, 96 / 6, 72 / 3, 108 / 4)  # largest cell side in seed pixels (27)

    boxes = torch.tensor([box_a, box_b], dtype=torch.float64)
    grid_a = location_grid(boxes[:1], torch.tensor([False]), map_a).flatten(1, 2)  # (1, 24, 2)
    grid_b = location_grid(boxes[1:], torch.tensor([True]), map_b).flatten(1, 2)  # (1, 12, 2)
    # The grid predicts what each cell shows (up to the resize's border effects).
    assert (grid_a[0] - content_a).abs().max() < 1.0
    assert (grid_b[0] - content_b).abs().max() < 1.0

    def content_error(grid_b):
        query_idx, candidate_idx = match_by_location(grid_a, grid_b, 8)
        return (content_a[query_idx[0]] - content_b[candidate_idx[0]]).norm(dim=1)  # (8,)

    # Kept matches pair cells whose content lies within a cell of each other ...
    assert content_error(grid_b).max() < cell_size
    # ... and ignoring the flip pairs mirrored cells: wrong content.
    grid_b_unflipped = location_grid(boxes[1:], torch.tensor([False]), map_b).flatten(1, 2)
    assert content_error(grid_b_unflipped).max() > 2 * cell_size

    # Matching on the content itself (features = coordinates) finds pairs just as close.
    query_idx, candidate_idx = match_by_features(content_a[None], content_b[None], 8)
    assert (content_a[query_idx[0]] - content_b[candidate_idx[0]]).norm(dim=1).max() < cell_size
