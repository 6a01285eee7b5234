"""Tests of model.py against independent computations: the reference key layout derived from the
depths/dims, torchvision's ResNet, resnet_toy built module by module, and functional ConvNeXt and
resnet_toy forwards written here with F.* ops."""

import copy
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import model

CONVNEXT_CONFIGS = {  # arch -> (depths, dims, stem stride): ConvNeXt's (Liu et al. 2022), and our CPU-sized toy
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768), 4),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768), 4),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024), 4),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536), 4),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048), 4),
    "convnext_toy": ((1, 1, 2, 1), (32, 64, 128, 256), 2),
}
RESNET_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
CONVNEXT_KEY = re.compile(
    r"downsample_layers\.[0-3]\.[01]\.(weight|bias)"
    r"|stages\.[0-3]\.\d+\.(dwconv|norm|pwconv1|pwconv2)\.(weight|bias)"
    r"|norm\.(weight|bias)"
)


def reference_convnext_shapes(depths, dims, stem):
    """The released ConvNeXt layout, key -> shape, written out from the depths and dims."""
    shapes = {
        "downsample_layers.0.0.weight": (dims[0], 3, stem, stem),
        "downsample_layers.0.0.bias": (dims[0],),
        "downsample_layers.0.1.weight": (dims[0],),
        "downsample_layers.0.1.bias": (dims[0],),
    }
    for i in range(1, 4):
        shapes[f"downsample_layers.{i}.0.weight"] = (dims[i - 1],)
        shapes[f"downsample_layers.{i}.0.bias"] = (dims[i - 1],)
        shapes[f"downsample_layers.{i}.1.weight"] = (dims[i], dims[i - 1], 2, 2)
        shapes[f"downsample_layers.{i}.1.bias"] = (dims[i],)
    for i, (depth, d) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            shapes[p + "dwconv.weight"], shapes[p + "dwconv.bias"] = (d, 1, 7, 7), (d,)
            shapes[p + "norm.weight"], shapes[p + "norm.bias"] = (d,), (d,)
            shapes[p + "pwconv1.weight"], shapes[p + "pwconv1.bias"] = (4 * d, d), (4 * d,)
            shapes[p + "pwconv2.weight"], shapes[p + "pwconv2.bias"] = (d, 4 * d), (d,)
    shapes["norm.weight"], shapes["norm.bias"] = (dims[-1],), (dims[-1],)
    return shapes


def convnext_param_count(depths, dims, stem):
    """Closed form: stem conv + LN, 3 × (LN + 2x2 conv), blocks of 8d² + 57d, final LN."""
    count = dims[0] * 3 * stem * stem + dims[0] + 2 * dims[0]
    count += sum(2 * dims[i - 1] + dims[i] * dims[i - 1] * 4 + dims[i] for i in range(1, 4))
    # block: dwconv 49d + d, LN 2d, pwconv1 4d² + 4d, pwconv2 4d² + d
    count += sum(depth * (8 * d * d + 57 * d) for depth, d in zip(depths, dims))
    return count + 2 * dims[-1]


