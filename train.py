"""
VICRegL pretraining (Bardes, Ponce & LeCun, NeurIPS 2022).

One process (CPU or one GPU), on the built-in toy data (the toy recipe is the default there):
    python train.py --dataset toy --exp-dir exp/toy
One node, 8 GPUs, ImageNet (the ConvNeXt-S recipe is the default):
    torchrun --nproc_per_node=8 train.py --data-dir /path/to/imagenet --exp-dir exp/convnext_small
Multi-node: torchrun on every node (--nnodes, --node-rank, --master-addr), or SLURM's srun (one task
per GPU): the rank is read from torchrun's environment or from SLURM's.

Every epoch EXP_DIR/model.pth is written atomically (the previous one is kept as model.prev.pth) and
a run started again with the same command resumes from it. EXP_DIR/stats.jsonl gets one JSON line per
log step (`loss`, the VICRegL criterion of paper eq. 6, and its six weighted terms; the online probe's
cross-entropy `cls_loss` and top-1; the RankMe collapse diagnostics) and, with
--eval-freq, one per evaluation on the val split (kNN top-1/top-5, and the dense kNN mIoU of
eval_seg.py --knn on the toy masks or on --seg-dataset); EXP_DIR/backbone.pth (the backbone alone, in the
released layout) is written at the end, and a toy run then prints (and writes to EXP_DIR/results.json)
the kNN top-1 of its backbone and of the same arch at random init.

Reading order: the arguments, then main() with the training loop, then the pieces of a step (loss,
optimisers, schedule, collapse diagnostics), then watching a run (kNN evaluation, checkpoints). The
last section is the run plumbing that eval_linear.py and eval_seg.py import too (processes, logging,
features and kNN, results files), so that neither evaluation script imports the other.
"""
import argparse
import datetime
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import data
from loss import VICRegLLoss, gather_from_all_ranks
from matching import location_grid
from model import ARCHS, VICRegL, backbone_state_dict, build_backbone, unwrap


DEFAULT_WEIGHT_DECAY = {"lars": 1e-6, "adamw": 0.05}  # the reference code's values (README, "The paper and the reference code")
KNN_K, KNN_TEMPERATURE = 20, 0.07  # the usual kNN protocol of self-supervised papers (Wu et al. 2018; DINO)
TOY_DENSE_IMAGES = 1000  # a toy run's dense evaluation = eval_seg.py --dataset toy --knn --toy-images 1000


# The two recipes of this script. Flags left out take their value from the recipe of --dataset;
# flags given always win. ImageNet: the paper's ConvNeXt-S recipe (§3.3, "Implementation details",
# with the reference code's learning rate: README, "The paper and the reference code"). Toy: what learns on
# the built-in data on a CPU in minutes (docs/toy.md).
RECIPES = {
    "imagenet": dict(arch="convnext_small", size_crops=[224, 96], num_crops=[2, 6], min_scale_crops=[0.4, 0.08],
                     max_scale_crops=[1.0, 0.4], blur_sigma=[0.1, 2.0], hue=0.1, mlp="8192-8192-8192",
                     maps_mlp="512-512-512", epochs=400, batch_size=384, base_lr=7.5e-4, warmup_epochs=10,
                     num_workers=8, eval_freq=0),
    "toy": dict(arch="resnet_toy", size_crops=[48, 24], num_crops=[2, 4], min_scale_crops=[0.3, 0.08],
                max_scale_crops=[1.0, 0.3], blur_sigma=[0.02, 0.43], hue=0.5, mlp="8", maps_mlp="8", epochs=8,
                batch_size=64, base_lr=8e-3, warmup_epochs=1, num_workers=2, eval_freq=0),
}


def recipe_help(text, key):
    """A flag's help with its default in each recipe."""
    imagenet, toy = (" ".join(map(str, v)) if isinstance(v, list) else v for v in
                     (RECIPES["imagenet"][key], RECIPES["toy"][key]))
    return f"{text} (default: {imagenet}; with --dataset toy: {toy})"


