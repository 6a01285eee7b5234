"""The fast paths give the results of the plain ones: mixed precision (the loss stays float32),
channels_last inputs, networks run once per resolution (LayerNorm) or per view (BatchNorm), and the local
criterion computed for all pairs at once against a plain loop over pairs written here."""

import pytest
import torch
import torch.nn.functional as F

import model
import train
from loss import VICRegLLoss, regularisers
from matching import location_grid, nearest_neighbors


def toy_net(arch="convnext_toy", **kwargs):
    torch.manual_seed(0)
    return model.VICRegL(arch, mlp="64-64-32", maps_mlp="32-32-16", num_classes=5, **kwargs)


def make_views(sizes, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


def boxes_and_flips(batch, num_views, seed=0):
    g = torch.Generator().manual_seed(seed)
    extent = 16 + torch.rand(batch, num_views, 2, generator=g) * 48
    top_left = torch.rand(batch, num_views, 2, generator=g) * (64 - extent)
    return torch.cat([top_left, extent], dim=2), torch.rand(batch, num_views, generator=g) < 0.5


def test_loss_under_autocast_is_float32_and_equals_float32_inputs():
    net = toy_net().eval()
    views = make_views([64, 64, 32, 32])
    boxes, flips = boxes_and_flips(4, 4)
    criterion = VICRegLLoss(num_matches=(6, 2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings, maps, _ = net(views)
        assert embeddings[0].dtype == torch.bfloat16 and maps[0].dtype == torch.bfloat16
        grids = [location_grid(boxes[:, v], flips[:, v], m.shape[1:3]) for v, m in enumerate(maps)]
        loss, stats = criterion(embeddings, maps, grids)  # called inside autocast on purpose
    assert loss.dtype == torch.float32 and all(value.dtype == torch.float32 for value in stats.values())
    # the same bf16 embeddings cast to float32 by hand, outside autocast
    expected, expected_stats = criterion([z.float() for z in embeddings], [m.float() for m in maps], grids)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for name, value in stats.items():
        torch.testing.assert_close(value, expected_stats[name], rtol=1e-6, atol=1e-6)


def test_compute_loss_under_amp_gives_float32_loss_with_gradients(amp_dtype=torch.bfloat16):
    # bf16 only: CPU autocast in fp16 is emulated and slow; the CUDA runs (README) cover fp16
    net = toy_net().train()
    views = make_views([64, 64, 32, 32])
    boxes, flips = boxes_and_flips(4, 4)
    criterion = VICRegLLoss(num_matches=(6, 2))
    loss, stats, logits = train.compute_loss(net, criterion, views, boxes, flips, torch.tensor([0, 1, 2, 3]), amp_dtype)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(value.dtype == torch.float32 for value in stats.values()) and logits.dtype == amp_dtype
    loss.backward()
    assert net.backbone.downsample_layers[0][0].weight.grad.abs().sum() > 0
    # bf16/fp16 networks, same weights: the loss is close to the float32 one
    plain, _, _ = train.compute_loss(net, criterion, views, boxes, flips, torch.tensor([0, 1, 2, 3]), None)
    assert abs(loss.item() - plain.item()) < 0.05 * abs(plain.item())


@pytest.mark.parametrize("arch", ["convnext_toy", "resnet18"])
def test_channels_last_forward_equals_contiguous(arch):
    net = toy_net(arch).eval()
    views = make_views([64, 64, 32])
    with torch.no_grad():
        expected = net(views)
        net = net.to(memory_format=torch.channels_last)
        got = net([v.to(memory_format=torch.channels_last) for v in views])
    assert views[0].to(memory_format=torch.channels_last).is_contiguous(memory_format=torch.channels_last)
    for want, have in zip(expected[0] + expected[1] + [expected[2]], got[0] + got[1] + [got[2]]):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)


def per_view_heads(net, views):
    """The plain path: backbone, pooling and heads on each view alone."""
    embeddings, maps = [], []
    for view in views:
        y = net.backbone(view)  # (B, C, h, w)
        embeddings.append(net.projector(y.mean(dim=(2, 3))))
        b, c, h, w = y.shape
        maps.append(net.maps_projector(y.permute(0, 2, 3, 1).reshape(-1, c)).reshape(b, h, w, -1))
    return embeddings, maps


@pytest.mark.parametrize("arch", ["convnext_toy", "resnet18"])
def test_heads_per_resolution_equal_heads_per_view_in_training(arch):
    # training mode: BatchNorm (resnet18) must see each view's batch alone to give these numbers
    net = toy_net(arch).train()
    assert net.heads_per_view == net.backbone_per_view == (arch == "resnet18")
    views = make_views([64, 32, 32] if arch == "resnet18" else [64, 64, 32, 32, 32])
    calls = []
    net.projector.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    embeddings, maps, _ = net(views)
    assert calls == ([4] * 3 if arch == "resnet18" else [8, 12])  # per view, or per run of one resolution
    expected_embeddings, expected_maps = per_view_heads(net, views)
    for have, want in zip(embeddings + maps, expected_embeddings + expected_maps):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)


def per_pair_local_loss(maps, grids, num_matches, num_large_views=2):
    """Local criterion written pair by pair, direction by direction (SPEC §2), with loss.regularisers."""
    maps = [m.flatten(1, 2) for m in maps]
    grids = [g.flatten(1, 2) for g in grids]
    total_inv = total_var = total_cov = 0.0
    pairs = [(a, b) for a in range(num_large_views) for b in range(len(maps)) if b != a]
    for a, b in pairs:
        directions = [(a, b, maps[a], maps[b], None), (b, a, maps[b], maps[a], None),
                      (a, b, grids[a], grids[b], num_matches[0]), (b, a, grids[b], grids[a], num_matches[1])]
        for q, c, queries, candidates, gamma in directions:
            query_idx, candidate_idx = nearest_neighbors(queries, candidates, gamma)
            inputs = torch.stack([maps[q][i, query_idx[i]] for i in range(len(query_idx))])  # (B, k, C)
            matched = torch.stack([maps[c][i, candidate_idx[i]] for i in range(len(query_idx))])
            var_in, cov_in = regularisers(inputs.transpose(0, 1))
            var_m, cov_m = regularisers(matched.transpose(0, 1))
            total_inv += F.mse_loss(inputs, matched) / 2
            total_var += (var_in + var_m) / 4
            total_cov += (cov_in + cov_m) / 4
    n = len(pairs)
    return total_inv / n, total_var / n, total_cov / n


def test_local_terms_all_pairs_at_once_equal_the_loop_over_pairs():
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 5)] * 2 + [(3, 3)] * 3 + [(2, 2)]  # three resolutions: three groups of pairs
    maps = [torch.randn(6, h, w, 7, generator=g, dtype=torch.float64, requires_grad=True) for h, w in shapes]
    grids = [location_grid(torch.cat([torch.rand(6, 2, generator=g) * 20, 8 + torch.rand(6, 2, generator=g) * 30], 1),
                           torch.rand(6, generator=g) < 0.5, shape).double() for shape in shapes]
    criterion = VICRegLLoss(num_matches=(7, 3))
    got = criterion.local_terms([m.flatten(1, 2) for m in maps], [grid.flatten(1, 2) for grid in grids])
    expected = per_pair_local_loss(maps, grids, (7, 3))
    for have, want in zip(got, expected):
        torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(sum(got), maps)
    expected_grads = torch.autograd.grad(sum(expected), maps)
    for have, want in zip(grads, expected_grads):
        torch.testing.assert_close(have, want, rtol=1e-8, atol=1e-12)
