"""Crashes and bad input: kill-and-resume is exact, checkpoints survive corruption, NaN losses and
unreadable images stop the run cleanly, and every load of a foreign file is weights_only. Also the
logged statistics: each record is the mean of the steps since the previous one."""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import train
from loss import VICRegLLoss

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 32 toy images, batch 16: 2 steps per epoch; 2 loading workers so per-worker seeding is exercised
RUN = ["--dataset", "toy", "--toy-images", "32", "--arch", "convnext_toy", "--size-crops", "64", "32",
       "--num-crops", "2", "2", "--min-scale-crops", "0.3", "0.1", "--max-scale-crops", "1", "0.3",
       "--mlp", "64-64", "--maps-mlp", "32-32", "--num-matches", "6", "2", "--batch-size", "16",
       "--epochs", "3", "--warmup-epochs", "1", "--num-workers", "2", "--device", "cpu", "--log-freq", "1",
       "--toy-val-images", "16"]


def train_command(exp_dir, *extra):
    return [sys.executable, str(ROOT / "train.py"), *RUN, "--exp-dir", str(exp_dir), *extra]


def run(cmd, **kwargs):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """A run that was never interrupted."""
    exp = tmp_path_factory.mktemp("straight")
    out = run(train_command(exp))
    assert out.returncode == 0, out.stderr
    return exp


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_toy_run_ends_with_the_knn_of_its_backbone_and_of_its_initial_weights(straight_run):
    import eval_linear
    results = json.loads((straight_run / "results.json").read_text())
    common = ["--dataset", "toy", "--arch", "convnext_toy", "--knn", "--toy-images", "32", "--toy-val-images", "16",
              "--num-workers", "0", "--device", "cpu"]
    trained = eval_linear.main(common + ["--pretrained", str(straight_run / "backbone.pth"),
                                         "--exp-dir", str(straight_run / "knn")])
    untrained = eval_linear.main(common + ["--pretrained", "none", "--exp-dir", str(straight_run / "knn0")])
    assert results["knn_top1"] == pytest.approx(trained["knn_top1"])
    assert results["knn_top1_random_init"] == pytest.approx(untrained["knn_top1"])
    assert results["val_images"] == 16 and results["train_images"] == 32


