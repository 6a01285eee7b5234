"""Watching a run: RankMe against its formula on known spectra, the periodic kNN evaluation (toy val
split and an ImageFolder val/ folder) against a brute-force kNN written here, and a 2-process
evaluation equal to the 1-process one."""
import json
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
from PIL import Image

import data
import train
from model import build_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch", "convnext_toy", "--size-crops", "64", "32", "--num-crops", "2", "2",
        "--min-scale-crops", "0.3", "0.1", "--max-scale-crops", "1", "0.3", "--mlp", "32-32",
        "--maps-mlp", "16-16", "--num-matches", "6", "2", "--batch-size", "16", "--warmup-epochs", "1",
        "--num-workers", "0", "--device", "cpu", "--log-freq", "1"]


def rankme_by_hand(singular_values, eps=1e-7):
    """Garrido et al. 2023, eq. 1, on a list of singular values: exp(-Σ p log p), p_k = σ_k / Σσ + eps."""
    total = sum(singular_values)
    p = [s / total + eps for s in singular_values]
    return math.exp(-sum(q * math.log(q) for q in p))


def random_orthogonal(n, generator):
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]


# --------------------------------------------------------------------------- RankMe

def test_rankme_of_rank_one_identity_and_a_known_spectrum():
    g = torch.Generator().manual_seed(0)
    rank_one = torch.randn(50, 1, generator=g) @ torch.randn(1, 10, generator=g)  # every row on one line
    assert train.rankme(rank_one).item() == pytest.approx(1.0, abs=1e-4)
    assert train.rankme(torch.eye(16)).item() == pytest.approx(rankme_by_hand([1.0] * 16), rel=1e-6)
    assert rankme_by_hand([1.0] * 16) == pytest.approx(16.0, rel=1e-5)  # a flat spectrum: the full width
    spectrum = [4.0, 2.0, 1.0, 1.0, 0.5, 0.0]  # x = U diag(σ) Vᵀ, 40 x 6
    x = random_orthogonal(40, g)[:, :6] @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) \
        @ random_orthogonal(6, g).T
    assert train.rankme(x).item() == pytest.approx(rankme_by_hand(spectrum), rel=1e-5)
    assert 3.9 < rankme_by_hand(spectrum) < 4.0  # five non-zero values, unequal: less than 5
    assert train.rankme(torch.zeros(8, 4)).item() == pytest.approx(1.0, abs=1e-4)  # total collapse
    assert math.isnan(train.rankme(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])).item())  # no error: NaN


def test_collapse_diagnostics_read_view_zero_and_all_its_cells():
    g = torch.Generator().manual_seed(1)
    embeddings = [torch.randn(8, 5, generator=g) for _ in range(3)]
    maps = [torch.randn(8, 3, 3, 4, generator=g) for _ in range(3)]
    diagnostics = train.collapse_diagnostics(embeddings, maps)
    cells = torch.stack([maps[0][b, r, c] for b in range(8) for r in range(3) for c in range(3)])  # (72, 4)
    by_hand = lambda x: rankme_by_hand(np.linalg.svd(x.double().numpy(), compute_uv=False).tolist())
    assert diagnostics["rankme"].item() == pytest.approx(by_hand(embeddings[0]), rel=1e-5)
    assert diagnostics["local_rankme"].item() == pytest.approx(by_hand(cells), rel=1e-5)
    assert set(train.collapse_diagnostics(embeddings, None)) == {"rankme"}  # alpha = 1: no local maps


# --------------------------------------------------------------------------- periodic kNN evaluation

def brute_force_knn_top1(backbone, memory, val, k=20, temperature=0.07):
    """Weighted kNN top-1 (%) with loops: each val image's k most cosine-similar memory images vote
    exp(cosine / T) for their class."""
    backbone.eval()
    with torch.no_grad():
        features = lambda dataset: [backbone(dataset[i][0][None]).mean(dim=(2, 3))[0] for i in range(len(dataset))]
        memory_features, val_features = features(memory), features(val)
    hits = 0
    for i, query in enumerate(val_features):
        cosines = [float(torch.dot(query, m) / (query.norm() * m.norm())) for m in memory_features]
        nearest = sorted(range(len(memory)), key=lambda j: -cosines[j])[:k]
        votes = {}
        for j in nearest:
            votes[memory[j][1]] = votes.get(memory[j][1], 0.0) + math.exp(cosines[j] / temperature)
        hits += max(votes, key=votes.get) == val[i][1]
    return 100 * hits / len(val)


# kNN percentages are float32: abs=1e-4 is far below one val image (100 / 24 %)


