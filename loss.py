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

from matching import best_matches, match_by_location, pairwise_distances


# ---------------------------------------------------------------------------------------------------
# VICReg terms on x (..., n, C): n vectors of dimension C, statistics taken over n, one value per
# leading "slot", averaged over slots. The global criterion has no slot (x is (B, D)); a matched set of
# the local criterion is (k, B, C): one slot per kept cell, statistics across the batch.

class CentredMoments(torch.autograd.Function):
    """x (..., n, C) -> (Var (..., C), ||Cov||_F² (...)), x centred over n, unbiased (divided by n − 1).

    With X = x − mean_n(x), the centred data of one slot:
        Var_c      = Σ_n X_nc² / (n − 1)                          ∂Var_c/∂X_nc = 2 X_nc / (n − 1)
        ||Cov||_F² = ||XᵀX||_F² / (n − 1)² = ||XXᵀ||_F² / (n − 1)²    ∂/∂X = 4 XXᵀX / (n − 1)²
    ||XᵀX||_F = ||XXᵀ||_F, so when n < C the (n, n) Gram matrix XXᵀ gives the same number as the (C, C)
    covariance at a fraction of the cost and memory, and no (C, C) matrix is ever built. The centring is a
    projection along n, so the gradient with respect to x is the gradient with respect to X minus its
    mean over n. Written out by hand because the local criterion evaluates it on thousands of slots at
    once: this backward is one matrix product and in-place updates of one buffer of the size of x, where
    autograd's would take two products and several such buffers.
    """

    @staticmethod
    def forward(ctx, x):
        n, C = x.shape[-2:]
        centred = x - x.mean(dim=-2, keepdim=True)  # (..., n, C)
        variances = centred.pow(2).sum(dim=-2) / (n - 1)  # (..., C)
        gram = centred @ centred.mT if n < C else centred.mT @ centred  # (..., n, n) or (..., C, C)
        squared_norm = gram.pow(2).sum(dim=(-2, -1)) / (n - 1) ** 2  # (...,)
        ctx.save_for_backward(centred, gram)
        return variances, squared_norm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_variances, grad_squared_norm):
        centred, gram = ctx.saved_tensors
        n, C = centred.shape[-2:]
        grad = gram @ centred if n < C else centred @ gram  # XXᵀX, (..., n, C)
        grad.mul_(grad_squared_norm[..., None, None] * (4 / (n - 1) ** 2))
        grad.addcmul_(centred, grad_variances[..., None, :], value=2 / (n - 1))
        return grad.sub_(grad.mean(dim=-2, keepdim=True))


def variance_hinge(variances):
    """v = mean_c relu(1 − sqrt(Var[x_c] + 1e-4)) of each slot: variances (..., C) -> (...,)."""
    return F.relu(1.0 - torch.sqrt(variances + 1e-4)).mean(dim=-1)


def off_diagonal_covariance(variances, squared_norm):
    """c = Σ_{c≠c'} Cov_{cc'}² / C of each slot: ||Cov||_F² minus the squared diagonal, over C: (...,)."""
    return (squared_norm - variances.pow(2).sum(dim=-1)) / variances.shape[-1]


def variance_term(x):
    """v(x) for x (..., n, C): variance hinge of each slot, averaged over slots."""
    return variance_hinge(CentredMoments.apply(x)[0]).mean()


def covariance_term(x):
    """c(x) for x (..., n, C): off-diagonal covariance of each slot, averaged over slots."""
    return off_diagonal_covariance(*CentredMoments.apply(x)).mean()


def regularisers(x):
    """(v(x), c(x)) for x (..., n, C), sharing one centring, averaged over slots."""
    variances, squared_norm = CentredMoments.apply(x)
    return variance_hinge(variances).mean(), off_diagonal_covariance(variances, squared_norm).mean()


