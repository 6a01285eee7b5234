"""The VICRegL criterion (paper §3.1-3.2, eq. 1-6), with the reference code's weighting.

VICReg on a set of vectors, written with sums in the paper (eq. 1):
    l(z, z') = λ·s(z, z') + μ·[v(z) + v(z')] + ν·[c(z) + c(z')]
with s the mean squared error, v the hinge on the per-dimension standard deviation, c the sum of the
squared off-diagonal covariances divided by the dimension.

VICRegL applies it twice: loss = α·global + (1 − α)·local (eq. 4 for two views, eq. 6 for multi-crop).
  - global: on the pooled-and-expanded embeddings z⊕ of every view;
  - local: on pairs of cells of the local maps z, matched by location (eq. 2) and by features (eq. 3)
    (matching.py).

Views are ordered large first. Every ordered pair (a, b) with a a large view and b any other view
contributes (eq. 5); the local term of a pair has four directions (features a→b, b→a, location a→b, b→a).

Where the paper sums, this code averages, as the authors' code does (README, "The paper and the
reference code"): the variance and covariance of the two sides of l are halved, globally and locally;
each of a pair's four matched sets weighs ½ in the invariance and ¼ per side in the variance and the
covariance (the paper: 1, and 1 per side; Algorithm 1 returns location_loss + feature_loss); the pairs
of eq. 5 are averaged, not summed. For two views (each direction keeping the paper's γ), in terms of
the six weighted terms returned here:
    paper's global = inv + 2·var + 2·cov,    paper's local = 2·local_inv + 4·local_var + 4·local_cov,
so this criterion at (α, μ, ν) is (1 + α)/2 times the paper's read literally at α' = 2α/(1 + α), μ/2,
ν/2: α = 0.75 here is α' = 6/7 ≈ 0.857 there (tests/test_paper_algorithm.py).

The file reads top to bottom: the VICReg terms, the criterion as loops over pairs and matched sets (the
shape of eq. 5 and Algorithm 1), then the fast version of its local part, which computes all pairs at
once and gives the same numbers (VICRegLLoss(simple=True) selects the loops, the default the fast one).
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from matching import best_matches, match_by_features, match_by_location, pairwise_distances


# ---------------------------------------------------------------------------------------------------
# The VICReg terms (paper eq. 1) on x (n, ..., C): n vectors of dimension C, statistics taken over the
# n samples, one value per "slot" (the middle dimensions), averaged over slots. The global criterion has
# no slot (x is (B, D)); a matched set of the local criterion is (B, k, C): one slot per kept cell, its
# statistics across the batch.

def invariance(x, y):
    """s(x, y): mean squared error over everything."""
    return F.mse_loss(x, y)


def variance(x):
    """v(x) = mean over dimensions of relu(1 − sqrt(Var[x_c] + 1e-4)), Var unbiased over the n samples."""
    std = torch.sqrt(x.var(dim=0) + 1e-4)  # (..., C)
    return F.relu(1.0 - std).mean()


def covariance(x):
    """c(x) = Σ_{c≠c'} Cov[x]_{cc'}² / C, Cov = XᵀX / (n − 1) of the centred X, averaged over slots."""
    n, C = x.shape[0], x.shape[-1]
    centred = (x - x.mean(dim=0)).movedim(0, -2)  # (..., n, C): one centred (n, C) matrix per slot
    cov = centred.mT @ (centred / (n - 1))  # (..., C, C) = XᵀX / (n − 1)
    # sum of the squared entries, minus those of the diagonal
    off_diagonal = cov.pow(2).sum(dim=(-2, -1)) - cov.diagonal(dim1=-2, dim2=-1).pow(2).sum(dim=-1)  # (...,)
    return off_diagonal.mean() / C


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
# The criterion, as loops over pairs of views and matched sets.

class VICRegLLoss(nn.Module):
    """loss = α·(inv + var + cov) + (1 − α)·(local_inv + local_var + local_cov) (paper eq. 6, with the
    reference code's averages where the paper sums: the module docstring).

    num_matches = (γ1, γ2) of eq. 5. gamma_rule "reference" keeps γ1 cells in the a→b direction of a pair
    and γ2 in b→a; "paper" keeps γ1 for the map of a large view and γ2 for a small one. feature_matches
    "all" keeps every cell in feature matching, "top" the same γ as location matching. The ablations:
    local_matching "location" or "features" keeps one kind of matching (paper Table 3), contributing
    exactly what it contributes to the default "both"; local_terms "vi" drops the local covariance term,
    "i" the local variance too (paper Table 7); the global terms never change. simple=True computes
    everything with the plain formulas and loops of this section; simple=False (default) uses the fast
    versions at the end of this file, which give the same numbers.
    """

    def __init__(self, alpha=0.75, inv_coeff=25.0, var_coeff=25.0, cov_coeff=1.0, num_matches=(20, 4),
                 num_large_views=2, gamma_rule="reference", feature_matches="all", local_matching="both",
                 local_terms="vic", simple=False):
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
        if local_matching not in ("both", "location", "features"):
            raise ValueError(f"local_matching must be 'both', 'location' or 'features', got {local_matching!r}")
        if local_terms not in ("vic", "vi", "i"):
            raise ValueError(f"local_terms must be 'vic', 'vi' or 'i', got {local_terms!r}")
        self.alpha = alpha
        self.inv_coeff, self.var_coeff, self.cov_coeff = inv_coeff, var_coeff, cov_coeff
        self.num_matches = tuple(int(k) for k in num_matches)
        self.num_large_views = num_large_views
        self.gamma_rule = gamma_rule
        self.feature_matches = feature_matches
        self.local_matching = local_matching
        self.local_terms = local_terms
        self.simple = simple

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
            inv, var, cov = self.global_criterion(embeddings)
            if local:
                # (B, h, w, C) -> (B, h*w, C), cells in row-major order like the grids.
                maps = [gather_from_all_ranks(at_least_float32(m)).flatten(1, 2) for m in maps]
                grids = [gather_from_all_ranks(at_least_float32(g)).flatten(1, 2) for g in grids]
                if self.simple:
                    local_inv, local_var, local_cov = self.local_criterion(maps, grids)
                else:
                    matched_sets = {(a, b): self.matched_sets(a, b) for a, b in self.view_pairs(num_views)}
                    local_inv, local_var, local_cov = all_pairs_local_criterion(maps, grids, matched_sets,
                                                                                self.local_terms)
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

    def global_criterion(self, embeddings):
        """Unweighted (inv, var, cov) of the global criterion on z⊕ (B, D) of every view."""
        pairs = self.view_pairs(len(embeddings))
        inv = sum(invariance(embeddings[a], embeddings[b]) for a, b in pairs) / len(pairs)
        # Variance and covariance regularise each view's embeddings on their own.
        if self.simple:
            terms = [(variance(z), covariance(z)) for z in embeddings]
        else:
            terms = [regularisers(z) for z in embeddings]  # the same numbers without the (D, D) matrix
        var = sum(v for v, _ in terms) / len(terms)
        cov = sum(c for _, c in terms) / len(terms)
        return inv, var, cov

    def matched_sets(self, a, b):
        """The matched sets of the pair (a, b) (paper §3.1-3.2, eq. 2-3, 5): a list of (kind, query view,
        candidate view, γ), γ the number of query cells kept, None for all of them."""
        if self.gamma_rule == "reference":  # by direction: the pair's large view a queries with γ1
            gamma_ab, gamma_ba = self.num_matches
        else:  # "paper": by the query map, γ1 for a large view's map, γ2 for a small one
            gamma_ab, gamma_ba = (self.num_matches[0] if v < self.num_large_views else self.num_matches[1]
                                  for v in (a, b))
        sets = []
        if self.local_matching in ("both", "features"):
            top = self.feature_matches == "top"
            sets += [("features", a, b, gamma_ab if top else None), ("features", b, a, gamma_ba if top else None)]
        if self.local_matching in ("both", "location"):
            sets += [("location", a, b, gamma_ab), ("location", b, a, gamma_ba)]
        return sets

    def local_criterion(self, maps, grids):
        """Unweighted (inv, var, cov) of the local criterion; maps[v] (B, N_v, C), grids[v] (B, N_v, 2).

        Per pair (a, b): ½(features a→b + features b→a) + ½(location a→b + location b→a) for each term,
        then the mean over pairs (eq. 5 sums the directions and the pairs, eq. 6 the two kinds). A
        matched set is VICReg (eq. 1) between the k kept cells of the query map and their matches in the
        candidate map, (B, k, C) each: the invariance is the mean squared error over everything, the
        variance and covariance are taken per kept cell across the batch and averaged over the k cells
        (as Algorithm 1's mse_loss and mean do; eq. 2-3 sum over the kept cells), the two sides ½ each
        (eq. 1 sums them).
        """
        pairs = self.view_pairs(len(maps))
        rows = torch.arange(maps[0].shape[0], device=maps[0].device)[:, None]  # (B, 1)
        inv = var = cov = maps[0].new_zeros(())
        for a, b in pairs:
            for kind, query, candidate, gamma in self.matched_sets(a, b):
                if kind == "features":  # nearest cell in embedding space (eq. 3)
                    query_idx, candidate_idx = match_by_features(maps[query], maps[candidate], gamma)  # (B, k)
                else:  # nearest cell centre in the seed image (eq. 2)
                    query_idx, candidate_idx = match_by_location(grids[query], grids[candidate], gamma)
                inputs = maps[query][rows, query_idx]  # (B, k, C): the kept cells z_p
                matched = maps[candidate][rows, candidate_idx]  # (B, k, C): their matches z'_NN(p)
                # each direction weighs ½, so a kind's two directions are averaged; var and cov
                # also average the two sides
                inv = inv + invariance(inputs, matched) / 2
                if "v" in self.local_terms:
                    var = var + (variance(inputs) + variance(matched)) / 4
                if "c" in self.local_terms:
                    cov = cov + (covariance(inputs) + covariance(matched)) / 4
        return inv / len(pairs), var / len(pairs), cov / len(pairs)


# ---------------------------------------------------------------------------------------------------
# The fast version (the default, simple=False): the same numbers, computed differently.
#
# What it buys: forward + backward of VICRegLLoss(alpha=0) at the paper's sizes (B=64, C=512, 2 views of
# 7x7 + 6 of 3x3, float32, CPU) takes about a tenth of the time of the simple version (0.085x to 0.12x
# wall-clock in two runs, measured side by side on 2 cores) and a fifth of its extra memory (+848 MiB
# against +3880 MiB): `python tests/benchmark.py --only local_loss`, docs/speed.md. tests/test_loss.py holds the two
# equal (float64, relative 1e-9, every option, input gradients included, also over 2 processes).
#
# Three ideas: every matched set of every pair is a set of slots (cells) whose statistics are taken
# across the batch, so all slots of all pairs go through one call; the covariance term only needs
# ||Cov||_F², which the (n, n) Gram matrix gives when n < C (CentredMoments, with a hand-written
# backward; the global criterion uses it too); and the invariance of all matched sets is a weighted sum
# over the squared distances between all cells of a sample, from their Gram matrix.

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


def regularisers(x):
    """(v(x), c(x)) of x (n, C), the plain variance and covariance above computed with CentredMoments."""
    variances, squared_norm = CentredMoments.apply(x)
    return variance_hinge(variances), off_diagonal_covariance(variances, squared_norm)


def per_slot_terms(slots, with_covariance=True):
    """(v, c) of every slot of slots (S, B, C), statistics across the batch: two (S,) tensors. Without
    the covariance, c is zero and no Gram matrix is built."""
    if not with_covariance:
        variances = slots.var(dim=1)  # (S, C)
        return variance_hinge(variances), variances.new_zeros(len(slots))
    variances, squared_norm = CentredMoments.apply(slots)  # (S, C), (S,)
    return variance_hinge(variances), off_diagonal_covariance(variances, squared_norm)


def all_pairs_local_criterion(maps, grids, matched_sets, local_terms="vic"):
    """VICRegLLoss.local_criterion computed for all pairs at once: the same (inv, var, cov).

    maps[v] (B, N_v, C), grids[v] (B, N_v, 2); matched_sets {(a, b): VICRegLLoss.matched_sets(a, b)};
    local_terms "vic", "vi" or "i" as in VICRegLLoss.

    Every matched set of every pair is a set of slots: k kept cells, statistics across the batch. All of
    them are computed together. The cells of all views are numbered 0..N−1 (view after view), so a slot
    is the number of its cell in each sample, (B,), and a matched set k of these, (k, B). The weights give
    exactly the average of local_criterion: per pair, ½ for each matched set's invariance, ¼ for each
    side's variance and covariance (both averaged over the k slots); then the mean over pairs. Pairs with
    the same map sizes and matched sets are matched together, their maps stacked along the batch.
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

    groups = {}  # (N_a, N_b, matched sets as (kind, a→b?, γ)) -> pairs
    for (a, b), sets in matched_sets.items():
        relative = tuple((kind, query == a, gamma) for kind, query, _, gamma in sets)
        groups.setdefault((maps[a].shape[1], maps[b].shape[1], relative), []).append((a, b))

    whole_map_uses = [0] * len(maps)  # query sides that keep every cell of view v, in index order
    query_cells, matched_cells, partial_cells = [], [], []  # (s, B) cell numbers of slots
    inv_weights, matched_weights, partial_weights = [], [], []  # (s,) per-slot weights
    for (_, _, relative), pairs in groups.items():
        firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
        if any(kind == "features" for kind, _, _ in relative):
            with torch.no_grad():  # both directions from one (P*B, N_a, N_b) distance matrix
                feature_distances = pairwise_distances(torch.cat([maps[v] for v in firsts]),
                                                       torch.cat([maps[v] for v in seconds]))
        for kind, forward, gamma in relative:
            query_views, candidate_views = (firsts, seconds) if forward else (seconds, firsts)
            if kind == "features":
                distances = feature_distances if forward else feature_distances.transpose(1, 2)
                query_idx, candidate_idx = best_matches(distances, gamma)  # (P*B, k) each
            else:
                query_idx, candidate_idx = match_by_location(torch.cat([grids[v] for v in query_views]),
                                                             torch.cat([grids[v] for v in candidate_views]), gamma)
            # l(z^q_p, z^c_NN(p)) over the k kept cells p of each query map, matched in the other view:
            # inv = mse over (B, k, C) -> ½ per matched set; var/cov = mean over k slots -> ¼ per side
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
    num_pairs = len(matched_sets)
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
    inv = (pair_weights * squared_distances).sum() / num_pairs
    if local_terms == "i":
        return inv, inv.new_zeros(()), inv.new_zeros(())

    # var/cov slots: every whole map used as a query side once, the partial query sides, the matched
    # sides. One gather of rows of cell_major.flatten(0, 1) (row n * B + b is cell n of sample b) builds
    # them all, already in the (slot, batch, channel) layout of the per-slot statistics.
    whole_maps = [v for v, uses in enumerate(whole_map_uses) if uses]
    whole_map_cells = [first_cell[v] + torch.arange(maps[v].shape[1], device=device) for v in whole_maps]
    whole_map_weights = [maps[v].new_full((maps[v].shape[1],), whole_map_uses[v] / (4 * maps[v].shape[1]))
                         for v in whole_maps]
    slot_cells = torch.cat([*(cells[:, None].expand(-1, B) for cells in whole_map_cells),
                            *partial_cells, matched_cells])  # (S', B)
    slots = cell_major.flatten(0, 1).index_select(0, (slot_cells * B + samples).flatten()).unflatten(0, (-1, B))
    slot_var, slot_cov = per_slot_terms(slots, with_covariance=local_terms == "vic")  # (S',) each
    weights = torch.cat(whole_map_weights + partial_weights + matched_weights)  # (S',)
    return inv, slot_var @ weights / num_pairs, slot_cov @ weights / num_pairs
