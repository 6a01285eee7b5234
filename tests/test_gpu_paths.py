"""The code paths of GPU runs, run on a CPU: mixed precision (bf16; fp16 with loss scaling) and switching it
between runs, torch.compile and --deterministic, LARS in a real run, more processes than evaluation items,
2-process evaluations against 1 process, SLURM's environment, ranks that see different checkpoints, and
pinned memory only for CUDA runs. What only a GPU can show is tests/gpu_check.py's (its --smoke run is
the last test here)."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
import eval_linear
import eval_seg
import train
from model import BackboneAndHeads, build_backbone

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 16 toy images, batch 16: one step per epoch; convnext_toy's 2x2 and 1x1 maps
TINY = ["--dataset", "toy", "--toy-images", "16", "--toy-val-images", "4", "--arch", "convnext_toy",
        "--size-crops", "32", "16", "--num-crops", "2", "2", "--min-scale-crops", "0.3", "0.1",
        "--max-scale-crops", "1", "0.3", "--mlp", "32-32", "--maps-mlp", "16-16", "--num-matches", "4", "1",
        "--batch-size", "16", "--warmup-epochs", "1", "--num-workers", "0", "--device", "cpu", "--log-freq", "1"]


def checkpoint(exp_dir):
    return torch.load(pathlib.Path(exp_dir) / "model.pth", weights_only=True)


def records(exp_dir):
    return [json.loads(line) for line in (pathlib.Path(exp_dir) / "stats.jsonl").read_text().splitlines()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------- mixed precision

def test_switching_precision_between_runs_resumes_in_every_direction(tmp_path):
    """bf16 -> fp16 -> none in 1 process, then fp16 -> bf16 in 2: every direction of a switch to and from
    fp16, and both half precisions in 1 and in 2 processes. A disabled GradScaler (bf16, none) saves {}: an
    fp16 run resumed from it starts from the default loss scale."""
    exp = str(tmp_path)
    for epoch, amp in enumerate(["bf16", "fp16", "none"], start=1):
        train.main([*TINY, "--epochs", str(epoch), "--amp", amp, "--exp-dir", exp])
        ckpt = checkpoint(exp)
        assert (ckpt["epoch"], ckpt["args"]["amp"]) == (epoch, amp)
        assert bool(ckpt["scaler"]) == (amp == "fp16")  # the loss scale of an fp16 run is kept
    # 2 processes; more processes than val images: rank 1's kNN shard is empty
    for epoch, amp in ((4, "fp16"), (5, "bf16")):
        out = torchrun("train.py", *TINY, "--epochs", str(epoch), "--amp", amp, "--exp-dir", exp,
                       "--toy-val-images", "1", "--eval-freq", "1")
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"resumed from {tmp_path / 'model.pth'} at epoch {epoch - 1}" in out.stdout
        assert (checkpoint(exp)["epoch"], checkpoint(exp)["args"]["amp"]) == (epoch, amp)
    losses = [r["loss"] for r in records(exp) if "loss" in r]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    # the 2-process kNN and dense kNN of the final backbone are the 1-process ones of the same weights
    backbone = build_backbone("convnext_toy", str(tmp_path / "backbone.pth"))
    args = train.get_arguments([*TINY, "--toy-val-images", "1", "--amp", "bf16"])
    top1, top5 = train.knn_accuracy(backbone, *train.knn_datasets(args), 128, 0, torch.device("cpu"), 0, 1, "bf16")
    dense, _, _ = eval_seg.dense_knn_miou(backbone, *train.dense_datasets(args), eval_seg.DENSE_KNN_K,
                                          eval_seg.DENSE_KNN_TEMPERATURE, eval_seg.DATASET_DEFAULTS["toy"]["memory_size"],
                                          0, 64, 0, torch.device("cpu"), 0, 1, "bf16")
    assert records(exp)[-1] == dict(epoch=5, knn_top1=top1, knn_top5=top5, dense_miou=dense)


@pytest.mark.parametrize("capability, amp", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_fp16_on_gpus_that_emulate_bf16(monkeypatch, capability, amp):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: capability)
    assert train.resolve_amp("auto", "cuda") == amp
    assert train.resolve_amp("none", "cuda") == "none" and train.resolve_amp("fp16", "cuda") == "fp16"


def test_a_cpu_run_on_a_gpu_host_neither_asks_the_gpu_nor_pins_memory(tmp_path, monkeypatch):
    """--device cpu where CUDA is available: no CUDA call (it would create a CUDA context), no pinned
    loader (its pinning thread would too). And every copy of a tensor to the run's device is asynchronous
    (non_blocking): on a GPU a blocking copy makes the host wait for the GPU, every step."""
    def no_cuda(*args, **kwargs):
        raise AssertionError("a --device cpu run asked the GPU")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)
    # torch's own optimisers look for CUDA graph capture when CUDA is available: not this project's call
    monkeypatch.setattr(torch.optim.Optimizer, "_accelerator_graph_capture_health_check", lambda self: None)
    pinned, blocking_copies = [], []
    init = torch.utils.data.DataLoader.__init__
    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__",
                        lambda self, *a, **k: (pinned.append(k.get("pin_memory", False)), init(self, *a, **k))[1])
    to = torch.Tensor.to

    def recorded_to(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename  # the project's own calls, not torch's internal ones
        to_device = any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs
        if to_device and pathlib.Path(caller).parent == ROOT and not kwargs.get("non_blocking", False):
            blocking_copies.append(f"{caller}:{sys._getframe(1).f_lineno}")
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recorded_to)
    train.main([*TINY, "--epochs", "1", "--exp-dir", str(tmp_path)])
    monkeypatch.undo()
    assert checkpoint(tmp_path)["args"]["amp"] == "none"
    assert len(pinned) >= 5 and not any(pinned)  # training, kNN memory and val, twice (trained, random init)
    assert blocking_copies == []


def test_evaluation_backbones_run_in_mixed_precision_and_hand_float32_maps_to_the_heads():
    torch.manual_seed(0)
    backbone, images = build_backbone("convnext_toy").eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = [m.float() for m in backbone.forward_stages(images)]
    model = BackboneAndHeads(backbone, torch.nn.Identity(), frozen=True, amp_dtype=torch.bfloat16)
    stages = model.backbone_stages(images)
    assert all(m.dtype == torch.float32 for m in stages)
    assert all(torch.equal(a, b) for a, b in zip(stages, expected))
    assert not torch.equal(stages[-1], backbone.forward_stages(images)[-1])  # not float32 throughout
    features, _ = train.compute_features(backbone, data.ToyShapes("val", 4, transform=data.linear_val_transform(
        *data.TOY_EVAL_SIZES)), 4, 0, torch.device("cpu"), 0, 1, "bf16")
    assert features.dtype == torch.float32


# --------------------------------------------------------------------------- compile, determinism, LARS

def test_compile_and_deterministic_runs_equal_the_plain_run(tmp_path):
    """--compile (inductor, which runs on CPUs too) gives the plain run's losses up to rounding, and
    --deterministic the same numbers exactly (a CPU is deterministic anyway: the flag changes no maths)."""
    runs = {}
    for name, flags in (("plain", []), ("compile", ["--compile"]), ("deterministic", ["--deterministic"])):
        train.main([*TINY, "--epochs", "2", "--exp-dir", str(tmp_path / name), *flags])
        runs[name] = [r["loss"] for r in records(tmp_path / name) if "loss" in r]
    torch.use_deterministic_algorithms(False)
    assert len(runs["plain"]) == 2
    assert runs["deterministic"] == runs["plain"]
    assert runs["compile"] == pytest.approx(runs["plain"], rel=1e-4)


def test_lars_in_a_real_run(tmp_path, monkeypatch):
    """The LARS recipe through train.main: each step applies the schedule's lr with the reference weight
    decay, and the update of every parameter is LARS's (momentum buffer from zero, trust ratio on
    matrices only), checked against the formula at every step of the run."""
    steps = []
    lars_step = train.LARS.step

    def checked_step(self, closure=None):
        before = {p: (p.detach().clone(), p.grad.clone(), self.state[p].get("mu")) for g in self.param_groups
                  for p in g["params"] if p.grad is not None}
        mu_before = {p: (None if mu is None else mu.clone()) for p, (_, _, mu) in before.items()}
        lars_step(self, closure)
        group = self.param_groups[0]
        for p, (w, g, _) in before.items():
            update = g
            if p.ndim > 1:
                update = g + group["weight_decay"] * w
                trust = group["eta"] * w.norm() / update.norm() if w.norm() > 0 and update.norm() > 0 else 1.0
                update = update * trust
            mu = update if mu_before[p] is None else group["momentum"] * mu_before[p] + update
            torch.testing.assert_close(p.detach(), w - group["lr"] * mu, rtol=1e-5, atol=1e-7)
        steps.append((group["lr"], group["weight_decay"], len(before)))

    monkeypatch.setattr(train.LARS, "step", checked_step)
    flags = [*TINY, "--toy-images", "32", "--epochs", "2", "--optimizer", "lars", "--base-lr", "0.3"]
    train.main([*flags, "--exp-dir", str(tmp_path)])
    args = train.get_arguments(flags)
    peak = 0.3 * 16 / 256
    expected_lrs = [train.learning_rate(s, 4, 2, peak, args.end_lr_ratio) for s in range(4)]
    assert [lr for lr, _, _ in steps] == pytest.approx(expected_lrs)
    assert all(wd == 1e-6 for _, wd, _ in steps)
    num_params = len(checkpoint(tmp_path)["optimizer"]["state"])
    assert all(n == num_params for _, _, n in steps)  # every parameter took every step


def test_lars_allocates_its_momentum_buffers_once(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = train.LARS(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    allocations = []
    zeros_like = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: (allocations.append(1), zeros_like(*a, **k))[1])
    optimizer.step()
    assert len(allocations) == 2  # the first step: one buffer per parameter
    buffers = [optimizer.state[p]["mu"] for p in params]
    optimizer.step()
    optimizer.step()
    assert len(allocations) == 2 and all(optimizer.state[p]["mu"] is b for p, b in zip(params, buffers))


# --------------------------------------------------------------------------- processes

def run_workers(worker, *args):
    """worker(rank, *args) in 2 processes."""
    mp.spawn(worker, args=args, nprocs=2, join=True)


def as_slurm_task(rank, port):
    """The environment srun gives task `rank` of 2 (one per GPU), MASTER_* from the job script."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def deterministic_linear_train_transform(size=224):
    """The evaluations' val transform: the 2-process runs then see the very images of the 1-process run."""
    return data.linear_val_transform(*data.TOY_EVAL_SIZES)