def get_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description="VICRegL pretraining. Defaults are the ConvNeXt-S recipe (paper §3.3), or with "
        "--dataset toy the toy recipe; --batch-size is global (split over processes) and the learning rate is "
        "--base-lr x batch-size / 256.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = parser.add_argument

    def r(*names, help, **kwargs):  # a flag whose default comes from the recipe (SUPPRESS: unset if not given)
        a(*names, default=argparse.SUPPRESS, help=recipe_help(help, names[0][2:].replace("-", "_")), **kwargs)

    # data
    a("--dataset", default="imagenet", choices=["imagenet", "toy"],
      help="an ImageFolder tree (DATA_DIR/train/<class>/<image>) or the built-in synthetic textures")
    a("--data-dir", default=None, help="dataset root holding train/ (and val/ for --eval-freq)")
    a("--toy-images", type=int, default=data.ToyShapes.SPLITS["train"][1], help="number of toy training images")
    a("--toy-val-images", type=int, default=data.ToyShapes.SPLITS["val"][1],
      help="toy val images of the kNN evaluations (--eval-freq and the one that ends a toy run)")
    r("--size-crops", type=int, nargs="+", help="view resolution per view size")
    r("--num-crops", type=int, nargs="+", help="number of views per view size")
    r("--min-scale-crops", type=float, nargs="+", help="RandomResizedCrop min scale")
    r("--max-scale-crops", type=float, nargs="+", help="RandomResizedCrop max scale")
    r("--blur-sigma", type=float, nargs=2, metavar=("MIN", "MAX"), help="Gaussian blur sigma range, pixels")
    r("--hue", type=float, help="colour jitter's hue range [-hue, hue] (at most 0.5, the whole hue circle)")
    r("--num-workers", type=int, help="data loading processes per training process")
    # model
    r("--arch", choices=ARCHS, help="backbone")
    r("--mlp", help="global expander layer sizes")
    r("--maps-mlp", help="local projector layer sizes (applied per cell)")
    a("--drop-path", type=float, default=0.1, help="stochastic depth rate (ConvNeXt only)")
    # loss
    a("--alpha", type=float, default=0.75,
      help="loss = alpha*global + (1-alpha)*local; 1 = VICReg. This code averages where the paper sums (README): "
      "for two views, alpha 0.75 here is alpha 6/7 with mu and nu halved in the paper's sums")
    a("--inv-coeff", type=float, default=25.0, help="invariance weight (lambda)")
    a("--var-coeff", type=float, default=25.0, help="variance weight (mu)")
    a("--cov-coeff", type=float, default=1.0, help="covariance weight (nu)")
    a("--num-matches", type=int, nargs=2, default=[20, 4],
      help="gamma: location matches kept for a->b and b->a (reference rule) or for large/small "
      "query maps (paper rule)")
    a("--gamma-rule", default="reference", choices=["reference", "paper"],
      help="how --num-matches is read: by direction (reference code) or by query map size (paper)")
    a("--feature-matches", default="all", choices=["all", "top"],
      help="feature-based matching keeps every cell (reference code) or the top-gamma ones (paper)")
    a("--ignore-flips", action="store_true",
      help="compute location grids as if no view were flipped (the reference code's default)")
    a("--local-matching", default="both", choices=["both", "location", "features"],
      help="paper Table 3: which matchings the local criterion uses; one kind alone contributes exactly "
      "its share of the default (both = location + features, term by term)")
    a("--local-terms", default="vic", choices=["vic", "vi", "i"],
      help="paper Table 7: the VICReg terms of the local criterion (vi: no local covariance; i: invariance "
      "only); the global terms never change")
    a("--simple", action="store_true",
      help="the plain code: the local criterion as loops over pairs and matched sets, and the "
      "augmentations as torchvision's transforms on PIL images (same maths, slower)")
    # optimisation
    r("--epochs", type=int, help="pretraining epochs (400 for ConvNeXt-S in the paper)")
    r("--batch-size", type=int, help="global batch size, over all processes")
    a("--optimizer", default="adamw", choices=["adamw", "lars"],
      help="AdamW (ConvNeXt recipe) or LARS (ResNet-50 recipe); 1-D parameters get no weight decay")
    r("--base-lr", type=float, help="learning rate for a batch of 256")
    a("--weight-decay", type=float, default=None,
      help="default by optimiser: 1e-6 with lars (the reference LARS always uses 1e-6), 0.05 with "
      "adamw (the reference code's ConvNeXt default; the paper says 1e-6)")
    r("--warmup-epochs", type=int, help="linear warm-up from 0")
    a("--end-lr-ratio", type=float, default=1e-3,
      help="final lr = peak lr x this (cosine decay; the reference code's ratio; the paper's final values "
      "are 0.02x its ResNet-50 peak and 0.01x its ConvNeXt one)")
    # running
    a("--exp-dir", default="./exp", help="checkpoints, stats.jsonl and backbone.pth go here")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"],
      help="cuda: one GPU per process (LOCAL_RANK); cpu: gloo backend for several processes")
    add_amp_argument(parser, "the networks' forward (the loss is always computed in float32)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--deterministic", action="store_true",
      help="CUDA: deterministic kernels (the local criterion's index_add_ without atomics, no cuDNN "
      "autotuning), so that a killed and resumed run equals an uninterrupted one bit for bit, as it "
      "always does on a CPU; slower")
    a("--log-freq", type=int, default=20,
      help="steps between progress lines / stats.jsonl records, each the mean over those steps")
    r("--eval-freq", type=int,
      help="every N epochs and at the end, weighted kNN top-1/top-5 (k=20, T=0.07) of the backbone on the val "
      "split (toy val, or DATA_DIR/val/<class>/<image>), the training images as the memory, and the dense "
      "kNN mIoU (eval_seg.py --knn) on the toy masks or on --seg-dataset; 0: off")
    a("--eval-images", type=int, default=None,
      help="with --eval-freq on an ImageFolder tree: at most this many training images (the memory) and "
      "as many val images, a fixed seeded subset of each (default: all); the same for --seg-dataset's images")
    a("--seg-dataset", default=None, choices=["voc", "ade20k", "cityscapes"],
      help="with --eval-freq: also the dense nearest-neighbour mIoU (eval_seg.py --knn) of the backbone on this "
      "segmentation set (a toy run always has it, on the toy masks)")
    a("--seg-data-dir", default=None, help="root of --seg-dataset, as eval_seg.py --data-dir")
    a("--seed", type=int, default=0, help="seeds weights, data order, augmentations and drop-path")
    args = parser.parse_args(argv)

    for key, value in RECIPES[args.dataset].items():
        if not hasattr(args, key):
            setattr(args, key, value)
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY[args.optimizer]
    views_options = [args.size_crops, args.num_crops, args.min_scale_crops, args.max_scale_crops]
    if len({len(v) for v in views_options}) != 1:
        parser.error("--size-crops, --num-crops, --min-scale-crops and --max-scale-crops need one value per view size")
    if args.num_crops[0] < 2:
        parser.error("--num-crops needs at least 2 large views")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error("--alpha must be in [0, 1]")
    if args.eval_freq < 0 or (args.eval_images is not None and args.eval_images < 1):
        parser.error("--eval-freq must be >= 0 and --eval-images >= 1")
    if (args.seg_dataset or args.seg_data_dir) and (args.dataset == "toy" or not args.eval_freq
                                                    or args.seg_dataset is None or args.seg_data_dir is None):
        parser.error("--seg-dataset needs --eval-freq and --seg-data-dir, on an ImageFolder run (toy runs use "
                     "the toy masks)")
    if args.dataset == "imagenet" and args.data_dir is None:
        parser.error("--data-dir is required with --dataset imagenet (or use --dataset toy)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available")
    args.amp = resolve_amp(args.amp, args.device)
    return args


# -----------------------------------------------------------------------------
# The training loop

