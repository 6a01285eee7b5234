"""VICRegL networks: backbones (ResNet, ConvNeXt), heads, and the released-checkpoint layout.

The networks of the paper's method ("VICRegL: feature vectors matching"): the backbone maps a view
(B, 3, S, S) to a feature map y (B, C, h, w). y is average-pooled into y⊕ (B, C); the global expander
maps y⊕ to z⊕ (B, 8192) and the local projector maps every cell of y to z (B, h, w, 512). A linear
classifier on the detached y⊕ of the first view is trained online for monitoring only. The evaluations'
networks (a frozen or fine-tuned backbone under a sweep of heads) are at the end.

Backbones keep the layout of the released files (README, "Released checkpoints") so that those load
unchanged: ResNets are torchvision's without `fc.*`; ConvNeXts are written here (torchvision's cannot
switch layer scale off and normalises after pooling, while VICRegL normalises every cell).
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

# arch -> (block, blocks per stage) for ResNets, (depths, dims, stem stride) for ConvNeXts
RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet_toy": (BasicBlock, (2, 2, 2, 2)),  # CPU-sized, see ToyResNet
}
CONVNEXTS = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768), 4),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768), 4),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024), 4),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536), 4),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048), 4),
    # CPU-sized: stem stride 2, so a 64-px crop gives a 4x4 map and a 32-px crop a 2x2 map
    "convnext_toy": ((1, 1, 2, 1), (32, 64, 128, 256), 2),
}
ARCHS = tuple(RESNETS) + tuple(CONVNEXTS)


def is_resnet(arch):
    """ResNets use BatchNorm (in the backbone and the heads), ConvNeXts LayerNorm."""
    return arch in RESNETS


def has_batchnorm(module):
    """Whether a training forward of `module` mixes the samples of its batch (BatchNorm, SyncBatchNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


# ---------------------------------------------------------------------------------------------
# ResNet: torchvision's, without the classification head


class ResNetBackbone(ResNet):
    """torchvision ResNet without avgpool/fc: state dict keys are torchvision's minus `fc.*`.

    zero_init_residual=True sets γ = 0 in the last BN of every residual block, so each block starts
    as the identity (as in the reference code's ResNet-50).
    """

    def __init__(self, block, layers):
        super().__init__(block, list(layers), zero_init_residual=True)
        del self.avgpool, self.fc
        self.num_features = 512 * block.expansion

    def forward_stages(self, x):
        # stem: (B, 3, S, S) -> (B, 64, S/4, S/4)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            maps.append(x)
        return maps  # strides 4, 8, 16, 32

    def forward(self, x):
        return self.forward_stages(x)[-1]  # (B, C, S/32, S/32)


def basic_block_stage(in_channels, width, num_blocks, stride):
    """A ResNet stage of torchvision's BasicBlocks, as torchvision lays one out: the first block takes
    the stride and, where the shape changes, a 1x1 conv + BatchNorm shortcut (`downsample`)."""
    downsample = None
    if stride != 1 or in_channels != width:
        downsample = nn.Sequential(nn.Conv2d(in_channels, width, kernel_size=1, stride=stride, bias=False),
                                   nn.BatchNorm2d(width))
    blocks = [BasicBlock(in_channels, width, stride, downsample)]
    blocks += [BasicBlock(width, width) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ToyResNet(nn.Module):
    """resnet_toy, the toy recipe's backbone: ResNet-18's blocks at 3/8 of its widths (24, 48, 96, 192),
    a 3x3 stride-2 stem without max-pool, and a last stage that keeps its stride. Its output stride is 8,
    so a 48-px view gives a 6x6 map and a 24-px view a 3x3 map: the geometry of the ImageNet recipe
    (7x7 and 3x3 maps), which location matching and gamma are made for. A LayerNorm on every cell of
    the last map (as ConvNeXt ends) puts the cells on one scale for the heads and the kNN probe.
    Its keys (not their shapes) are those of torchvision's ResNet-18 without `fc.*`, plus `norm.*`.
    """

    widths, strides = (24, 48, 96, 192), (1, 2, 2, 1)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, self.widths[0], kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_channels = (self.widths[0],) + self.widths[:-1]
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            basic_block_stage(c, width, 2, stride) for c, width, stride in zip(in_channels, self.widths, self.strides))
        self.norm = nn.LayerNorm(self.widths[-1])
        self.num_features = self.widths[-1]
        # torchvision's ResNet init: He init for convs, BN γ=1, β=0, and γ=0 in each block's last BN
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward_stages(self, x):
        x = self.relu(self.bn1(self.conv1(x)))  # stem: (B, 24, S/2, S/2)
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            maps.append(x)
        maps[-1] = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, 192, S/8, S/8)
        return maps  # strides 2, 4, 8, 8

    def forward(self, x):
        return self.forward_stages(x)[-1]


