"""train.py: LARS, the schedule, DDP equivalence, command-line errors (crashes: test_reliability.py)."""
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from loss import VICRegLLoss
from model import VICRegL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


# --------------------------------------------------------------------------- LARS and schedule

def test_lars_matches_hand_computation():
    torch.manual_seed(0)
    w0, b0 = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    grads = [(torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)) for _ in range(2)]
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    lr, wd, momentum, eta = 0.5, 0.1, 0.9, 0.02
    opt = train.LARS([w, b], lr=lr, weight_decay=wd, momentum=momentum, eta=eta)
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()

    # by hand, in numpy: the matrix gets decay + trust ratio, the vector plain momentum SGD
    W, Bv = w0.numpy().copy(), b0.numpy().copy()
    mu_w, mu_b = np.zeros_like(W), np.zeros_like(Bv)
    for gw, gb in grads:
        u = gw.numpy() + wd * W
        trust = eta * np.sqrt((W ** 2).sum()) / np.sqrt((u ** 2).sum())
        mu_w = momentum * mu_w + trust * u
        mu_b = momentum * mu_b + gb.numpy()
        W, Bv = W - lr * mu_w, Bv - lr * mu_b
    np.testing.assert_allclose(w.detach().numpy(), W, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.detach().numpy(), Bv, rtol=1e-12, atol=1e-12)