def per_slot_terms(slots):
    """(v, c) of every slot of slots (S, B, C), statistics across the batch: two (S,) tensors."""
    variances, squared_norm = CentredMoments.apply(slots)  # (S, C), (S,)
    return variance_hinge(variances), off_diagonal_covariance(variances, squared_norm)


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

        Every matched set of every pair and direction is a set of slots: k kept cells, statistics across
        the batch. All of them are computed together. The cells of all views are numbered 0..N−1 (view
        after view), so a slot is the number of its cell in each sample, (B,), and a matched set k of
        these, (k, B). The weights give exactly the average of SPEC §2: per pair, ½(feature a→b + feature
        b→a) + ½(location a→b + location b→a), each side of a direction ½ for var/cov; then the mean over
        pairs. Pairs with the same map sizes and γ are matched together, their maps stacked along the batch.
        """
        B, C = maps[0].shape[0], maps[0].shape[2]
        device = maps[0].device
        first_cell = [sum(m.shape[1] for m in maps[:v]) for v in range(len(maps))]  # of each view
        cell_major = torch.cat([m.transpose(0, 1) for m in maps])  # (N, B, C): every cell of every view
        samples = torch.arange(B, device=device)

        def cell_numbers(views, idx):
            """Kept cells idx (P*B, k) of the maps of views[p], P stacked pairs -> (P*k, B) cell numbers:
            slot p*k + i holds cell idx[p*B + b, i] of view views[p] in sample b."""
            numbers = torch.stack([cells + first_cell[v] for cells, v in zip(idx.unflatten(0, (len(views), B)), views)])
            return numbers.transpose(1, 2).flatten(0, 1)  # (P, B, k) -> (P*k, B)

        groups = {}  # (N_a, N_b, γ's) -> pairs
        for a, b in self.view_pairs(len(maps)):
            groups.setdefault((maps[a].shape[1], maps[b].shape[1], self.location_gammas(a, b)), []).append((a, b))
        num_pairs = sum(len(pairs) for pairs in groups.values())

        whole_map_uses = [0] * len(maps)  # query sides that keep every cell of view v, in index order
        query_cells, matched_cells, partial_cells = [], [], []  # (s, B) cell numbers of slots
        inv_weights, matched_weights, partial_weights = [], [], []  # (s,) per-slot weights
        for (_, _, (gamma_ab, gamma_ba)), pairs in groups.items():
            firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
            with torch.no_grad():
                maps_a = torch.cat([maps[v] for v in firsts])  # (P*B, N_a, C)
                maps_b = torch.cat([maps[v] for v in seconds])  # (P*B, N_b, C)
                feature_distances = pairwise_distances(maps_a, maps_b)  # (P*B, N_a, N_b), both directions
            grids_a, grids_b = torch.cat([grids[v] for v in firsts]), torch.cat([grids[v] for v in seconds])
            feature_gamma_ab, feature_gamma_ba = (None, None) if self.feature_matches == "all" else (gamma_ab, gamma_ba)
            directions = [  # (query views, candidate views, matches (P*B, k))
                (firsts, seconds, best_matches(feature_distances, feature_gamma_ab)),
                (seconds, firsts, best_matches(feature_distances.transpose(1, 2), feature_gamma_ba)),
                (firsts, seconds, match_by_location(grids_a, grids_b, gamma_ab)),
                (seconds, firsts, match_by_location(grids_b, grids_a, gamma_ba)),
            ]
            for query_views, candidate_views, (query_idx, candidate_idx) in directions:
                # l(z^q_p, z^c_NN(p)) over the k kept cells p of each query map, matched in the other view:
                # inv = mse over (B, k, C) -> ½ per direction; var/cov = mean over k slots -> ¼ per side
                k = query_idx.shape[1]
                query_cells.append(cell_numbers(query_views, query_idx))
                matched_cells.append(cell_numbers(candidate_views, candidate_idx))
                inv_weights.append(maps[0].new_full((len(pairs) * k,), 1.0 / (2 * B * k * C)))
                matched_weights.append(maps[0].new_full((len(pairs) * k,), 1.0 / (4 * k)))
                if k == maps[query_views[0]].shape[1]:
                    # every cell kept: the query side is the whole map, whose per-slot var/cov depend on
                    # the view only, so they are computed once per view (below) and counted per use
                    for v in query_views:
                        whole_map_uses[v] += 1
                else:
                    partial_cells.append(query_cells[-1])
                    partial_weights.append(matched_weights[-1])
        whole_map_weights = [m.new_full((m.shape[1],), uses / (4 * m.shape[1])) for m, uses in zip(maps, whole_map_uses)]
        query_cells, matched_cells = torch.cat(query_cells), torch.cat(matched_cells)  # (S, B)

        # Invariance: Σ_s w_s Σ_b ||x_b[query cell of slot s] − x_b[matched cell]||², two cells of the
        # same sample b. Rather than gathering both sides, (S, B, C) each, the weights are summed per
        # (sample, query cell, matched cell) into W (B, N, N), and the squared distances between all
        # cells of a sample come from their (N, N) Gram matrix: ||x_n − x_n'||² = G_nn + G_n'n' − 2 G_nn'.
        N = len(cell_major)
        pair_index = (samples * N + query_cells) * N + matched_cells  # (S, B) into W.flatten()
        pair_weights = cell_major.new_zeros(B * N * N).index_add_(
            0, pair_index.flatten(), torch.cat(inv_weights)[:, None].expand(-1, B).flatten()).view(B, N, N)
        cells = cell_major.transpose(0, 1)  # (B, N, C)
        gram = cells @ cells.transpose(1, 2)  # (B, N, N)
        squared_norms = gram.diagonal(dim1=1, dim2=2)  # (B, N)
        squared_distances = squared_norms[:, :, None] + squared_norms[:, None, :] - 2 * gram  # (B, N, N)
        inv = (pair_weights * squared_distances).sum()

        # var/cov slots: every view's whole map once, the partial query sides, the matched sides. One
        # gather of rows of cell_major.flatten(0, 1) (row n * B + b is cell n of sample b) builds them all,
        # already in the (slot, batch, channel) layout of the per-slot statistics.
        whole_map_cells = torch.arange(N, device=device)[:, None].expand(-1, B)
        slot_cells = torch.cat([whole_map_cells, *partial_cells, matched_cells])  # (S', B)
        slots = cell_major.flatten(0, 1).index_select(0, (slot_cells * B + samples).flatten()).unflatten(0, (-1, B))
        slot_var, slot_cov = per_slot_terms(slots)  # (S',) each
        weights = torch.cat(whole_map_weights + partial_weights + matched_weights)  # (S',)
        return inv / num_pairs, slot_var @ weights / num_pairs, slot_cov @ weights / num_pairs
