"""
Linear semantic segmentation on a pretrained backbone (paper appendix "Linear Segmentation";
docs/evaluation.md), and with --knn, dense nearest-neighbour retrieval (no training; below).

Head: ResNet -> the last map (B, C, S/32, S/32); ConvNeXt -> the four stage outputs bilinearly
upsampled to the first stage's resolution (S/4; S/2 for convnext_toy) and concatenated (B, ΣC_i, ·, ·).
Then BatchNorm -> 1x1 conv to the classes -> bilinear upsampling to the input (B, K, S, S), trained
with per-pixel cross-entropy (label 255 ignored). AdamW, iteration-based: linear warm-up then the
poly schedule lr·(1 - t/T)^0.9. The paper's frozen protocol for ConvNeXts takes the best of the
learning rates {1e-3, 8e-4, 3e-4, 1e-4, 8e-5} (AdamW): with a frozen backbone they are all trained in
one pass, one head per learning rate on the same features. Inference: sliding windows (crop 512, stride
341), logits averaged where windows overlap, resized to the label's resolution; mIoU from the confusion
matrix. ResNets get the same head, optimiser and learning rates on the undilated stride-32 map; the
paper's ResNet-50 protocol differs (a dilated backbone, a (2048, 32, 32) map of a 512-px image, SGD with
learning rates {0.1, 0.05, 0.03, 0.02, 0.01}): README, "The paper and the reference code".

    python eval_seg.py --dataset voc --data-dir /data/VOC --arch convnext_small \
        --pretrained exp/backbone.pth --exp-dir exp/seg_voc
    python eval_seg.py --dataset toy --arch resnet_toy --pretrained exp/toy/backbone.pth \
        --device cpu --cache-features --exp-dir exp/toy_seg
    torchrun --nproc_per_node=4 eval_seg.py ...      # DDP, --batch-size is global
    python eval_seg.py --dataset toy --arch resnet_toy --pretrained exp/toy/backbone.pth \
        --device cpu --knn --exp-dir exp/toy_seg_knn     # dense nearest-neighbour retrieval

Datasets: voc (VOCdevkit/VOC2012, the SegmentationClassAug training set when present), ade20k
(ADEChallengeData2016), cityscapes (leftImg8bit + gtFine, 19 train ids), toy (ToyShapes masks,
9 classes). EXP_DIR/seg.pth is written after every pass over the training data (resume: run the same
command again); EXP_DIR/results.json gets the best learning rate's mIoU and per-class IoU.

--knn (Balazevic et al., NeurIPS 2023, "Towards In-context Scene Understanding"): the cells of the
backbone's last map on the training crops, L2-normalised, with the fraction of their pixels in each class,
are the memory (--memory-size // images of each image); each cell of a val image takes the label fractions of its
--k most cosine-similar memory cells, weighted by softmax(cosine / --temperature); the scores are
upsampled to the label and the argmax scored as above. results.json gets its mIoU. train.py --eval-freq
runs the same probe during pretraining.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import data
from model import BackboneAndHeads, SweepHeads, build_backbone, is_resnet, unwrap
from train import (AMP_DTYPES, add_common_eval_arguments, all_reduce_sum, autocast, check_eval_arguments,
                   check_full_batch, eta_string, finish_evaluation, gather_shards, log_command, resume_evaluation,
                   run_script, save_atomic, setup_run, sweep_param_groups, sweep_step, sync_batchnorm, wrap_ddp)

FROZEN_LRS = [1e-3, 8e-4, 3e-4, 1e-4, 8e-5]
# --knn, dense nearest-neighbour retrieval (Balazevic et al., NeurIPS 2023): k = 30 neighbours and a memory of
# 1024 x 10^4 patches, as that paper evaluates; the softmax temperature 0.02 is that of its open
# reproduction (Pariza, Salehi & Asano, 2024, "Hummingbird Evaluation for vision encoders")
DENSE_KNN_K, DENSE_KNN_TEMPERATURE = 30, 0.02
FINETUNE_LR = 1e-4  # the paper's fine-tuning sweep is {1e-4, 8e-5, 3e-5, 1e-5, 8e-6, 3e-6, 1e-6}, one run each
# per dataset: short side of the images before random rescaling, crop size, iterations, warm-up, and the
# --knn memory's size in patches (toy: 12 of the 64 cells of each of 4000 images, docs/monitoring.md)
DATASET_DEFAULTS = {
    "voc": dict(base_size=512, crop_size=512, iters=40_000, warmup_iters=1500, memory_size=10_240_000),
    "ade20k": dict(base_size=512, crop_size=512, iters=160_000, warmup_iters=1500, memory_size=10_240_000),
    "cityscapes": dict(base_size=1024, crop_size=512, iters=40_000, warmup_iters=1500, memory_size=10_240_000),
    "toy": dict(base_size=64, crop_size=64, iters=500, warmup_iters=50, memory_size=51_200),  # 64-px images
}


def get_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description="Linear segmentation on a pretrained backbone (paper protocol by default). With "
        "--weights freeze, every --lr value trains its own head in the same pass. Unset size and "
        "schedule flags take the dataset's default (voc/ade20k: 512/512, cityscapes: 1024/512, "
        "toy: 64/64; iterations 40k/160k/40k/500, warm-up 1500, toy 50).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = parser.add_argument
    # data
    a("--dataset", default="voc", choices=list(DATASET_DEFAULTS), help="segmentation dataset")
    a("--data-dir", default=None, help="dataset root (not for --dataset toy)")
    a("--toy-images", type=int, default=data.ToyShapes.SPLITS["train"][1],
      help="ToyShapes training images (val: a quarter)")
    a("--base-size", type=int, default=None, help="images are resized to this short side (x0.5-2 in training)")
    a("--crop-size", type=int, default=None, help="training crop and sliding-window size")
    a("--stride", type=int, default=None, help="sliding-window stride (default 2/3 of --crop-size: 341 for 512)")
    # optimisation
    a("--iters", type=int, default=None, help="training iterations")
    a("--warmup-iters", type=int, default=None, help="linear warm-up iterations")
    a("--batch-size", type=int, default=16, help="global batch size, over all processes")
    a("--lr", type=float, nargs="+", default=None,
      help=f"learning rate(s); several values = independent heads trained in one pass (freeze only); "
      f"with --weights finetune, the backbone's too. Default: {FROZEN_LRS} frozen, {FINETUNE_LR} fine-tuned")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    a("--poly-power", type=float, default=0.9, help="lr = peak x (1 - t/T)^power after the warm-up")
    a("--cache-features", action="store_true",
      help="frozen only: compute the backbone's stage maps of the training images once (short side "
      "--base-size, centre crop, no random rescale/crop/flip; stored in float16 in memory) and "
      "train the heads on them: exact for a fixed backbone, but without the training augmentation; "
      "meant for small data (toy, CPU)")
    # dense nearest-neighbour retrieval
    a("--knn", action="store_true",
      help="dense nearest-neighbour retrieval instead of linear heads, no training (Balazevic et al. 2023): "
      "a memory of the training crops' patches (the cells of the backbone's last map, L2-normalised, each "
      "with the fraction of its pixels in each class); every val patch takes the softmax-weighted label "
      "fractions of its --k most cosine-similar memory patches; mIoU of the upsampled argmax")
    a("--k", type=int, default=DENSE_KNN_K, help="--knn: neighbours per val patch (Balazevic et al. 2023)")
    a("--temperature", type=float, default=DENSE_KNN_TEMPERATURE,
      help="--knn: softmax temperature on the neighbours' cosine similarities")
    a("--memory-size", type=int, default=None,
      help="--knn: memory size in patches: memory-size // images of each training image (at least one), a seeded "
      "draw (default: 1024 x 10^4 as Balazevic et al. 2023; toy 51200)")
    add_common_eval_arguments(parser, "seg")
    args = parser.parse_args(argv)

    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.stride = args.stride or max(1, args.crop_size * 2 // 3)
    if args.lr is None:
        args.lr = FROZEN_LRS if args.weights == "freeze" else [FINETUNE_LR]
    check_eval_arguments(parser, args, "--lr", args.lr)
    if args.knn and args.weights == "finetune":
        parser.error("--knn trains nothing: it takes the backbone as it is (no --weights finetune)")
    if args.k < 1 or args.temperature <= 0 or args.memory_size < 1:
        parser.error("--k and --memory-size must be at least 1, --temperature positive")
    return args


# -----------------------------------------------------------------------------
# Metrics

def confusion_matrices(preds, label, num_classes, ignore_index=data.IGNORE_LABEL):
    """(H, K, K) counts of every head h: rows = true class, columns = the class preds[h] predicts, pixels labelled
    ignore_index (or anything else outside 0..K-1) left out. preds (H, ...) and label (...) integer tensors. One
    index_add_ for all heads, with no host synchronisation on a GPU (boolean indexing and bincount would wait
    for the GPU to learn the size of their output)."""
    num_heads, cells = len(preds), num_classes * num_classes
    label = label.long().flatten()  # (P,)
    # head h, true class t, predicted class p -> bin h*K*K + t*K + p; ignored pixels -> one extra bin
    index = torch.arange(num_heads, device=label.device)[:, None] * cells + label * num_classes + preds.flatten(1)
    ignored = (label == ignore_index) | (label < 0) | (label >= num_classes)  # never another head's bins
    index = torch.where(ignored, num_heads * cells, index).flatten()  # (H*P,)
    counts = torch.zeros(num_heads * cells + 1, dtype=torch.long, device=label.device)
    counts.index_add_(0, index, torch.ones_like(index))
    return counts[:-1].view(num_heads, num_classes, num_classes)


def iou_per_class(confusion):
    """IoU_k = TP / (TP + FP + FN) = cm[k,k] / (row_k + col_k - cm[k,k]); NaN for a class that is
    neither in the labels nor predicted (left out of the mean)."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))


