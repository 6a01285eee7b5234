"""The paper's Algorithm 1 ("VICRegL pytorch pseudocode"), transcribed literally for two views, against
loss.VICRegLLoss: how the paper's sums and the code's averages relate, term by term.

Algorithm 1 computes, for two views a and b,
    loss = alpha * vicreg(avg_pool(map_a), avg_pool(map_b)) + (1 - alpha) * local_criterion(...)
with vicreg returning lambda * sim_loss + mu * std_loss + nu * cov_loss, where std_loss and cov_loss
*sum* the two sides, and local_criterion returning location_loss + feature_loss (a sum). Its
local_criterion shows the direction a -> b; the paper's text symmetrises both matchings ("Both location
and feature-based loss functions are symmetrized", eq. 4-5), so the two-view local criterion here is
local_criterion(a, b) + local_criterion(b, a).

The code averages where the paper sums (README, "The paper and the reference code"). With the six
weighted terms of VICRegLLoss's stats, for two views and the same gamma in both directions:
    paper's global = inv + 2 var + 2 cov
    paper's local  = 2 local_inv + 4 local_var + 4 local_cov
hence VICRegLLoss(alpha, lambda, mu, nu) = (1 + alpha) / 2 * paper(2 alpha / (1 + alpha), lambda, mu / 2,
nu / 2): alpha = 0.75 in the code is alpha = 6/7 = 0.857 in Algorithm 1 read literally.

Nothing here is imported from loss.py or matching.py: the matching is Python loops over cells, and the
VICReg terms are Algorithm 1's lines.
"""
import pytest
import torch
import torch.nn.functional as F

from loss import VICRegLLoss
from naive_loss import naive_location_grids

LAMBDA, MU, NU = 25.0, 25.0, 1.0


# ---------------------------------------------------------------------------------------------------
# Algorithm 1, line by line. A matched set is (N, gamma, D): Algorithm 1 writes vicreg for (N, D)
# matrices; its mse_loss and torch.mean average over the extra axis of kept cells, and its covariance
# is read the same way, one (D, D) matrix per kept cell, averaged over the kept cells.

def off_diagonal(x):
    """The off-diagonal elements of a square matrix, flattened."""
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def covariance_loss(z):
    """off_diagonal(cov_z).pow_(2).sum() / D of a centred z (N, D), or its mean over kept cells of
    z (N, gamma, D)."""
    N, D = z.shape[0], z.shape[-1]
    if z.dim() == 2:
        cov_z = (z.T @ z) / (N - 1)
        return off_diagonal(cov_z).pow_(2).sum() / D
    return sum(covariance_loss(z[:, k]) for k in range(z.shape[1])) / z.shape[1]


def vicreg(z_a, z_b, lam=LAMBDA, mu=MU, nu=NU):
    """Algorithm 1's vicreg, returning its three weighted terms (lambda * sim_loss, mu * std_loss,
    nu * cov_loss); their sum is what vicreg returns."""
    # invariance loss
    sim_loss = F.mse_loss(z_a, z_b)
    # variance loss
    std_z_a = torch.sqrt(z_a.var(dim=0) + 1e-04)
    std_z_b = torch.sqrt(z_b.var(dim=0) + 1e-04)
    std_loss = torch.mean(F.relu(1 - std_z_a)) + torch.mean(F.relu(1 - std_z_b))
    # covariance loss
    z_a = z_a - z_a.mean(dim=0)
    z_b = z_b - z_b.mean(dim=0)
    cov_loss = covariance_loss(z_a) + covariance_loss(z_b)
    return torch.stack([lam * sim_loss, mu * std_loss, nu * cov_loss])


def l2_dist(u, v):
    return torch.sqrt(((u - v) ** 2).sum())


def filter_best(map_a, map_a_nn, distances, gamma):
    """Keep the gamma cells of each sample whose match is nearest, in the order of the map's cells
    (row-major): map_a, map_a_nn (N, C, H, W), distances (N, H, W) -> (N, gamma, C) each. gamma None:
    every cell."""
    N, C, H, W = map_a.shape
    cells = [(h, w) for h in range(H) for w in range(W)]
    gamma = len(cells) if gamma is None else gamma
    kept, kept_nn = [], []
    for n in range(N):
        best = sorted(range(len(cells)), key=lambda i: (distances[n][cells[i]].item(), i))[:gamma]
        kept.append(torch.stack([map_a[n, :, cells[i][0], cells[i][1]] for i in sorted(best)]))
        kept_nn.append(torch.stack([map_a_nn[n, :, cells[i][0], cells[i][1]] for i in sorted(best)]))
    return torch.stack(kept), torch.stack(kept_nn)


def nearest(query, candidates):
    """(distance, (h', w')) of the candidate nearest to query; candidates (H', W', ·); the first on ties."""
    best = None
    for h2 in range(candidates.shape[0]):
        for w2 in range(candidates.shape[1]):
            d = l2_dist(query, candidates[h2, w2])
            if best is None or d < best[0]:
                best = (d, (h2, w2))
    return best


