"""
Linear semantic segmentation on a pretrained backbone (paper appendix "Linear Segmentation";
docs/evaluation.md).

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

Datasets: voc (VOCdevkit/VOC2012, the SegmentationClassAug training set when present), ade20k
(ADEChallengeData2016), cityscapes (leftImg8bit + gtFine, 19 train ids), toy (ToyShapes masks,
9 classes). EXP_DIR/seg.pth is written after every pass over the training data (resume: run the same
command again); EXP_DIR/results.json gets the best learning rate's mIoU and per-class IoU.
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
                   check_full_batch, eta_string, finish_evaluation, log_command, resume_evaluation, run_script,
                   save_atomic, setup_run, sweep_param_groups, sweep_step, sync_batchnorm, wrap_ddp)

FROZEN_LRS = [1e-3, 8e-4, 3e-4, 1e-4, 8e-5]
FINETUNE_LR = 1e-4  # the paper's fine-tuning sweep is {1e-4, 8e-5, 3e-5, 1e-5, 8e-6, 3e-6, 1e-6}, one run each
# per dataset: short side of the images before random rescaling, crop size, iterations, warm-up
DATASET_DEFAULTS = {
    "voc": dict(base_size=512, crop_size=512, iters=40_000, warmup_iters=1500),
    "ade20k": dict(base_size=512, crop_size=512, iters=160_000, warmup_iters=1500),
    "cityscapes": dict(base_size=1024, crop_size=512, iters=40_000, warmup_iters=1500),
    "toy": dict(base_size=64, crop_size=64, iters=500, warmup_iters=50),  # the toy images are 64 px
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
    add_common_eval_arguments(parser, "seg")
    args = parser.parse_args(argv)

    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.stride = args.stride or max(1, args.crop_size * 2 // 3)
    if args.lr is None:
        args.lr = FROZEN_LRS if args.weights == "freeze" else [FINETUNE_LR]
    check_eval_arguments(parser, args, "--lr", args.lr)
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

def main(argv=None):
    args = get_arguments(argv)
    rank, world_size, device, log = setup_run(args, tf32=True)
    per_rank_batch = args.batch_size // world_size
    log_command(args, log)

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


if __name__ == "__main__":
    run_script(main, "eval_seg.py")
