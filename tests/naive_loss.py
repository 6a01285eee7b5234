"""A deliberately naive VICRegL criterion: the independent reference for tests/test_loss.py. It follows
the structure of the paper (eq. 1 on every matched set of eq. 2-3, the view pairs of eq. 5, eq. 6) with
the reference code's averages where the paper sums (the two sides ½ each, each matched set ½ of a
pair, the mean over pairs; tests/test_paper_algorithm.py relates the two), with explicit Python loops
over view pairs, kinds of matching, directions and kept slots; every slot builds its full C x C
covariance matrix. It shares no code with loss.py or matching.py.
"""

import torch


def brute_force_nearest_neighbors(queries, candidates, num_matches=None):
    """Loop version of matching.nearest_neighbors: queries (B, N, D), candidates (B, M, D) ->
    (query_idx, candidate_idx) (B, k) long; ties go to the lower index."""
    B, N, M = queries.shape[0], queries.shape[1], candidates.shape[1]
    k = N if num_matches is None else min(num_matches, N)
    all_kept, all_matched = [], []
    with torch.no_grad():
        for b in range(B):
            nn_distance, nn_index = [], []
            for i in range(N):
                distances = ((candidates[b] - queries[b, i]) ** 2).sum(dim=-1).sqrt().tolist()  # (M,)
                j = min(range(M), key=lambda m: (distances[m], m))
                nn_distance.append(distances[j])
                nn_index.append(j)
            kept = sorted(sorted(range(N), key=lambda i: (nn_distance[i], i))[:k])
            all_kept.append(kept)
            all_matched.append([nn_index[i] for i in kept])
    return torch.tensor(all_kept, dtype=torch.long), torch.tensor(all_matched, dtype=torch.long)


def naive_variance(x):
    """x (n, C): mean over channels of relu(1 − sqrt(unbiased var + 1e-4))."""
    std = torch.sqrt(x.var(dim=0) + 1e-4)
    return torch.relu(1 - std).mean()


def naive_covariance(x):
    """x (n, C): sum of squared off-diagonal entries of the C x C covariance, divided by C."""
    n, C = x.shape
    centred = x - x.mean(dim=0)
    covariance = centred.T @ centred / (n - 1)  # (C, C)
    off_diagonal = 1 - torch.eye(C, dtype=x.dtype, device=x.device)  # mask: 0 on the diagonal, 1 elsewhere
    return (covariance * off_diagonal).pow(2).sum() / C


def naive_matched_set(inputs, matched):
    """inputs, matched (B, k, C): (inv, var, cov) with var/cov per slot across the batch, both sides ½."""
    inv = ((inputs - matched) ** 2).mean()
    k = inputs.shape[1]
    var = sum((naive_variance(inputs[:, s]) + naive_variance(matched[:, s])) / 2 for s in range(k)) / k
    cov = sum((naive_covariance(inputs[:, s]) + naive_covariance(matched[:, s])) / 2 for s in range(k)) / k
    return inv, var, cov


def naive_vicregl_loss(embeddings, maps, grids, alpha=0.75, inv_coeff=25.0, var_coeff=25.0, cov_coeff=1.0,
                       num_matches=(20, 4), num_large_views=2, gamma_rule="reference", feature_matches="all",
                       local_matching="both", local_terms="vic", nearest_neighbors=brute_force_nearest_neighbors):
    """Same contract as loss.VICRegLLoss(...)(embeddings, maps, grids) -> (loss, stats)."""
    V = len(embeddings)
    pairs = [(a, b) for a in range(num_large_views) for b in range(V) if b != a]

    inv = sum(((embeddings[a] - embeddings[b]) ** 2).mean() for a, b in pairs) / len(pairs)
    var = sum(naive_variance(z) for z in embeddings) / V
    cov = sum(naive_covariance(z) for z in embeddings) / V

    local_inv = local_var = local_cov = torch.zeros((), dtype=embeddings[0].dtype)
    if alpha < 1:
        cells = [m.reshape(m.shape[0], -1, m.shape[-1]) for m in maps]  # (B, h*w, C), row-major
        centres = [g.reshape(g.shape[0], -1, 2) for g in grids]  # (B, h*w, 2)
        kinds = {"both": ("features", "location"), "features": ("features",), "location": ("location",)}
        for a, b in pairs:
            for kind in kinds[local_matching]:
                for query, candidate, forward in ((a, b, True), (b, a, False)):
                    if gamma_rule == "reference":
                        gamma = num_matches[0] if forward else num_matches[1]
                    else:
                        gamma = num_matches[0] if query < num_large_views else num_matches[1]
                    if kind == "features":
                        gamma = None if feature_matches == "all" else gamma
                        query_idx, candidate_idx = nearest_neighbors(cells[query], cells[candidate], gamma)
                    else:
                        query_idx, candidate_idx = nearest_neighbors(centres[query], centres[candidate], gamma)
                    rows = torch.arange(query_idx.shape[0])[:, None]  # (B, 1)
                    inputs = cells[query][rows, query_idx]  # (B, k, C)
                    matched = cells[candidate][rows, candidate_idx]  # (B, k, C)
                    d_inv, d_var, d_cov = naive_matched_set(inputs, matched)
                    local_inv = local_inv + d_inv / 2
                    if "v" in local_terms:
                        local_var = local_var + d_var / 2
                    if "c" in local_terms:
                        local_cov = local_cov + d_cov / 2
        local_inv, local_var, local_cov = local_inv / len(pairs), local_var / len(pairs), local_cov / len(pairs)

    stats = {"inv": inv_coeff * inv, "var": var_coeff * var, "cov": cov_coeff * cov,
             "local_inv": inv_coeff * local_inv, "local_var": var_coeff * local_var,
             "local_cov": cov_coeff * local_cov}
    loss = (alpha * (stats["inv"] + stats["var"] + stats["cov"])
            + (1 - alpha) * (stats["local_inv"] + stats["local_var"] + stats["local_cov"]))
    return loss, {name: value.detach() for name, value in stats.items()}


def naive_location_grid(box, flip, height, width):
    """Cell centres of one view, written out cell by cell (the reference for matching.location_grid):
    box = (top, left, box_height, box_width) in seed-image pixels, flip bool, an height x width map.
    Cell (r, c) covers rows top + [r, r + 1)·box_height/height of the seed image, so its centre is at
    top + (r + ½)·box_height/height, and likewise for columns; a flipped view shows column c at the place
    of column width − 1 − c. Returns (height, width, 2) float64 as (row, col)."""
    top, left, box_height, box_width = (float(x) for x in box)
    grid = torch.zeros(height, width, 2, dtype=torch.float64)
    for r in range(height):
        for c in range(width):
            seen = width - 1 - c if flip else c
            grid[r, c, 0] = top + (r + 0.5) * box_height / height
            grid[r, c, 1] = left + (seen + 0.5) * box_width / width
    return grid


def naive_location_grids(boxes, flips, height, width):
    """naive_location_grid of every view of a batch: boxes (B, 4), flips (B,) -> (B, height, width, 2)."""
    return torch.stack([naive_location_grid(box.tolist(), bool(flip), height, width) for box, flip in zip(boxes, flips)])