# ---------------------------------------------------------------------------------------------
# ConvNeXt in the reference layout, without layer scale


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a channels-first map (B, C, H, W), at every cell."""

    def __init__(self, num_channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class DropPath(nn.Module):
    """Stochastic depth: in training, drop the whole residual branch of a sample with probability p,
    scaling the kept ones by 1/(1-p) so the expectation is unchanged."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1, 1)
        return x * mask / keep


class Block(nn.Module):
    """ConvNeXt block: x + DropPath(pwconv2(GELU(pwconv1(LN(dwconv7x7(x)))))), no layer scale."""

    def __init__(self, dim, drop_path):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)  # 1x1 convs as Linear on channels-last cells
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))  # (B, H, W, C)
        return x + self.drop_path(y.permute(0, 3, 1, 2))  # (B, C, H, W)


class ConvNeXt(nn.Module):
    """ConvNeXt trunk; forward returns the last map with the final LayerNorm applied per cell."""

    def __init__(self, depths, dims, stem_stride, drop_path_rate):
        super().__init__()
        stem = nn.Sequential(
            nn.Conv2d(3, dims[0], kernel_size=stem_stride, stride=stem_stride),
            LayerNorm2d(dims[0]),
        )
        downsamples = [
            nn.Sequential(LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2))
            for i in range(1, 4)
        ]
        self.downsample_layers = nn.ModuleList([stem] + downsamples)
        # stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last
        num_blocks = sum(depths)
        rates = [drop_path_rate * k / max(num_blocks - 1, 1) for k in range(num_blocks)]
        starts = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList(
            nn.Sequential(*[Block(dims[i], rates[starts[i] + j]) for j in range(depths[i])]) for i in range(4)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.num_features = dims[-1]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward_stages(self, x):
        maps = []
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
            maps.append(x)
        # final LayerNorm on every cell of the last map (before any pooling)
        maps[-1] = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, h, w)
        return maps

    def forward(self, x):
        return self.forward_stages(x)[-1]


# ---------------------------------------------------------------------------------------------
# building and loading backbones


def build_backbone(arch, pretrained=None, drop_path_rate=0.0):
    """Backbone by name; `pretrained` is a released backbone file or a full training checkpoint, or
    None (or 'none', the scripts' `--pretrained none`) for a random init.

    drop_path_rate is the ConvNeXt stochastic depth of the last block (ResNets have none).
    """
    if arch == "resnet_toy":
        backbone = ToyResNet()
    elif arch in RESNETS:
        backbone = ResNetBackbone(*RESNETS[arch])
    elif arch in CONVNEXTS:
        backbone = ConvNeXt(*CONVNEXTS[arch], drop_path_rate=drop_path_rate)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    backbone.arch = arch
    if pretrained is not None and pretrained.lower() != "none":
        load_backbone_weights(backbone, pretrained)
    return backbone


BACKBONE_PREFIXES = ("module.backbone.", "backbone.")


