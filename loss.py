"""The VICRegL criterion (paper §3, eq. 1-6; exact semantics in SPEC.md §2).

VICReg on a set of vectors (paper eq. 1):
    l(z, z') = λ·s(z, z') + μ·[v(z) + v(z')] + ν·[c(z) + c(z')]
with s the mean squared error, v the hinge on the per-dimension standard deviation, c the sum of the
squared off-diagonal covariances divided by the dimension.

VICRegL applies it twice (eq. 6): loss = α·global + (1 − α)·local.
  - global: on the pooled-and-expanded embeddings z⊕ of every view;
  - local: on pairs of cells of the local maps z, matched by location and by features (matching.py).

Views are ordered large first. Every ordered pair (a, b) with a a large view and b any other view
contributes; the local term of a pair has four directions (features a→b, b→a, location a→b, b→a).
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from matching import best_matches, gather_cells, match_by_location, pairwise_distances


# ---------------------------------------------------------------------------------------------------
# VICReg terms on x (..., n, C): n vectors of dimension C, statistics taken over n, one value per
# leading "slot", averaged over slots. The global criterion has no slot (x is (B, D)); a matched set of
# the local criterion is (k, B, C): one slot per kept cell, statistics across the batch.

def centre(x):
    """x (..., n, C) -> (x − mean over n, unbiased variances (..., C))."""
    x = x - x.mean(dim=-2, keepdim=True)
    return x, x.pow(2).sum(dim=-2) / (x.shape[-2] - 1)


def variance_hinge(variances):
    """v = mean_c relu(1 − sqrt(Var[x_c] + 1e-4)) of each slot: variances (..., C) -> (...,)."""
    return F.relu(1.0 - torch.sqrt(variances + 1e-4)).mean(dim=-1)


def off_diagonal_covariance(centred, variances):
    """c = Σ_{c≠c'} Cov_{cc'}² / C with Cov = XᵀX / (n − 1), of each slot: (...,).

    Σ_{c≠c'} Cov² = ||Cov||_F² − Σ_c Cov_cc² and ||XᵀX||_F = ||XXᵀ||_F, so when n < C the (n, n) Gram
    matrix gives the same number as the (C, C) covariance at a fraction of the cost and memory.
    """
    n, C = centred.shape[-2:]
    if n < C:
        gram = centred @ centred.transpose(-1, -2)  # (..., n, n)
    else:
        gram = centred.transpose(-1, -2) @ centred  # (..., C, C)
    squared_norm = gram.pow(2).sum(dim=(-2, -1)) / (n - 1) ** 2  # (...,) ||Cov||_F²
    off_diagonal = squared_norm - variances.pow(2).sum(dim=-1)  # (...,) minus the squared diagonal
    return off_diagonal / C


def variance_term(x):
    """v(x) for x (..., n, C): variance hinge of each slot, averaged over slots."""
    return variance_hinge(centre(x)[1]).mean()


def covariance_term(x):
    """c(x) for x (..., n, C): off-diagonal covariance of each slot, averaged over slots."""
    return off_diagonal_covariance(*centre(x)).mean()


def regularisers(x):
    """(v(x), c(x)) for x (..., n, C), sharing one centring, averaged over slots."""
    centred, variances = centre(x)
    return variance_hinge(variances).mean(), off_diagonal_covariance(centred, variances).mean()


def per_slot_terms(cells):
    """(v, c) of every slot of cells (B, S, C), statistics across the batch: two (S,) tensors."""
    centred, variances = centre(cells.transpose(0, 1))  # (S, B, C), (S, C)
    return variance_hinge(variances), off_diagonal_covariance(centred, variances)


# ---------------------------------------------------------------------------------------------------
# Distributed training: variance and covariance need the batch of all ranks.

class _GatherFromAllRanks(torch.autograd.Function):
    """Concatenate x (B, ...) of every rank along the batch: (world_size * B, ...).

    Every rank then computes the same loss on the same global batch. Backward sums the gradients of
    all ranks and returns this rank's rows, i.e. world_size × (this rank's rows of the 1-process
    gradient); DDP's average over ranks then yields exactly the 1-process parameter gradient.
    """

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.batch_size = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(0, dist.get_rank() * ctx.batch_size, ctx.batch_size)


def gather_from_all_ranks(x):
    """x (B, ...) -> (world_size * B, ...), differentiable; identity without torch.distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _GatherFromAllRanks.apply(x)
    return x