def test_lars_zero_weight_still_moves():
    w = torch.zeros(2, 2, requires_grad=True)
    opt = train.LARS([w], lr=1.0, momentum=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(w.detach(), -torch.ones(2, 2))  # trust ratio 1 when ||w|| = 0


def test_learning_rate_schedule():
    peak, ratio, total, warm = 2.0, 1e-3, 110, 10
    lr = [train.learning_rate(s, total, warm, peak, ratio) for s in range(total + 1)]
    assert lr[0] == 0.0 and math.isclose(lr[5], 1.0) and math.isclose(lr[warm], peak)
    assert math.isclose(lr[total], peak * ratio)
    assert math.isclose(lr[warm + 50], (peak + peak * ratio) / 2)  # cosine midpoint
    assert all(a >= b for a, b in zip(lr[warm:], lr[warm + 1:]))


def test_adamw_groups_exclude_1d_from_decay():
    model = VICRegL("convnext_toy", mlp="16-16", maps_mlp="8-8", num_classes=3)
    args = train.get_arguments(["--dataset", "toy", "--weight-decay", "0.3"])
    opt = train.build_optimizer(model, args, lr=1.0)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.3 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("flags, weight_decay", [
    (["--optimizer", "lars"], 1e-6),  # the reference LARS's fixed value
    (["--optimizer", "adamw"], 0.05),  # the reference code's ConvNeXt default
    ([], 0.05),  # AdamW is the default optimiser
    (["--optimizer", "lars", "--weight-decay", "0"], 0.0),  # an explicit value always wins, 0 included
    (["--optimizer", "adamw", "--weight-decay", "1e-6"], 1e-6),
])
def test_default_weight_decay_depends_on_the_optimizer(flags, weight_decay):
    args = train.get_arguments(["--dataset", "toy", *flags])
    assert args.weight_decay == weight_decay
    model = VICRegL("resnet18", mlp="16-16", maps_mlp="8-8", num_classes=3)
    optimizer = train.build_optimizer(model, args, lr=1.0)
    assert optimizer.param_groups[0]["weight_decay"] == weight_decay
    assert isinstance(optimizer, train.LARS) == ("lars" in flags)


def test_help_states_the_weight_decay_per_optimizer(capsys):
    with pytest.raises(SystemExit):
        train.get_arguments(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "1e-6 with lars" in help_text and "0.05 with adamw" in help_text


# --------------------------------------------------------------------------- DDP equivalence

def fixed_global_batch(batch=8, num_classes=5):
    g = torch.Generator().manual_seed(123)
    views = [torch.randn(batch, 3, s, s, generator=g) for s in (64, 64, 32, 32)]
    sizes = torch.rand(batch, 4, 1, generator=g) * 60 + 20                      # crop side in pixels
    corners = torch.rand(batch, 4, 2, generator=g) * (96 - sizes)               # top, left
    boxes = torch.cat([corners, sizes, sizes], dim=2)                           # (B, V, 4)
    flips = torch.rand(batch, 4, generator=g) < 0.5
    labels = torch.randint(num_classes, (batch,), generator=g)
    return views, boxes, flips, labels


def small_model_and_loss():
    torch.manual_seed(0)
    model = VICRegL("convnext_toy", mlp="64-64", maps_mlp="32-32", num_classes=5, drop_path_rate=0.0)
    return model, VICRegLLoss(num_matches=(6, 2))


def loss_and_grads(model, criterion, views, boxes, flips, labels):
    loss, _, _ = train.compute_loss(model, criterion, views, boxes, flips, labels)
    loss.backward()
    inner = getattr(model, "module", model)
    return loss.detach(), {n: p.grad.clone() for n, p in inner.named_parameters()}


def ddp_worker(rank, world_size, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model, criterion = small_model_and_loss()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    views, boxes, flips, labels = fixed_global_batch()
    part = slice(rank * 4, rank * 4 + 4)  # this rank's half of the global batch
    loss, grads = loss_and_grads(ddp, criterion, [v[part] for v in views], boxes[part], flips[part], labels[part])
    torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process(tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, criterion = small_model_and_loss()
    loss, grads = loss_and_grads(model, criterion, *fixed_global_batch())
    # the VICRegL part is computed on the gathered batch on each rank; the classifier's cross-entropy
    # is a per-rank mean, so the mean over ranks is the 1-process loss
    assert abs((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - loss) < 1e-5
    for name, g in grads.items():
        for r in ranks:  # DDP averaged the gradients: every rank holds the 1-process gradient
            assert torch.allclose(r["grads"][name], g, atol=1e-5, rtol=1e-4), name


# --------------------------------------------------------------------------- command-line errors

@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet"], "--data-dir is required"),
    (["--dataset", "toy", "--arch", "vgg16"], "invalid choice"),
    (["--dataset", "toy", "--size-crops", "64", "32", "--num-crops", "2"], "one value per view size"),
    (["--dataset", "toy", "--alpha", "1.5"], "--alpha"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        train.get_arguments(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_folder_is_one_line_and_exit_2(tmp_path):
    out = run_train("--dataset", "imagenet", "--data-dir", "/nonexistent/folder", "--device", "cpu",
                    "--exp-dir", str(tmp_path / "exp"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "train.py: error: data folder not found: /nonexistent/folder"


def test_dataset_picks_the_recipe_and_explicit_flags_win():
    imagenet = train.get_arguments(["--data-dir", "/data"])
    toy = train.get_arguments(["--dataset", "toy"])
    for args, recipe in ((imagenet, train.RECIPES["imagenet"]), (toy, train.RECIPES["toy"])):
        assert {key: getattr(args, key) for key in recipe} == recipe
    # the ImageNet recipe is the paper's ConvNeXt-S one (paper §3.3), at the reference code's learning rate
    assert (imagenet.arch, imagenet.size_crops, imagenet.num_crops, imagenet.batch_size, imagenet.base_lr,
            imagenet.epochs, imagenet.blur_sigma, imagenet.hue) == ("convnext_small", [224, 96], [2, 6], 384, 7.5e-4,
                                                                     400, [0.1, 2.0], 0.1)
    assert toy.arch == "resnet_toy" and toy.size_crops == [48, 24]
    explicit = train.get_arguments(["--dataset", "toy", "--arch", "convnext_toy", "--batch-size", "32",
                                    "--size-crops", "64", "32", "--hue", "0.1"])
    assert (explicit.arch, explicit.batch_size, explicit.size_crops, explicit.hue) == ("convnext_toy", 32, [64, 32], 0.1)
    assert explicit.num_crops == train.RECIPES["toy"]["num_crops"]  # the rest from the toy recipe


def test_help_shows_both_recipes(capsys):
    with pytest.raises(SystemExit):
        train.get_arguments(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for key in ("batch_size", "arch", "mlp"):
        assert f"(default: {train.RECIPES['imagenet'][key]}; with --dataset toy: {train.RECIPES['toy'][key]})" \
            in help_text