def local_criterion(map_a, map_b, pos_a, pos_b, gamma_location, gamma_features):
    """Algorithm 1's local_criterion for the direction a -> b: map (N, C, H, W), pos (N, H, W, 2) cell
    centres in the seed image. Returns the three weighted terms of location_loss + feature_loss."""
    N, C, H, W = map_a.shape
    # Location-based loss function
    map_a_nn, distances = torch.zeros_like(map_a), torch.zeros(N, H, W, dtype=map_a.dtype)
    for n in range(N):
        for h in range(H):
            for w in range(W):
                distances[n, h, w], (h2, w2) = nearest(pos_a[n, h, w], pos_b[n])
                map_a_nn[n, :, h, w] = map_b[n, :, h2, w2]
    map_a_filtered, map_a_nn_filtered = filter_best(map_a, map_a_nn, distances, gamma_location)
    location_loss = vicreg(map_a_filtered, map_a_nn_filtered)
    # Feature-based loss function
    map_a_nn, distances = torch.zeros_like(map_a), torch.zeros(N, H, W, dtype=map_a.dtype)
    for n in range(N):
        for h in range(H):
            for w in range(W):
                distances[n, h, w], (h2, w2) = nearest(map_a[n, :, h, w], map_b[n].permute(1, 2, 0))
                map_a_nn[n, :, h, w] = map_b[n, :, h2, w2]
    map_a_filtered, map_a_nn_filtered = filter_best(map_a, map_a_nn, distances, gamma_features)
    feature_loss = vicreg(map_a_filtered, map_a_nn_filtered)
    return location_loss + feature_loss


# ---------------------------------------------------------------------------------------------------

def two_views(N, C, sizes, seed):
    """maps (N, C, H, W) of two views, their pos (N, H, W, 2), from random crop boxes and flips."""
    generator = torch.Generator().manual_seed(seed)
    maps, pos = [], []
    for H in sizes:
        maps.append(torch.randn(N, C, H, H, generator=generator, dtype=torch.float64))
        boxes = torch.rand(N, 4, generator=generator, dtype=torch.float64) * torch.tensor([40, 40, 50, 50]) + \
            torch.tensor([0, 0, 14, 14])
        flips = torch.rand(N, generator=generator) < 0.5
        pos.append(naive_location_grids(boxes, flips, H, H))  # each cell's centre, written out (paper appendix)
    return maps, pos


# (map sizes of views a and b, large views, VICRegLLoss options, gamma of location matching a -> b and
# b -> a, gamma of feature matching (None: every cell), as the code's options set them)
CASES = {
    # Algorithm 1 as written: two views of one resolution, one gamma for both kinds of matching
    "two large views, top-gamma everywhere": (
        (4, 4), 2, dict(num_matches=(5, 5), gamma_rule="paper", feature_matches="top"), (5, 5), 5),
    # the code's defaults (reference gamma rule, every cell in feature matching) on a large and a small view
    "a large and a small view, defaults": ((4, 2), 1, dict(num_matches=(5, 2)), (5, 2), None),
}


@pytest.mark.parametrize("path", ["simple", "fast"])
@pytest.mark.parametrize("case", list(CASES))
def test_algorithm_1_sums_what_the_code_averages_term_by_term(case, path):
    sizes, num_large_views, options, (gamma_ab, gamma_ba), gamma_features = CASES[case]
    alpha = 0.75
    (map_a, map_b), (pos_a, pos_b) = two_views(N=12, C=5, sizes=sizes, seed=sorted(CASES).index(case))

    # Algorithm 1: global on the pooled maps, local symmetrised
    global_terms = vicreg(map_a.mean(dim=(2, 3)), map_b.mean(dim=(2, 3)))
    local_terms = (local_criterion(map_a, map_b, pos_a, pos_b, gamma_ab, gamma_features)
                   + local_criterion(map_b, map_a, pos_b, pos_a, gamma_ba, gamma_features))

    # the code, on the same views: embeddings = avg_pool(map), maps (N, H, W, C), grids = pos
    criterion = VICRegLLoss(alpha=alpha, num_large_views=num_large_views, simple=path == "simple", **options)
    embeddings = [m.mean(dim=(2, 3)) for m in (map_a, map_b)]
    maps = [m.permute(0, 2, 3, 1) for m in (map_a, map_b)]
    loss, stats = criterion(embeddings, maps, [pos_a, pos_b])

    # the code halves the two sides' variance and covariance of the global criterion ...
    torch.testing.assert_close(global_terms, torch.stack([stats["inv"], 2 * stats["var"], 2 * stats["cov"]]),
                               rtol=1e-10, atol=0)
    # ... and weighs each of the four matched sets ½ (invariance), ¼ per side (variance, covariance)
    torch.testing.assert_close(
        local_terms, torch.stack([2 * stats["local_inv"], 4 * stats["local_var"], 4 * stats["local_cov"]]),
        rtol=1e-10, atol=0)
    assert min(local_terms) > 0 and min(global_terms) > 0  # every term takes part

    # what it means for alpha: the code's criterion at (alpha, mu, nu) is (1 + alpha) / 2 times Algorithm 1's
    # at alpha' = 2 alpha / (1 + alpha) with mu and nu halved
    alpha_paper = 2 * alpha / (1 + alpha)
    assert alpha_paper == pytest.approx(6 / 7)
    halve_regularisers = torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64)
    paper_loss = (alpha_paper * (halve_regularisers * global_terms).sum()
                  + (1 - alpha_paper) * (halve_regularisers * local_terms).sum())
    torch.testing.assert_close(loss, (1 + alpha) / 2 * paper_loss, rtol=1e-10, atol=0)
    # and Algorithm 1 read literally at the same alpha and coefficients is another criterion
    literal = alpha * global_terms.sum() + (1 - alpha) * local_terms.sum()
    assert abs(literal - loss) > 0.1 * loss
