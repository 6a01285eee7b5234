import collections
import functools
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loss
from loss import CentredMoments, VICRegLLoss, covariance, per_slot_terms, regularisers, variance
from naive_loss import naive_covariance, naive_location_grids, naive_variance, naive_vicregl_loss

TWO_RESOLUTIONS = [(4, 4)] * 2 + [(2, 2)] * 3  # 2 large views with 4x4 maps, 3 small ones with 2x2 maps
THREE_RESOLUTIONS = [(5, 5)] * 2 + [(3, 3)] * 3 + [(2, 2)]
LOCAL_MATCHINGS, LOCAL_TERMS = ("both", "location", "features"), ("vic", "vi", "i")
LOCAL_STATS, GLOBAL_STATS = ("local_inv", "local_var", "local_cov"), ("inv", "var", "cov")


def make_views(batch_size, map_channels, embedding_dim, seed=0, shapes=TWO_RESOLUTIONS):
    """Random multi-crop inputs in float64, large views first. Boxes have integer coordinates so that
    location matching meets exact ties. The grids are naive_location_grids, written out cell by cell: a
    bug in matching.location_grid cannot hide in both the criterion's inputs and its reference."""
    generator = torch.Generator().manual_seed(seed)
    embeddings, maps, grids = [], [], []
    for size in shapes:
        embeddings.append(torch.randn(batch_size, embedding_dim, generator=generator, dtype=torch.float64))
        maps.append(torch.randn(batch_size, *size, map_channels, generator=generator, dtype=torch.float64))
        top_left = torch.randint(0, 60, (batch_size, 2), generator=generator)
        extent = torch.randint(8, 40, (batch_size, 2), generator=generator)
        flips = torch.rand(batch_size, generator=generator) < 0.5
        grids.append(naive_location_grids(torch.cat([top_left, extent], dim=1), flips, *size))
    return embeddings, maps, grids


def make_criterion(path, **options):
    """The criterion under test: VICRegLLoss with the "simple" or the "fast" local criterion, or "naive"."""
    if path == "naive":
        return lambda embeddings, maps, grids: naive_vicregl_loss(embeddings, maps, grids, **options)
    return VICRegLLoss(simple=path == "simple", **options)


def loss_and_gradients(criterion, embeddings, maps, grids):
    """(loss, stats, gradients of the loss with respect to every embedding, then every map)."""
    embeddings = [z.clone().requires_grad_() for z in embeddings]
    maps = None if maps is None else [m.clone().requires_grad_() for m in maps]
    loss, stats = criterion(embeddings, maps, grids)
    inputs = embeddings + ([] if maps is None else maps)
    return loss, stats, torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)  # 0 if unused


def assert_same_results(have, want, rtol, atol, grad_rtol=None):
    """Loss, every stat and every gradient of two loss_and_gradients results agree."""
    (loss, stats, grads), (expected_loss, expected_stats, expected_grads) = have, want
    assert loss.dtype == expected_loss.dtype and loss.dim() == 0
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=atol)
    assert stats.keys() == expected_stats.keys()
    for name, value in expected_stats.items():
        assert stats[name].dim() == 0 and not stats[name].requires_grad
        torch.testing.assert_close(stats[name], value, rtol=rtol, atol=atol)
    assert len(grads) == len(expected_grads)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=grad_rtol or rtol, atol=atol)


# --- the simple and the fast criterion give the same numbers ---------------------------------------
# A check that two paths agree, not a proof of the maths: both share matched_sets, view_pairs, the global
# criterion and forward, so a bug there moves both alike. The maths is checked against the naive
# reference (next section, and tests/test_wiring.py for 1 and 3 large views).

AGREEMENT_CONFIGS = [  # (alpha, gamma_rule, feature_matches, num_matches, map_channels, embedding_dim)
    (0.75, "reference", "all", (20, 4), 5, 6),  # the defaults; C = 5 < B = 8
    (0.75, "paper", "top", (6, 3), 12, 11),  # C = 12 > B = 8: the fast path's Gram matrices on the other side
    (0.0, "reference", "top", (6, 3), 5, 6),
    (0.0, "paper", "all", (20, 4), 12, 11),
    (1.0, "reference", "all", (20, 4), 5, 6),  # maps and grids given but unused
]


@pytest.mark.parametrize("local_terms", LOCAL_TERMS)
@pytest.mark.parametrize("local_matching", LOCAL_MATCHINGS)
@pytest.mark.parametrize("alpha, gamma_rule, feature_matches, num_matches, map_channels, embedding_dim",
                         AGREEMENT_CONFIGS)