def read_backbone_state(path):
    """The backbone weights in a file: a plain state dict, or the `backbone.*` part of a full
    checkpoint `{"model": {"module.backbone.*": ...}}` (with or without `module.`)."""
    if not os.path.isfile(path):
        raise ValueError(f"pretrained weights: no such file {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling error, corrupt or truncated archive, not a torch file
        detail = (str(error).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"pretrained weights: {path} is not a readable PyTorch checkpoint (not a torch.save "
                         f"file, or corrupt or truncated; {type(error).__name__}: {detail})") from None
    weights = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    weights = weights if isinstance(weights, dict) else {}
    for prefix in BACKBONE_PREFIXES:
        state = {k[len(prefix):]: v for k, v in weights.items() if isinstance(k, str) and k.startswith(prefix)}
        if state:
            break
    else:  # no backbone.* keys: only a plain backbone state dict (not a full checkpoint) is left
        state = weights if weights is checkpoint else {}
    if not state or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"pretrained weights: {path} holds no backbone state dict")
    return state


def guess_arch(state):
    """The arch whose key set and shapes equal those of `state`, or None (models built on meta)."""
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    for arch in ARCHS:
        with torch.device("meta"):
            reference = build_backbone(arch).state_dict()
        if shapes == {key: tuple(value.shape) for key, value in reference.items()}:
            return arch
    return None


def describe_mismatch(state, expected):
    """One line naming the first missing, unexpected and mis-shaped keys of `state`."""
    # BatchNorm fills in a missing num_batches_tracked itself, older files may lack it
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    misshaped = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    parts = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", misshaped)):
        if keys:
            parts.append(f"{len(keys)} {name} keys, e.g. {', '.join(keys[:3])}")
    return "; ".join(parts)


def load_backbone_weights(backbone, path):
    """Strict load of a released backbone file or full checkpoint; ValueError when it does not fit."""
    state = read_backbone_state(path)
    expected = backbone.state_dict()
    mismatch = describe_mismatch(state, expected)
    if mismatch:
        arch = getattr(backbone, "arch", type(backbone).__name__)
        found = guess_arch(state)
        looks = f"it looks like a {found} checkpoint" if found else "its keys are of another architecture"
        raise ValueError(f"pretrained weights: {path} does not fit {arch} ({looks}): {mismatch}")
    backbone.load_state_dict(state, strict=True)