def random_state(shapes, seed=0):
    """Random weights for every key; norm weights near 1 so activations keep a sane scale."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 1 and key.endswith("weight"):
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in) * (0.1 if len(shape) == 1 else 1.0)
    return state


def functional_convnext(state, x, depths, stem):
    """ConvNeXt forward written with F.* on the state dict (no modules)."""

    def ln_channels_first(x, prefix):  # LayerNorm over C at each cell of (B, C, H, W)
        y = x.permute(0, 2, 3, 1)
        y = F.layer_norm(y, y.shape[-1:], state[prefix + ".weight"], state[prefix + ".bias"], 1e-6)
        return y.permute(0, 3, 1, 2)

    x = F.conv2d(x, state["downsample_layers.0.0.weight"], state["downsample_layers.0.0.bias"], stride=stem)
    x = ln_channels_first(x, "downsample_layers.0.1")
    for i in range(4):
        if i > 0:
            x = ln_channels_first(x, f"downsample_layers.{i}.0")
            x = F.conv2d(x, state[f"downsample_layers.{i}.1.weight"], state[f"downsample_layers.{i}.1.bias"], stride=2)
        for j in range(depths[i]):
            p = f"stages.{i}.{j}."
            y = F.conv2d(x, state[p + "dwconv.weight"], state[p + "dwconv.bias"], padding=3, groups=x.shape[1])
            y = ln_channels_first(y, p + "norm")
            y = y.permute(0, 2, 3, 1)
            y = F.linear(F.gelu(F.linear(y, state[p + "pwconv1.weight"], state[p + "pwconv1.bias"])),
                         state[p + "pwconv2.weight"], state[p + "pwconv2.bias"])
            x = x + y.permute(0, 3, 1, 2)
    return ln_channels_first(x, "norm")


def torchvision_resnet(arch):
    return getattr(torchvision.models, arch)(weights=None)


# ---------------------------------------------------------------------------------------------
# backbones: shapes, layouts, parameter counts, init


@pytest.mark.parametrize("arch", list(RESNET_FEATURES))
def test_resnet_layout_and_shapes(arch):
    backbone = model.build_backbone(arch)
    expected = {k: v.shape for k, v in torchvision_resnet(arch).state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in backbone.state_dict().items()} == expected
    tv_params = sum(p.numel() for n, p in torchvision_resnet(arch).named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in backbone.parameters()) == tv_params
    assert backbone.num_features == RESNET_FEATURES[arch]
    assert model.is_resnet(arch)
    # zero-init of the last BN of every residual block
    last_bn = "bn3" if RESNET_FEATURES[arch] == 2048 else "bn2"
    blocks = [b for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for b in layer]
    assert all(torch.all(getattr(b, last_bn).weight == 0) for b in blocks)
    backbone.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        stages = backbone.forward_stages(x)
        y = backbone(x)
    assert y.shape == (1, RESNET_FEATURES[arch], 7, 7)
    assert [s.shape[-1] for s in stages] == [56, 28, 14, 7]
    assert torch.equal(stages[-1], y)


def naive_toy_resnet(state, x):
    """resnet_toy's forward from its state dict alone, in eval mode: 3x3/2 stem, BN, ReLU; four
    stages of two BasicBlocks (widths 24, 48, 96, 192, first-block strides 1, 2, 2, 1; a 1x1 conv +
    BN shortcut where the shape changes); LayerNorm over the channels of every cell of the last map."""
    def bn(x, name):
        return F.batch_norm(x, state[name + ".running_mean"], state[name + ".running_var"],
                            state[name + ".weight"], state[name + ".bias"], training=False, eps=1e-5)

    x = F.relu(bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=1), "bn1"))
    for layer, stride in zip(range(1, 5), (1, 2, 2, 1)):
        for block in range(2):
            p, s = f"layer{layer}.{block}.", stride if block == 0 else 1
            y = F.relu(bn(F.conv2d(x, state[p + "conv1.weight"], stride=s, padding=1), p + "bn1"))
            y = bn(F.conv2d(y, state[p + "conv2.weight"], padding=1), p + "bn2")
            if p + "downsample.0.weight" in state:
                x = bn(F.conv2d(x, state[p + "downsample.0.weight"], stride=s), p + "downsample.1")
            x = F.relu(x + y)
    cells = x.permute(0, 2, 3, 1)  # (B, h, w, C)
    return F.layer_norm(cells, (192,), state["norm.weight"], state["norm.bias"], eps=1e-5).permute(0, 3, 1, 2)


def reference_toy_resnet_shapes():
    """resnet_toy's key -> shape, written out: ResNet-18's keys without fc.* at widths 24, 48, 96, 192 (a
    1x1 conv + BN shortcut in the first block of the stages that change the shape), plus the LayerNorm."""
    def batchnorm(name, width):
        return {f"{name}.{key}": (width,) for key in ("weight", "bias", "running_mean", "running_var")} | \
            {f"{name}.num_batches_tracked": ()}

    shapes = {"conv1.weight": (24, 3, 3, 3), **batchnorm("bn1", 24)}
    for layer, (in_width, width) in enumerate(zip((24, 24, 48, 96), (24, 48, 96, 192)), start=1):
        for block in range(2):
            p, c = f"layer{layer}.{block}.", in_width if block == 0 else width
            shapes |= {p + "conv1.weight": (width, c, 3, 3), **batchnorm(p + "bn1", width)}
            shapes |= {p + "conv2.weight": (width, width, 3, 3), **batchnorm(p + "bn2", width)}
            if block == 0 and layer > 1:
                shapes |= {p + "downsample.0.weight": (width, c, 1, 1), **batchnorm(p + "downsample.1", width)}
    return shapes | {"norm.weight": (192,), "norm.bias": (192,)}


def toy_resnet_module_by_module():
    """resnet_toy built from plain Conv2d/BatchNorm2d/LayerNorm modules, registered in torchvision's
    order (a block: conv1, bn1, conv2, bn2, downsample) and initialised as torchvision initialises a
    ResNet with zero_init_residual: He init (fan out) of every conv, then γ = 0 in each block's last BN."""
    net = nn.Module()
    net.conv1, net.bn1 = nn.Conv2d(3, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24)
    for layer, (in_width, width, stride) in enumerate(zip((24, 24, 48, 96), (24, 48, 96, 192), (1, 2, 2, 1)), 1):
        blocks = []
        for c, s in ((in_width, stride), (width, 1)):
            block = nn.Module()
            block.conv1 = nn.Conv2d(c, width, 3, stride=s, padding=1, bias=False)
            block.bn1 = nn.BatchNorm2d(width)
            block.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            block.bn2 = nn.BatchNorm2d(width)
            if (c, s) != (width, 1):
                block.downsample = nn.Sequential(nn.Conv2d(c, width, 1, stride=s, bias=False), nn.BatchNorm2d(width))
            blocks.append(block)
        setattr(net, f"layer{layer}", nn.Sequential(*blocks))
    net.norm = nn.LayerNorm(192)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    for name, m in net.named_modules():
        if name.endswith(".bn2"):
            nn.init.zeros_(m.weight)
    return net