LINEAR = ["--dataset", "toy", "--arch", "convnext_toy", "--toy-images", "32", "--batch-size", "8",
          "--epochs", "2", "--num-workers", "0", "--device", "cpu", "--log-freq", "1", "--lr-head", "0.3", "0.03"]
EVALUATIONS = {  # name: (script, arguments); val sets of 1 or 3 images: shards of 1 and 0, or 2 and 1
    "knn": (eval_linear, [*LINEAR, "--knn", "--toy-val-images", "1"]),
    "frozen": (eval_linear, [*LINEAR, "--cache-features", "--toy-val-images", "3"]),
    "finetune": (eval_linear, [*LINEAR[:-3], "--weights", "finetune", "--lr-head", "0.1", "--lr-backbone", "0.01",
                               "--toy-val-images", "1"]),
    "seg": (eval_seg, ["--dataset", "toy", "--arch", "convnext_toy", "--toy-images", "4", "--batch-size", "2",
                       "--iters", "4", "--warmup-iters", "1", "--num-workers", "0", "--device", "cpu",
                       "--log-freq", "1", "--lr", "1e-3", "3e-4"]),
}


def evaluation_worker(rank, ports, pretrained, out_dir):
    data.linear_train_transform = deterministic_linear_train_transform
    for port, (name, (script, argv)) in zip(ports, EVALUATIONS.items()):
        as_slurm_task(rank, port)  # a port per run: the previous run's store may still be closing
        script.main([*argv, "--pretrained", pretrained, "--exp-dir", os.path.join(out_dir, name)])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained") / "backbone.pth"
    torch.manual_seed(3)
    torch.save(build_backbone("convnext_toy").state_dict(), path)
    return str(path)