def unwrap(model):
    """Strip DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def backbone_state_dict(model):
    """The backbone weights in the released layout, from a (wrapped) VICRegL module or a backbone."""
    model = unwrap(model)
    backbone = unwrap(getattr(model, "backbone", model))
    return {key: value.detach().clone() for key, value in backbone.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# VICRegL: backbone + global expander + local projector + online classifier


def build_mlp(in_features, spec, norm_layer):
    """"8192-8192-8192" -> in→8192→8192→8192: Linear→norm→ReLU between layers, last Linear no bias."""
    dims = [in_features] + [int(d) for d in spec.split("-")]
    layers = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_in, d_out), norm_layer(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


class VICRegL(nn.Module):
    def __init__(self, arch, mlp="8192-8192-8192", maps_mlp="512-512-512", num_classes=1000,
                 drop_path_rate=0.0, local=True):
        super().__init__()
        self.backbone = build_backbone(arch, drop_path_rate=drop_path_rate)
        num_features = self.backbone.num_features
        norm_layer = nn.BatchNorm1d if is_resnet(arch) else nn.LayerNorm
        self.projector = build_mlp(num_features, mlp, norm_layer)  # global expander
        if local:
            self.maps_projector = build_mlp(num_features, maps_mlp, norm_layer)  # local, per cell
        self.local = local
        # LayerNorm normalises each vector (each cell) alone, so the views of one resolution can go
        # through the networks together: the same numbers, fewer and larger operations. BatchNorm
        # normalises over the batch, and in training that batch must be one view's (with SyncBatchNorm,
        # that view's global batch), as in the reference code's one backbone pass per view. Otherwise
        # the two large views, which differ in kind (one always blurred, the other sometimes
        # solarised), would be normalised with their joint statistics, each view's gradient would flow
        # through the other's statistics, and the running statistics that the evaluations use would be
        # updated once per step with the joint ones instead of once per view.
        self.backbone_per_view = has_batchnorm(self.backbone)
        self.heads_per_view = has_batchnorm(self.projector)
        self.classifier = nn.Linear(num_features, num_classes)

    def view_runs(self, views):
        """[(start, end)] of the views that go through the backbone together: each view alone
        (BatchNorm backbone), or each run of consecutive views of one resolution (LayerNorm)."""
        if self.backbone_per_view:
            return [(v, v + 1) for v in range(len(views))]
        runs, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            runs.append((start, end))
            start = end
        return runs

    def forward(self, views):
        """views: list of (B, 3, S_v, S_v) -> embeddings [(B, D)], maps [(B, h, w, D_local)] or None,
        logits (B, num_classes) of the online classifier on view 0."""
        embeddings, maps = [], []
        for start, end in self.view_runs(views):
            sizes = [v.shape[0] for v in views[start:end]]
            y = self.backbone(torch.cat(views[start:end]))  # (n*B, C, h, w)
            if start == 0:
                first_pooled = y[:sizes[0]].mean(dim=(2, 3))  # y⊕ of view 0: (B, C)
            # heads: once for the whole run (LayerNorm), or once per view (BatchNorm)
            runs = [(part, [size]) for part, size in zip(torch.split(y, sizes), sizes)] if self.heads_per_view \
                else [(y, sizes)]
            for part, part_sizes in runs:
                pooled = part.mean(dim=(2, 3))  # y⊕: (b, C)
                embeddings += torch.split(self.projector(pooled), part_sizes)  # z⊕: (B, D) per view
                if self.local:
                    b, c, h, w = part.shape
                    cells = part.permute(0, 2, 3, 1).reshape(b * h * w, c)  # every cell alone: (b*h*w, C)
                    z = self.maps_projector(cells).reshape(b, h, w, -1)  # z: (b, h, w, D_local)
                    maps += torch.split(z, part_sizes)  # (B, h, w, D_local) per view

        # online linear probe: detached, so its gradient never reaches the backbone
        logits = self.classifier(first_pooled.detach())  # (B, num_classes)
        return embeddings, (maps if self.local else None), logits


# ---------------------------------------------------------------------------------------------
# The evaluations' networks (eval_linear.py, eval_seg.py): a pretrained backbone under a sweep of heads


class SweepHeads(nn.Module):
    """H independent copies of one head on the same features -> their outputs stacked (H, B, ...): one
    head per learning rate of a sweep (docs/evaluation.md). Every copy starts from the same weights,
    those of its last layer drawn from `seed` (N(0, 0.01²), zero bias), so head h of a sweep is exactly
    the head a run with learning rate h alone and that seed would train."""

    def __init__(self, make_head, num_heads, seed):
        super().__init__()
        self.heads = nn.ModuleList(make_head() for _ in range(num_heads))
        for head in self.heads:
            last = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
            weight = torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.01
            with torch.no_grad():
                last.weight.copy_(weight)
                last.bias.zero_()

    def forward(self, features):
        return torch.stack([head(features) for head in self.heads])  # (H, B, ...)


class BackboneAndHeads(nn.Module):
    """A backbone and the heads an evaluation trains on its maps (paper appendix, "Evaluation details").
    A frozen backbone stays in eval mode whatever train() asks, so its BatchNorm statistics never
    change, and runs without a graph; a fine-tuned one trains with the heads. Each evaluation's
    forward takes the maps from backbone_stages(): the backbone runs in amp_dtype (mixed precision:
    torch.bfloat16 or torch.float16; None = float32), the maps come back in float32 for the heads."""

    def __init__(self, backbone, heads, frozen, amp_dtype=None):
        super().__init__()
        self.backbone, self.heads, self.frozen, self.amp_dtype = backbone, heads, frozen, amp_dtype
        self.backbone.requires_grad_(not frozen)

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def backbone_stages(self, images):
        """The backbone's four stage maps of images (B, 3, S, S), float32."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen), \
                torch.autocast(images.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            stages = self.backbone.forward_stages(images)
        return [m.float() for m in stages]
