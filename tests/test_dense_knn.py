"""Dense nearest-neighbour retrieval (eval_seg.py --knn; train.py --eval-freq's dense_miou) against a
brute-force version written here with loops: each patch label counted pixel by pixel, each val patch's
neighbours found by sorting its cosines to every memory patch, the softmax written out, the confusion
matrix and the IoUs counted pixel by pixel. Then the wiring (flags, results.json, stats.jsonl records) and
2 processes = 1 process."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

import data
import eval_seg
import train
from model import build_backbone
from test_eval import free_port

CPU = torch.device("cpu")


class PaintedLabels(Dataset):
    """The toy masks painted as images (a colour per class, plus noise), so that even a random-init backbone's
    cells tell the classes apart and the probe scores well above chance: a wrong neighbour or weight then
    changes the mIoU. With `top`, label rows [top, top + 9) are 255 (ignored)."""

    palette = torch.rand(9, 3, generator=torch.Generator().manual_seed(0)) * 4 - 2

    def __init__(self, dataset, top=None):
        self.dataset, self.top, self.classes = dataset, top, dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        _, label = self.dataset[index]
        noise = torch.randn(3, *label.shape, generator=torch.Generator().manual_seed(index))
        image = self.palette[label].permute(2, 0, 1) + 0.5 * noise  # (3, S, S)
        if self.top is not None:
            label = label.clone()
            label[self.top:self.top + 9] = data.IGNORE_LABEL
        return image, label


def brute_force_dense_miou(backbone, memory_set, val_set, k, temperature, kept_cells=None):
    """mIoU (%) of dense retrieval with loops. kept_cells[i]: the cells of training image i in the memory
    (all when None)."""
    backbone.eval()
    num_classes = len(memory_set.classes)
    memory = []  # (unit feature, [fraction of the cell's pixels in class c for c in 0..K-1])
    with torch.no_grad():
        for i in range(len(memory_set)):
            image, label = memory_set[i]
            feature_map = backbone(image[None])[0]  # (C, h, w)
            h, w = feature_map.shape[1:]
            cell_h, cell_w = label.shape[0] // h, label.shape[1] // w  # the test's sizes divide exactly
            for cell in (range(h * w) if kept_cells is None else kept_cells[i].tolist()):
                r, c = divmod(cell, w)
                counts = [0] * num_classes
                for y in range(r * cell_h, (r + 1) * cell_h):
                    for x in range(c * cell_w, (c + 1) * cell_w):
                        if int(label[y, x]) < num_classes:
                            counts[int(label[y, x])] += 1
                vector = feature_map[:, r, c]
                memory.append((vector / vector.norm(), [n / (cell_h * cell_w) for n in counts]))
        memory_matrix = torch.stack([m[0] for m in memory])  # only to compute the cosines faster
        confusion = [[0] * num_classes for _ in range(num_classes)]
        for i in range(len(val_set)):
            image, label = val_set[i]
            feature_map = backbone(image[None])[0]
            h, w = feature_map.shape[1:]
            scores = torch.zeros(num_classes, h, w, dtype=torch.float64)
            for r in range(h):
                for c in range(w):
                    query = feature_map[:, r, c] / feature_map[:, r, c].norm()
                    cosines = (memory_matrix @ query).tolist()
                    nearest = sorted(range(len(memory)), key=lambda j: -cosines[j])[:k]
                    exps = [math.exp(cosines[j] / temperature) for j in nearest]
                    for j, e in zip(nearest, exps):
                        for cls in range(num_classes):
                            scores[cls, r, c] += e / sum(exps) * memory[j][1][cls]
            upsampled = F.interpolate(scores[None].float(), size=label.shape, mode="bilinear", align_corners=False)
            predicted = upsampled[0].argmax(0)
            for y in range(label.shape[0]):
                for x in range(label.shape[1]):
                    if int(label[y, x]) < num_classes:
                        confusion[int(label[y, x])][int(predicted[y, x])] += 1
    ious = []
    for cls in range(num_classes):
        true_positive = confusion[cls][cls]
        union = sum(confusion[cls]) + sum(row[cls] for row in confusion) - true_positive
        if union > 0:
            ious.append(true_positive / union)
    return 100 * sum(ious) / len(ious)


def toy_sets(train_images, val_images, painted=True, ignored=False):
    """The dense probe's toy sets (eval_seg.dense_knn_datasets), their images painted from the labels."""
    memory_set, val_set = eval_seg.dense_knn_datasets("toy", None, train_images, val_images)
    if painted:
        memory_set = PaintedLabels(memory_set, 20 if ignored else None)
        val_set = PaintedLabels(val_set, 40 if ignored else None)
    return memory_set, val_set


def random_backbone():
    torch.manual_seed(0)
    return build_backbone("resnet_toy").eval()


@pytest.fixture(scope="module")
def backbone():
    return random_backbone()