def test_simple_and_fast_criteria_agree(alpha, gamma_rule, feature_matches, num_matches, map_channels,
                                        embedding_dim, local_matching, local_terms):
    views = make_views(8, map_channels, embedding_dim)
    options = dict(alpha=alpha, gamma_rule=gamma_rule, feature_matches=feature_matches, num_matches=num_matches,
                   local_matching=local_matching, local_terms=local_terms)
    simple = loss_and_gradients(make_criterion("simple", **options), *views)
    fast = loss_and_gradients(make_criterion("fast", **options), *views)
    assert_same_results(fast, simple, rtol=1e-9, atol=1e-14)
    assert (simple[1]["local_inv"] > 0) == (alpha < 1)


@pytest.mark.parametrize("local_matching, local_terms, gamma_rule, feature_matches",
                         [("both", "vic", "reference", "all"), ("location", "vi", "paper", "top"),
                          ("features", "i", "paper", "top"), ("both", "vic", "paper", "top")])
def test_simple_and_fast_criteria_agree_on_three_resolutions(local_matching, local_terms, gamma_rule,
                                                              feature_matches):
    # 5x5, 3x3 and 2x2 maps: the fast path matches three groups of pairs, each stacked on its own
    views = make_views(6, 7, 5, seed=1, shapes=THREE_RESOLUTIONS)
    options = dict(alpha=0.25, num_matches=(7, 3), local_matching=local_matching, local_terms=local_terms,
                   gamma_rule=gamma_rule, feature_matches=feature_matches)
    simple = loss_and_gradients(make_criterion("simple", **options), *views)
    fast = loss_and_gradients(make_criterion("fast", **options), *views)
    assert_same_results(fast, simple, rtol=1e-9, atol=1e-14)


# --- both criteria against the naive reference of tests/naive_loss.py ------------------------------

NAIVE_CONFIGS = [  # (alpha, gamma_rule, feature_matches, num_matches, local_matching, local_terms, C, D)
    (0.75, "reference", "all", (20, 4), "both", "vic", 5, 6),  # the defaults; C = 5 < B = 8
    (0.75, "reference", "all", (20, 4), "both", "vic", 12, 11),  # C = 12 > B = 8
    (0.75, "reference", "all", (6, 3), "both", "vic", 12, 11),
    (0.75, "paper", "top", (6, 3), "both", "vic", 5, 6),
    (0.75, "reference", "top", (20, 4), "both", "vic", 12, 11),
    (0.0, "paper", "all", (6, 3), "both", "vic", 5, 6),
    (0.0, "reference", "top", (6, 3), "both", "vic", 12, 11),
    (0.75, "paper", "top", (6, 3), "location", "vi", 12, 11),
    (0.0, "reference", "all", (6, 3), "features", "vic", 5, 6),
    (0.5, "reference", "top", (6, 3), "location", "i", 5, 6),
]


@pytest.mark.parametrize("alpha, gamma_rule, feature_matches, num_matches, local_matching, local_terms, "
                         "map_channels, embedding_dim", NAIVE_CONFIGS)
def test_both_criteria_match_naive_reference(alpha, gamma_rule, feature_matches, num_matches, local_matching,
                                             local_terms, map_channels, embedding_dim):
    views = make_views(8, map_channels, embedding_dim)
    options = dict(alpha=alpha, num_matches=num_matches, gamma_rule=gamma_rule, feature_matches=feature_matches,
                   local_matching=local_matching, local_terms=local_terms)
    expected = loss_and_gradients(make_criterion("naive", **options), *views)
    for path in ("simple", "fast"):
        assert_same_results(loss_and_gradients(make_criterion(path, **options), *views), expected,
                            rtol=1e-10, atol=1e-10, grad_rtol=1e-8)
    # every term that the options keep is non-trivial, every other one is zero
    kept = {"local_inv": True, "local_var": "v" in local_terms, "local_cov": "c" in local_terms}
    stats = expected[1]
    assert all(stats[name] > 0 for name in GLOBAL_STATS)
    assert all((stats[name] > 0) == kept[name] and stats[name] >= 0 for name in LOCAL_STATS)


# --- the ablations (paper Table 3 and Table 7) as identities, in every implementation ---------------

IDENTITY_VIEWS = make_views(8, 5, 6, seed=2)
IDENTITY_ALPHA = 0.75


@functools.lru_cache(maxsize=None)
def ablation(path, local_matching, local_terms):
    """loss_and_gradients of one implementation on IDENTITY_VIEWS; the naive one also checked equal to it."""
    options = dict(alpha=IDENTITY_ALPHA, num_matches=(6, 3), local_matching=local_matching, local_terms=local_terms)
    result = loss_and_gradients(make_criterion(path, **options), *IDENTITY_VIEWS)
    if path != "naive":
        assert_same_results(result, ablation("naive", local_matching, local_terms),
                            rtol=1e-10, atol=1e-10, grad_rtol=1e-8)
    return result


