"""
Linear classification on a pretrained backbone (paper appendix "Linear Evaluation", SPEC §4).

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
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import data
from model import ARCHS, build_backbone, unwrap
from train import (KNN_K, KNN_TEMPERATURE, all_reduce_sum, compute_features, eta_string, knn_accuracy,
                   load_resume_state, run_script, save_atomic, save_results, setup_run, sweep_param_groups, wrap_ddp)

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
    a("--num-workers", type=int, default=8, help="data loading processes per training process")
    # model
    a("--arch", default="convnext_small", choices=ARCHS, help="backbone")
    a("--pretrained", required=True,
      help="backbone.pth / model.pth of train.py or a released backbone file; 'none' = random init")
    a("--knn", action="store_true",
      help=f"instead of linear heads: weighted kNN (k={KNN_K}, temperature {KNN_TEMPERATURE}) on the pooled, "
      "L2-normalised features of the val images (val transform), the training images (val transform too) "
      "as the memory; no training")
    a("--weights", default="freeze", choices=["freeze", "finetune"],
      help="freeze: only the linear heads train (backbone in eval mode); finetune: the backbone too")
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
    # running
    a("--exp-dir", default="./exp/linear", help="linear.pth (for resuming) and results.json go here")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"],
      help="one process per GPU under torchrun; cpu runs (and DDP) use gloo")
    a("--log-freq", type=int, default=50, help="steps between progress lines")
    a("--seed", type=int, default=0, help="seeds the heads' initial weights and the data order")
    args = parser.parse_args(argv)

    resize, size = DEFAULT_SIZES[args.dataset]
    args.resize = resize if args.resize is None else args.resize
    args.size = size if args.size is None else args.size
    if args.dataset == "imagenet" and args.data_dir is None:
        parser.error("--data-dir is required with --dataset imagenet (or use --dataset toy)")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.knn and args.weights == "finetune":
        parser.error("--knn evaluates the backbone as it is: it takes no --weights finetune")
    if args.weights == "finetune":
        if len(args.lr_head) != 1:
            parser.error("--weights finetune trains the backbone, so it takes a single --lr-head value")
        if args.lr_backbone is None:
            parser.error("--weights finetune needs --lr-backbone")
        if args.cache_features:
            parser.error("--cache-features needs a frozen backbone (--weights freeze)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available")
    return args


# -----------------------------------------------------------------------------
# Model: backbone -> pooled features -> one linear head per learning rate

class LinearHeads(nn.Module):
    """H independent linear classifiers on the same (B, C) features -> logits (H, B, K).

    Every head starts from the same weights, drawn from `seed` (N(0, 0.01²), zero bias), so head h
    of a sweep is exactly the head a single run with learning rate lrs[h] and that seed would train.
    """

    def __init__(self, num_features, num_classes, num_heads, seed):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(num_features, num_classes) for _ in range(num_heads))
        weight = torch.randn(num_classes, num_features, generator=torch.Generator().manual_seed(seed)) * 0.01
        with torch.no_grad():
            for head in self.heads:
                head.weight.copy_(weight)
                head.bias.zero_()

    def forward(self, features):
        return torch.stack([head(features) for head in self.heads])  # (H, B, K)


class BackboneAndHeads(nn.Module):
    """images (B, 3, S, S) -> backbone -> y⊕ = mean over cells (B, C) -> heads -> (H, B, K).
    A frozen backbone stays in eval mode (BatchNorm statistics unchanged) and runs without grad."""

    def __init__(self, backbone, heads, frozen):
        super().__init__()
        self.backbone, self.heads, self.frozen = backbone, heads, frozen
        self.backbone.requires_grad_(not frozen)

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, images):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = self.backbone(images).mean(dim=(2, 3))  # (B, C)
        return self.heads(features)


@torch.no_grad()
def evaluate(classify, batches, device, world_size):
    """Top-1 and top-5 accuracy (%) of every head on the whole dataset: two (H,) tensors on the CPU.
    `batches` covers this rank's shard: (images or cached features, labels, ...) that `classify`
    maps to logits (H, B, K)."""
    classify.eval()
    correct, total = None, torch.zeros((), device=device)
    for inputs, labels, *_ in batches:  # a loader's items also carry the unreadable flags
        logits = classify(inputs.to(device))  # (H, B, K)
        labels = labels.to(device)
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (H, B, 5)
        hits = top5 == labels[None, :, None]  # (H, B, 5)
        counts = torch.stack([hits[..., 0].sum(1), hits.any(-1).sum(1)]).float()  # (2, H)
        correct = counts if correct is None else correct + counts
        total += len(labels)
    correct, total = all_reduce_sum(correct, world_size), all_reduce_sum(total, world_size)
    accuracy = (100 * correct / total).cpu()
    return accuracy[0], accuracy[1]


def knn_results(backbone, args, train_set, val_set, device, rank, world_size, log):
    """--knn: kNN top-1/top-5 of the backbone, written to EXP_DIR/results.json."""
    top1, top5 = knn_accuracy(backbone, train_set, val_set, args.batch_size // world_size, args.num_workers,
                              device, rank, world_size)
    results = dict(knn_top1=top1, knn_top5=top5, k=KNN_K, temperature=KNN_TEMPERATURE, arch=args.arch,
                   pretrained=args.pretrained, dataset=args.dataset, train_images=len(train_set),
                   val_images=len(val_set))
    if rank == 0:
        save_results(results, args.exp_dir)
    log(f"kNN (k={KNN_K}, T={KNN_TEMPERATURE}): top1 {top1:.2f} top5 {top5:.2f} "
        f"(results in {os.path.join(args.exp_dir, 'results.json')})")
    if world_size > 1:
        dist.destroy_process_group()
    return results


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_arguments(argv)
    rank, world_size, device, log = setup_run(args)
    is_main = rank == 0
    per_rank_batch = args.batch_size // world_size
    log(" ".join(sys.argv))
    log(json.dumps(vars(args)))

    # data: the training transform is only used without a feature cache and without kNN
    val_transform = data.linear_val_transform(args.resize, args.size)
    train_transform = val_transform if args.cache_features or args.knn else data.linear_train_transform(args.size)
    if args.dataset == "toy":
        train_set = data.ToyShapes("train", num_images=args.toy_images, transform=train_transform)
        val_set = data.ToyShapes("val", num_images=args.toy_val_images, transform=val_transform)
    else:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(args.data_dir, split)):
                raise ValueError(f"data folder not found: {os.path.join(args.data_dir, split)} "
                                 f"(expected {args.data_dir}/{split}/<class>/<image files>)")
        train_set = data.ImageFiles(os.path.join(args.data_dir, "train"), train_transform)
        val_set = data.ImageFiles(os.path.join(args.data_dir, "val"), val_transform)
    num_classes = len(train_set.classes)
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0 and not args.knn:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size}")

    # model
    torch.manual_seed(args.seed)  # identical weights on every rank
    backbone = build_backbone(args.arch, args.pretrained).to(device)
    if args.knn:
        return knn_results(backbone, args, train_set, val_set, device, rank, world_size, log)
    heads = LinearHeads(backbone.num_features, num_classes, len(args.lr_head), args.seed).to(device)
    model = BackboneAndHeads(backbone, heads, frozen=args.weights == "freeze")
    groups = sweep_param_groups(heads.heads, args.lr_head)
    if args.weights == "finetune":
        groups.append(dict(params=list(backbone.parameters()), lr=args.lr_backbone, peak_lr=args.lr_backbone))
    optimizer = torch.optim.SGD(groups, lr=args.lr_head[0], momentum=0.9, weight_decay=args.weight_decay)

    ckpt_path = os.path.join(args.exp_dir, "linear.pth")
    start_epoch = 0
    # every head's best val top-1 (H,) over the epochs so far, and the number of epochs it came after
    best_top1, best_epoch = torch.full((len(args.lr_head),), -1.0), torch.zeros(len(args.lr_head), dtype=torch.long)
    ckpt = load_resume_state(ckpt_path, log)
    if ckpt is not None:
        if ckpt.get("lr_head") != args.lr_head:
            raise ValueError(f"{ckpt_path} was trained with --lr-head {ckpt.get('lr_head')}, not {args.lr_head}")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            top1, top5, best_top1, best_epoch = (ckpt[key] for key in ("top1", "top5", "best_top1", "best_epoch"))
        except (RuntimeError, ValueError, KeyError) as error:
            raise ValueError(f"checkpoint {ckpt_path} does not match this run (--arch, --weights, "
                             f"classes): {str(error).splitlines()[0]}") from None
        start_epoch = ckpt["epoch"]

    # in the frozen regime only the heads train: DDP needs to see (and average) only them
    trainable = heads if args.cache_features else model
    if world_size > 1:
        trainable = wrap_ddp(trainable, device)
    if args.cache_features:  # the backbone is frozen: its features of an image never change
        log("computing the training and val features once (backbone frozen, val transform)")
        train_features, train_labels = compute_features(backbone, train_set, per_rank_batch, args.num_workers,
                                                         device, rank, world_size)
        val_features, val_labels = compute_features(backbone, val_set, per_rank_batch, args.num_workers,
                                                     device, rank, world_size)
        # this rank's shard (items rank, rank + W, ..., as data.shard), in batches
        classify, val_batches = heads, list(zip(val_features[rank::world_size].split(per_rank_batch),
                                                val_labels[rank::world_size].split(per_rank_batch)))
    else:
        classify, val_batches = model, DataLoader(data.shard(val_set, rank, world_size), batch_size=per_rank_batch,
                                                  num_workers=args.num_workers)

    total_steps = args.epochs * steps_per_epoch
    step = start_step = start_epoch * steps_per_epoch
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        data.seed_process(args.seed, epoch, rank, worker_id=0)  # an epoch replays exactly on resume
        model.train()
        if args.cache_features:
            batches = ((train_features[idx], train_labels[idx]) for idx in
                       data.cached_batches(len(train_set), per_rank_batch, epoch, args.seed, rank, world_size))
        else:
            loader = data.make_loader(train_set, per_rank_batch, args.num_workers, epoch, seed=args.seed)
            batches = ((images, labels) for images, labels, _ in loader)
        for inputs, labels in batches:
            # cosine decay of every group's learning rate, per step, from its peak to 0
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            logits = trainable(inputs.to(device, non_blocking=True))  # (H, B, K)
            labels = labels.to(device, non_blocking=True)
            # sum of the heads' losses: head h's gradient is that of its own loss alone
            losses = torch.stack([F.cross_entropy(head_logits, labels) for head_logits in logits])  # (H,)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            step += 1
            if step % args.log_freq == 0 or step % steps_per_epoch == 0:
                best = int(losses.argmin())
                log(f"[{step}/{total_steps}] epoch {epoch} eta {eta_string(start_time, step, start_step, total_steps)} "
                    f"loss (lr {args.lr_head[best]:g}, lowest) {losses[best].item():.4f} "
                    f"lr-scale {optimizer.param_groups[0]['lr'] / optimizer.param_groups[0]['peak_lr']:.3f}")
        top1, top5 = evaluate(classify, val_batches, device, world_size)  # (H,) each
        improved = top1 > best_top1  # strictly: the first of equally good epochs is kept
        best_top1, best_epoch = torch.where(improved, top1, best_top1), torch.where(improved, epoch + 1, best_epoch)
        log(f"val top1 after epoch {epoch + 1}: "
            + ", ".join(f"lr {lr:g} {accuracy:.2f}" for lr, accuracy in zip(args.lr_head, top1.tolist())))
        if is_main:
            os.makedirs(args.exp_dir, exist_ok=True)
            save_atomic(dict(epoch=epoch + 1, model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                             top1=top1, top5=top5, best_top1=best_top1, best_epoch=best_epoch,
                             lr_head=args.lr_head, args=vars(args)), ckpt_path)

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
    if is_main:
        save_results(results, args.exp_dir)
    log(f"best lr {results['best_lr']:g}: top1 {results['top1']:.2f} top5 {results['top5']:.2f} after the last epoch; "
        f"best epoch: top1 {results['best_epoch_top1']:.2f} (lr {results['best_epoch_lr']:g}, epoch "
        f"{results['best_epoch']}) (results in {os.path.join(args.exp_dir, 'results.json')})")
    if world_size > 1:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    run_script(main, "eval_linear.py")