def test_patch_label_distributions_count_each_cells_pixels():
    labels = torch.tensor([[[0, 0, 1, 255],
                            [2, 0, 1, 1],
                            [7, 7, 2, 2],
                            [2, 255, 2, 2]]])  # 7 is outside the 3 classes: counted for none, as 255
    fractions = eval_seg.patch_label_distributions(labels, (2, 2), 3)  # (1, 4, 3): cells in row-major order
    expected = torch.tensor([[3, 0, 1], [0, 3, 0], [0, 0, 1], [0, 0, 4]]) / 4
    assert torch.equal(fractions[0], expected)


def test_memory_cells_keep_the_same_number_of_each_image_and_all_when_they_fit():
    assert eval_seg.memory_cells(10, 64, 640, seed=0) is None
    cells = eval_seg.memory_cells(10, 64, 215, seed=0)  # 21 of each image's 64 cells
    assert cells.shape == (10, 21)
    assert all(len(set(row.tolist())) == 21 and 0 <= row.min() and row.max() < 64 for row in cells)
    assert not torch.equal(cells[0], cells[1])  # a draw per image
    assert torch.equal(cells, eval_seg.memory_cells(10, 64, 215, seed=0))
    assert not torch.equal(cells, eval_seg.memory_cells(10, 64, 215, seed=1))
    assert eval_seg.memory_cells(100, 64, 10, seed=0).shape == (100, 1)  # at least one cell per image


def test_dense_knn_equals_brute_force_with_ignored_pixels_and_a_memory_subset(backbone):
    memory_set, val_set = toy_sets(12, 3, ignored=True)
    kept = eval_seg.memory_cells(12, 64, 300, seed=5)  # 25 of the 64 cells of each image
    expected = brute_force_dense_miou(backbone, memory_set, val_set, k=7, temperature=0.05, kept_cells=kept)
    miou, per_class, patches = eval_seg.dense_knn_miou(backbone, memory_set, val_set, 7, 0.05, 300, 5,
                                                       batch_size=5, num_workers=0, device=CPU, rank=0, world_size=1)
    assert patches == 300 and miou == pytest.approx(expected, abs=1e-6)
    assert 30 < miou < 90  # far from chance and from perfect: a wrong neighbour or weight shows
    # the whole memory, the defaults' k and temperature
    expected = brute_force_dense_miou(backbone, memory_set, val_set, k=30, temperature=0.02)
    miou, _, patches = eval_seg.dense_knn_miou(backbone, memory_set, val_set, 30, 0.02, 10_000, 0, 4, 0, CPU, 0, 1)
    assert patches == 12 * 64 and miou == pytest.approx(expected, abs=1e-6)


def test_eval_seg_knn_writes_the_brute_force_miou_to_results_json(tmp_path, backbone):
    """The command line on the toy data itself (textures, a random-init backbone: a low mIoU, but every flag
    reaches the probe)."""
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    results = eval_seg.main(["--dataset", "toy", "--toy-images", "12", "--arch", "resnet_toy", "--pretrained",
                             str(tmp_path / "backbone.pth"), "--knn", "--k", "5", "--temperature", "0.1",
                             "--memory-size", "240", "--seed", "3", "--batch-size", "4", "--num-workers", "0",
                             "--device", "cpu", "--exp-dir", str(tmp_path / "knn")])
    memory_set, val_set = toy_sets(12, 3, painted=False)  # --toy-images 12: 3 val images
    kept = eval_seg.memory_cells(12, 64, 240, seed=3)
    expected = brute_force_dense_miou(backbone, memory_set, val_set, k=5, temperature=0.1, kept_cells=kept)
    with open(tmp_path / "knn" / "results.json") as f:
        written = json.load(f)
    assert written["miou"] == results["miou"] == pytest.approx(expected, abs=1e-6)
    assert (written["k"], written["temperature"], written["memory_patches"]) == (5, 0.1, 240)


def test_knn_flags_are_checked(capsys):
    for flags, message in ((["--weights", "finetune"], "--knn trains nothing"), (["--k", "0"], "--k and"),
                           (["--temperature", "0"], "--temperature positive")):
        with pytest.raises(SystemExit):
            eval_seg.get_arguments(["--dataset", "toy", "--pretrained", "none", "--knn", *flags])
        assert message in capsys.readouterr().err
    defaults = eval_seg.get_arguments(["--dataset", "voc", "--data-dir", "x", "--pretrained", "none", "--knn"])
    assert (defaults.k, defaults.temperature, defaults.memory_size) == (30, 0.02, 10_240_000)


# --------------------------------------------------------------------------- 2 processes = 1 process