def mean_iou(confusion):
    return iou_per_class(confusion).nanmean().item()


# -----------------------------------------------------------------------------
# Model: backbone -> feature map -> one (BatchNorm, 1x1 conv) head per learning rate -> upsampling

def stage_features(stages, multi_stage):
    """ResNet: the last map. ConvNeXt: all four maps, bilinearly upsampled to the first one's
    size and concatenated: (B, C_1 + C_2 + C_3 + C_4, h_1, w_1)."""
    if not multi_stage:
        return stages[-1].float()
    size = stages[0].shape[-2:]
    return torch.cat([F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in stages], 1)


def seg_heads(in_channels, num_classes, num_lrs, seed):
    """One BatchNorm + 1x1 conv head per learning rate on the same (B, C, h, w) map -> logits (H, B, K, h, w)."""
    return SweepHeads(lambda: nn.Sequential(nn.BatchNorm2d(in_channels),
                                            nn.Conv2d(in_channels, num_classes, kernel_size=1)), num_lrs, seed)


class SegModel(BackboneAndHeads):
    """images (B, 3, S, S) -> logits (H, B, K, S, S); with `stages` given (cached stage maps), the
    backbone is skipped and the logits are upsampled to `size`."""

    def forward(self, images=None, stages=None, size=None):
        if stages is None:
            stages = self.backbone_stages(images)
            size = images.shape[-2:]
        multi_stage = not is_resnet(self.backbone.arch)
        logits = self.heads(stage_features(stages, multi_stage))  # (H, B, K, h, w)
        h, b, k = logits.shape[:3]
        logits = F.interpolate(logits.flatten(0, 1), size=size, mode="bilinear", align_corners=False)
        return logits.unflatten(0, (h, b))  # (H, B, K, S, S)