def main(argv=None):
    args = get_arguments(argv)
    rank, world_size, device, log = setup_run(args)
    is_main = rank == 0
    if is_main:
        os.makedirs(args.exp_dir, exist_ok=True)
    log_command(args, log)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA >= 10.2)
        torch.use_deterministic_algorithms(True, warn_only=True)  # a warning names any op without such a kernel
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the training shapes never change: autotune the convolutions

    # each sample: (views, crop boxes, flips) of one image, its label (online probe only), unreadable?
    transform = data.MultiCropTransform(args.size_crops, args.num_crops, args.min_scale_crops,
                                        args.max_scale_crops, args.blur_sigma, args.hue, simple=args.simple)
    dataset = data.build_pretrain_dataset(args.dataset, args.data_dir, transform, toy_images=args.toy_images)
    per_rank_batch = args.batch_size // world_size
    steps_per_epoch = len(dataset) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images are fewer than one batch of {args.batch_size}")
    knn_sets = knn_datasets(args) if args.eval_freq or args.dataset == "toy" else None  # (memory, val)
    dense_sets = dense_datasets(args) if args.eval_freq and (args.dataset == "toy" or args.seg_dataset) else None

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = VICRegL(args.arch, mlp=args.mlp, maps_mlp=args.maps_mlp, num_classes=len(dataset.classes),
                    drop_path_rate=args.drop_path, local=args.alpha < 1).to(device)
    model = sync_batchnorm(model, device, world_size)
    # channels-last activations: faster convolutions on GPUs and CPUs alike (a toy step: -20 % on a CPU)
    model = model.to(memory_format=torch.channels_last)
    criterion = VICRegLLoss(alpha=args.alpha, inv_coeff=args.inv_coeff, var_coeff=args.var_coeff,
                            cov_coeff=args.cov_coeff, num_matches=tuple(args.num_matches),
                            num_large_views=args.num_crops[0], gamma_rule=args.gamma_rule,
                            feature_matches=args.feature_matches, local_matching=args.local_matching,
                            local_terms=args.local_terms, simple=args.simple)
    peak_lr = args.base_lr * args.batch_size / 256
    optimizer = build_optimizer(model, args, peak_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")  # bf16 needs no loss scaling

    start_epoch = 0
    ckpt, ckpt_path = load_checkpoint(args.exp_dir, log, rank, world_size, device)
    if ckpt is not None:
        state = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
        try:
            model.load_state_dict(state)
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"checkpoint {ckpt_path} does not match this model (--arch {args.arch}, "
                             f"--mlp, --maps-mlp, --alpha): {str(e).splitlines()[0]}") from None
        load_scaler_state(scaler, ckpt.get("scaler"))
        start_epoch = ckpt["epoch"]
        log(f"resumed from {ckpt_path} at epoch {start_epoch}")

    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = wrap_ddp(model, device)

    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch
    stats_file = os.path.join(args.exp_dir, "stats.jsonl")
    start_time, start_step = time.time(), start_epoch * steps_per_epoch
    step = start_step
    for epoch in range(start_epoch, args.epochs):
        # everything random in an epoch (order, augmentations, drop-path) is a function of
        # (seed, epoch, rank, worker), so a resumed epoch replays exactly (on CUDA: with --deterministic)
        data.seed_process(args.seed, epoch, rank, worker_id=0)
        loader = data.make_loader(dataset, per_rank_batch, args.num_workers, epoch, seed=args.seed,
                                  pin_memory=device.type == "cuda")
        model.train()
        interval_sum, interval_start = 0.0, step  # loss terms summed on the device since the last log line
        interval_time = time.time()
        unreadable_seen = 0
        for (views, boxes, flips), labels, unreadable in loader:
            if step - epoch * steps_per_epoch >= steps_per_epoch:
                break  # same number of steps on every rank and in every epoch
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr, args.end_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # from pinned memory, asynchronous: no copy makes the host wait for the GPU
            views = [v.to(device, non_blocking=True, memory_format=torch.channels_last) for v in views]
            flips = torch.zeros_like(flips) if args.ignore_flips else flips
            boxes, flips, labels = (t.to(device, non_blocking=True) for t in (boxes, flips, labels))
            # total = the criterion + the probe's cross-entropy; stats["loss"] is the criterion alone
            total, stats, (embeddings, maps, _) = compute_loss(model, criterion, views, boxes, flips, labels,
                                                               AMP_DTYPES[args.amp])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            unreadable_seen += int(unreadable.sum())
            step += 1
            names = list(stats)
            interval_sum = interval_sum + torch.stack([v.float() for v in stats.values()])
            if step % args.log_freq and step % steps_per_epoch:
                continue

            # A log step: the loop's one host synchronisation (fp16's loss scaling and SyncBatchNorm on
            # several GPUs add their own, docs/speed.md). The record holds the mean of the interval's
            # steps (one batch's top-1 is noisy) and the collapse diagnostics of this batch.
            diagnostics = collapse_diagnostics(embeddings, maps)
            record = mean_over_ranks(names + list(diagnostics), torch.cat(
                [interval_sum / (step - interval_start), torch.stack(list(diagnostics.values()))]), world_size)
            check_finite(record, names, interval_start + 1, step)
            check_unreadable(unreadable_seen, len(dataset), world_size, device)
            # wall-clock seconds per step over the interval (exact: the interval ends with a host sync)
            step_time = (time.time() - interval_time) / (step - interval_start)
            interval_sum, interval_start, interval_time = 0.0, step, time.time()
            record = dict(step=step, epoch=epoch, lr=lr, **record, step_time=step_time)
            if device.type == "cuda":
                record["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            if is_main:
                with open(stats_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
                local_rankme = f" local_rankme {record['local_rankme']:.1f}" if "local_rankme" in record else ""
                print(f"[{step}/{total_steps}] eta {eta_string(start_time, step, start_step, total_steps)} "
                      f"loss {record['loss']:.4f} (inv {record['inv']:.3f} var {record['var']:.3f} "
                      f"cov {record['cov']:.3f} local_inv {record['local_inv']:.3f} "
                      f"local_var {record['local_var']:.3f} local_cov {record['local_cov']:.3f}) "
                      f"cls_loss {record['cls_loss']:.3f} top1 {record['top1']:.1f} rankme {record['rankme']:.1f}"
                      f"{local_rankme} lr {lr:.3g}",
                      flush=True)

        if is_main:
            state = {"module." + k: v for k, v in unwrap(model).state_dict().items()}
            save_checkpoint(args.exp_dir, dict(epoch=epoch + 1, model=state, optimizer=optimizer.state_dict(),
                                               scaler=scaler.state_dict(), args=vars(args)))
        if args.eval_freq and (epoch + 1) % args.eval_freq == 0 and epoch + 1 < args.epochs:
            evaluate_knn(unwrap(model).backbone, knn_sets, epoch + 1, args, device, rank, world_size, log,
                         dense_sets=dense_sets)

    if is_main:
        save_atomic(backbone_state_dict(unwrap(model)), os.path.join(args.exp_dir, "backbone.pth"))
        log(f"done in {datetime.timedelta(seconds=int(time.time() - start_time))}; "
            f"backbone written to {os.path.join(args.exp_dir, 'backbone.pth')}")
    if args.eval_freq or args.dataset == "toy":
        # the final evaluation, and on the toy data the run's last line: trained vs random init
        top1 = evaluate_knn(unwrap(model).backbone, knn_sets, args.epochs, args, device, rank, world_size, log,
                            write=args.eval_freq > 0, dense_sets=dense_sets)
        if args.dataset == "toy":
            report_toy_knn(top1, knn_sets, args, device, rank, world_size, log)
    if world_size > 1:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# The pieces of a training step: loss, optimisers, schedule, collapse diagnostics

def compute_loss(model, criterion, views, boxes, flips, labels, amp_dtype=None):
    """
    views: list of (B, 3, S_v, S_v); boxes (B, V, 4) crop boxes in seed-image pixels; flips (B, V).
    Returns (what to backward: the VICRegL criterion plus the online probe's cross-entropy; stats, a dict
    of detached 0-dim tensors: `loss`, the criterion alone (paper eq. 6, with the weighting of the README's
    "The paper and the reference code"), its six weighted terms, the probe's `cls_loss` and `top1`; the
    model's outputs (embeddings, maps, logits)).
    """
    with torch.autocast(views[0].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        embeddings, maps, logits = model(views)
    # the VICRegL criterion runs outside autocast: its statistics are computed in float32
    grids = None
    if maps is not None:
        # each cell's centre in the seed image, from the real feature-map size (B, h, w, 2)
        grids = [location_grid(boxes[:, v], flips[:, v], m.shape[1:3]) for v, m in enumerate(maps)]
    loss, stats = criterion(embeddings, maps, grids)
    # online linear classifier on detached features: monitoring only, its gradient stays in the head
    cls_loss = F.cross_entropy(logits.float(), labels)
    stats = dict(loss=loss.detach(), **stats, cls_loss=cls_loss.detach(),
                 top1=(logits.argmax(dim=1) == labels).float().mean() * 100)
    return loss + cls_loss, stats, (embeddings, maps, logits)


class LARS(torch.optim.Optimizer):
    """
    LARS (You et al., 2017): SGD with momentum where the update of each weight tensor is rescaled by
    the trust ratio eta * ||w|| / ||g + wd * w||, so that every layer moves by a similar relative
    amount. One-dimensional parameters (biases, norm scales and shifts) get neither weight decay nor
    the trust ratio, as in the VICReg/VICRegL ResNet recipe.
    """

    def __init__(self, params, lr, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    # ratio 1 when either norm is 0 (a zero-initialised weight must still move)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, 1.0)
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:  # the first step: momentum starts from zero
                    state["mu"] = torch.zeros_like(p)
                velocity = state["mu"]
                velocity.mul_(group["momentum"]).add_(update)
                p.add_(velocity, alpha=-group["lr"])


def build_optimizer(model, args, lr):
    if args.optimizer == "lars":
        return LARS(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    # AdamW: no weight decay on 1-D parameters (biases, LayerNorm/BatchNorm affine parameters)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr)



def learning_rate(step, total_steps, warmup_steps, peak_lr, end_lr_ratio):
    """Linear warm-up from 0 to peak_lr, then cosine decay to peak_lr * end_lr_ratio."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    end_lr = peak_lr * end_lr_ratio
    return end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

@torch.no_grad()
def rankme(x, eps=1e-7):
    """RankMe (Garrido et al. 2023), the effective rank of x (N, D): exp of the entropy of its normalised
    singular values, p_k = σ_k / Σσ + eps. 1 when every row lies on one line (complete collapse),
    min(N, D) when the spectrum is flat. It does not climb towards the width in a healthy run: on the toy
    data it starts high (a random expander spreads the batch), falls while the network learns the data's
    few directions and levels off well above 1 (docs/monitoring.md)."""
    x = x.float()
    finite = torch.isfinite(x).all()  # a diverged run's embeddings: NaN, which check_finite reports
    singular_values = torch.linalg.svdvals(torch.where(finite, x, 0.0))  # (min(N, D),)
    p = singular_values / singular_values.sum().clamp_min(1e-30) + eps  # all zero (total collapse): 1
    return torch.where(finite, torch.exp(-(p * p.log()).sum()), torch.nan)


@torch.no_grad()
def collapse_diagnostics(embeddings, maps):
    """RankMe of the logged batch (gathered from all ranks): of the first view's global embeddings z⊕
    (B, D), and of every cell of its local maps z (B*h*w, D_local) when the run has them."""
    diagnostics = {"rankme": rankme(gather_from_all_ranks(embeddings[0].detach()))}
    if maps is not None:
        diagnostics["local_rankme"] = rankme(gather_from_all_ranks(maps[0].detach()).flatten(0, 2))
    return diagnostics


# -----------------------------------------------------------------------------
# Watching a run: non-finite losses, unreadable images, kNN on the val split, checkpoints

def mean_over_ranks(names, values, world_size):
    """{name: value averaged over ranks} for a (n,) tensor of per-rank statistics (a host sync)."""
    values = all_reduce_sum(values.clone(), world_size) / world_size
    return dict(zip(names, values.tolist()))


def check_finite(record, names, first_step, last_step):
    """Stop at the log step if a loss term was NaN or infinite at any step of the interval: once
    non-finite, a sum stays so. Checking the interval's mean costs no host sync beyond the log line's."""
    if not all(math.isfinite(record[name]) for name in names):
        steps = f"step {last_step}" if first_step == last_step else f"steps {first_step} to {last_step}"
        terms = ", ".join(f"{name}={record[name]:.4g}" for name in names)
        raise FloatingPointError(f"non-finite loss in {steps} (means over these steps: {terms}); stopping "
                                 "without writing a checkpoint from this state")


def check_unreadable(unreadable, dataset_size, world_size, device):
    """Stop once the images found unreadable this epoch (all ranks) exceed 1% of the dataset."""
    if world_size > 1:
        unreadable = int(all_reduce_sum(torch.tensor(unreadable, dtype=torch.float64, device=device), world_size))
    if unreadable > 0.01 * dataset_size:
        raise ValueError(f"{unreadable} of {dataset_size} images are unreadable (more than 1%): "
                         "check the data folder (the paths are in the warnings above)")


def knn_datasets(args):
    """(memory, val) of the kNN evaluations: the training images and the val split, both with the
    evaluation transform. An ImageFolder tree's are capped at --eval-images each (a fixed, seeded subset)."""
    if args.dataset == "toy":
        transform = data.linear_val_transform(*data.TOY_EVAL_SIZES)
    else:
        transform = data.linear_val_transform()
    memory, val = classification_datasets(args.dataset, args.data_dir, transform, transform, args.toy_images,
                                          args.toy_val_images)
    if args.dataset != "toy" and args.eval_images is not None:
        memory, val = (seeded_subset(d, args.eval_images, args.seed) for d in (memory, val))
    return memory, val


def dense_datasets(args):
    """(memory, val) segmentation images of the dense nearest-neighbour evaluation (eval_seg.py --knn): the
    toy masks (TOY_DENSE_IMAGES training images, or --toy-images if fewer, and a quarter as many val images)
    or --seg-dataset's train and val splits, each capped at --eval-images (a fixed seeded subset)."""
    import eval_seg  # here, not at the top: eval_seg.py imports this file's plumbing
    if args.dataset == "toy":
        return eval_seg.dense_knn_datasets("toy", None, min(TOY_DENSE_IMAGES, args.toy_images))
    memory, val = eval_seg.dense_knn_datasets(args.seg_dataset, args.seg_data_dir, None)
    if args.eval_images is not None:
        memory, val = (seeded_subset(d, args.eval_images, args.seed) for d in (memory, val))
    return memory, val


def evaluate_knn(backbone, knn_sets, epoch, args, device, rank, world_size, log, write=True, dense_sets=None):
    """The kNN top-1 (%) of the backbone after `epoch` epochs, written to stats.jsonl as {epoch, knn_top1,
    knn_top5} and logged. Every rank computes its share of the features (knn_accuracy). With dense_sets,
    the record also holds dense_miou, the mIoU of dense nearest-neighbour retrieval (eval_seg.py --knn with
    its defaults) on those segmentation images."""
    start = time.time()
    top1, top5 = knn_accuracy(backbone, *knn_sets, max(1, 256 // world_size), args.num_workers, device, rank,
                              world_size, args.amp)
    record = dict(epoch=epoch, knn_top1=top1, knn_top5=top5)
    if write:
        log(f"epoch {epoch}: kNN top-1 {top1:.2f} top-5 {top5:.2f} on {len(knn_sets[1])} val images "
            f"({time.time() - start:.1f} s)")
    if dense_sets is not None:
        import eval_seg  # here, not at the top: eval_seg.py imports this file's plumbing
        start, dataset = time.time(), "toy" if args.dataset == "toy" else args.seg_dataset
        record["dense_miou"], _, patches = eval_seg.dense_knn_miou(
            backbone, *dense_sets, eval_seg.DENSE_KNN_K, eval_seg.DENSE_KNN_TEMPERATURE,
            eval_seg.DATASET_DEFAULTS[dataset]["memory_size"], args.seed, max(1, 64 // world_size),
            args.num_workers, device, rank, world_size, args.amp)
        log(f"epoch {epoch}: dense kNN mIoU {record['dense_miou']:.2f} on {len(dense_sets[1])} {dataset} val images, "
            f"{patches} memory patches ({time.time() - start:.1f} s)")
    if write and rank == 0:
        with open(os.path.join(args.exp_dir, "stats.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    return top1


def report_toy_knn(top1, knn_sets, args, device, rank, world_size, log):
    """The last line of a toy run: the kNN top-1 of the trained backbone (top1) next to the same arch at
    random init (the very weights this run started from: same seed, same first draws). Also written to
    EXP_DIR/results.json."""
    torch.manual_seed(args.seed)
    random_init = build_backbone(args.arch).to(device)
    untrained, _ = knn_accuracy(random_init, *knn_sets, max(1, 256 // world_size), args.num_workers, device, rank,
                                world_size, args.amp)
    memory, val = knn_sets
    if rank == 0:
        save_results(dict(knn_top1=top1, knn_top1_random_init=untrained, k=KNN_K, temperature=KNN_TEMPERATURE,
                          arch=args.arch, train_images=len(memory), val_images=len(val)), args.exp_dir)
    log(f"kNN top-1 on the toy val split (k={KNN_K}, T={KNN_TEMPERATURE}): {top1:.1f} % for this backbone, "
        f"{untrained:.1f} % for the same arch at random init (chance {100 / len(val.classes):.1f} %)")


def save_checkpoint(exp_dir, state):
    path = os.path.join(exp_dir, "model.pth")
    tmp = path + ".tmp"
    torch.save(state, tmp)
    if os.path.exists(path):
        os.replace(path, os.path.join(exp_dir, "model.prev.pth"))
    os.replace(tmp, path)


CHECKPOINTS = ("model.pth", "model.prev.pth")  # the newest first
NO_CHECKPOINT, NONE_READABLE, UNREADABLE = -1, -2, -3  # what a rank found instead of an epoch


def read_checkpoint(path):
    """A training checkpoint, or an exception naming why it cannot be used."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not {"epoch", "model", "optimizer"} <= set(ckpt):
        raise ValueError("missing epoch/model/optimizer")
    return ckpt


def choose_checkpoint(exp_dir, log):
    """(index in CHECKPOINTS of the newest readable checkpoint of EXP_DIR, or NO_CHECKPOINT /
    NONE_READABLE; that checkpoint or None)."""
    existing = [i for i, name in enumerate(CHECKPOINTS) if os.path.exists(os.path.join(exp_dir, name))]
    for i in existing:
        path = os.path.join(exp_dir, CHECKPOINTS[i])
        try:
            return i, read_checkpoint(path)
        except Exception as e:  # truncated, corrupt, or not ours: fall back to the previous one
            log(f"warning: cannot read checkpoint {path} ({type(e).__name__}: {e}); trying the previous one")
    return (NONE_READABLE if existing else NO_CHECKPOINT), None


def load_checkpoint(exp_dir, log, rank=0, world_size=1, device=torch.device("cpu")):
    """(checkpoint, path) of the newest readable checkpoint of EXP_DIR, or (None, None) for a fresh run.
    Never silently restarts. Rank 0 chooses the file and the other ranks read that same file; then
    every rank checks that all of them resume at the same epoch, and all stop together with one error
    if not (a node-local --exp-dir, a stale network file system): ranks that started at different
    epochs would wait forever in the first collective."""
    choice, ckpt = choose_checkpoint(exp_dir, log) if rank == 0 else (None, None)
    if world_size > 1:
        choice = broadcast_int(choice, world_size, device)
    if choice == NONE_READABLE:
        raise ValueError(f"no readable checkpoint in {exp_dir} (tried "
                         f"{', '.join(os.path.join(exp_dir, name) for name in CHECKPOINTS)}); move them away to "
                         "start from scratch")
    path = os.path.join(exp_dir, CHECKPOINTS[choice]) if choice != NO_CHECKPOINT else None
    if world_size == 1:
        return ckpt, path
    if rank > 0 and path is not None:
        try:
            ckpt = read_checkpoint(path)
        except Exception:
            ckpt = None  # reported below, by every rank
    epoch = ckpt["epoch"] if ckpt is not None else (NO_CHECKPOINT if path is None else UNREADABLE)
    gathered = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor([epoch], device=device))
    epochs = [int(e) for e in gathered]
    if len(set(epochs)) > 1:
        seen = {UNREADABLE: f"cannot read {path}", NO_CHECKPOINT: "finds no checkpoint"}
        others = "; ".join(f"rank {r} {seen.get(e, f'reads epoch {e}')}" for r, e in enumerate(epochs)
                           if r > 0 and e != epochs[0])
        raise ValueError(f"the ranks see different checkpoints: rank 0 resumes {path} at epoch {epochs[0]}; "
                         f"{others}. --exp-dir must be one folder that every node reads and writes")
    return ckpt, path


def broadcast_int(value, world_size, device):
    """Rank 0's integer, on every rank."""
    tensor = torch.tensor([value if value is not None else 0], device=device)
    if world_size > 1:
        dist.broadcast(tensor, src=0)
    return int(tensor)


# -----------------------------------------------------------------------------
# Run plumbing shared with the evaluation scripts (eval_linear.py, eval_seg.py): processes and
# logging, the evaluations' common flags and learning-rate sweeps, datasets, features and kNN,
# checkpoints and results files. Distributed setup: torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM's
# srun (SLURM_PROCID/...).


def setup_distributed(device_type):
    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        # srun starts one task per GPU; MASTER_ADDR/MASTER_PORT come from the job script (README)
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env["SLURM_LOCALID"]
    if int(env.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, 0
    local_rank = int(env["LOCAL_RANK"])
    if device_type == "cuda":
        local_rank = visible_gpu_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(local_rank)
    store, restart = None, int(env.get("TORCHELASTIC_RESTART_COUNT", 0))
    if restart and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun --max-restarts restarted the job: keep this attempt's rendezvous keys apart from
        # the dead attempt's in the agent's store (otherwise ranks find stale addresses)
        agent_store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False)
        store = dist.PrefixStore(f"restart_{restart}", agent_store)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=store,
                            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]))
    return dist.get_rank(), dist.get_world_size(), local_rank


def visible_gpu_index(local_rank, num_visible_gpus):
    """The GPU this process uses, among those it can see. torchrun, or srun with every GPU visible to
    every task: GPU LOCAL_RANK. srun --gpus-per-task=1 (or a GPU binding) shows each task only its
    own GPU(s) while SLURM_LOCALID still runs 0..7: wrap around the visible ones."""
    return local_rank % num_visible_gpus


def setup_run(args, tf32=False):
    """Processes, device and logging of a script run (train.py and the evaluation scripts):
    (rank, world size, this process's device, a print that only rank 0 does). tf32: float32 matrix
    products and convolutions on TF32 tensor cores (the evaluations' float32 heads and kNN similarities)."""
    rank, world_size, local_rank = setup_distributed(args.device)
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda" and tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the world size {world_size}")

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    return rank, world_size, device, log


def wrap_ddp(module, device):
    """DistributedDataParallel (gradients averaged over processes), on this process's GPU if any."""
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


def sync_batchnorm(model, device, world_size):
    """BatchNorm layers that normalise with the statistics of the global batch (all GPUs), as in the
    reference recipe, so that the result does not depend on the number of GPUs. SyncBatchNorm runs
    only on GPUs: on a CPU (gloo) each process keeps its own batch statistics. No-op for LayerNorm."""
    if device.type == "cuda" and world_size > 1:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


# Mixed precision (--amp): the networks' forward in bfloat16 or float16, everything else in float32
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def add_amp_argument(parser, what):
    parser.add_argument("--amp", default="auto", choices=["auto", *AMP_DTYPES],
                        help=f"mixed precision of {what}; auto: bf16 on GPUs that compute in it (compute "
                        "capability 8.0 and later: A100, H100, ...), fp16 on older GPUs (V100, T4 emulate "
                        "bf16), none on a CPU")


def resolve_amp(amp, device_type):
    """--amp auto -> bf16, fp16 or none for this device (asks the GPU only when the run uses CUDA, so a
    --device cpu run on a GPU host creates no CUDA context)."""
    if amp != "auto":
        return amp
    if device_type != "cuda":
        return "none"
    return "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"


def autocast(device, amp):
    """The --amp context of a forward on `device` (a no-op for none)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != "none")


def load_scaler_state(scaler, state):
    """A checkpoint's GradScaler state, when it has one: a disabled scaler (a bf16 or float32 run) saves
    {}, so a run that switches to fp16 starts from the default loss scale. Switching precision between
    runs works in every direction."""
    if state:
        scaler.load_state_dict(state)


def all_reduce_sum(tensor, world_size):
    """The tensor summed over the processes, in place (unchanged in a single process)."""
    if world_size > 1:
        dist.all_reduce(tensor)
    return tensor


def eta_string(start_time, done, start_done, total):
    """Remaining time, extrapolated from the steps done since this process started."""
    elapsed = time.time() - start_time
    remaining = elapsed / max(done - start_done, 1) * (total - done)
    return str(datetime.timedelta(seconds=int(remaining)))


def run_script(main, name):
    """main() as a command: bad input is one line and exit code 2, a diverged run exit code 1."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(1)


def log_command(args, log):
    """The first lines of a run's log: its command line and the value of every argument."""
    log(" ".join(sys.argv))
    log(json.dumps(vars(args)))


def add_common_eval_arguments(parser, name):
    """The flags both evaluation scripts take: the backbone evaluated, and the run. `name` names the
    run's checkpoint, EXP_DIR/<name>.pth, and the default EXP_DIR, ./exp/<name>."""
    a = parser.add_argument
    # model
    a("--arch", default="convnext_small", choices=ARCHS, help="backbone")
    a("--pretrained", required=True,
      help="backbone.pth / model.pth of train.py or a released backbone file; 'none' = random init")
    a("--weights", default="freeze", choices=["freeze", "finetune"],
      help="freeze: only the heads train (backbone in eval mode); finetune: the backbone too")
    # running
    a("--exp-dir", default=f"./exp/{name}", help=f"{name}.pth (for resuming) and results.json go here")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"],
      help="one process per GPU under torchrun; cpu runs (and DDP) use gloo")
    add_amp_argument(parser, "the backbone's forward (the heads and their loss stay float32)")
    a("--num-workers", type=int, default=8, help="data loading processes per training process")
    a("--log-freq", type=int, default=50, help="training steps between progress lines")
    a("--seed", type=int, default=0, help="seeds the heads' initial weights, the data order and augmentation")


def check_eval_arguments(parser, args, lr_flag, lrs):
    """The checks both evaluation scripts make of their arguments (their --dataset, --data-dir and
    --cache-features, and the flags above); `lrs` are the values of the sweep's flag `lr_flag`."""
    if args.dataset != "toy" and args.data_dir is None:
        parser.error(f"--data-dir is required with --dataset {args.dataset} (or use --dataset toy)")
    if args.weights == "finetune":
        if len(lrs) != 1:
            parser.error(f"--weights finetune trains the backbone, so it takes a single {lr_flag} value")
        if args.cache_features:
            parser.error("--cache-features needs a frozen backbone (--weights freeze)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available")
    args.amp = resolve_amp(args.amp, args.device)


def sweep_param_groups(heads, lrs):
    """The evaluation scripts' sweeps: one parameter group per head, each with its own (peak) lr."""
    return [dict(params=list(head.parameters()), lr=lr, peak_lr=lr) for head, lr in zip(heads, lrs)]


def sweep_step(optimizer, scaler, losses):
    """One optimiser step of a sweep on the sum of its heads' losses (H,): head h's gradient is that
    of its own loss alone. The scaler scales the loss for fp16 (a no-op otherwise)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses.sum()).backward()
    scaler.step(optimizer)
    scaler.update()


def check_full_batch(train_set, batch_size):
    """An error when an evaluation's training set is smaller than one (global) batch: a pass over it, its
    full batches, would train nothing."""
    if len(train_set) < batch_size:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {batch_size}")


def classification_datasets(dataset, data_dir, train_transform, val_transform, toy_images, toy_val_images):
    """(train, val) labelled images: the toy splits, or an ImageFolder tree's DATA_DIR/{train,val}."""
    if dataset == "toy":
        return (data.ToyShapes("train", num_images=toy_images, transform=train_transform),
                data.ToyShapes("val", num_images=toy_val_images, transform=val_transform))
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            raise ValueError(f"data folder not found: {os.path.join(data_dir, split)} "
                             f"(expected {data_dir}/{split}/<class>/<image files>)")
    return (data.ImageFiles(os.path.join(data_dir, "train"), train_transform),
            data.ImageFiles(os.path.join(data_dir, "val"), val_transform))


def seeded_subset(dataset, num_images, seed):
    """At most num_images items of a labelled dataset, a fixed subset drawn from the seed, in dataset order."""
    if num_images >= len(dataset):
        return dataset
    subset = Subset(dataset, sorted(random.Random(seed).sample(range(len(dataset)), num_images)))
    subset.classes = dataset.classes
    return subset


@torch.no_grad()
def compute_features(backbone, dataset, batch_size, num_workers, device, rank, world_size, amp="none"):
    """Pooled features (N, C), float32, and labels (N,) of a whole dataset, on every rank (each rank
    computes its shard, then the shards are all-gathered and put back in dataset order). The backbone
    runs under --amp."""
    backbone.eval()
    loader = DataLoader(data.shard(dataset, rank, world_size), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    # a rank's shard is empty when there are more ranks than items: it still takes part in the gather
    features = [torch.empty(0, backbone.num_features, device=device)]
    labels = [torch.empty(0, dtype=torch.long, device=device)]
    for images, targets, _ in loader:
        with autocast(device, amp):
            maps = backbone(images.to(device, non_blocking=True))  # (b, C, h, w)
        features.append(maps.float().mean(dim=(2, 3)))  # (b, C)
        labels.append(targets.to(device, non_blocking=True))
    merged = gather_shards(torch.cat([torch.cat(features), torch.cat(labels)[:, None].float()], dim=1),
                           len(dataset), world_size)  # (N, C + 1)
    return merged[:, :-1].contiguous(), merged[:, -1].long()


def gather_shards(rows, num_items, world_size):
    """The rows (n_r, D) of this rank's shard (items r, r + W, ..., as data.shard) gathered from every rank
    and put back in dataset order: (num_items, D) on every rank."""
    if world_size == 1:
        return rows
    longest = math.ceil(num_items / world_size)  # pad the shards to one length, gather, interleave back
    rows = F.pad(rows, (0, 0, 0, longest - len(rows)))
    gathered = [torch.empty_like(rows) for _ in range(world_size)]
    dist.all_gather(gathered, rows)
    return torch.stack(gathered, dim=1).reshape(longest * world_size, -1)[:num_items]  # row i = item i


@torch.no_grad()
def knn_votes(train_features, train_labels, features, num_classes, k=KNN_K, temperature=KNN_TEMPERATURE):
    """Weighted kNN votes (N, K) of `features` (N, C) among the training set's (M, C), labels (M,): the
    features are L2-normalised, each one's k most cosine-similar training images vote for their class
    with weight exp(cosine / temperature) (Wu et al. 2018; DINO's eval_knn). No training: the quick
    check of a self-supervised backbone. Queries go in chunks, so the (chunk, M) similarities stay small."""
    train_features = F.normalize(train_features, dim=1)
    votes = []
    for queries in F.normalize(features, dim=1).split(1024):
        similarity, neighbours = (queries @ train_features.T).topk(min(k, len(train_features)), dim=1)  # (q, k)
        weights = (similarity / temperature).exp()
        votes.append(weights.new_zeros(len(queries), num_classes).scatter_add_(1, train_labels[neighbours], weights))
    return torch.cat(votes)


def knn_accuracy(backbone, train_set, val_set, batch_size, num_workers, device, rank, world_size, amp="none"):
    """kNN top-1 and top-5 (%) on val_set of the backbone's pooled features, train_set as the memory.
    Every rank holds all the features and classifies its shard of the val set (items rank, rank + W, ...
    as data.shard; none when there are more ranks than val items); the hits are summed over the ranks."""
    train_features, train_labels = compute_features(backbone, train_set, batch_size, num_workers, device, rank,
                                                    world_size, amp)
    val_features, val_labels = compute_features(backbone, val_set, batch_size, num_workers, device, rank, world_size,
                                                amp)
    num_classes = len(train_set.classes)
    votes = knn_votes(train_features, train_labels, val_features[rank::world_size], num_classes)  # (n_r, K)
    top5 = votes.topk(min(5, num_classes), dim=1).indices  # (n_r, 5)
    hits = top5 == val_labels[rank::world_size, None]
    counts = all_reduce_sum(torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).float(), world_size)
    top1, top5 = (100 * counts / len(val_set)).tolist()
    return top1, top5


# -----------------------------------------------------------------------------
# Checkpoints and results: written atomically, loaded with weights_only=True

def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_results(results, exp_dir):
    """EXP_DIR/results.json of an evaluation, written atomically like every other file of a run."""
    os.makedirs(exp_dir, exist_ok=True)
    tmp = os.path.join(exp_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, os.path.join(exp_dir, "results.json"))


def resume_evaluation(path, model, optimizer, scaler, lr_flag, lrs, log):
    """An evaluation's checkpoint at `path`, its model, optimizer and loss-scaler states loaded into
    model, optimizer and scaler, or None when there is none yet. It must come from the same sweep (`lrs`, the values of
    `lr_flag`, kept in the checkpoint under the flag's name); an unreadable checkpoint, or one of another
    --arch, --weights or number of classes, is a one-line error."""
    if not os.path.exists(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read checkpoint {path} ({type(error).__name__}); move it away to start "
                         "from scratch") from None
    log(f"resuming from {path}")
    trained_lrs = ckpt.get(lr_flag.lstrip("-").replace("-", "_"))  # --lr-head: ckpt["lr_head"]
    if trained_lrs != lrs:
        raise ValueError(f"{path} was trained with {lr_flag} {trained_lrs}, not {lrs}")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        load_scaler_state(scaler, ckpt.get("scaler"))
    except (RuntimeError, ValueError, KeyError) as error:
        raise ValueError(f"checkpoint {path} does not match this run (--arch, --weights, classes): "
                         f"{str(error).splitlines()[0]}") from None
    return ckpt


def finish_evaluation(results, summary, exp_dir, rank, world_size, log):
    """The end of an evaluation run: EXP_DIR/results.json, the summary line that points to it, and the
    processes' exit from their group."""
    if rank == 0:
        save_results(results, exp_dir)
    log(f"{summary} (results in {os.path.join(exp_dir, 'results.json')})")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_script(main, "train.py")