def dense_worker(rank, world_size, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    memory_set, val_set = toy_sets(7, 3, ignored=True)  # 7 and 3 images: unequal shards
    result = eval_seg.dense_knn_miou(random_backbone(), memory_set, val_set, 30, 0.02, 200, 1, 2, 0, CPU,
                                     rank, world_size)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def test_two_process_dense_knn_equals_one_process():
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dense_two_{os.getpid()}.pt")
    mp.spawn(dense_worker, args=(2, free_port(), out), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    os.remove(out)
    memory_set, val_set = toy_sets(7, 3, ignored=True)
    one = eval_seg.dense_knn_miou(random_backbone(), memory_set, val_set, 30, 0.02, 200, 1, 5, 0, CPU, 0, 1)
    assert two[2] == one[2] == 7 * 28  # 28 cells of each image: the same draw in both
    assert two[0] == pytest.approx(one[0], abs=1e-9) and two[1] == pytest.approx(one[1], abs=1e-9, nan_ok=True)


# --------------------------------------------------------------------------- during training

def test_a_toy_run_with_eval_freq_logs_dense_miou_every_epoch(tmp_path):
    tiny = ["--dataset", "toy", "--arch", "resnet_toy", "--toy-images", "16", "--toy-val-images", "8",
            "--size-crops", "48", "24", "--num-crops", "2", "2", "--mlp", "16", "--maps-mlp", "16",
            "--batch-size", "16", "--num-workers", "0", "--device", "cpu", "--log-freq", "1"]
    train.main([*tiny, "--epochs", "2", "--eval-freq", "1", "--exp-dir", str(tmp_path)])
    with open(tmp_path / "stats.jsonl") as f:
        evaluations = [json.loads(line) for line in f if '"knn_top1"' in line]
    assert [sorted(e) for e in evaluations] == [["dense_miou", "epoch", "knn_top1", "knn_top5"]] * 2
    assert [e["epoch"] for e in evaluations] == [1, 2]
    # the last one is the brute force of the run's backbone on its 16 toy training images and 4 val images
    backbone = build_backbone("resnet_toy", pretrained=str(tmp_path / "backbone.pth"))
    memory_set, val_set = train.dense_datasets(train.get_arguments(tiny))  # the toy textures themselves
    assert (len(memory_set), len(val_set)) == (16, 4)
    kept = eval_seg.memory_cells(16, 64, eval_seg.DATASET_DEFAULTS["toy"]["memory_size"], seed=0)
    expected = brute_force_dense_miou(backbone, memory_set, val_set, 30, 0.02, kept)
    assert evaluations[-1]["dense_miou"] == pytest.approx(expected, abs=1e-6)


def test_seg_dataset_flags_are_checked(capsys):
    for flags in (["--dataset", "toy", "--eval-freq", "1", "--seg-dataset", "voc", "--seg-data-dir", "x"],
                  ["--data-dir", "d", "--seg-dataset", "voc", "--seg-data-dir", "x"],  # no --eval-freq
                  ["--data-dir", "d", "--eval-freq", "1", "--seg-dataset", "voc"],  # no --seg-data-dir
                  ["--data-dir", "d", "--eval-freq", "1", "--seg-data-dir", "x"]):  # no --seg-dataset
        with pytest.raises(SystemExit):
            train.get_arguments(flags)
        assert "--seg-dataset needs --eval-freq and --seg-data-dir" in capsys.readouterr().err


def test_an_image_folder_run_with_a_seg_dataset_logs_its_dense_miou(tmp_path):
    """--seg-dataset voc on an ImageFolder run: the dense probe of the run's backbone on VOC's train and val
    splits (a tiny VOC tree: 512-px crops, labels with 255 and classes 0, 5, 20)."""
    from test_eval import voc_tree
    from test_monitoring import TINY, image_folder
    image_folder(tmp_path / "data", {"train": 16, "val": 4})
    voc = voc_tree(tmp_path / "voc", with_aug=False)
    rng = np.random.default_rng(0)  # textured images: a one-colour image's cells would all tie in the search
    for name in ("a", "b"):
        pixels = rng.integers(0, 256, (40, 60, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(voc, "JPEGImages", name + ".jpg"))
    train.main(["--dataset", "imagenet", "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--eval-freq", "1",
                *TINY, "--size-crops", "32", "16", "--seg-dataset", "voc", "--seg-data-dir", str(tmp_path / "voc"),
                "--exp-dir", str(tmp_path / "run")])
    with open(tmp_path / "run" / "stats.jsonl") as f:
        (evaluation,) = [json.loads(line) for line in f if '"dense_miou"' in line]
    backbone = build_backbone("convnext_toy", pretrained=str(tmp_path / "run" / "backbone.pth"))
    memory_set, val_set = eval_seg.dense_knn_datasets("voc", str(tmp_path / "voc"), None)
    assert (len(memory_set), len(val_set)) == (1, 1)
    assert evaluation["dense_miou"] == pytest.approx(brute_force_dense_miou(backbone, memory_set, val_set, 30, 0.02),
                                                     abs=1e-6)


def test_no_cudnn_autotuning_while_val_images_of_many_sizes_go_through(backbone):
    """train.py turns cuDNN autotuning on for its fixed training shapes; the dense probe's val images come
    in many sizes, so it turns autotuning off for them (each new size would be tuned again) and back on."""
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return backbone(x)

    memory_set, val_set = toy_sets(4, 2)
    memory = eval_seg.build_memory(backbone, memory_set, 9, 1000, 0, 4, 0, CPU, 0, 1)
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        eval_seg.dense_knn_confusion(Recording(), memory, val_set, 9, 30, 0.02, 0, CPU, 0, 1)
        assert seen == [False, False] and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before
