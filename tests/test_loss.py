import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loss
from loss import CentredMoments, VICRegLLoss, covariance_term, per_slot_terms, variance_term
from matching import location_grid
from naive_loss import naive_covariance, naive_variance, naive_vicregl_loss

LARGE_MAP, SMALL_MAP = (4, 4), (2, 2)
NUM_LARGE, NUM_SMALL = 2, 3


def make_views(batch_size, map_channels, embedding_dim, seed=0):
    """Random multi-crop inputs in float64: 2 large views with 4x4 maps, 3 small ones with 2x2 maps.
    Boxes have integer coordinates so that location matching meets exact ties."""
    generator = torch.Generator().manual_seed(seed)
    embeddings, maps, grids = [], [], []
    for v in range(NUM_LARGE + NUM_SMALL):
        size = LARGE_MAP if v < NUM_LARGE else SMALL_MAP
        embeddings.append(torch.randn(batch_size, embedding_dim, generator=generator, dtype=torch.float64))
        maps.append(torch.randn(batch_size, *size, map_channels, generator=generator, dtype=torch.float64))
        top_left = torch.randint(0, 60, (batch_size, 2), generator=generator)
        extent = torch.randint(8, 40, (batch_size, 2), generator=generator)
        flips = torch.rand(batch_size, generator=generator) < 0.5
        grids.append(location_grid(torch.cat([top_left, extent], dim=1).double(), flips, size))
    return embeddings, maps, grids


def loss_and_gradients(criterion, embeddings, maps, grids):
    embeddings = [z.clone().requires_grad_() for z in embeddings]
    maps = None if maps is None else [m.clone().requires_grad_() for m in maps]
    loss, stats = criterion(embeddings, maps, grids)
    inputs = embeddings + ([] if maps is None else maps)
    return loss, stats, torch.autograd.grad(loss, inputs)


CONFIGS = [  # (alpha, gamma_rule, feature_matches, num_matches)
    (0.75, "reference", "all", (20, 4)),
    (0.75, "reference", "all", (6, 3)),
    (0.75, "paper", "top", (6, 3)),
    (0.75, "reference", "top", (20, 4)),
    (0.0, "paper", "all", (6, 3)),
    (0.0, "reference", "top", (6, 3)),
]


@pytest.mark.parametrize("map_channels, embedding_dim", [(5, 6), (12, 11)])  # C < B = 8 and C > B
@pytest.mark.parametrize("alpha, gamma_rule, feature_matches, num_matches", CONFIGS)
def test_loss_matches_naive_reference(alpha, gamma_rule, feature_matches, num_matches, map_channels, embedding_dim):
    embeddings, maps, grids = make_views(8, map_channels, embedding_dim)
    options = dict(alpha=alpha, num_matches=num_matches, gamma_rule=gamma_rule, feature_matches=feature_matches)
    loss, stats, grads = loss_and_gradients(VICRegLLoss(**options), embeddings, maps, grids)
    naive = lambda e, m, g: naive_vicregl_loss(e, m, g, **options)
    expected_loss, expected_stats, expected_grads = loss_and_gradients(naive, embeddings, maps, grids)

    assert loss.dtype == torch.float64 and loss.dim() == 0
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
    for name, value in expected_stats.items():
        assert stats[name].dim() == 0 and not stats[name].requires_grad
        torch.testing.assert_close(stats[name], value, rtol=1e-10, atol=1e-10)
    assert all(expected_stats[name] > 0 for name in ("inv", "var", "cov", "local_inv", "local_var", "local_cov"))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("map_channels, embedding_dim", [(5, 6), (12, 11)])
def test_alpha_one_is_plain_vicreg(map_channels, embedding_dim):
    embeddings, maps, grids = make_views(8, map_channels, embedding_dim)
    loss, stats, grads = loss_and_gradients(VICRegLLoss(alpha=1.0), embeddings, None, None)
    naive = lambda e, m, g: naive_vicregl_loss(e, m, g, alpha=1.0)
    expected_loss, expected_stats, expected_grads = loss_and_gradients(naive, embeddings, None, None)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
    assert stats["local_inv"] == stats["local_var"] == stats["local_cov"] == 0
    torch.testing.assert_close(loss, stats["inv"] + stats["var"] + stats["cov"], rtol=1e-12, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10)
    # Maps and grids, when given, are ignored.
    torch.testing.assert_close(VICRegLLoss(alpha=1.0)(embeddings, maps, grids)[0], loss, rtol=0, atol=0)


