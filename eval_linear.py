"""
Linear classification on a pretrained backbone (paper appendix "Linear Evaluation"; docs/evaluation.md).

A linear layer on the average-pooled final map y⊕ (B, C) is trained with SGD (momentum 0.9), batch 256,
100 epochs, cosine learning-rate decay; train images: random resized crop 224 (bilinear, as in the
reference evaluation) + flip, val images: resize 256 + centre crop 224, no colour augmentation. The
paper reports the best of the learning rates {30, 10, 1, 0.3, 0.1, 0.03, 0.01}, and the reference
README uses 0.02 for ResNets (0.3 for ConvNeXts): with a frozen backbone all eight are trained *in the
same pass*, one linear head per learning rate fed by one backbone forward (each head has its own SGD
parameter group, and its own loss, so the heads never interact), and the best head on val is reported.

    python eval_linear.py --data-dir /path/to/imagenet --pretrained exp/backbone.pth \
        --arch convnext_small --exp-dir exp/linear
    python eval_linear.py --dataset toy --arch resnet_toy --pretrained exp/toy/backbone.pth \
        --device cpu --cache-features --exp-dir exp/toy_linear
    python eval_linear.py --dataset toy --arch resnet_toy --pretrained exp/toy/backbone.pth \
        --device cpu --knn --exp-dir exp/toy_knn        # weighted kNN, no training
    torchrun --nproc_per_node=8 eval_linear.py ...      # DDP, --batch-size is global

Every head is evaluated on val after every epoch. EXP_DIR/linear.pth is written every epoch (with those
accuracies) and a run started again with the same command resumes from it; EXP_DIR/results.json gets
top1/top5 of the best learning rate after the last epoch (no choice of an epoch on val: the honest
number) and every learning rate's accuracies, and, under their own names, the best epoch's top-1
(`best_epoch_top1`, `best_epoch`, `best_epoch_lr`; per head in `per_lr`): the number the reference
code reports, to compare with the paper's.
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import data
from model import BackboneAndHeads, SweepHeads, build_backbone, unwrap
from train import (AMP_DTYPES, KNN_K, KNN_TEMPERATURE, add_common_eval_arguments, all_reduce_sum,
                   check_eval_arguments, check_full_batch, classification_datasets, compute_features, eta_string,
                   finish_evaluation, knn_accuracy, log_command, resume_evaluation, run_script, save_atomic,
                   setup_run, sweep_param_groups, sweep_step, sync_batchnorm, wrap_ddp)

PAPER_LRS = [30.0, 10.0, 1.0, 0.3, 0.1, 0.03, 0.02, 0.01]  # the paper's seven, and the reference README's 0.02
# (resize, crop) of the eval transforms: ImageNet's 256/224, and the toy data's data.TOY_EVAL_SIZES
DEFAULT_SIZES = {"imagenet": (256, 224), "toy": data.TOY_EVAL_SIZES}


def get_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description="Linear classification on a pretrained backbone (paper protocol by default). "
        "With --weights freeze, every --lr-head value trains its own linear head in the same pass.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = parser.add_argument
    # data
    a("--dataset", default="imagenet", choices=["imagenet", "toy"],
      help="an ImageFolder tree (DATA_DIR/{train,val}/<class>/<image>) or the built-in ToyShapes")
    a("--data-dir", default=None, help="dataset root holding train/ and val/ (for --dataset imagenet)")
    a("--toy-images", type=int, default=data.ToyShapes.SPLITS["train"][1], help="ToyShapes training images")
    a("--toy-val-images", type=int, default=data.ToyShapes.SPLITS["val"][1], help="ToyShapes validation images")
    a("--size", type=int, default=None,
      help=f"crop size of the train and val transforms (default 224, or {data.TOY_EVAL_SIZES[1]} with --dataset toy)")
    a("--resize", type=int, default=None,
      help="val images are resized to this before the centre crop (default 256, or "
      f"{data.TOY_EVAL_SIZES[0]} with --dataset toy)")
    # evaluation
    a("--knn", action="store_true",
      help=f"instead of linear heads: weighted kNN (k={KNN_K}, temperature {KNN_TEMPERATURE}) on the pooled, "
      "L2-normalised features of the val images (val transform), the training images (val transform too) "
      "as the memory; no training")
    # optimisation
    a("--epochs", type=int, default=100, help="passes over the training set (cosine decay to 0)")
    a("--batch-size", type=int, default=256, help="global batch size, over all processes")
    a("--lr-head", type=float, nargs="+", default=PAPER_LRS,
      help="learning rate(s) of the linear head; several values = a sweep of independent heads "
      "trained in one pass (freeze only); the best on val is reported")
    a("--lr-backbone", type=float, default=None, help="backbone learning rate (required with --weights finetune)")
    a("--weight-decay", type=float, default=1e-6, help="SGD weight decay (momentum 0.9)")
    a("--cache-features", action="store_true",
      help="frozen only: compute the pooled features of the training images once (val transform, "
      "no random crops/flips), then train the heads on them: exact for a fixed backbone but "
      "without the protocol's augmentation; meant for small data (toy, CPU); the features of "
      "the whole training and val sets are kept in memory")
    add_common_eval_arguments(parser, "linear")
    args = parser.parse_args(argv)

    resize, size = DEFAULT_SIZES[args.dataset]
    args.resize = resize if args.resize is None else args.resize
    args.size = size if args.size is None else args.size
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.knn and args.weights == "finetune":
        parser.error("--knn evaluates the backbone as it is: it takes no --weights finetune")
    if args.weights == "finetune" and args.lr_backbone is None:
        parser.error("--weights finetune needs --lr-backbone")
    check_eval_arguments(parser, args, "--lr-head", args.lr_head)
    return args


# -----------------------------------------------------------------------------
# Model: backbone -> pooled features -> one linear head per learning rate

def linear_heads(num_features, num_classes, num_lrs, seed):
    """One linear classifier per learning rate on the same (B, C) features -> logits (H, B, K)."""
    return SweepHeads(lambda: nn.Linear(num_features, num_classes), num_lrs, seed)


class LinearClassifiers(BackboneAndHeads):
    """images (B, 3, S, S) -> backbone -> y⊕ = mean over cells (B, C) -> heads -> logits (H, B, K)."""

    def forward(self, images):
        return self.heads(self.backbone_stages(images)[-1].mean(dim=(2, 3)))


@torch.no_grad()
def evaluate(classify, batches, num_heads, device, world_size):
    """Top-1 and top-5 accuracy (%) of every head on the whole dataset: two (H,) tensors on the CPU.
    `batches` covers this rank's shard (empty when there are more ranks than val images): (images or
    cached features, labels, ...) that `classify` maps to logits (H, B, K)."""
    classify.eval()
    correct, total = torch.zeros(2, num_heads, device=device), torch.zeros((), device=device)  # top-1/top-5 hits
    for inputs, labels, *_ in batches:  # a loader's items also carry the unreadable flags
        logits = classify(inputs.to(device, non_blocking=True))  # (H, B, K)
        labels = labels.to(device, non_blocking=True)
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (H, B, 5)
        hits = top5 == labels[None, :, None]  # (H, B, 5)
        correct += torch.stack([hits[..., 0].sum(1), hits.any(-1).sum(1)]).float()  # (2, H)
        total += len(labels)
    correct, total = all_reduce_sum(correct, world_size), all_reduce_sum(total, world_size)
    accuracy = (100 * correct / total).cpu()
    return accuracy[0], accuracy[1]


def knn_results(backbone, args, train_set, val_set, device, rank, world_size, log):
    """--knn: kNN top-1/top-5 of the backbone, written to EXP_DIR/results.json."""
    top1, top5 = knn_accuracy(backbone, train_set, val_set, args.batch_size // world_size, args.num_workers,
                              device, rank, world_size, args.amp)
    results = dict(knn_top1=top1, knn_top5=top5, k=KNN_K, temperature=KNN_TEMPERATURE, arch=args.arch,
                   pretrained=args.pretrained, dataset=args.dataset, train_images=len(train_set),
                   val_images=len(val_set))
    finish_evaluation(results, f"kNN (k={KNN_K}, T={KNN_TEMPERATURE}): top1 {top1:.2f} top5 {top5:.2f}",
                      args.exp_dir, rank, world_size, log)
    return results


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_arguments(argv)
    rank, world_size, device, log = setup_run(args, tf32=True)
    per_rank_batch = args.batch_size // world_size
    log_command(args, log)

    # data: the training transform is only used without a feature cache and without kNN
    val_transform = data.linear_val_transform(args.resize, args.size)
    train_transform = val_transform if args.cache_features or args.knn else data.linear_train_transform(args.size)
    train_set, val_set = classification_datasets(args.dataset, args.data_dir, train_transform, val_transform,
                                                 args.toy_images, args.toy_val_images)

    # model
    torch.manual_seed(args.seed)  # identical weights on every rank
    backbone = build_backbone(args.arch, args.pretrained).to(device)
    if args.knn:
        return knn_results(backbone, args, train_set, val_set, device, rank, world_size, log)
    check_full_batch(train_set, args.batch_size)
    steps_per_epoch = len(train_set) // args.batch_size
    heads = linear_heads(backbone.num_features, len(train_set.classes), len(args.lr_head), args.seed).to(device)
    model = LinearClassifiers(backbone, heads, frozen=args.weights == "freeze", amp_dtype=AMP_DTYPES[args.amp])
    model = sync_batchnorm(model, device, world_size)  # a fine-tuned ResNet: the global batch's statistics
    groups = sweep_param_groups(heads.heads, args.lr_head)
    if args.weights == "finetune":
        groups.append(dict(params=list(backbone.parameters()), lr=args.lr_backbone, peak_lr=args.lr_backbone))
    optimizer = torch.optim.SGD(groups, lr=args.lr_head[0], momentum=0.9, weight_decay=args.weight_decay)
    # fine-tuning in fp16: loss scaling (a frozen backbone's heads train on float32 features without it)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16" and args.weights == "finetune")

    ckpt_path = os.path.join(args.exp_dir, "linear.pth")
    start_epoch = 0
    # every head's best val top-1 (H,) over the epochs so far, and the number of epochs it came after
    best_top1, best_epoch = torch.full((len(args.lr_head),), -1.0), torch.zeros(len(args.lr_head), dtype=torch.long)
    ckpt = resume_evaluation(ckpt_path, model, optimizer, scaler, "--lr-head", args.lr_head, log)
    if ckpt is not None:
        start_epoch, top1, top5, best_top1, best_epoch = (
            ckpt[key] for key in ("epoch", "top1", "top5", "best_top1", "best_epoch"))

    # in the frozen regime only the heads train: DDP needs to see (and average) only them
    trainable = heads if args.cache_features else model
    if world_size > 1:
        trainable = wrap_ddp(trainable, device)
    if args.cache_features:  # the backbone is frozen: its features of an image never change
        log("computing the training and val features once (backbone frozen, val transform)")
        train_features, train_labels = compute_features(backbone, train_set, per_rank_batch, args.num_workers,
                                                         device, rank, world_size, args.amp)
        val_features, val_labels = compute_features(backbone, val_set, per_rank_batch, args.num_workers,
                                                     device, rank, world_size, args.amp)
        # this rank's shard (items rank, rank + W, ..., as data.shard), in batches
        classify, val_batches = heads, list(zip(val_features[rank::world_size].split(per_rank_batch),
                                                val_labels[rank::world_size].split(per_rank_batch)))
    else:
        classify, val_batches = model, DataLoader(data.shard(val_set, rank, world_size), batch_size=per_rank_batch,
                                                  num_workers=args.num_workers, pin_memory=device.type == "cuda")

    total_steps = args.epochs * steps_per_epoch
    step = start_step = start_epoch * steps_per_epoch
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        data.seed_process(args.seed, epoch, rank, worker_id=0)  # an epoch replays exactly on resume
        model.train()
        if args.cache_features:
            order = (idx.to(device, non_blocking=True) for idx in  # indices on the features' device
                     data.cached_batches(len(train_set), per_rank_batch, epoch, args.seed, rank, world_size))
            batches = ((train_features[idx], train_labels[idx]) for idx in order)
        else:
            loader = data.make_loader(train_set, per_rank_batch, args.num_workers, epoch, seed=args.seed,
                                      pin_memory=device.type == "cuda")
            batches = ((images, labels) for images, labels, _ in loader)
        for inputs, labels in batches:
            # cosine decay of every group's learning rate, per step, from its peak to 0
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            logits = trainable(inputs.to(device, non_blocking=True))  # (H, B, K)
            labels = labels.to(device, non_blocking=True)
            losses = torch.stack([F.cross_entropy(head_logits, labels) for head_logits in logits])  # (H,)
            sweep_step(optimizer, scaler, losses)
            step += 1
            if step % args.log_freq == 0 or step % steps_per_epoch == 0:
                best = int(losses.argmin())
                log(f"[{step}/{total_steps}] epoch {epoch} eta {eta_string(start_time, step, start_step, total_steps)} "
                    f"loss (lr {args.lr_head[best]:g}, lowest) {losses[best].item():.4f} "
                    f"lr-scale {optimizer.param_groups[0]['lr'] / optimizer.param_groups[0]['peak_lr']:.3f}")
        top1, top5 = evaluate(classify, val_batches, len(args.lr_head), device, world_size)  # (H,) each
        improved = top1 > best_top1  # strictly: the first of equally good epochs is kept
        best_top1, best_epoch = torch.where(improved, top1, best_top1), torch.where(improved, epoch + 1, best_epoch)
        log(f"val top1 after epoch {epoch + 1}: "
            + ", ".join(f"lr {lr:g} {accuracy:.2f}" for lr, accuracy in zip(args.lr_head, top1.tolist())))
        if rank == 0:
            os.makedirs(args.exp_dir, exist_ok=True)
            save_atomic(dict(epoch=epoch + 1, model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                             scaler=scaler.state_dict(), top1=top1, top5=top5, best_top1=best_top1,
                             best_epoch=best_epoch, lr_head=args.lr_head, args=vars(args)), ckpt_path)

    per_lr = [dict(lr=lr, top1=t1, top5=t5, best_epoch_top1=b1, best_epoch=e) for lr, t1, t5, b1, e in
              zip(args.lr_head, top1.tolist(), top5.tolist(), best_top1.tolist(), best_epoch.tolist())]
    for entry in per_lr:
        log(f"lr {entry['lr']:g}: top1 {entry['top1']:.2f} top5 {entry['top5']:.2f} (best epoch: "
            f"top1 {entry['best_epoch_top1']:.2f} after epoch {entry['best_epoch']})")
    last, best = per_lr[int(top1.argmax())], per_lr[int(best_top1.argmax())]  # the first of equally good lrs
    results = dict(top1=last["top1"], top5=last["top5"], best_lr=last["lr"],
                   best_epoch_top1=best["best_epoch_top1"], best_epoch=best["best_epoch"], best_epoch_lr=best["lr"],
                   per_lr=per_lr, arch=args.arch, pretrained=args.pretrained, weights=args.weights,
                   dataset=args.dataset, epochs=args.epochs, seed=args.seed)
    summary = (f"best lr {results['best_lr']:g}: top1 {results['top1']:.2f} top5 {results['top5']:.2f} after the "
               f"last epoch; best epoch: top1 {results['best_epoch_top1']:.2f} (lr {results['best_epoch_lr']:g}, "
               f"epoch {results['best_epoch']})")
    finish_evaluation(results, summary, args.exp_dir, rank, world_size, log)
    return results


if __name__ == "__main__":
    run_script(main, "eval_linear.py")