def at_least_float32(x):
    """Half-precision inputs (mixed precision) are computed in float32; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------------

class VICRegLLoss(nn.Module):
    """loss = α·(inv + var + cov) + (1 − α)·(local_inv + local_var + local_cov) (paper eq. 6)."""

    def __init__(self, alpha=0.75, inv_coeff=25.0, var_coeff=25.0, cov_coeff=1.0, num_matches=(20, 4),
                 num_large_views=2, gamma_rule="reference", feature_matches="all"):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if len(num_matches) != 2 or min(num_matches) < 1:
            raise ValueError(f"num_matches must be two positive integers, got {num_matches}")
        if num_large_views < 1:
            raise ValueError(f"num_large_views must be at least 1, got {num_large_views}")
        if gamma_rule not in ("reference", "paper"):
            raise ValueError(f"gamma_rule must be 'reference' or 'paper', got {gamma_rule!r}")
        if feature_matches not in ("all", "top"):
            raise ValueError(f"feature_matches must be 'all' or 'top', got {feature_matches!r}")
        self.alpha = alpha
        self.inv_coeff, self.var_coeff, self.cov_coeff = inv_coeff, var_coeff, cov_coeff
        self.num_matches = tuple(int(k) for k in num_matches)
        self.num_large_views = num_large_views
        self.gamma_rule = gamma_rule
        self.feature_matches = feature_matches

    def forward(self, embeddings, maps, grids):
        """embeddings[v] (B, D), maps[v] (B, h_v, w_v, C), grids[v] (B, h_v, w_v, 2); large views first."""
        num_views = len(embeddings)
        if num_views < 2 or num_views < self.num_large_views:
            raise ValueError(f"need at least 2 views and {self.num_large_views} large ones, got {num_views}")
        local = self.alpha < 1.0
        if local and (maps is None or grids is None or len(maps) != num_views or len(grids) != num_views):
            raise ValueError("alpha < 1 needs one local map and one location grid per view")

        # Mixed precision stops here: the statistics below are computed in (at least) float32.
        with torch.autocast(device_type=embeddings[0].device.type, enabled=False):
            embeddings = [gather_from_all_ranks(at_least_float32(z)) for z in embeddings]  # (B, D) each
            if embeddings[0].shape[0] < 2:
                raise ValueError("the (gathered) batch needs at least 2 samples for variances")
            inv, var, cov = self.global_terms(embeddings)
            if local:
                # (B, h, w, C) -> (B, h*w, C), cells in row-major order like the grids.
                maps = [gather_from_all_ranks(at_least_float32(m)).flatten(1, 2) for m in maps]
                grids = [gather_from_all_ranks(at_least_float32(g)).flatten(1, 2) for g in grids]
                local_inv, local_var, local_cov = self.local_terms(maps, grids)
            else:
                local_inv = local_var = local_cov = torch.zeros((), dtype=inv.dtype, device=inv.device)

        stats = {"inv": self.inv_coeff * inv, "var": self.var_coeff * var, "cov": self.cov_coeff * cov,
                 "local_inv": self.inv_coeff * local_inv, "local_var": self.var_coeff * local_var,
                 "local_cov": self.cov_coeff * local_cov}
        global_loss = stats["inv"] + stats["var"] + stats["cov"]
        local_loss = stats["local_inv"] + stats["local_var"] + stats["local_cov"]
        loss = self.alpha * global_loss + (1.0 - self.alpha) * local_loss
        return loss, {name: value.detach() for name, value in stats.items()}

    def view_pairs(self, num_views):
        """Ordered pairs (a, b): a a large view, b any other view (paper eq. 5)."""
        return [(a, b) for a in range(self.num_large_views) for b in range(num_views) if b != a]

    def global_terms(self, embeddings):
        """Unweighted (inv, var, cov) of the global criterion on z⊕ (B, D) of every view."""
        pairs = self.view_pairs(len(embeddings))
        inv = sum(F.mse_loss(embeddings[a], embeddings[b]) for a, b in pairs) / len(pairs)
        # Variance and covariance regularise each view's embeddings on their own.
        terms = [regularisers(z) for z in embeddings]  # (v, c) per view
        var = sum(v for v, _ in terms) / len(terms)
        cov = sum(c for _, c in terms) / len(terms)
        return inv, var, cov

    def location_gammas(self, a, b):
        """(γ for a→b, γ for b→a) of location matching; feature matching uses them with "top"."""
        if self.gamma_rule == "reference":  # by direction: the pair's large view a queries with γ[0]
            return self.num_matches[0], self.num_matches[1]
        # "paper": by the query map, γ[0] for a large view's map, γ[1] for a small one.
        return tuple(self.num_matches[0] if v < self.num_large_views else self.num_matches[1] for v in (a, b))

    def local_terms(self, maps, grids):
        """Unweighted (inv, var, cov) of the local criterion; maps[v] (B, N_v, C), grids[v] (B, N_v, 2).

        Every matched set of every pair and direction is a set of slots (kept cells, statistics across
        the batch), so all of them are computed together: the sets are laid side by side along the slot
        axis, (B, S, C), and invariance, variance and covariance are weighted sums over all slots at once.
        The weights give exactly the average of SPEC §2: per pair, ½(feature a→b + feature b→a) +
        ½(location a→b + location b→a), each side of a direction ½ for var/cov; then the mean over pairs.
        Pairs with the same map sizes and γ are matched together, their maps stacked along the batch.
        """
        B, C = maps[0].shape[0], maps[0].shape[2]

        def side_by_side(x):
            """(P*B, k, C) of P stacked pairs -> (B, P*k, C): slot p*k + i is kept cell i of pair p."""
            return x.unflatten(0, (-1, B)).transpose(0, 1).flatten(1, 2)

        groups = {}  # (N_a, N_b, γ's) -> pairs
        for a, b in self.view_pairs(len(maps)):
            groups.setdefault((maps[a].shape[1], maps[b].shape[1], self.location_gammas(a, b)), []).append((a, b))
        num_pairs = sum(len(pairs) for pairs in groups.values())

        whole_map_uses = [0] * len(maps)  # query sides that keep every cell of view v, in index order
        inputs, matched, partial_inputs = [], [], []  # (B, s, C) each
        inv_weights, matched_weights, partial_weights = [], [], []  # (s,) per-slot weights
        for (_, _, (gamma_ab, gamma_ba)), pairs in groups.items():
            firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
            maps_a, maps_b = torch.cat([maps[v] for v in firsts]), torch.cat([maps[v] for v in seconds])  # (P*B, N, C)
            grids_a, grids_b = torch.cat([grids[v] for v in firsts]), torch.cat([grids[v] for v in seconds])
            feature_gamma_ab, feature_gamma_ba = (None, None) if self.feature_matches == "all" else (gamma_ab, gamma_ba)
            feature_distances = pairwise_distances(maps_a, maps_b)  # (P*B, N_a, N_b), serves both directions
            directions = [  # (query views, queries, candidates, matches (P*B, k))
                (firsts, maps_a, maps_b, best_matches(feature_distances, feature_gamma_ab)),
                (seconds, maps_b, maps_a, best_matches(feature_distances.transpose(1, 2), feature_gamma_ba)),
                (firsts, maps_a, maps_b, match_by_location(grids_a, grids_b, gamma_ab)),
                (seconds, maps_b, maps_a, match_by_location(grids_b, grids_a, gamma_ba)),
            ]
            for query_views, queries, candidates, (query_idx, candidate_idx) in directions:
                # l(z^q_p, z^c_NN(p)) over the k kept cells p of each query map, matched in the other view:
                # inv = mse over (B, k, C) -> ½ per direction; var/cov = mean over k slots -> ¼ per side
                k = query_idx.shape[1]
                matched.append(side_by_side(gather_cells(candidates, candidate_idx)))
                inv_weights.append(queries.new_full((len(pairs) * k,), 1.0 / (2 * B * k * C)))
                matched_weights.append(queries.new_full((len(pairs) * k,), 1.0 / (4 * k)))
                if k == queries.shape[1]:
                    # every cell kept: the input side is the whole map, whose per-slot var/cov depend on
                    # the view only, so they are computed once per view (below) and counted per use
                    inputs.append(side_by_side(queries))
                    for v in query_views:
                        whole_map_uses[v] += 1
                else:
                    inputs.append(side_by_side(gather_cells(queries, query_idx)))
                    partial_inputs.append(inputs[-1])
                    partial_weights.append(matched_weights[-1])
        whole_map_weights = [m.new_full((m.shape[1],), uses / (4 * m.shape[1])) for m, uses in zip(maps, whole_map_uses)]

        matched = torch.cat(matched, dim=1)  # (B, S, C): every matched set, side by side
        inv = (torch.cat(inputs, dim=1) - matched).pow(2).sum(dim=(0, 2)) @ torch.cat(inv_weights)
        # var/cov slots: every view's whole map once, the partial query sides, the matched sides
        slot_var, slot_cov = per_slot_terms(torch.cat(maps + partial_inputs + [matched], dim=1))  # (S',) each
        weights = torch.cat(whole_map_weights + partial_weights + matched_weights)  # (S',)
        return inv / num_pairs, slot_var @ weights / num_pairs, slot_cov @ weights / num_pairs