def read_records(exp_dir):
    with open(os.path.join(exp_dir, "stats.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "step" in r], [r for r in records if "knn_top1" in r]


def test_toy_run_logs_knn_every_epoch_and_rankme_every_record(tmp_path):
    train.main(["--dataset", "toy", "--toy-images", "32", "--toy-val-images", "24", "--epochs", "3",
                "--eval-freq", "1", *TINY, "--exp-dir", str(tmp_path)])
    steps, evaluations = read_records(tmp_path)
    assert [r["step"] for r in steps] == list(range(1, 7))
    for r in steps:
        assert 1.0 <= r["rankme"] <= 32 and 1.0 <= r["local_rankme"] <= 16  # at most the embeddings' widths
    assert [e["epoch"] for e in evaluations] == [1, 2, 3]
    assert all(0 <= e["knn_top1"] <= e["knn_top5"] <= 100 for e in evaluations)
    # the last evaluation is the trained backbone's kNN, as a loop computes it, and the run's last line
    memory, val = train.knn_datasets(train.get_arguments(["--dataset", "toy", "--toy-images", "32",
                                                          "--toy-val-images", "24"]))
    backbone = build_backbone("convnext_toy", pretrained=str(tmp_path / "backbone.pth"))
    assert evaluations[-1]["knn_top1"] == pytest.approx(brute_force_knn_top1(backbone, memory, val), abs=1e-4)
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["knn_top1"] == evaluations[-1]["knn_top1"]


def image_folder(root, per_class):
    """root/{train,val}/class{0,1}/img*.png: class 0 dark images, class 1 bright ones."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for cls in range(2):
            folder = root / split / f"class{cls}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 128, (40, 40, 3)) + 127 * cls
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{i}.png")


def test_image_folder_run_evaluates_on_val_with_capped_sets(tmp_path):
    image_folder(tmp_path / "data", {"train": 16, "val": 7})
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "imagenet", "--data-dir",
               str(tmp_path / "data"), "--epochs", "2", "--eval-freq", "1", "--eval-images", "10", *TINY,
               "--size-crops", "32", "16", "--exp-dir", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "epoch 1: kNN top-1" in result.stdout and "on 10 val images" in result.stdout
    _, evaluations = read_records(tmp_path / "run")
    assert [e["epoch"] for e in evaluations] == [1, 2]
    # the capped sets: a fixed subset of 10 of the 32 training and 10 of the 14 val images
    args = train.get_arguments(["--data-dir", str(tmp_path / "data"), "--eval-images", "10"])
    memory, val = train.knn_datasets(args)
    assert len(memory) == len(val) == 10 and list(memory.indices) == list(train.knn_datasets(args)[0].indices)
    backbone = build_backbone("convnext_toy", pretrained=str(tmp_path / "run" / "backbone.pth"))
    assert evaluations[-1]["knn_top1"] == pytest.approx(brute_force_knn_top1(backbone, memory, val), abs=1e-4)


def test_eval_freq_without_a_val_folder_is_one_line_and_exit_2(tmp_path):
    image_folder(tmp_path / "data", {"train": 16})
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--data-dir", str(tmp_path / "data"),
               "--eval-freq", "1", *TINY, "--exp-dir", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip() == f"train.py: error: data folder not found: {tmp_path / 'data' / 'val'} " \
                                    f"(expected {tmp_path / 'data'}/val/<class>/<image files>)"


# --------------------------------------------------------------------------- distributed evaluation

def knn_setup():
    args = train.get_arguments(["--dataset", "toy", "--toy-images", "40", "--toy-val-images", "21",
                                "--num-workers", "0"])  # 21: the ranks' shards differ in length
    torch.manual_seed(0)
    return build_backbone("convnext_toy"), train.knn_datasets(args), args


def knn_worker(rank, world_size, port, exp_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    backbone, knn_sets, args = knn_setup()
    args.exp_dir = exp_dir
    train.evaluate_knn(backbone, knn_sets, 1, args, torch.device("cpu"), rank, world_size, print)
    dist.destroy_process_group()


def test_two_process_knn_evaluation_equals_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "two").mkdir()
    mp.spawn(knn_worker, args=(2, port, str(tmp_path / "two")), nprocs=2, join=True)
    backbone, knn_sets, args = knn_setup()
    args.exp_dir = str(tmp_path)
    top1 = train.evaluate_knn(backbone, knn_sets, 1, args, torch.device("cpu"), 0, 1, print)
    _, one = read_records(tmp_path)
    _, two = read_records(tmp_path / "two")
    assert len(two) == 1 and two == one  # rank 0 alone writes, the same numbers
    assert one[0]["knn_top1"] == top1 == pytest.approx(brute_force_knn_top1(backbone, *knn_sets), abs=1e-4)