def test_toy_resnet_keys_shapes_and_initial_weights_are_those_of_its_module_by_module_build():
    torch.manual_seed(0)
    state = model.build_backbone("resnet_toy").state_dict()
    torch.manual_seed(0)
    reference = toy_resnet_module_by_module().state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == reference_toy_resnet_shapes()
    assert list(state) == list(reference)  # the same order too
    for key, value in reference.items():
        assert torch.equal(state[key], value), key  # same seed, same draws


def test_toy_resnet_geometry_init_and_forward():
    torch.manual_seed(0)
    backbone = model.build_backbone("resnet_toy")
    assert model.is_resnet("resnet_toy") and model.has_batchnorm(backbone) and backbone.num_features == 192
    # zero-init of each block's last BN, He init of the convs (std sqrt(2 / fan_out))
    blocks = [b for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for b in layer]
    assert len(blocks) == 8 and all(torch.all(b.bn2.weight == 0) for b in blocks)
    conv = backbone.layer3[0].conv1.weight  # (96, 48, 3, 3)
    assert conv.std().item() == pytest.approx((2 / (96 * 9)) ** 0.5, rel=0.05)
    # the toy recipe's views: 48 px -> 6 x 6 cells, 24 px -> 3 x 3 (ImageNet recipe: 7 x 7 and 3 x 3)
    for size, cells in ((48, 6), (24, 3), (64, 8)):
        assert backbone(torch.randn(2, 3, size, size)).shape == (2, 192, cells, cells)
    # the forward equals the hand-written one, with non-trivial BN statistics and affine parameters
    with torch.no_grad():
        for name, value in backbone.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5 if name.endswith("running_var") else torch.randn_like(value) * 0.2)
    backbone.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), naive_toy_resnet(backbone.state_dict(), x), rtol=1e-4, atol=1e-4)
        stages = backbone.forward_stages(x)
        torch.testing.assert_close(stages[-1], naive_toy_resnet(backbone.state_dict(), x), rtol=1e-4, atol=1e-4)
    assert [tuple(m.shape[1:]) for m in stages] == [(24, 24, 24), (48, 12, 12), (96, 6, 6), (192, 6, 6)]
    assert [48 // m.shape[-1] for m in stages] == [2, 4, 8, 8]  # the strides of the four stages


@pytest.mark.parametrize("arch", list(CONVNEXT_CONFIGS))
def test_convnext_layout_and_shapes(arch):
    depths, dims, stem = CONVNEXT_CONFIGS[arch]
    small = arch in ("convnext_toy", "convnext_tiny")
    if small:
        backbone = model.build_backbone(arch).eval()
    else:  # the big ones only on the meta device: shapes without compute
        with torch.device("meta"):
            backbone = model.build_backbone(arch)
    state = backbone.state_dict()
    assert all(CONVNEXT_KEY.fullmatch(k) for k in state), [k for k in state if not CONVNEXT_KEY.fullmatch(k)]
    assert not any("gamma" in k or k.startswith("fc.") or "head" in k for k in state)
    assert {k: tuple(v.shape) for k, v in state.items()} == reference_convnext_shapes(depths, dims, stem)
    assert sum(p.numel() for p in backbone.parameters()) == convnext_param_count(depths, dims, stem)
    assert backbone.num_features == dims[-1]
    assert not model.is_resnet(arch)

    size = 64 if arch == "convnext_toy" else 224
    x = torch.randn(1, 3, size, size, device="cpu" if small else "meta")
    with torch.no_grad():
        stages = backbone.forward_stages(x)
        y = backbone(x)
    assert y.shape == (1, dims[-1], size // (8 * stem), size // (8 * stem))
    assert [tuple(s.shape[1:]) for s in stages] == [
        (dims[i], size // (stem * 2**i), size // (stem * 2**i)) for i in range(4)
    ]
    if small:
        assert torch.equal(stages[-1], y)
        # per-cell final LayerNorm with unit weight, zero bias: every cell has mean 0, variance 1
        cells = y.permute(0, 2, 3, 1)
        assert torch.allclose(cells.mean(-1), torch.zeros(()), atol=1e-5)
        assert torch.allclose(cells.var(-1, unbiased=False), torch.ones(()), atol=1e-3)


def test_convnext_small_parameter_count():
    assert convnext_param_count(*CONVNEXT_CONFIGS["convnext_small"]) == 49_441_152  # ≈ 49.44M, no head


def test_convnext_init():
    backbone = model.build_backbone("convnext_tiny")
    weights = torch.cat([m.weight.flatten() for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    biases = torch.cat([m.bias for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert abs(weights.std().item() - 0.02) < 5e-4 and abs(weights.mean().item()) < 1e-4
    assert torch.all(biases == 0)


def test_drop_path():
    rate = 0.1
    backbone = model.build_backbone("convnext_tiny", drop_path_rate=rate)
    rates = [block.drop_path.p for stage in backbone.stages for block in stage]
    assert rates == pytest.approx([rate * k / 17 for k in range(18)])
    drop = model.DropPath(0.5).train()
    x = torch.ones(4000, 3, 2, 2)
    y = drop(x)
    per_sample = y.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 2).all(1))  # whole samples dropped or x2
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.5) < 0.05
    assert torch.equal(drop.eval()(x), x)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch"):
        model.build_backbone("vit_base")


# ---------------------------------------------------------------------------------------------
# loading released files and checkpoints


def full_checkpoint(backbone_state, prefix="module."):
    """A training checkpoint as the reference saves it."""
    weights = {f"{prefix}backbone.{k}": v for k, v in backbone_state.items()}
    weights[f"{prefix}projector.0.weight"] = torch.randn(8, 4)
    weights[f"{prefix}maps_projector.0.weight"] = torch.randn(8, 4)
    weights[f"{prefix}classifier.weight"] = torch.randn(3, 4)
    optimizer = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    return {"epoch": 3, "model": weights, "optimizer": optimizer}


@pytest.mark.parametrize("arch", ["convnext_toy", "convnext_tiny"])
def test_convnext_loads_reference_layout_and_matches_functional(arch, tmp_path):
    depths, dims, stem = CONVNEXT_CONFIGS[arch]
    state = random_state(reference_convnext_shapes(depths, dims, stem))
    x = torch.randn(2, 3, 64, 64)
    expected = functional_convnext(state, x, depths, stem)
    for name, content in (("plain.pth", state), ("full.pth", full_checkpoint(state)),
                          ("nomodule.pth", full_checkpoint(state, prefix=""))):
        torch.save(content, tmp_path / name)
        backbone = model.build_backbone(arch, pretrained=str(tmp_path / name)).eval()
        assert all(torch.equal(backbone.state_dict()[k], v) for k, v in state.items())
        with torch.no_grad():
            y = backbone(x)
        assert y.shape == expected.shape
        assert torch.allclose(y, expected, atol=1e-4, rtol=1e-4)


def test_resnet50_matches_torchvision(tmp_path):
    reference = torchvision_resnet("resnet50")
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    reference.load_state_dict(random_state(shapes, seed=1))
    reference.fc = nn.Identity()
    torch.save({k: v for k, v in reference.state_dict().items()}, tmp_path / "r50.pth")
    torch.save(full_checkpoint(reference.state_dict()), tmp_path / "r50_full.pth")
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = reference.eval()(x)  # (B, 2048)
        for name in ("r50.pth", "r50_full.pth"):
            backbone = model.build_backbone("resnet50", pretrained=str(tmp_path / name)).eval()
            pooled = backbone(x).mean(dim=(2, 3))
            assert torch.allclose(pooled, expected, atol=1e-5, rtol=1e-4)
    assert expected.abs().mean() > 1e-3  # not a trivially zero comparison


def assert_one_line_error(arch, path, *fragments):
    with pytest.raises(ValueError) as info:
        model.build_backbone(arch, pretrained=str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_load_errors(tmp_path):
    toy = CONVNEXT_CONFIGS["convnext_toy"]
    toy_state = random_state(reference_convnext_shapes(*toy))

    # a ResNet-50 file into ConvNeXt-S: names both archs
    r50 = {k: v for k, v in model.build_backbone("resnet50").state_dict().items()}
    torch.save(r50, tmp_path / "r50.pth")
    assert_one_line_error("convnext_small", tmp_path / "r50.pth", "convnext_small", "resnet50", "missing")
    # a ConvNeXt-T file into ConvNeXt-S: missing blocks of stage 2
    with torch.device("meta"):
        tiny_shapes = {k: tuple(v.shape) for k, v in model.build_backbone("convnext_tiny").state_dict().items()}
    torch.save({k: torch.zeros(s) for k, s in tiny_shapes.items()}, tmp_path / "tiny.pth")
    assert_one_line_error("convnext_small", tmp_path / "tiny.pth", "convnext_tiny", "stages.2.9.")
    # a missing key
    torch.save({k: v for k, v in toy_state.items() if k != "norm.weight"}, tmp_path / "missing.pth")
    assert_one_line_error("convnext_toy", tmp_path / "missing.pth", "missing", "norm.weight")
    # an unexpected layer-scale key
    torch.save({**toy_state, "stages.0.0.gamma": torch.ones(32)}, tmp_path / "gamma.pth")
    assert_one_line_error("convnext_toy", tmp_path / "gamma.pth", "unexpected", "stages.0.0.gamma")
    # a mis-shaped tensor
    torch.save({**toy_state, "norm.bias": torch.zeros(3)}, tmp_path / "shape.pth")
    assert_one_line_error("convnext_toy", tmp_path / "shape.pth", "mis-shaped", "norm.bias")
    # a text file, a truncated file, a missing path
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    assert_one_line_error("convnext_toy", tmp_path / "notes.txt", "not a readable PyTorch checkpoint")
    torch.save(toy_state, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    assert_one_line_error("convnext_toy", tmp_path / "truncated.pth", "not a readable PyTorch checkpoint")
    assert_one_line_error("convnext_toy", tmp_path / "absent.pth", "no such file")
    # a checkpoint without backbone weights
    torch.save({"epoch": 1, "model": {"module.projector.0.weight": torch.zeros(2, 2)}}, tmp_path / "heads.pth")
    assert_one_line_error("convnext_toy", tmp_path / "heads.pth", "no backbone")


# ---------------------------------------------------------------------------------------------
# VICRegL module


def toy_vicregl(**kwargs):
    torch.manual_seed(0)
    return model.VICRegL("convnext_toy", mlp="64-64-32", maps_mlp="16-16-8", num_classes=5, **kwargs)


def make_views(sizes, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


def test_vicregl_shapes_and_keys():
    net = toy_vicregl()
    embeddings, maps, logits = net(make_views([64, 64, 32, 32, 32]))
    assert [tuple(e.shape) for e in embeddings] == [(2, 32)] * 5
    assert [tuple(m.shape) for m in maps] == [(2, 4, 4, 8)] * 2 + [(2, 2, 2, 8)] * 3
    assert logits.shape == (2, 5)
    assert {k.split(".")[0] for k in net.state_dict()} == {"backbone", "projector", "maps_projector", "classifier"}
    kinds = [type(m) for m in net.projector]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.ReLU] * 2 + [nn.Linear]
    assert [m.weight.shape for m in net.projector if isinstance(m, nn.Linear)] == [(64, 256), (64, 64), (32, 64)]
    assert net.projector[-1].bias is None and net.maps_projector[-1].bias is None
    assert net.maps_projector[0].weight.shape == (16, 256) and net.classifier.weight.shape == (5, 256)

    resnet = model.VICRegL("resnet18", mlp="64-32", num_classes=4, local=False)
    embeddings, maps, logits = resnet(make_views([64, 64]))
    assert maps is None and not hasattr(resnet, "maps_projector")
    assert [type(m) for m in resnet.projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert [tuple(e.shape) for e in embeddings] == [(2, 32)] * 2 and logits.shape == (2, 4)
    assert {k.split(".")[0] for k in resnet.state_dict()} == {"backbone", "projector", "classifier"}


def test_vicregl_batched_forward_equals_per_view():
    net = toy_vicregl().eval()
    views = make_views([64, 64, 32, 32, 64])
    calls = []
    net.backbone.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    with torch.no_grad():
        embeddings, maps, logits = net(views)
        assert calls == [4, 4, 2]  # one pass per run of equal resolution
        for v, view in enumerate(views):
            single_embeddings, single_maps, single_logits = net([view])
            assert torch.allclose(embeddings[v], single_embeddings[0], atol=1e-5)
            assert torch.allclose(maps[v], single_maps[0], atol=1e-5)
            if v == 0:
                assert torch.allclose(logits, single_logits, atol=1e-5)
        # local projector applied to each cell alone
        y = net.backbone(views[2])  # (B, C, 2, 2)
        assert torch.allclose(maps[2][1, 0, 1], net.maps_projector(y[1, :, 0, 1]), atol=1e-5)
        assert torch.allclose(embeddings[2], net.projector(y.mean(dim=(2, 3))), atol=1e-5)


def per_view_loop(net, views):
    """The reference's forward written plainly: backbone -> pooling -> heads, one view at a time."""
    embeddings, maps, pooled = [], [], []
    for view in views:
        y = net.backbone(view)  # (B, C, h, w)
        pooled.append(y.mean(dim=(2, 3)))  # (B, C)
        embeddings.append(net.projector(pooled[-1]))  # (B, D)
        b, c, h, w = y.shape
        maps.append(net.maps_projector(y.permute(0, 2, 3, 1).reshape(b * h * w, c)).reshape(b, h, w, -1))
    return embeddings, maps, net.classifier(pooled[0])


def batchnorm_buffers(net):
    return {name: value for name, value in net.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def test_resnet_vicregl_training_forward_equals_a_loop_over_views():
    torch.manual_seed(0)
    net = model.VICRegL("resnet18", mlp="64-64-32", maps_mlp="16-16-8", num_classes=5).train()
    assert net.backbone_per_view and net.heads_per_view
    views = make_views([64, 64, 32, 32], batch=4)  # two resolutions, two views each
    loop, batched = copy.deepcopy(net), copy.deepcopy(net)
    embeddings, maps, logits = net(views)
    loop_embeddings, loop_maps, loop_logits = per_view_loop(loop, views)
    for have, want in zip(embeddings + maps + [logits], loop_embeddings + loop_maps + [loop_logits]):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    # every BatchNorm buffer has seen each view's batch alone, once per view
    buffers, loop_buffers = batchnorm_buffers(net), batchnorm_buffers(loop)
    assert len(buffers) == 3 * sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in net.modules())
    for name, value in buffers.items():
        torch.testing.assert_close(value, loop_buffers[name], rtol=1e-5, atol=1e-6, msg=name)
    assert int(buffers["backbone.bn1.num_batches_tracked"]) == len(views)
    # gradients: no view's gradient flows through another view's statistics
    sum(z.square().sum() for z in embeddings + maps).backward()
    sum(z.square().sum() for z in loop_embeddings + loop_maps).backward()
    for (name, p), q in zip(net.named_parameters(), loop.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    # the views of one resolution concatenated through the backbone give other numbers
    batched.backbone_per_view = False
    batched_embeddings, _, _ = batched(views)
    assert not torch.allclose(batched_embeddings[0], embeddings[0], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(batched.backbone.bn1.running_mean, net.backbone.bn1.running_mean)
    assert int(batched.backbone.bn1.num_batches_tracked) == 2  # once per resolution


def test_classifier_gradient_stops_at_backbone():
    net = toy_vicregl().train()
    embeddings, maps, logits = net(make_views([64, 64]))
    logits.sum().backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in net.backbone.parameters())
    assert all(p.grad is None for p in net.projector.parameters())
    assert net.classifier.weight.grad.abs().sum() > 0
    net.zero_grad(set_to_none=True)
    (embeddings[0].sum() + maps[1].sum()).backward()  # the losses' path does reach the backbone
    assert net.backbone.downsample_layers[0][0].weight.grad.abs().sum() > 0


class FakeDDP(nn.Module):
    """Same attribute and key naming as DistributedDataParallel (`module.`)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_backbone_state_dict_round_trip(tmp_path):
    net = toy_vicregl()
    with torch.no_grad():  # non-default values everywhere
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    expected = net.backbone.state_dict()
    for wrapped in (net, FakeDDP(net), torch.compile(net), net.backbone):
        exported = model.backbone_state_dict(wrapped)
        assert list(exported) == list(expected)
        assert all(torch.equal(exported[k], v) for k, v in expected.items())
    torch.save(model.backbone_state_dict(FakeDDP(net)), tmp_path / "backbone.pth")
    torch.save({"epoch": 1, "model": FakeDDP(net).state_dict(), "optimizer": {}}, tmp_path / "model.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = net.backbone.eval()(x)
        for name in ("backbone.pth", "model.pth"):
            loaded = model.build_backbone("convnext_toy", pretrained=str(tmp_path / name)).eval()
            assert torch.equal(loaded(x), reference)


# ---------------------------------------------------------------------------------------------
# the evaluations' networks: a sweep of heads on a frozen or fine-tuned backbone


def test_sweep_heads_start_equal_from_the_seed():
    heads = model.SweepHeads(lambda: nn.Sequential(nn.BatchNorm2d(6), nn.Conv2d(6, 4, kernel_size=1)), 3, seed=5)
    expected = torch.randn(4, 6, 1, 1, generator=torch.Generator().manual_seed(5)) * 0.01
    for head in heads.heads:
        assert torch.equal(head[1].weight, expected) and torch.all(head[1].bias == 0)
    features = torch.randn(2, 6, 3, 3)
    outputs = heads.eval()(features)
    assert outputs.shape == (3, 2, 4, 3, 3)
    assert torch.equal(outputs[0], heads.heads[0](features)) and torch.equal(outputs[0], outputs[2])


def test_backbone_and_heads_keeps_a_frozen_backbone_in_eval_mode_and_out_of_the_graph():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    frozen = model.BackboneAndHeads(model.build_backbone("resnet_toy"), nn.Identity(), frozen=True).train()
    statistics = frozen.backbone.bn1.running_mean.clone()
    stages = frozen.backbone_stages(images)
    assert not frozen.backbone.training and frozen.training
    assert not any(p.requires_grad for p in frozen.backbone.parameters()) and not stages[-1].requires_grad
    assert torch.equal(frozen.backbone.bn1.running_mean, statistics)  # BatchNorm statistics unchanged
    assert [32 // m.shape[-1] for m in stages] == [2, 4, 8, 8]

    tuned = model.BackboneAndHeads(model.build_backbone("resnet_toy"), nn.Identity(), frozen=False).train()
    assert tuned.backbone.training and tuned.backbone_stages(images)[-1].requires_grad
    assert not torch.equal(tuned.backbone.bn1.running_mean, statistics)
