"""Matching cells of two feature maps (VICRegL, paper §3.1-3.2, eq. 2-3 and 5).

A view is a crop box of the seed image, resized to S x S and maybe flipped horizontally. Its backbone
gives an h x w feature map; each cell (r, c) "looks at" a region of the seed image whose centre we can
compute from the box alone. Two cells of different views are matched either

  - by location: the candidate cell whose centre is nearest in seed-image pixels, or
  - by features: the candidate cell whose embedding is nearest in embedding space.

In both cases every query cell takes its nearest candidate, and only the gamma query cells with the
smallest nearest-neighbour distance are kept (filter_best in the paper's pseudo-code). They are kept
in ascending cell-index order: the loss computes variance/covariance per kept slot across the batch,
so the slot order is part of the semantics.

Cells are indexed row-major: cell (r, c) of an h x w map is index r * w + c.
"""

import torch


def location_grid(boxes, flips, size):
    """Centre of every feature-map cell in seed-image pixels, as (row, col).

    boxes (B, 4) = (top, left, height, width) of each crop in the seed image, flips (B,) bool
    (horizontal flip of the view), size = (h, w) of the feature map. Returns (B, h, w, 2).
    """
    h, w = size
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (B, 4), got {tuple(boxes.shape)}")
    boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    flips = torch.as_tensor(flips, dtype=torch.bool, device=boxes.device)
    if flips.shape != boxes.shape[:1]:
        raise ValueError(f"flips must have shape ({boxes.shape[0]},), got {tuple(flips.shape)}")
    top, left, height, width = boxes.unbind(dim=1)  # each (B,)

    # The crop is resized to S x S and cut into h x w cells, so cell (r, c) covers rows
    # [top + r*height/h, top + (r+1)*height/h) of the seed image: its centre is at (r + 1/2)*height/h.
    cell_rows = torch.arange(h, dtype=boxes.dtype, device=boxes.device) + 0.5  # (h,)
    cell_cols = torch.arange(w, dtype=boxes.dtype, device=boxes.device) + 0.5  # (w,)
    rows = top[:, None] + cell_rows[None, :] * (height / h)[:, None]  # (B, h)
    cols = left[:, None] + cell_cols[None, :] * (width / w)[:, None]  # (B, w)

    # A horizontal flip mirrors the view: its column c shows what column w-1-c showed before.
    cols = torch.where(flips[:, None], cols.flip(dims=[1]), cols)  # (B, w)

    B = boxes.shape[0]
    return torch.stack([rows[:, :, None].expand(B, h, w), cols[:, None, :].expand(B, h, w)], dim=-1)


@torch.no_grad()
def pairwise_distances(points_a, points_b):
    """Euclidean distances (B, N, M) between points_a (B, N, D) and points_b (B, M, D).

    Computed exactly: the matrix-product shortcut ||a||² + ||b||² − 2 a·b would let rounding decide
    between equidistant cells, which are common on regular grids.
    """
    return torch.cdist(points_a, points_b, compute_mode="donot_use_mm_for_euclid_dist")


@torch.no_grad()
def best_matches(distances, num_matches=None):
    """filter_best on a distance matrix (B, N, M) from N queries to M candidates.

    Every query takes its nearest candidate; the k = min(num_matches, N) queries (all if None) with the
    smallest nearest-neighbour distance are kept, in ascending query-index order. Ties go to the lower
    index. Returns (query_idx, candidate_idx), both (B, k) long.
    """
    if num_matches is not None and num_matches < 1:
        raise ValueError(f"num_matches must be a positive integer or None, got {num_matches}")
    N = distances.shape[1]
    k = N if num_matches is None else min(num_matches, N)
    nn_distance, nn_index = distances.min(dim=2)  # (B, N): the first minimum on ties
    best = torch.sort(nn_distance, dim=1, stable=True).indices[:, :k]  # (B, k): lower index wins ties
    query_idx = torch.sort(best, dim=1).values  # (B, k) back in cell-index order
    candidate_idx = nn_index.gather(1, query_idx)  # (B, k)
    return query_idx, candidate_idx


def nearest_neighbors(queries, candidates, num_matches=None):
    """Nearest candidate of every query, keeping the num_matches queries closest to their match.

    queries (B, N, D), candidates (B, M, D). Returns (query_idx, candidate_idx), both (B, k) long with
    k = min(num_matches, N) (k = N when num_matches is None): the kept query cells in ascending index
    order, and the candidate cell each one is matched to. Ties go to the lower index. No gradient.
    """
    return best_matches(pairwise_distances(queries, candidates), num_matches)


def match_by_features(maps_a, maps_b, num_matches=None):
    """Feature-based matching: maps_a (B, N, C) queries, maps_b (B, M, C) candidates, in embedding space."""
    return nearest_neighbors(maps_a, maps_b, num_matches)


def match_by_location(grid_a, grid_b, num_matches):
    """Location-based matching: grid_a (B, N, 2), grid_b (B, M, 2) cell centres in seed-image pixels."""
    return nearest_neighbors(grid_a, grid_b, num_matches)

