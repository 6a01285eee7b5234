"""The fast paths give the results of the plain ones: mixed precision (the loss stays float32),
channels_last inputs, networks run once per resolution (LayerNorm) or per view (BatchNorm). The fast local
criterion is held equal to the simple one (VICRegLLoss(simple=True)) in tests/test_loss.py."""

import pytest
import torch

import model
import train
from loss import VICRegLLoss
from matching import location_grid


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
    loss, stats, (_, _, logits) = train.compute_loss(net, criterion, views, boxes, flips, torch.tensor([0, 1, 2, 3]), amp_dtype)
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