def test_half_precision_inputs_are_computed_in_float32():
    embeddings, maps, grids = make_views(8, 5, 6)
    half = lambda tensors: [t.to(torch.bfloat16) for t in tensors]
    loss, stats = VICRegLLoss()(half(embeddings), half(maps), grids)
    assert loss.dtype == torch.float32
    rounded = lambda tensors: [t.to(torch.bfloat16).double() for t in tensors]
    expected, _ = naive_vicregl_loss(rounded(embeddings), rounded(maps), grids)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


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
    with pytest.raises(ValueError, match="alpha < 1"):
        VICRegLLoss()(embeddings, None, None)
    with pytest.raises(ValueError, match="views"):
        VICRegLLoss()(embeddings[:1], maps[:1], grids[:1])


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

    def counting_per_slot_terms(cells):
        calls.append(cells.shape)
        return per_slot_terms(cells)

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


# --- the VICReg terms against their plain formulas -------------------------------------------------

def test_terms_by_hand():
    # x = [[1, 2], [3, 6]]: centred [[-1, -2], [1, 2]], Cov = [[2, 4], [4, 8]] -> off-diagonal 2 * 4² / C = 16;
    # both standard deviations exceed 1 -> no variance penalty.
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    assert covariance_term(x).item() == pytest.approx(16.0, rel=1e-12)
    assert variance_term(x).item() == 0.0
    # x = [[0, 0], [0.5, 0]]: unbiased variances 0.125 and 0.
    x = torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    expected = ((1 - math.sqrt(0.125 + 1e-4)) + (1 - math.sqrt(1e-4))) / 2
    assert variance_term(x).item() == pytest.approx(expected, rel=1e-12)
    assert covariance_term(x).item() == 0.0


@pytest.mark.parametrize("n, channels", [(7, 5), (4, 9), (6, 6)])  # Gram on both sides, and n == C
def test_terms_against_plain_formulas_per_slot(n, channels):
    x = torch.randn(3, n, channels, dtype=torch.float64) * torch.rand(channels, dtype=torch.float64) * 2
    expected_var = sum(naive_variance(x[s]) for s in range(3)) / 3
    expected_cov = sum(naive_covariance(x[s]) for s in range(3)) / 3
    torch.testing.assert_close(variance_term(x), expected_var, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(covariance_term(x), expected_cov, rtol=1e-10, atol=1e-14)
    # Against torch.cov too (it takes variables as rows).
    off_diagonal = ~torch.eye(channels, dtype=torch.bool)
    torch_cov = sum(torch.cov(x[s].T)[off_diagonal].pow(2).sum() / channels for s in range(3)) / 3
    torch.testing.assert_close(covariance_term(x), torch_cov, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n, channels", [(7, 5), (4, 9), (6, 6)])  # both sides of the Gram matrix
def test_hand_written_gradient_of_the_moments_equals_finite_differences(n, channels):
    x = torch.randn(3, n, channels, dtype=torch.float64, generator=torch.Generator().manual_seed(n)).requires_grad_()
    assert torch.autograd.gradcheck(CentredMoments.apply, (x,))
    # and the gradient of the terms built on it equals autograd through the plain formulas
    grad = torch.autograd.grad(variance_term(x) + covariance_term(x), x)[0]
    plain = sum(naive_variance(x[s]) + naive_covariance(x[s]) for s in range(3)) / 3
    torch.testing.assert_close(grad, torch.autograd.grad(plain, x)[0], rtol=1e-10, atol=1e-12)


# --- distributed: two gloo processes, each with half of the batch -----------------------------------

def distributed_worker(rank, world_size, port, views, result_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        embeddings, maps, grids = [[t.chunk(world_size)[rank] for t in tensors] for tensors in views]
        maps = [m.movedim(-1, 1).contiguous().movedim(1, -1) for m in maps]  # channels-last, as a backbone gives
        criterion = VICRegLLoss(alpha=0.75, num_matches=(6, 3))
        loss, stats, grads = loss_and_gradients(criterion, embeddings, maps, grids)
        torch.save({"loss": loss.detach(), "stats": stats, "grads": grads}, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_gather_gives_the_one_process_loss_and_gradient(tmp_path):
    world_size = 2
    views = make_views(8, 12, 11, seed=3)
    loss, stats, grads = loss_and_gradients(VICRegLLoss(alpha=0.75, num_matches=(6, 3)), *views)
    mp.spawn(distributed_worker, args=(world_size, free_port(), views, str(tmp_path / "rank")),
             nprocs=world_size, join=True)
    for rank in range(world_size):
        result = torch.load(f"{tmp_path / 'rank'}.{rank}")
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        for name, value in stats.items():
            torch.testing.assert_close(result["stats"][name], value, rtol=1e-6, atol=1e-6)
        # All-reduce-sum backward: each rank holds world_size x its rows of the 1-process gradient,
        # so DDP's mean over ranks of the parameter gradients is the 1-process gradient.
        for grad, full_grad in zip(result["grads"], grads):
            torch.testing.assert_close(grad, world_size * full_grad.chunk(world_size)[rank], rtol=1e-6, atol=1e-6)