def results(path):
    return json.loads((pathlib.Path(path) / "results.json").read_text())


def test_two_process_evaluations_equal_one_process_with_empty_shards_under_slurm(tmp_path, pretrained, monkeypatch):
    """eval_linear.py (kNN, frozen, fine-tuned) and eval_seg.py in 2 processes started as SLURM tasks,
    with val sets smaller than the number of processes, against the same runs in 1 process. The linear
    runs are equal (their training batches together are the 1-process batches; LayerNorm backbone); the
    segmentation heads' BatchNorm normalises per process on a CPU (SyncBatchNorm needs GPUs), so there the
    2-process evaluation is compared with the 1-process evaluation of the 2-process weights."""
    run_workers(evaluation_worker, [free_port() for _ in EVALUATIONS], pretrained, str(tmp_path / "two"))
    monkeypatch.setattr(data, "linear_train_transform", deterministic_linear_train_transform)
    converted = []
    sync_batchnorm = eval_linear.sync_batchnorm
    monkeypatch.setattr(eval_linear, "sync_batchnorm", lambda model, device, world_size: (
        converted.append(model), sync_batchnorm(model, device, world_size))[1])
    for name in ("knn", "frozen", "finetune"):
        script, argv = EVALUATIONS[name]
        one = script.main([*argv, "--pretrained", pretrained, "--exp-dir", str(tmp_path / "one" / name)])
        two = results(tmp_path / "two" / name)
        for key in ("knn_top1", "top1", "top5", "best_epoch_top1"):
            if key in one:
                assert two[key] == pytest.approx(one[key], abs=1e-6), (name, key)
        if name == "finetune":  # the backbone trained, so 2 processes moved it as 1 did
            weights = [torch.load(tmp_path / n / "finetune" / "linear.pth", weights_only=True)["model"]
                       for n in ("one", "two")]
            for key in weights[0]:
                torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-6)
    # the fine-tuned backbone goes through the SyncBatchNorm conversion (a ResNet's BatchNorm on GPUs)
    assert [m.frozen for m in converted] == [True, False]
    # segmentation: the 2-process mIoU (rank 1's val shard is empty) is the 1-process evaluation of its weights
    args = eval_seg.get_arguments([*EVALUATIONS["seg"][1], "--pretrained", pretrained])
    val = data.build_seg_dataset("toy", None, "val", data.SegValTransform(args.base_size), 1)
    model = eval_seg.SegModel(build_backbone("convnext_toy"), eval_seg.seg_heads(480, 9, 2, 0), frozen=True)
    model.load_state_dict(torch.load(tmp_path / "two" / "seg" / "seg.pth", weights_only=True)["model"])
    confusion = eval_seg.evaluate(model, val, 9, args.crop_size, args.stride, 0, torch.device("cpu"), 0, 1)
    assert [entry["miou"] for entry in results(tmp_path / "two" / "seg")["per_lr"]] == \
        pytest.approx([100 * eval_seg.mean_iou(c) for c in confusion])


