"""Tests of eval_linear.py, eval_seg.py and the segmentation data sets of data.py."""
import ast
import copy
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from PIL import Image

import data
import eval_linear
import eval_seg
import train as train_mod
from model import build_backbone
from train import save_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# mIoU from confusion matrices

def test_confusion_matrix_and_miou_by_hand():
    label = torch.tensor([[0, 0, 1, 1],
                          [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 2, 1]])  # the two 255 pixels are ignored whatever their prediction
    confusion = eval_seg.confusion_matrices(pred[None], label, num_classes=4)[0]
    # rows = true class, columns = predicted: class 0 -> (0, 1), class 1 -> (1, 1), class 2 -> (2, 0)
    expected = torch.tensor([[1, 1, 0, 0],
                             [0, 2, 0, 0],
                             [1, 0, 1, 0],
                             [0, 0, 0, 0]])
    assert torch.equal(confusion, expected)
    iou = eval_seg.iou_per_class(confusion)
    # class 0: TP 1, FP 1 (pred 0 where 2), FN 1 -> 1/3; class 1: TP 2, FP 1, FN 0 -> 2/3;
    # class 2: TP 1, FP 0, FN 1 -> 1/2; class 3: absent and never predicted -> NaN, left out of the mean
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert torch.isnan(iou[3])
    assert eval_seg.mean_iou(confusion) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_miou_counts_a_predicted_but_absent_class_as_zero():
    label = torch.tensor([0, 0, 1, 1, 255])
    pred = torch.tensor([0, 2, 1, 1, 2])
    confusion = eval_seg.confusion_matrices(pred[None], label, num_classes=3)[0]
    # class 2 never in the labels but predicted once (on a valid pixel): IoU 0, counted in the mean
    assert eval_seg.iou_per_class(confusion).tolist() == pytest.approx([1 / 2, 1.0, 0.0])
    assert eval_seg.mean_iou(confusion) == pytest.approx(0.5)


def test_confusion_matrices_of_every_head_match_a_naive_loop():
    generator = torch.Generator().manual_seed(0)
    label = torch.randint(0, 6, (40, 30), generator=generator)
    label[label == 5] = 255
    preds = torch.randint(0, 5, (3, 40, 30), generator=generator)  # three heads
    naive = torch.zeros(3, 5, 5, dtype=torch.long)
    for h in range(3):
        for t, p in zip(label.flatten().tolist(), preds[h].flatten().tolist()):
            if t != 255:
                naive[h, t, p] += 1
    assert torch.equal(eval_seg.confusion_matrices(preds, label, 5), naive)


# -----------------------------------------------------------------------------
# sliding-window inference

@pytest.mark.parametrize("length,crop,stride", [(10, 4, 3), (12, 4, 4), (4, 4, 2), (3, 8, 5), (53, 16, 11)])
def test_window_starts_cover_the_side(length, crop, stride):
    starts = eval_seg.window_starts(length, crop, stride)
    covered = np.zeros(length, bool)
    for start in starts:
        covered[start:start + crop] = True
        assert start + min(crop, length) <= length
    assert covered.all() and starts[0] == 0 and starts[-1] + min(crop, length) == length
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("crop,stride", [(16, 5), (16, 11), (16, 16), (20, 7), (64, 10)])
def test_slide_inference_equals_whole_image_for_a_per_pixel_model(crop, stride):
    torch.manual_seed(0)
    per_pixel = nn.Conv2d(3, 4, kernel_size=1)  # each output pixel depends on its input pixel only
    image = torch.randn(2, 3, 37, 53)
    with torch.no_grad():
        whole = per_pixel(image)
    slid = eval_seg.slide_inference(per_pixel, image, crop, stride)
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-5)


def test_slide_inference_equals_whole_image_when_the_window_is_the_image():
    torch.manual_seed(0)
    backbone = build_backbone("convnext_toy")
    model = eval_seg.SegModel(backbone, eval_seg.seg_heads(32 + 64 + 128 + 256, 5, 2, seed=0), frozen=True).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        whole = model(image)  # (H, B, K, S, S)
    assert whole.shape == (2, 1, 5, 64, 64)
    torch.testing.assert_close(eval_seg.slide_inference(model, image, crop=64, stride=43), whole)
    # and windows larger than the image shrink to it
    torch.testing.assert_close(eval_seg.slide_inference(model, image, crop=96, stride=64), whole)