def window_starts(length, crop, stride):
    """Start offsets of the windows along one side: every `stride`, the last one flush with the end;
    a single window covering the side when it is not longer than the crop."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


@torch.no_grad()
def slide_inference(predict, image, crop, stride):
    """Logits of a whole image from windows of crop x crop (smaller when the image is): predict maps
    a window (B, 3, h, w) to logits (..., h, w); overlapping logits are averaged. image (B, 3, H, W)
    -> (..., H, W)."""
    height, width = image.shape[-2:]
    total = count = None
    for top in window_starts(height, crop, stride):
        for left in window_starts(width, crop, stride):
            window = image[..., top:top + crop, left:left + crop]
            logits = predict(window)
            if total is None:
                total = logits.new_zeros(logits.shape[:-2] + (height, width))
                count = logits.new_zeros((height, width))
            total[..., top:top + window.shape[-2], left:left + window.shape[-1]] += logits
            count[top:top + window.shape[-2], left:left + window.shape[-1]] += 1
    return total / count


@torch.no_grad()
def evaluate(model, dataset, num_classes, crop, stride, num_workers, device, rank, world_size):
    """Confusion matrices (H, K, K) of every head over the whole dataset (one image at a time: the
    images' sizes differ): sliding-window logits, resized to the label, argmax."""
    model.eval()
    loader = DataLoader(data.shard(dataset, rank, world_size), batch_size=1, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    confusion = torch.zeros(len(model.heads.heads), num_classes, num_classes, dtype=torch.long, device=device)
    for image, label in loader:
        logits = slide_inference(model, image.to(device, non_blocking=True), crop, stride)  # (H, 1, K, h, w)
        label = label.to(device, non_blocking=True)  # (1, H0, W0)
        logits = F.interpolate(logits.flatten(0, 1), size=label.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrices(logits.argmax(1), label[0], num_classes)  # argmax: (H, H0, W0)
    return all_reduce_sum(confusion, world_size)


@torch.no_grad()
def compute_stage_maps(backbone, dataset, batch_size, device, amp):
    """The backbone's four stage maps of every training crop (the backbone under --amp), float16 on the
    CPU, and the labels."""
    backbone.eval()
    stages, labels = [[] for _ in range(4)], []
    for images, targets in DataLoader(dataset, batch_size=batch_size):
        with autocast(device, amp):
            maps = backbone.forward_stages(images.to(device))
        for store, m in zip(stages, maps):
            store.append(m.half().cpu())
        labels.append(targets)
    return [torch.cat(store) for store in stages], torch.cat(labels)


def learning_rate_scale(step, total_steps, warmup_steps, power):
    """Linear warm-up from 0, times the poly decay (1 - t/T)^power."""
    warmup = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    return warmup * (1 - step / total_steps) ** power


# -----------------------------------------------------------------------------
# Dense nearest-neighbour retrieval (--knn): no training at all (Balazevic et al., NeurIPS 2023, "Towards
# In-context Scene Understanding", the "Hummingbird" evaluation). A memory of (patch feature, patch label)
# pairs from the training images; each val patch takes the labels of its k nearest memory patches.

def patch_label_distributions(labels, grid_size, num_classes):
    """labels (B, S, S) -> (B, h*w, K): for each cell of an h x w grid over the image (the feature map's
    cells), the fraction of its pixels labelled with each class; pixels labelled 255 (or anything outside
    0..K-1) count for no class, so a patch's fractions sum to its labelled share (0 for a patch of ignored
    pixels only: it stays in the memory and adds nothing to the labels it is retrieved for). When S is not
    a multiple of h, the cells are adaptive pooling's even split of the image, close to each cell's own."""
    labels = torch.where((labels >= 0) & (labels < num_classes), labels, num_classes)  # ignored -> class K
    one_hot = torch.zeros(len(labels), num_classes + 1, *labels.shape[1:], device=labels.device)
    one_hot.scatter_(1, labels[:, None], 1.0)  # (B, K+1, S, S), built in float32 (F.one_hot: int64)
    fractions = F.adaptive_avg_pool2d(one_hot, grid_size)[:, :num_classes]  # (B, K, h, w)
    return fractions.flatten(2).transpose(1, 2)  # (B, h*w, K)


def memory_cells(num_images, num_cells, memory_size, seed):
    """Which cells of each training image go into the memory: the same number
    m = memory_size // num_images of every image (all of them when they fit, at least one), a seeded draw
    per image, independent of the number of processes. Returns (num_images, m) cell indices, or None (all)."""
    per_image = max(1, memory_size // num_images)
    if per_image >= num_cells:
        return None
    draws = torch.rand(num_images, num_cells, generator=torch.Generator().manual_seed(seed))
    return draws.argsort(dim=1)[:, :per_image].sort(dim=1).values  # (N, m)


@torch.no_grad()
def build_memory(backbone, dataset, num_classes, memory_size, seed, batch_size, num_workers, device, rank,
                 world_size, amp="none"):
    """The memory, on every rank: L2-normalised patch features (M, C), the cells of the backbone's last map
    on the training crops, and their label distributions (M, K). Each rank computes its shard of the
    images; the kept cells are gathered in dataset order, so any number of processes builds the same one."""
    backbone.eval()
    with autocast(device, amp):  # the map's size and width, on every rank (a shard may be empty)
        channels, height, width = backbone(dataset[0][0][None].to(device)).shape[1:]
    cells = memory_cells(len(dataset), height * width, memory_size, seed)
    rows = [torch.empty(0, (channels + num_classes) * (height * width if cells is None else cells.shape[1]),
                        device=device)]
    loader = DataLoader(data.shard(dataset, rank, world_size), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    done = 0  # images of this shard so far: image index = rank + W * (done + i)
    for images, labels in loader:
        with autocast(device, amp):
            maps = backbone(images.to(device, non_blocking=True))  # (b, C, h, w)
        features = F.normalize(maps.float().flatten(2).transpose(1, 2), dim=2)  # (b, h*w, C)
        fractions = patch_label_distributions(labels.to(device, non_blocking=True), (height, width), num_classes)
        patches = torch.cat([features, fractions], dim=2)  # (b, h*w, C + K)
        if cells is not None:
            index = cells[rank + world_size * torch.arange(done, done + len(images))].to(device)  # (b, m)
            patches = patches.gather(1, index[..., None].expand(-1, -1, patches.shape[2]))  # (b, m, C + K)
        rows.append(patches.flatten(1))
        done += len(images)
    memory = gather_shards(torch.cat(rows), len(dataset), world_size).view(-1, channels + num_classes)
    return memory[:, :channels].contiguous(), memory[:, channels:].contiguous()  # (M, C), (M, K)


def retrieve_labels(queries, memory_features, memory_labels, k, temperature):
    """Label distributions (Q, K) of L2-normalised query patches (Q, C): the label distributions of their
    k most cosine-similar memory patches, weighted by softmax(cosine / temperature) over those k. Queries
    go in chunks, so the (chunk, M) similarities stay under 2^26 numbers (256 MB)."""
    predicted = []
    for chunk in queries.split(max(1, 2 ** 26 // len(memory_features))):
        similarity, neighbours = (chunk @ memory_features.T).topk(min(k, len(memory_features)), dim=1)  # (q, k)
        weights = F.softmax(similarity / temperature, dim=1)
        predicted.append((weights[..., None] * memory_labels[neighbours]).sum(dim=1))  # (q, K)
    return torch.cat(predicted)


@torch.no_grad()
def dense_knn_confusion(backbone, memory, dataset, num_classes, k, temperature, num_workers, device, rank,
                        world_size, amp="none"):
    """Confusion matrix (K, K) of dense retrieval over the val set: the whole image in one forward, every
    cell of its last map labelled by retrieve_labels, the (K, h, w) scores upsampled bilinearly to the
    label's resolution, argmax (class 0 for a cell whose k neighbours all have no labelled pixel). Each rank
    scores its shard; the counts are summed. The val images come in many sizes: no cuDNN autotuning here
    (train.py turns it on for its fixed training shapes), which would tune again for every new size."""
    backbone.eval()
    loader = DataLoader(data.shard(dataset, rank, world_size), batch_size=1, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        for image, label in loader:
            with autocast(device, amp):
                maps = backbone(image.to(device, non_blocking=True))  # (1, C, h, w)
            queries = F.normalize(maps.float()[0].flatten(1).T, dim=1)  # (h*w, C)
            scores = retrieve_labels(queries, *memory, k, temperature).T.reshape(1, num_classes, *maps.shape[-2:])
            label = label.to(device, non_blocking=True)  # (1, H0, W0)
            scores = F.interpolate(scores, size=label.shape[-2:], mode="bilinear", align_corners=False)
            confusion += confusion_matrices(scores.argmax(1), label[0], num_classes)[0]
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return all_reduce_sum(confusion, world_size)


def dense_knn_datasets(dataset, data_dir, toy_images, toy_val_images=None, crop_size=None, base_size=None):
    """(memory images, val images) of dense retrieval: the training images as the centre crops of
    --cache-features (short side base_size, crop_size x crop_size), the val images as the linear protocol
    scores them (short side base_size, labels at their own resolution). Sizes default to the dataset's;
    the toy val split has toy_val_images images (default: a quarter of toy_images, as eval_seg.py's)."""
    crop_size = crop_size or DATASET_DEFAULTS[dataset]["crop_size"]
    base_size = base_size or DATASET_DEFAULTS[dataset]["base_size"]
    train_transform = data.SegTrainTransform(crop_size, base_size, augment=False)
    if dataset == "toy":
        toy_val_images = toy_val_images or max(1, toy_images // 4)
    return (data.build_seg_dataset(dataset, data_dir, "train", train_transform, toy_images),
            data.build_seg_dataset(dataset, data_dir, "val", data.SegValTransform(base_size), toy_val_images))


def dense_knn_miou(backbone, memory_set, val_set, k, temperature, memory_size, seed, batch_size, num_workers,
                   device, rank, world_size, amp="none"):
    """mIoU (%) of dense nearest-neighbour retrieval, per-class IoU (%), and the memory's size in patches."""
    num_classes = len(memory_set.classes)
    memory = build_memory(backbone, memory_set, num_classes, memory_size, seed, batch_size, num_workers, device,
                          rank, world_size, amp)
    confusion = dense_knn_confusion(backbone, memory, val_set, num_classes, k, temperature, num_workers, device,
                                    rank, world_size, amp)
    return 100 * mean_iou(confusion), (100 * iou_per_class(confusion)).tolist(), len(memory[0])


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_arguments(argv)
    rank, world_size, device, log = setup_run(args, tf32=True)
    per_rank_batch = args.batch_size // world_size
    log_command(args, log)
    if args.knn:
        return run_dense_knn(args, per_rank_batch, rank, world_size, device, log)

    train_transform = data.SegTrainTransform(args.crop_size, args.base_size, augment=not args.cache_features)
    train_set = data.build_seg_dataset(args.dataset, args.data_dir, "train", train_transform, args.toy_images)
    val_set = data.build_seg_dataset(args.dataset, args.data_dir, "val", data.SegValTransform(args.base_size),
                                     max(1, args.toy_images // 4))
    num_classes = len(train_set.classes)
    check_full_batch(train_set, args.batch_size)

    torch.manual_seed(args.seed)  # identical weights on every rank
    backbone = build_backbone(args.arch, args.pretrained).to(device)
    with torch.no_grad():  # channels of the head's input, from a dry run
        probe = backbone.eval().forward_stages(torch.zeros(1, 3, 64, 64, device=device))
    in_channels = sum(m.shape[1] for m in probe) if not is_resnet(args.arch) else probe[-1].shape[1]
    heads = seg_heads(in_channels, num_classes, len(args.lr), args.seed).to(device)
    model = SegModel(backbone, heads, frozen=args.weights == "freeze", amp_dtype=AMP_DTYPES[args.amp])
    model = sync_batchnorm(model, device, world_size)  # the heads' BatchNorm: the global batch's statistics
    groups = sweep_param_groups(heads.heads, args.lr)
    if args.weights == "finetune":
        groups.append(dict(params=list(backbone.parameters()), lr=args.lr[0], peak_lr=args.lr[0]))
    optimizer = torch.optim.AdamW(groups, lr=args.lr[0], weight_decay=args.weight_decay)
    # fine-tuning in fp16: loss scaling (a frozen backbone's heads train on float32 maps without it)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16" and args.weights == "finetune")

    ckpt_path = os.path.join(args.exp_dir, "seg.pth")
    start_epoch = step = 0
    ckpt = resume_evaluation(ckpt_path, model, optimizer, scaler, "--lr", args.lr, log)
    if ckpt is not None:
        start_epoch, step = ckpt["epoch"], ckpt["step"]

    if args.cache_features:
        log("computing the training stage maps once (backbone frozen, centre crops)")
        cached_stages, cached_labels = compute_stage_maps(backbone, train_set, per_rank_batch, device, args.amp)
    trainable = model  # with cached stage maps, its forward(stages=...) skips the backbone
    if world_size > 1:
        trainable = wrap_ddp(trainable, device)

    start_step, start_time = step, time.time()
    epoch = start_epoch
    while step < args.iters:
        data.seed_process(args.seed, epoch, rank, worker_id=0)  # an epoch replays exactly on resume
        model.train()
        if args.cache_features:
            batches = (([m[idx].to(device, non_blocking=True) for m in cached_stages], cached_labels[idx]) for idx in
                       data.cached_batches(len(train_set), per_rank_batch, epoch, args.seed, rank, world_size))
        else:
            batches = data.make_loader(train_set, per_rank_batch, args.num_workers, epoch, seed=args.seed,
                                       pin_memory=device.type == "cuda")
        for inputs, labels in batches:
            if step >= args.iters:
                break
            scale = learning_rate_scale(step, args.iters, args.warmup_iters, args.poly_power)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * scale
            labels = labels.to(device, non_blocking=True)
            if args.cache_features:
                logits = trainable(stages=inputs, size=labels.shape[-2:])  # (H, B, K, S, S)
            else:
                logits = trainable(inputs.to(device, non_blocking=True))
            losses = torch.stack([F.cross_entropy(head_logits, labels, ignore_index=data.IGNORE_LABEL)
                                  for head_logits in logits])  # (H,)
            sweep_step(optimizer, scaler, losses)
            step += 1
            if step % args.log_freq == 0 or step == args.iters:
                best = int(losses.argmin())
                log(f"[{step}/{args.iters}] epoch {epoch} eta {eta_string(start_time, step, start_step, args.iters)} "
                    f"loss (lr {args.lr[best]:g}, lowest) {losses[best].item():.4f} lr-scale {scale:.3f}")
        epoch += 1
        if rank == 0:
            os.makedirs(args.exp_dir, exist_ok=True)
            save_atomic(dict(epoch=epoch, step=step, model=unwrap(model).state_dict(),
                             optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), lr=args.lr,
                             args=vars(args)), ckpt_path)

    log("evaluating (sliding windows)")
    confusion = evaluate(unwrap(model), val_set, num_classes, args.crop_size, args.stride,
                         args.num_workers, device, rank, world_size)
    mious = [mean_iou(c) for c in confusion]
    for lr, miou in zip(args.lr, mious):
        log(f"lr {lr:g}: mIoU {100 * miou:.2f}")
    best = int(np.nanargmax(mious))
    per_class = iou_per_class(confusion[best]).tolist()
    results = dict(miou=100 * mious[best], best_lr=args.lr[best],
                   per_class_iou={name: (None if math.isnan(v) else 100 * v)
                                  for name, v in zip(train_set.classes, per_class)},
                   per_lr=[dict(lr=lr, miou=100 * m) for lr, m in zip(args.lr, mious)],
                   arch=args.arch, pretrained=args.pretrained, weights=args.weights, dataset=args.dataset,
                   iters=args.iters, seed=args.seed)
    finish_evaluation(results, f"best lr {results['best_lr']:g}: mIoU {results['miou']:.2f}", args.exp_dir,
                      rank, world_size, log)
    return results


def run_dense_knn(args, batch_size, rank, world_size, device, log):
    """eval_seg.py --knn: dense retrieval with the backbone as it is; results.json gets its mIoU."""
    memory_set, val_set = dense_knn_datasets(args.dataset, args.data_dir, args.toy_images,
                                             crop_size=args.crop_size, base_size=args.base_size)
    backbone = build_backbone(args.arch, args.pretrained).to(device)
    log(f"dense nearest-neighbour retrieval: memory of {max(1, args.memory_size // len(memory_set))} patches (or "
        f"all, if fewer) of each of {len(memory_set)} training images, k={args.k}, T={args.temperature}, "
        f"{len(val_set)} val images")
    start = time.time()
    miou, per_class, memory_patches = dense_knn_miou(
        backbone, memory_set, val_set, args.k, args.temperature, args.memory_size, args.seed, batch_size,
        args.num_workers, device, rank, world_size, args.amp)
    results = dict(miou=miou, protocol="dense nearest-neighbour retrieval", k=args.k, temperature=args.temperature,
                   memory_patches=memory_patches, seconds=time.time() - start,
                   per_class_iou={name: (None if math.isnan(v) else v)
                                  for name, v in zip(memory_set.classes, per_class)},
                   arch=args.arch, pretrained=args.pretrained, dataset=args.dataset, seed=args.seed)
    finish_evaluation(results, f"dense kNN (k={args.k}, T={args.temperature}, {memory_patches} memory patches): "
                      f"mIoU {miou:.2f}", args.exp_dir, rank, world_size, log)
    return results


if __name__ == "__main__":
    run_script(main, "eval_seg.py")