@pytest.mark.parametrize("local_id, visible, index", [(0, 8, 0), (5, 8, 5), (5, 1, 0), (3, 2, 1)])
def test_a_slurm_task_uses_a_gpu_it_can_see(local_id, visible, index):
    """srun --gpus-per-task=1 shows each task one GPU while SLURM_LOCALID runs 0..7."""
    assert train.visible_gpu_index(local_id, visible) == index


@pytest.mark.parametrize("device, world_size, norm", [
    ("cuda", 2, torch.nn.SyncBatchNorm), ("cuda", 1, torch.nn.BatchNorm2d), ("cpu", 2, torch.nn.BatchNorm2d)])
def test_sync_batchnorm_only_for_several_gpus(device, world_size, norm):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    assert type(train.sync_batchnorm(net, torch.device(device), world_size)[1]) is norm


def save_training_checkpoint(exp_dir, name, epoch):
    os.makedirs(exp_dir, exist_ok=True)
    torch.save(dict(epoch=epoch, model={}, optimizer={}), os.path.join(exp_dir, name))


def checkpoint_worker(rank, port, root):
    """Each rank reads its own folder (a node-local --exp-dir); every case ends the same way on both ranks."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    outcomes = {}
    for case in sorted(os.listdir(root)):
        os.chdir(os.path.join(root, case, f"rank{rank}"))  # --exp-dir . on every rank
        try:
            ckpt, path = train.load_checkpoint(".", lambda msg: None, rank, 2)
            outcomes[case] = (ckpt["epoch"] if ckpt else None, os.path.basename(path) if path else None)
        except ValueError as error:
            outcomes[case] = str(error)
    torch.save(outcomes, os.path.join(root, "..", f"outcomes{rank}.pt"))
    dist.destroy_process_group()


def test_ranks_resume_from_rank_0s_choice_or_all_stop_with_one_error(tmp_path):
    cases = tmp_path / "cases"  # case/rank<r>/ is rank r's --exp-dir
    save_training_checkpoint(cases / "agree" / "rank0", "model.pth", 3)
    save_training_checkpoint(cases / "agree" / "rank1", "model.pth", 3)
    # rank 0's model.pth is corrupt: it falls back to model.prev.pth, and rank 1 follows it, not its own newer file
    (cases / "fallback" / "rank0").mkdir(parents=True)
    (cases / "fallback" / "rank0" / "model.pth").write_bytes(b"truncated")
    for rank in (0, 1):
        save_training_checkpoint(cases / "fallback" / f"rank{rank}", "model.prev.pth", 2)
    save_training_checkpoint(cases / "fallback" / "rank1", "model.pth", 3)
    save_training_checkpoint(cases / "stale" / "rank0", "model.pth", 5)
    save_training_checkpoint(cases / "stale" / "rank1", "model.pth", 4)
    save_training_checkpoint(cases / "local" / "rank0", "model.pth", 5)  # rank 1's folder is empty
    (cases / "local" / "rank1").mkdir()
    (cases / "fresh" / "rank0").mkdir(parents=True)  # rank 0 finds none: every rank starts from scratch
    save_training_checkpoint(cases / "fresh" / "rank1", "model.pth", 4)
    run_workers(checkpoint_worker, free_port(), str(cases))
    outcomes = [torch.load(tmp_path / f"outcomes{rank}.pt") for rank in (0, 1)]
    assert outcomes[0] == outcomes[1]
    got = outcomes[0]
    assert got["agree"] == (3, "model.pth") and got["fallback"] == (2, "model.prev.pth")
    assert got["fresh"] == (None, None)
    advice = ". --exp-dir must be one folder that every node reads and writes"
    assert got["stale"] == "the ranks see different checkpoints: rank 0 resumes ./model.pth at epoch 5; rank 1 " \
                           "reads epoch 4" + advice
    assert got["local"] == "the ranks see different checkpoints: rank 0 resumes ./model.pth at epoch 5; rank 1 " \
                           "cannot read ./model.pth" + advice


# --------------------------------------------------------------------------- the GPU check's smoke run

def test_gpu_check_smoke_run_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py"), "--device", "cpu", "--smoke",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    verdicts = [line.split()[0] for line in lines if line.split() and line.split()[0] in ("PASS", "FAIL", "SKIP")]
    assert verdicts.count("PASS") >= 5 and "FAIL" not in verdicts
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert figures["device"] == "cpu" and figures["checks"]