def test_seg_model_concatenates_the_convnext_stages_at_the_first_stage_resolution():
    backbone = build_backbone("convnext_toy")
    stages = backbone.forward_stages(torch.randn(2, 3, 64, 64))
    features = eval_seg.stage_features(stages, multi_stage=True)
    assert features.shape == (2, 32 + 64 + 128 + 256, 32, 32)  # stem stride 2: S/2
    torch.testing.assert_close(features[:, :32], stages[0])  # the first stage is not resampled
    # the last stage is a bilinear upsampling: a constant map stays constant
    constant = [torch.ones(1, c, s, s) for c, s in ((1, 8), (1, 4), (1, 2), (1, 1))]
    assert torch.equal(eval_seg.stage_features(constant, True), torch.ones(1, 4, 8, 8))


# -----------------------------------------------------------------------------
# dataset layouts, from tiny fake trees

def write_image(path, size=(6, 4)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)


def write_label(path, values, palette=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    values = np.asarray(values, np.uint8)
    if palette:  # VOC's SegmentationClass PNGs are colour palette images whose indices are the classes
        img = Image.new("P", values.shape[::-1])
        img.putdata(values.flatten().tolist())
        img.putpalette([v for k in range(256) for v in (k * 7 % 256, k * 3 % 256, 255 - k)])
    else:
        img = Image.fromarray(values)
    img.save(path)


def voc_tree(root, with_aug, aug_list=None):
    voc = os.path.join(root, "VOCdevkit", "VOC2012")
    for name in ("a", "b", "c"):
        write_image(os.path.join(voc, "JPEGImages", name + ".jpg"))
    write_label(os.path.join(voc, "SegmentationClass", "a.png"), [[0, 5], [255, 20]], palette=True)
    write_label(os.path.join(voc, "SegmentationClass", "b.png"), [[1, 1], [0, 255]], palette=True)
    os.makedirs(os.path.join(voc, "ImageSets", "Segmentation"))
    with open(os.path.join(voc, "ImageSets", "Segmentation", "train.txt"), "w") as f:
        f.write("a\n")
    with open(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"), "w") as f:
        f.write("b\n")
    if with_aug:
        for name, value in (("a", 3), ("b", 4), ("c", 7)):
            write_label(os.path.join(voc, "SegmentationClassAug", name + ".png"), [[value, 0], [255, value]])
    if aug_list is not None:
        os.makedirs(os.path.join(voc, "ImageSets", "SegmentationAug"))
        with open(os.path.join(voc, "ImageSets", "SegmentationAug", "train_aug.txt"), "w") as f:
            f.write("\n".join(aug_list) + "\n")
    return voc


def labels_of(dataset):
    return [np.array(dataset[i][1]).tolist() for i in range(len(dataset))]


def test_voc_without_aug(tmp_path):
    voc = voc_tree(tmp_path, with_aug=False)
    train = data.build_seg_dataset("voc", str(tmp_path), "train")
    val = data.build_seg_dataset("voc", str(tmp_path), "val")
    assert [os.path.basename(p) for p, _ in train.pairs] == ["a.jpg"]
    assert labels_of(train) == [[[0, 5], [255, 20]]]  # palette indices are the classes, 255 kept
    assert labels_of(val) == [[[1, 1], [0, 255]]]
    assert len(train.classes) == 21
    # root may also be VOCdevkit/VOC2012 itself
    assert len(data.build_seg_dataset("voc", voc, "val")) == 1


def test_voc_with_aug(tmp_path):
    voc_tree(tmp_path, with_aug=True)
    train = data.build_seg_dataset("voc", str(tmp_path), "train")
    # every SegmentationClassAug image but the val ones, with the Aug labels
    assert [os.path.basename(p) for p, _ in train.pairs] == ["a.jpg", "c.jpg"]
    assert all("SegmentationClassAug" in label for _, label in train.pairs)
    assert labels_of(train) == [[[3, 0], [255, 3]], [[7, 0], [255, 7]]]
    val = data.build_seg_dataset("voc", str(tmp_path), "val")
    assert labels_of(val) == [[[1, 1], [0, 255]]]  # val keeps SegmentationClass


def test_voc_with_aug_list(tmp_path):
    voc_tree(tmp_path / "x", with_aug=True, aug_list=["c", "b"])
    train = data.build_seg_dataset("voc", str(tmp_path / "x"), "train")
    assert [os.path.basename(p) for p, _ in train.pairs] == ["c.jpg"]  # listed, minus val


def test_ade20k_labels_shift(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        write_image(str(base / "images" / split / "ADE_1.jpg"))
        write_label(str(base / "annotations" / split / "ADE_1.png"), [[0, 1], [150, 37]])
    for split in ("train", "val"):
        dataset = data.build_seg_dataset("ade20k", str(tmp_path), split)
        assert labels_of(dataset) == [[[255, 0], [149, 36]]]  # 0 "other" -> 255, k -> k - 1
        assert len(dataset.classes) == 150


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    for split in ("train", "val"):
        write_image(str(tmp_path / "leftImg8bit" / split / "aachen" / "aachen_000000_000019_leftImg8bit.png"))
        write_label(str(tmp_path / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"),
                    [[7, 8, 11, 26], [33, 0, 6, 34]])
    dataset = data.build_seg_dataset("cityscapes", str(tmp_path), "val")
    # road 7 -> 0, sidewalk 8 -> 1, building 11 -> 2, car 26 -> 13, bicycle 33 -> 18, the rest 255
    assert labels_of(dataset) == [[[0, 1, 2, 13], [18, 255, 255, 255]]]
    table = data.CITYSCAPES_TABLE
    assert sorted(int(v) for v in table if v != 255) == list(range(19))


def test_missing_dataset_folders_raise_value_errors(tmp_path):
    for name in ("voc", "ade20k", "cityscapes"):
        with pytest.raises(ValueError, match="data folder not found"):
            data.build_seg_dataset(name, str(tmp_path), "train")


def test_toy_segmentation_items():
    dataset = data.ToySegmentation("val", num_images=3, transform=data.SegValTransform(64))
    image, label = dataset[2]
    assert image.shape == (3, 64, 64) and label.shape == (64, 64)
    assert torch.equal(label, torch.from_numpy(data.ToyShapes("val", num_images=3).mask(2)).long())
    assert len(dataset.classes) == 9


def test_seg_train_transform_crops_pads_and_keeps_labels_aligned():
    img = Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3))
    mask = Image.fromarray((np.arange(20 * 30) % 7).astype(np.uint8).reshape(20, 30))
    image, label = data.SegTrainTransform(24, base_size=20, augment=False)(img, mask)
    # short side 20 -> unchanged; centre crop 24: columns 3..26 of the 20 rows, rows 20..23 padded
    assert image.shape == (3, 24, 24) and label.shape == (24, 24)
    assert torch.equal(label[:20], torch.from_numpy(np.array(mask, np.int64))[:, 3:27])
    assert (label[20:] == 255).all() and (image[:, 20:] == 0).all()


# -----------------------------------------------------------------------------
# learning-rate sweeps: each head equals the head of a single-lr run

def linear_args(exp_dir, lrs):
    return ["--dataset", "toy", "--arch", "convnext_toy", "--pretrained", "none", "--device", "cpu",
            "--toy-images", "48", "--toy-val-images", "8", "--size", "32", "--resize", "36",
            "--batch-size", "16", "--epochs", "1", "--num-workers", "0", "--log-freq", "100",
            "--exp-dir", str(exp_dir), "--lr-head", *lrs]


def test_linear_default_sweep_is_the_papers_and_the_reference_readmes_learning_rates():
    args = eval_linear.get_arguments(["--dataset", "toy", "--pretrained", "none"])
    # the paper's appendix ("Linear Evaluation"); the reference README's for ResNets, ConvNeXts (README,
    # "The paper and the reference code")
    paper, reference_readme = {30, 10, 1, 0.3, 0.1, 0.03, 0.01}, {0.02, 0.3}
    assert set(args.lr_head) == paper | reference_readme and len(args.lr_head) == 8


def test_linear_sweep_trains_independent_heads(tmp_path):
    sweep = eval_linear.main(linear_args(tmp_path / "sweep", ["3", "0.1"]))
    single = eval_linear.main(linear_args(tmp_path / "single", ["0.1"]))
    sweep_state = torch.load(tmp_path / "sweep" / "linear.pth", weights_only=True)["model"]
    single_state = torch.load(tmp_path / "single" / "linear.pth", weights_only=True)["model"]
    for name in ("weight", "bias"):
        torch.testing.assert_close(sweep_state[f"heads.heads.1.{name}"], single_state[f"heads.heads.0.{name}"],
                                   rtol=0, atol=0)
        # and the heads did train, each its own way
        assert not torch.equal(sweep_state[f"heads.heads.0.{name}"], sweep_state[f"heads.heads.1.{name}"])
    assert sweep["per_lr"][1]["top1"] == single["top1"]
    results = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert {"top1", "top5", "best_lr"} <= set(results) and results["best_lr"] in (3.0, 0.1)


def naive_top1(model_state, num_heads, val_set):
    """Top-1 (%) of every head of a saved LinearClassifiers, one val image at a time."""
    model = eval_linear.LinearClassifiers(build_backbone("convnext_toy"),
                                          eval_linear.linear_heads(256, len(val_set.classes), num_heads, seed=0), True)
    model.load_state_dict(model_state)
    model.eval()
    correct = [0] * num_heads
    with torch.no_grad():
        for i in range(len(val_set)):
            image, label, _ = val_set[i]
            logits = model(image[None])  # (H, 1, K)
            for h in range(num_heads):
                correct[h] += int(logits[h, 0].argmax()) == label
    return [100 * c / len(val_set) for c in correct]


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("cache", [False, True])
def test_linear_best_epoch_is_the_best_val_accuracy_over_epochs_and_survives_a_resume(tmp_path, monkeypatch, cache):
    lrs, epochs = ["30", "1", "0.02"], 4
    args = linear_args(tmp_path / "run", lrs) + (["--cache-features"] if cache else [])
    args[args.index("--toy-val-images") + 1], args[args.index("--epochs") + 1] = "24", str(epochs)
    states = []  # the model after every epoch, as written to linear.pth

    def record(state, path):
        states.append(copy.deepcopy(state["model"]))
        save_atomic(state, path)

    monkeypatch.setattr(eval_linear, "save_atomic", record)
    results = eval_linear.main(args)
    assert len(states) == epochs
    val_set = data.ToyShapes("val", num_images=24, transform=data.linear_val_transform(36, 32))
    per_epoch = np.array([naive_top1(state, len(lrs), val_set) for state in states])  # (epochs, H)
    for h, entry in enumerate(results["per_lr"]):
        assert entry["top1"] == pytest.approx(per_epoch[-1, h], abs=1e-4)  # the last epoch's
        assert entry["best_epoch_top1"] == pytest.approx(per_epoch[:, h].max(), abs=1e-4)
        assert entry["best_epoch"] == int(per_epoch[:, h].argmax()) + 1  # the first of equal epochs
    assert results["top1"] == pytest.approx(per_epoch[-1].max(), abs=1e-4)
    assert results["best_epoch_top1"] == pytest.approx(per_epoch.max(), abs=1e-4)
    assert results["best_epoch_lr"] == float(lrs[int(per_epoch.max(axis=0).argmax())])
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results

    # the same run, stopped after epoch 3 (once its checkpoint is written) and started again
    assert min(entry["best_epoch"] for entry in results["per_lr"]) <= 3  # a best the resume must carry over

    def stop_after_epoch_3(state, path):
        save_atomic(state, path)
        if state["epoch"] == 3:
            raise Interrupted

    resumed_args = [str(tmp_path / "resumed") if a == str(tmp_path / "run") else a for a in args]
    monkeypatch.setattr(eval_linear, "save_atomic", stop_after_epoch_3)
    with pytest.raises(Interrupted):
        eval_linear.main(resumed_args)
    monkeypatch.setattr(eval_linear, "save_atomic", save_atomic)
    assert eval_linear.main(resumed_args) == results


def seg_args(exp_dir, lrs, *extra):
    return ["--dataset", "toy", "--arch", "convnext_toy", "--pretrained", "none", "--device", "cpu",
            "--toy-images", "16", "--base-size", "32", "--crop-size", "32", "--batch-size", "8",
            "--iters", "3", "--warmup-iters", "1", "--num-workers", "0", "--log-freq", "100",
            "--exp-dir", str(exp_dir), "--lr", *lrs, *extra]


@pytest.mark.parametrize("cache", [False, True])
def test_seg_sweep_trains_independent_heads(tmp_path, cache):
    extra = ["--cache-features"] if cache else []
    eval_seg.main(seg_args(tmp_path / "sweep", ["1e-2", "1e-3"], *extra))
    single = eval_seg.main(seg_args(tmp_path / "single", ["1e-3"], *extra))
    sweep_state = torch.load(tmp_path / "sweep" / "seg.pth", weights_only=True)["model"]
    single_state = torch.load(tmp_path / "single" / "seg.pth", weights_only=True)["model"]
    for name in ("0.weight", "0.bias", "0.running_mean", "1.weight", "1.bias"):
        torch.testing.assert_close(sweep_state[f"heads.heads.1.{name}"], single_state[f"heads.heads.0.{name}"],
                                   rtol=0, atol=0)
    assert not torch.equal(sweep_state["heads.heads.0.1.weight"], sweep_state["heads.heads.1.1.weight"])
    results = json.loads((tmp_path / "single" / "results.json").read_text())
    assert results["miou"] == single["miou"] and len(results["per_class_iou"]) == 9


def test_linear_resume_continues_from_the_checkpoint(tmp_path, capsys):
    eval_linear.main(linear_args(tmp_path, ["0.1"]))
    args = linear_args(tmp_path, ["0.1"])
    args[args.index("--epochs") + 1] = "2"
    eval_linear.main(args)
    out = capsys.readouterr().out
    assert "resuming from" in out
    assert torch.load(tmp_path / "linear.pth", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("script", ["eval_linear", "eval_seg"])
def test_resuming_with_another_sweep_or_arch_is_a_one_line_error(tmp_path, script):
    main, make_args, flag = {"eval_linear": (eval_linear.main, linear_args, "--lr-head"),
                             "eval_seg": (eval_seg.main, seg_args, "--lr")}[script]
    main(make_args(tmp_path, ["0.1"]))
    with pytest.raises(ValueError, match=rf"was trained with {flag} \[0.1\], not \[0.2\]"):
        main(make_args(tmp_path, ["0.2"]))
    other_arch = make_args(tmp_path, ["0.1"])
    other_arch[other_arch.index("--arch") + 1] = "resnet_toy"
    with pytest.raises(ValueError, match="does not match this run") as error:
        main(other_arch)
    assert "\n" not in str(error.value)


# -----------------------------------------------------------------------------
# the scripts' shared plumbing lives in train.py, model.py and data.py

def imported_modules(script):
    tree = ast.parse(open(os.path.join(REPO, script)).read())
    return {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names} | \
        {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


def test_no_evaluation_script_imports_the_other():
    assert "eval_seg" not in imported_modules("eval_linear.py")
    assert "eval_linear" not in imported_modules("eval_seg.py")
    assert {"train", "model", "data"} <= imported_modules("eval_linear.py") & imported_modules("eval_seg.py")


# -----------------------------------------------------------------------------
# command-line errors: one line, exit code 2

@pytest.mark.parametrize("script,argv,message", [
    ("eval_linear.py", ["--dataset", "toy", "--arch", "convnext_toy", "--pretrained", "missing.pth"],
     "pretrained weights: no such file"),
    ("eval_linear.py", ["--data-dir", "no/such/dir", "--arch", "convnext_toy", "--pretrained", "none",
                        "--device", "cpu"], "data folder not found"),
    ("eval_seg.py", ["--dataset", "ade20k", "--data-dir", "no/such/dir", "--arch", "convnext_toy",
                     "--pretrained", "none", "--device", "cpu"], "data folder not found"),
])
def test_bad_inputs_exit_with_one_line(tmp_path, script, argv, message):
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *argv, "--exp-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and message in lines[0]


@pytest.mark.parametrize("script,argv,message", [
    (eval_linear, ["--dataset", "imagenet"], "--data-dir is required with --dataset imagenet"),
    (eval_seg, ["--dataset", "ade20k"], "--data-dir is required with --dataset ade20k"),
    (eval_linear, ["--weights", "finetune", "--lr-backbone", "0.1", "--lr-head", "1", "2"],
     "takes a single --lr-head value"),
    (eval_seg, ["--weights", "finetune", "--lr", "1e-3", "1e-4"], "takes a single --lr value"),
    (eval_linear, ["--weights", "finetune", "--lr-backbone", "0.1", "--lr-head", "1", "--cache-features"],
     "--cache-features needs a frozen backbone"),
    (eval_seg, ["--weights", "finetune", "--cache-features"], "--cache-features needs a frozen backbone"),
    (eval_linear, ["--weights", "finetune", "--lr-head", "1"], "--weights finetune needs --lr-backbone"),
    (eval_linear, ["--knn", "--weights", "finetune", "--lr-backbone", "0.1"], "--knn evaluates the backbone as it is"),
])
def test_argument_errors(capsys, script, argv, message):
    dataset = [] if "--dataset" in argv else ["--dataset", "toy"]
    with pytest.raises(SystemExit) as exit_:
        script.get_arguments(["--pretrained", "none", "--device", "cpu", *dataset, *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_flags_both_scripts_take_keep_their_defaults():
    for script, name in ((eval_linear, "linear"), (eval_seg, "seg")):
        args = script.get_arguments(["--dataset", "toy", "--pretrained", "none"])
        assert (args.arch, args.weights, args.exp_dir, args.num_workers, args.log_freq, args.seed) == \
            ("convnext_small", "freeze", f"./exp/{name}", 8, 50, 0)


# -----------------------------------------------------------------------------
# kNN (eval_linear.py --knn and the end of a toy run)

def brute_force_knn_votes(train_features, train_labels, queries, num_classes, k, temperature):
    """One query at a time: cosine to every training vector, the k largest, exp(cos / T) per class."""
    votes = np.zeros((len(queries), num_classes))
    for i, query in enumerate(queries.double().numpy()):
        cosines = []
        for j, vector in enumerate(train_features.double().numpy()):
            cosines.append((query @ vector / np.linalg.norm(query) / np.linalg.norm(vector), j))
        for cosine, j in sorted(cosines, reverse=True)[:k]:
            votes[i, int(train_labels[j])] += np.exp(cosine / temperature)
    return torch.from_numpy(votes)


@pytest.mark.parametrize("num_queries, num_train, k", [(7, 60, 20), (1030, 30, 20), (5, 12, 20)])
def test_knn_votes_match_a_brute_force_loop(num_queries, num_train, k):
    # 1030 queries: more than one chunk of 1024; 12 training vectors: fewer than k, all of them vote
    generator = torch.Generator().manual_seed(num_queries)
    train_features = torch.randn(num_train, 6, generator=generator) * 3  # norms differ: normalisation matters
    train_labels = torch.randint(0, 4, (num_train,), generator=generator)
    queries = torch.randn(num_queries, 6, generator=generator)
    votes = train_mod.knn_votes(train_features, train_labels, queries, 4, k=k, temperature=0.07)
    naive = brute_force_knn_votes(train_features, train_labels, queries, 4, k, 0.07)
    torch.testing.assert_close(votes.double(), naive, rtol=1e-4, atol=0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def knn_worker(rank, world_size, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.save(toy_knn(rank, world_size), f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def toy_knn(rank, world_size):
    """kNN accuracy of a random resnet_toy on small toy splits (13 val images: shards of unequal length)."""
    transform = data.linear_val_transform(*data.TOY_EVAL_SIZES)
    train_set = data.ToyShapes("train", num_images=40, transform=transform)
    val_set = data.ToyShapes("val", num_images=13, transform=transform)
    torch.manual_seed(0)
    backbone = build_backbone("resnet_toy")
    return train_mod.knn_accuracy(backbone, train_set, val_set, 8, 0, torch.device("cpu"), rank, world_size)


def test_knn_accuracy_is_a_brute_force_knn_and_two_processes_give_the_one_process_result(tmp_path):
    top1, top5 = toy_knn(0, 1)
    # brute force: the same backbone's pooled features, image by image, then the loop above
    transform = data.linear_val_transform(*data.TOY_EVAL_SIZES)
    torch.manual_seed(0)
    backbone = build_backbone("resnet_toy").eval()
    with torch.no_grad():
        def features(split, n):
            dataset = data.ToyShapes(split, num_images=n, transform=transform)
            return (torch.cat([backbone(dataset[i][0][None]).mean(dim=(2, 3)) for i in range(n)]),
                    torch.tensor([dataset.label(i) for i in range(n)]))
        (train_features, train_labels), (val_features, val_labels) = features("train", 40), features("val", 13)
    votes = brute_force_knn_votes(train_features, train_labels, val_features, 8, 20, 0.07)
    ranked = votes.argsort(dim=1, descending=True)
    assert top1 == pytest.approx(100 * (ranked[:, 0] == val_labels).double().mean().item())
    assert top5 == pytest.approx(100 * (ranked[:, :5] == val_labels[:, None]).any(1).double().mean().item())

    mp.spawn(knn_worker, args=(2, free_port(), str(tmp_path / "rank")), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(f"{tmp_path / 'rank'}.{rank}") == pytest.approx((top1, top5))


def test_eval_linear_knn_writes_its_results(tmp_path):
    args = ["--dataset", "toy", "--arch", "resnet_toy", "--pretrained", "none", "--device", "cpu", "--knn",
            "--toy-images", "40", "--toy-val-images", "13", "--batch-size", "8", "--num-workers", "0",
            "--exp-dir", str(tmp_path)]
    results = eval_linear.main(args)
    assert (results["knn_top1"], results["knn_top5"]) == pytest.approx(toy_knn(0, 1))
    assert json.loads((tmp_path / "results.json").read_text())["knn_top1"] == results["knn_top1"]