def test_sigkill_then_same_command_equals_uninterrupted(straight_run, tmp_path):
    proc = subprocess.Popen(train_command(tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    # kill the whole process group (loader workers too) as soon as epoch 1's checkpoint is on disk,
    # i.e. somewhere in epoch 2
    wait_for(lambda: (tmp_path / "model.pth").exists() or proc.poll() is not None)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(tmp_path / "model.pth", weights_only=True)["epoch"] < 3
    out = run(train_command(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stdout
    assert_same_weights(tmp_path / "model.pth", straight_run / "model.pth")  # bit for bit
    a = torch.load(tmp_path / "backbone.pth", weights_only=True)
    b = torch.load(straight_run / "backbone.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_each_logged_record_is_the_mean_of_the_steps_since_the_last_one(straight_run, tmp_path):
    # straight_run logs every step; this run logs at epoch ends only (every 2 steps), same training
    out = run(train_command(tmp_path, "--log-freq", "100"))
    assert out.returncode == 0, out.stderr
    per_step = [json.loads(line) for line in open(straight_run / "stats.jsonl")]
    per_epoch = [json.loads(line) for line in open(tmp_path / "stats.jsonl")]
    assert [r["step"] for r in per_step] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in per_epoch] == [2, 4, 6]
    for record, steps in zip(per_epoch, [per_step[0:2], per_step[2:4], per_step[4:6]]):
        for name in ("loss", "inv", "local_var", "top1", "cls_loss"):
            assert record[name] == pytest.approx((steps[0][name] + steps[1][name]) / 2, rel=1e-6), name
    assert all(steps[0]["loss"] != steps[1]["loss"] for steps in [per_step[0:2], per_step[2:4]])  # not the last step alone


def test_truncated_checkpoint_falls_back_to_previous(straight_run, tmp_path):
    shutil.copy(straight_run / "model.prev.pth", tmp_path / "model.prev.pth")  # epoch 2
    full = (straight_run / "model.pth").read_bytes()
    (tmp_path / "model.pth").write_bytes(full[: len(full) // 2])  # a crash mid-copy, a full disk...
    out = run(train_command(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "warning: cannot read checkpoint" in out.stdout and "model.prev.pth" in out.stdout
    assert "resumed from" in out.stdout
    assert_same_weights(tmp_path / "model.pth", straight_run / "model.pth")


def test_corrupt_checkpoint_without_previous_stops(tmp_path):
    (tmp_path / "model.pth").write_bytes(b"\x00" * 100)
    out = run(train_command(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no readable checkpoint" in out.stderr
    assert (tmp_path / "model.pth").read_bytes() == b"\x00" * 100  # nothing overwritten


def test_checkpoint_of_another_model_is_refused(straight_run, tmp_path):
    shutil.copy(straight_run / "model.pth", tmp_path / "model.pth")
    out = run(train_command(tmp_path, "--mlp", "32-32"))
    assert out.returncode == 2 and "does not match this model" in out.stderr
    assert "Traceback" not in out.stderr


class NaNAtThirdCall(VICRegLLoss):
    calls = 0

    def forward(self, *args):
        loss, stats = super().forward(*args)
        NaNAtThirdCall.calls += 1
        if NaNAtThirdCall.calls == 3:  # first step of epoch 2
            stats = dict(stats, local_var=torch.tensor(float("nan")))
            loss = loss * float("nan")
        return loss, stats


@pytest.mark.parametrize("log_freq, steps", [(1, "step 3"), (2, "steps 3 to 4")])
def test_nan_loss_stops_without_checkpointing_bad_state(tmp_path, monkeypatch, log_freq, steps):
    # the NaN at step 3 is found at the next log step, which names the steps since the previous one
    monkeypatch.setattr(train, "VICRegLLoss", NaNAtThirdCall)
    NaNAtThirdCall.calls = 0
    with pytest.raises(FloatingPointError, match=rf"non-finite loss in {steps} \(means over these steps: loss=nan.*"
                                                 "local_var=nan"):
        train.main([*RUN, "--num-workers", "0", "--log-freq", str(log_freq), "--exp-dir", str(tmp_path)])
    assert torch.load(tmp_path / "model.pth", weights_only=True)["epoch"] == 1  # epoch 1's, untouched
    assert not (tmp_path / "backbone.pth").exists()


def image_tree(root, num_images, num_corrupt):
    rng = np.random.default_rng(0)
    for i in range(num_images):
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        if i < num_corrupt:
            (folder / f"img{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        else:
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


FOLDER_RUN = ["--dataset", "imagenet", "--arch", "convnext_toy", "--size-crops", "32", "16",
              "--num-crops", "2", "1", "--min-scale-crops", "0.3", "0.1", "--max-scale-crops", "1", "0.3",
              "--mlp", "32-32", "--maps-mlp", "16-16", "--batch-size", "50", "--epochs", "1",
              "--num-workers", "0", "--device", "cpu"]


def test_few_unreadable_images_are_skipped_and_logged(tmp_path):
    image_tree(tmp_path / "data", num_images=150, num_corrupt=1)  # 0.7 %
    out = run([sys.executable, "train.py", *FOLDER_RUN, "--data-dir", str(tmp_path / "data"),
               "--exp-dir", str(tmp_path / "exp")])
    assert out.returncode == 0, out.stderr
    assert re.search(r"warning: unreadable image skipped: .*class0/img0\.png", out.stderr)
    assert (tmp_path / "exp" / "backbone.pth").exists()


def test_many_unreadable_images_stop_the_run(tmp_path):
    image_tree(tmp_path / "data", num_images=100, num_corrupt=5)  # 5 %
    out = run([sys.executable, "train.py", *FOLDER_RUN, "--data-dir", str(tmp_path / "data"),
               "--exp-dir", str(tmp_path / "exp")])
    assert out.returncode == 2
    assert "images are unreadable (more than 1%)" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "exp" / "model.pth").exists()


def test_empty_data_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    out = run([sys.executable, "train.py", *FOLDER_RUN, "--data-dir", str(tmp_path / "data"),
               "--exp-dir", str(tmp_path / "exp")])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(tmp_path / "data" / "train") in out.stderr


def worker_pids(agent_pid):
    """torchrun's worker processes (children of its agent), by LOCAL_RANK."""
    pids = {}
    for task in pathlib.Path(f"/proc/{agent_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            env = pathlib.Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            for entry in env:
                if entry.startswith(b"LOCAL_RANK="):
                    pids[int(entry.split(b"=")[1])] = int(child)
    return pids


def test_torchrun_restarts_from_checkpoint_after_a_rank_dies(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           "--standalone", str(ROOT / "train.py"), *RUN, "--num-workers", "0", "--exp-dir", str(tmp_path)]
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: (tmp_path / "model.pth").exists() or proc.poll() is not None)
        os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)  # rank 1 dies during epoch 2
        assert proc.wait(timeout=600) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert "resumed from" in log
    assert torch.load(tmp_path / "model.pth", weights_only=True)["epoch"] == 3


def test_batch_not_divisible_by_world_size(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(ROOT / "train.py"), *RUN, "--batch-size", "15",
           "--exp-dir", str(tmp_path)]
    out = run(cmd)
    assert out.returncode != 0
    assert "--batch-size 15 is not divisible by the world size 2" in out.stderr


def test_every_foreign_torch_load_is_weights_only():
    for path in ROOT.glob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path.name}: {call}"


@pytest.fixture(scope="module")
def bad_pretrained_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrained")
    (folder / "corrupt.pth").write_bytes(b"PK\x03\x04 truncated zip")
    torch.save(torch.nn.Linear(2, 2).state_dict(), folder / "other_arch.pth")  # no backbone of ours
    from model import build_backbone
    torch.save(build_backbone("resnet18").state_dict(), folder / "resnet18.pth")
    return folder


@pytest.mark.parametrize("script", ["eval_linear.py", "visualize.py"])
@pytest.mark.parametrize("name, message", [
    ("missing.pth", "no such file"),
    ("corrupt.pth", "is not a readable PyTorch checkpoint"),
    ("other_arch.pth", "does not fit convnext_toy"),
    ("resnet18.pth", "it looks like a resnet18 checkpoint"),
])
def test_bad_pretrained_file_is_one_line_and_exit_2(bad_pretrained_files, tmp_path, script, name, message):
    extra = ["--out", str(tmp_path / "m.png")] if script == "visualize.py" else \
        ["--dataset", "toy", "--device", "cpu", "--exp-dir", str(tmp_path)]
    out = run([sys.executable, script, "--arch", "convnext_toy", "--pretrained",
               str(bad_pretrained_files / name), *extra])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