def global_loss(stats):
    return IDENTITY_ALPHA * sum(stats[name] for name in GLOBAL_STATS)


PATHS = ("naive", "simple", "fast")


@pytest.mark.parametrize("path", PATHS)
def test_both_matchings_are_location_plus_features_term_by_term(path):
    both_loss, both, _ = ablation(path, "both", "vic")
    location_loss, location, _ = ablation(path, "location", "vic")
    features_loss, features, _ = ablation(path, "features", "vic")
    for name in LOCAL_STATS:
        assert location[name] > 0 and features[name] > 0
        torch.testing.assert_close(both[name], location[name] + features[name], rtol=1e-12, atol=0)
    # the losses too: α·global + (1 − α)·(location + features)
    torch.testing.assert_close(both_loss, location_loss + features_loss - global_loss(both), rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_local_terms_vi_drops_only_the_local_covariance(path):
    vic_loss, vic, _ = ablation(path, "both", "vic")
    vi_loss, vi, _ = ablation(path, "both", "vi")
    assert vi["local_cov"] == 0 and vic["local_cov"] > 0
    for name in ("inv", "var", "cov", "local_inv", "local_var"):
        torch.testing.assert_close(vi[name], vic[name], rtol=1e-12, atol=0)
    torch.testing.assert_close(vi_loss, vic_loss - (1 - IDENTITY_ALPHA) * vic["local_cov"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_local_terms_i_drops_local_variance_too(path):
    vic_loss, vic, _ = ablation(path, "both", "vic")
    i_loss, i, _ = ablation(path, "both", "i")
    assert i["local_var"] == i["local_cov"] == 0 and vic["local_var"] > 0
    for name in ("inv", "var", "cov", "local_inv"):
        torch.testing.assert_close(i[name], vic[name], rtol=1e-12, atol=0)
    dropped = vic["local_var"] + vic["local_cov"]
    torch.testing.assert_close(i_loss, vic_loss - (1 - IDENTITY_ALPHA) * dropped, rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_ablations_never_change_the_global_terms(path):
    _, default, default_grads = ablation(path, "both", "vic")
    num_views = len(IDENTITY_VIEWS[0])
    for local_matching in LOCAL_MATCHINGS:
        for local_terms in LOCAL_TERMS:
            loss_value, stats, grads = ablation(path, local_matching, local_terms)
            for name in GLOBAL_STATS:
                assert stats[name] == default[name]
            # the embeddings enter the global criterion only: their gradients are α·∂global, unchanged
            for grad, default_grad in zip(grads[:num_views], default_grads[:num_views]):
                assert torch.equal(grad, default_grad)


# --- alpha = 1, mixed precision, arguments ---------------------------------------------------------

@pytest.mark.parametrize("path", ["simple", "fast"])
@pytest.mark.parametrize("map_channels, embedding_dim", [(5, 6), (12, 11)])
def test_alpha_one_is_plain_vicreg(map_channels, embedding_dim, path):
    embeddings, maps, grids = make_views(8, map_channels, embedding_dim)
    result = loss_and_gradients(make_criterion(path, alpha=1.0), embeddings, None, None)
    expected = loss_and_gradients(make_criterion("naive", alpha=1.0), embeddings, None, None)
    assert_same_results(result, expected, rtol=1e-10, atol=1e-10, grad_rtol=1e-8)
    loss_value, stats, _ = result
    assert stats["local_inv"] == stats["local_var"] == stats["local_cov"] == 0
    torch.testing.assert_close(loss_value, stats["inv"] + stats["var"] + stats["cov"], rtol=1e-12, atol=0)
    # Maps and grids, when given, are ignored.
    torch.testing.assert_close(make_criterion(path, alpha=1.0)(embeddings, maps, grids)[0], loss_value, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["simple", "fast"])
def test_half_precision_inputs_are_computed_in_float32(path):
    embeddings, maps, grids = make_views(8, 5, 6)
    half = lambda tensors: [t.to(torch.bfloat16) for t in tensors]
    loss_value, stats = make_criterion(path)(half(embeddings), half(maps), grids)
    assert loss_value.dtype == torch.float32 and all(value.dtype == torch.float32 for value in stats.values())
    rounded = lambda tensors: [t.to(torch.bfloat16).double() for t in tensors]
    expected, _ = naive_vicregl_loss(rounded(embeddings), rounded(maps), grids)
    torch.testing.assert_close(loss_value.double(), expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_value_error():
    embeddings, maps, grids = make_views(4, 3, 3)
    with pytest.raises(ValueError, match="alpha"):
        VICRegLLoss(alpha=1.5)
    with pytest.raises(ValueError, match="gamma_rule"):
        VICRegLLoss(gamma_rule="other")
    with pytest.raises(ValueError, match="feature_matches"):
        VICRegLLoss(feature_matches="some")
    with pytest.raises(ValueError, match="num_matches"):
        VICRegLLoss(num_matches=(20, 0))
    with pytest.raises(ValueError, match="local_matching"):
        VICRegLLoss(local_matching="none")
    with pytest.raises(ValueError, match="local_terms"):
        VICRegLLoss(local_terms="vc")
    for simple in (False, True):
        with pytest.raises(ValueError, match="alpha < 1"):
            VICRegLLoss(simple=simple)(embeddings, None, None)
        with pytest.raises(ValueError, match="views"):
            VICRegLLoss(simple=simple)(embeddings[:1], maps[:1], grids[:1])


# --- what the fast path computes, and what it skips -------------------------------------------------

class RecordShapes(torch.overrides.TorchFunctionMode):
    """Records the shape of every tensor produced by a torch function call."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_no_channel_by_channel_matrix_when_batch_is_smaller():
    embeddings, maps, grids = make_views(8, 12, 11)  # B = 8 < C = 12, D = 11
    with RecordShapes() as recorder:  # γ = (5, 3): no set of kept cells has 11 or 12 of them
        VICRegLLoss(num_matches=(5, 3))(embeddings, maps, grids)
    assert (8, 8) in {shape[-2:] for shape in recorder.shapes}  # the Gram matrices
    assert not [shape for shape in recorder.shapes if shape[-2:] in ((12, 12), (11, 11))]


def test_whole_map_terms_are_computed_once_per_view(monkeypatch):
    calls = []

    def counting_per_slot_terms(slots, with_covariance=True):
        calls.append(slots.shape)
        return per_slot_terms(slots, with_covariance)

    monkeypatch.setattr(loss, "per_slot_terms", counting_per_slot_terms)
    embeddings, maps, grids = make_views(8, 5, 6)
    VICRegLLoss(num_matches=(6, 3), feature_matches="all")(embeddings, maps, grids)
    # one call on all slots (S', B, C): each of the 5 whole maps once (2 x 16 + 3 x 4 cells), the query
    # sides of the location directions that keep fewer cells than the map has (6 < 16 and 3 < 4 or 16),
    # and every matched side (feature: all cells; location: 6 and 3); 2 large-large + 6 large-small pairs.
    whole_maps = 2 * 16 + 3 * 4
    partial_queries = 2 * (6 + 3) + 6 * (6 + 3)
    matched = 2 * (16 + 16 + 6 + 3) + 6 * (16 + 4 + 6 + 3)
    assert calls == [(whole_maps + partial_queries + matched, 8, 5)]


@pytest.mark.parametrize("local_matching, local_terms", [("location", "vic"), ("features", "vi"), ("both", "i")])
def test_fast_path_does_only_the_work_its_options_need(monkeypatch, local_matching, local_terms):
    calls = collections.defaultdict(list)

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name].append(kwargs)
            return function(*args, **kwargs)
        monkeypatch.setattr(loss, name, wrapper)

    for name in ("pairwise_distances", "match_by_location", "per_slot_terms"):  # as loss.py calls them
        counting(name, getattr(loss, name))
    embeddings, maps, grids = make_views(8, 5, 6)
    VICRegLLoss(num_matches=(6, 3), local_matching=local_matching, local_terms=local_terms)(embeddings, maps, grids)
    # feature distances once per group of pairs (large-large, large-small), location matching twice per group
    assert len(calls["pairwise_distances"]) == (0 if local_matching == "location" else 2)
    assert len(calls["match_by_location"]) == (0 if local_matching == "features" else 4)
    # the per-slot statistics: none without variance, no covariance (no Gram matrix) without it
    expected_slot_calls = {"vic": [{"with_covariance": True}], "vi": [{"with_covariance": False}], "i": []}
    assert calls["per_slot_terms"] == expected_slot_calls[local_terms]


# --- the VICReg terms against their plain formulas -------------------------------------------------

def test_terms_by_hand():
    # x = [[1, 2], [3, 6]]: centred [[-1, -2], [1, 2]], Cov = [[2, 4], [4, 8]] -> off-diagonal 2 * 4² / C = 16;
    # both standard deviations exceed 1 -> no variance penalty.
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    assert covariance(x).item() == pytest.approx(16.0, rel=1e-12)
    assert variance(x).item() == 0.0
    assert [t.item() for t in regularisers(x)] == pytest.approx([0.0, 16.0], rel=1e-12)
    # x = [[0, 0], [0.5, 0]]: unbiased variances 0.125 and 0.
    x = torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    expected = ((1 - math.sqrt(0.125 + 1e-4)) + (1 - math.sqrt(1e-4))) / 2
    assert variance(x).item() == pytest.approx(expected, rel=1e-12)
    assert covariance(x).item() == 0.0
    assert [t.item() for t in regularisers(x)] == pytest.approx([expected, 0.0], rel=1e-12)


@pytest.mark.parametrize("n, channels", [(7, 5), (4, 9), (6, 6)])  # Gram on both sides, and n == C
def test_terms_against_plain_formulas_per_slot(n, channels):
    x = torch.randn(n, 3, channels, dtype=torch.float64) * torch.rand(channels, dtype=torch.float64) * 2  # (n, k, C)
    expected_var = sum(naive_variance(x[:, s]) for s in range(3)) / 3
    expected_cov = sum(naive_covariance(x[:, s]) for s in range(3)) / 3
    # the simple path: statistics over the first dimension, averaged over slots
    torch.testing.assert_close(variance(x), expected_var, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(covariance(x), expected_cov, rtol=1e-10, atol=1e-14)
    # the fast path: slots first, (k, n, C), one value per slot
    slot_var, slot_cov = per_slot_terms(x.transpose(0, 1))
    torch.testing.assert_close(slot_var.mean(), expected_var, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(slot_cov.mean(), expected_cov, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(per_slot_terms(x.transpose(0, 1), with_covariance=False)[0], slot_var,
                               rtol=1e-12, atol=1e-14)
    # Against torch.cov too (it takes variables as rows).
    off_diagonal = ~torch.eye(channels, dtype=torch.bool)
    torch_cov = sum(torch.cov(x[:, s].T)[off_diagonal].pow(2).sum() / channels for s in range(3)) / 3
    torch.testing.assert_close(covariance(x), torch_cov, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n, channels", [(7, 5), (4, 9), (6, 6)])  # both sides of the Gram matrix
def test_hand_written_gradient_of_the_moments_equals_finite_differences(n, channels):
    x = torch.randn(3, n, channels, dtype=torch.float64, generator=torch.Generator().manual_seed(n)).requires_grad_()
    assert torch.autograd.gradcheck(CentredMoments.apply, (x,))
    # and the gradient of the terms built on it equals autograd through the plain formulas
    slot_var, slot_cov = per_slot_terms(x)
    grad = torch.autograd.grad(slot_var.mean() + slot_cov.mean(), x)[0]
    plain = variance(x.transpose(0, 1)) + covariance(x.transpose(0, 1))
    torch.testing.assert_close(grad, torch.autograd.grad(plain, x)[0], rtol=1e-10, atol=1e-12)


# --- distributed: two gloo processes, each with half of the batch -----------------------------------

DISTRIBUTED_OPTIONS = dict(alpha=0.75, num_matches=(6, 3))


def distributed_worker(rank, world_size, port, views, result_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        embeddings, maps, grids = [[t.chunk(world_size)[rank] for t in tensors] for tensors in views]
        maps = [m.movedim(-1, 1).contiguous().movedim(1, -1) for m in maps]  # channels-last, as a backbone gives
        results = {path: loss_and_gradients(make_criterion(path, **DISTRIBUTED_OPTIONS), embeddings, maps, grids)
                   for path in ("simple", "fast")}
        torch.save({path: (loss.detach(), stats, grads) for path, (loss, stats, grads) in results.items()},
                   f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_gather_gives_the_one_process_loss_and_gradient(tmp_path):
    world_size = 2
    views = make_views(8, 12, 11, seed=3)
    loss_value, stats, grads = loss_and_gradients(make_criterion("fast", **DISTRIBUTED_OPTIONS), *views)
    mp.spawn(distributed_worker, args=(world_size, free_port(), views, str(tmp_path / "rank")),
             nprocs=world_size, join=True)
    for rank in range(world_size):
        results = torch.load(f"{tmp_path / 'rank'}.{rank}")
        for path in ("simple", "fast"):
            # All-reduce-sum backward: each rank holds world_size x its rows of the 1-process gradient,
            # so DDP's mean over ranks of the parameter gradients is the 1-process gradient.
            expected_grads = [world_size * grad.chunk(world_size)[rank] for grad in grads]
            assert_same_results(results[path], (loss_value.detach(), stats, expected_grads), rtol=1e-9, atol=1e-14)
