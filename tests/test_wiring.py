"""The wiring of the scripts, each checked against a computation written in the test: what train.py's
criterion receives (each view's own grid, every loss flag), the learning rate each step applies, the
random-init baseline; eval_seg.py's training crops, loss, schedule, evaluation and resume; eval_linear.py's
schedule, fine-tuning learning rates and resume. tests/mutants.py plants the bugs these tests target."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import eval_linear
import eval_seg
import train
from loss import VICRegLLoss
from model import VICRegL
from naive_loss import naive_location_grids, naive_vicregl_loss
from test_eval import linear_args, seg_args
from train import save_atomic

# 8 toy images, batch 8: one step per epoch; epoch 1 warms up, epochs 2-3 decay
TRAIN_RUN = ["--dataset", "toy", "--toy-images", "8", "--toy-val-images", "8", "--arch", "convnext_toy",
             "--size-crops", "32", "16", "--min-scale-crops", "0.3", "0.1", "--max-scale-crops", "1", "0.3",
             "--mlp", "32-32", "--maps-mlp", "16-16", "--batch-size", "8", "--epochs", "3", "--warmup-epochs", "1",
             "--base-lr", "0.01", "--num-workers", "0", "--device", "cpu", "--log-freq", "1"]
# every flag of the criterion away from its default, 3 large views and --ignore-flips
FLAGS_RUN = ["--num-crops", "3", "1", "--num-matches", "3", "2", "--alpha", "0.4", "--inv-coeff", "20",
             "--var-coeff", "30", "--cov-coeff", "2", "--gamma-rule", "paper", "--feature-matches", "top",
             "--local-matching", "features", "--local-terms", "vi", "--ignore-flips", "--simple", "--epochs", "1"]


class Recorder:
    """What a train.main run passed between its pieces: the loader's (boxes, flips), the criterion's
    options, inputs and outputs, the learning rates of every optimiser step, the initial backbones."""

    def __init__(self, monkeypatch):
        self.batches, self.calls, self.step_lrs = [], [], []
        recorder = self

        class RecordingLoss(VICRegLLoss):
            def __init__(self, **options):
                super().__init__(**options)
                recorder.criterion = self

            def forward(self, embeddings, maps, grids):
                loss, stats = super().forward(embeddings, maps, grids)
                detached = [[t.detach().clone() for t in ts] for ts in (embeddings, maps, grids)]
                recorder.calls.append((*detached, loss.detach(), stats))
                return loss, stats

        class RecordingModel(VICRegL):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                recorder.initial_backbone = {k: v.clone() for k, v in self.backbone.state_dict().items()}

        def make_loader(*args, **kwargs):
            for batch in original_make_loader(*args, **kwargs):
                (_, boxes, flips), _, _ = batch
                self.batches.append((boxes.clone(), flips.clone()))
                yield batch

        def build_optimizer(*args, **kwargs):
            optimizer = original_build_optimizer(*args, **kwargs)
            optimizer.register_step_pre_hook(
                lambda opt, *_: self.step_lrs.append([group["lr"] for group in opt.param_groups]))
            return optimizer

        def build_backbone(*args, **kwargs):  # report_toy_knn's random-init baseline
            backbone = original_build_backbone(*args, **kwargs)
            self.random_init_backbone = {k: v.clone() for k, v in backbone.state_dict().items()}
            return backbone

        original_make_loader, original_build_optimizer = data.make_loader, train.build_optimizer
        original_build_backbone = train.build_backbone
        monkeypatch.setattr(train, "VICRegLLoss", RecordingLoss)
        monkeypatch.setattr(train, "VICRegL", RecordingModel)
        monkeypatch.setattr(data, "make_loader", make_loader)
        monkeypatch.setattr(train, "build_optimizer", build_optimizer)
        monkeypatch.setattr(train, "build_backbone", build_backbone)


def recorded_train_run(exp_dir, *flags):
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = Recorder(monkeypatch)
        train.main(TRAIN_RUN + ["--exp-dir", str(exp_dir), *flags])
    recorder.records = [json.loads(line) for line in open(exp_dir / "stats.jsonl")]
    return recorder


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return recorded_train_run(tmp_path_factory.mktemp("default"), "--num-crops", "2", "2", "--num-matches", "4", "1")


@pytest.fixture(scope="module")
def flags_run(tmp_path_factory):
    return recorded_train_run(tmp_path_factory.mktemp("flags"), *FLAGS_RUN)


def assert_grids_are_the_boxes(run, flipped):
    """Every view's grid, as the criterion received it, is the cell centres of that view's own box,
    with its own flip (flipped=True) or as if unflipped (--ignore-flips)."""
    assert len(run.calls) == len(run.batches) > 0
    for (boxes, flips), (_, maps, grids, _, _) in zip(run.batches, run.calls):
        assert len(grids) == boxes.shape[1] == flips.shape[1]
        for v, (grid, view_map) in enumerate(zip(grids, maps)):
            height, width = view_map.shape[1:3]
            view_flips = flips[:, v] if flipped else torch.zeros_like(flips[:, v])
            expected = naive_location_grids(boxes[:, v], view_flips, height, width)
            torch.testing.assert_close(grid.double(), expected, rtol=1e-6, atol=1e-4)
    all_flips = torch.cat([flips.flatten() for _, flips in run.batches])
    assert all_flips.any() and not all_flips.all()  # the loader drew both kinds of view


def test_each_view_reaches_the_criterion_with_its_own_box_and_flip(default_run):
    assert_grids_are_the_boxes(default_run, flipped=True)


def test_ignore_flips_gives_the_criterion_unflipped_grids(flags_run):
    assert_grids_are_the_boxes(flags_run, flipped=False)


def test_the_criterion_of_a_run_carries_every_loss_flag(flags_run):
    # the naive reference, with the options written out here, on what the run's criterion received
    options = dict(alpha=0.4, inv_coeff=20.0, var_coeff=30.0, cov_coeff=2.0, num_matches=(3, 2), num_large_views=3,
                   gamma_rule="paper", feature_matches="top", local_matching="features", local_terms="vi")
    for embeddings, maps, grids, loss, stats in flags_run.calls:
        assert len(embeddings) == 4
        expected_loss, expected_stats = naive_vicregl_loss([z.double() for z in embeddings],
                                                           [m.double() for m in maps],
                                                           [g.double() for g in grids], **options)
        torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-4, atol=1e-5)
        for name, value in expected_stats.items():
            torch.testing.assert_close(stats[name].double(), value, rtol=1e-4, atol=1e-5)
        assert stats["local_cov"] == 0 and stats["local_var"] > 0
    assert flags_run.criterion.simple  # --simple: the paper-shaped loops (same numbers, so asked directly)


def hand_schedule(step, total_steps, warmup_steps, peak_lr, end_ratio=1e-3):
    """The pretraining schedule (README): linear warm-up from 0 over warmup_steps, then cosine from the
    peak to peak × end_ratio at total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    end = peak_lr * end_ratio
    return end + (peak_lr - end) * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2


def test_every_step_applies_and_logs_the_schedule_at_its_step(default_run):
    peak = 0.01 * 8 / 256  # --base-lr × batch / 256
    expected = [hand_schedule(step, 3, 1, peak) for step in range(3)]  # steps 0, 1, 2 (one per epoch)
    assert expected[0] == 0 and expected[1] == peak  # warm-up, then the peak
    for lrs, lr in zip(default_run.step_lrs, expected, strict=True):  # every parameter group, every step
        assert lrs == pytest.approx([lr] * len(lrs), rel=1e-12, abs=0)
    steps = [r for r in default_run.records if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]  # record n: the mean of step n (0-based n - 1)
    assert [r["lr"] for r in steps] == pytest.approx(expected, rel=1e-12, abs=0)


def test_the_random_init_baseline_is_the_runs_initial_backbone(default_run):
    initial, baseline = default_run.initial_backbone, default_run.random_init_backbone
    assert initial.keys() == baseline.keys()
    for name in initial:
        assert torch.equal(initial[name], baseline[name]), name


@pytest.mark.parametrize("num_large_views", [1, 3])
@pytest.mark.parametrize("path", ["simple", "fast"])
def test_criterion_matches_the_naive_reference_with_one_or_three_large_views(num_large_views, path):
    # 4 views, the large ones 4x4 maps and the others 2x2, grids written out by naive_location_grid
    generator = torch.Generator().manual_seed(num_large_views)
    batch, channels, dim = 6, 5, 7
    embeddings, maps, grids = [], [], []
    for v in range(4):
        side = 4 if v < num_large_views else 2
        embeddings.append(torch.randn(batch, dim, generator=generator, dtype=torch.float64).requires_grad_())
        maps.append(torch.randn(batch, side, side, channels, generator=generator, dtype=torch.float64).requires_grad_())
        boxes = torch.cat([torch.randint(0, 50, (batch, 2), generator=generator),
                           torch.randint(8, 40, (batch, 2), generator=generator)], dim=1)
        grids.append(naive_location_grids(boxes, torch.rand(batch, generator=generator) < 0.5, side, side))
    options = dict(alpha=0.6, num_matches=(5, 2), num_large_views=num_large_views)
    loss, stats = VICRegLLoss(simple=path == "simple", **options)(embeddings, maps, grids)
    expected_loss, expected_stats = naive_vicregl_loss(embeddings, maps, grids, **options)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
    for name, value in expected_stats.items():
        torch.testing.assert_close(stats[name], value, rtol=1e-10, atol=1e-10)
    inputs = embeddings + maps
    for grad, expected in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(expected_loss, inputs)):
        torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- eval_seg.py

def test_seg_training_crops_keep_image_and_label_aligned():
    # an image that encodes its own label: column x has label 3 × (x // 8) (0, 3, ..., 21: increasing,
    # so never symmetric under a mirror, and spaced, so that an interpolated label is no label) and red
    # value 10 × label; rescaling, cropping and flipping must move both together
    width = height = 64
    labels = np.tile((3 * (np.arange(width) // 8)).astype(np.uint8), (height, 1))
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = 10 * labels
    img, mask = Image.fromarray(pixels), Image.fromarray(labels)
    transform = data.SegTrainTransform(48, base_size=64)
    mean, std = data.IMAGENET_MEAN[0], data.IMAGENET_STD[0]
    flipped_seen = 0
    for seed in range(12):
        data.random.seed(seed)
        image, label = transform(img, mask)
        decoded = torch.round((image[0] * std + mean) * 255 / 10)
        labelled = label != data.IGNORE_LABEL
        assert set(label[labelled].tolist()) <= set(range(0, 22, 3))  # the mask is resized by nearest neighbour
        # bilinear image vs nearest label: only the columns next to a stripe's edge may disagree
        agreement = (decoded[labelled] == label[labelled]).double().mean()
        assert agreement > 0.85, (seed, agreement)
        first_row = label[0][labelled[0]]
        flipped_seen += bool(len(first_row) > 1 and first_row[0] > first_row[-1])
    assert 0 < flipped_seen < 12  # both flipped and unflipped crops were drawn


SEG_RUN = ["--iters", "5", "--warmup-iters", "2", "--poly-power", "2", "--crop-size", "40", "--base-size", "24"]


def recorded_seg_run(exp_dir, monkeypatch):
    """eval_seg.main on toy data, 2 steps per epoch over 3 epochs (crops larger than the rescaled images, so
    every batch has padding labelled 255); records each step's labels, logits, losses and learning rates."""
    steps = []
    original_forward, original_step, original_loader = eval_seg.SegModel.forward, eval_seg.sweep_step, data.make_loader

    def make_loader(*args, **kwargs):
        for inputs, labels in original_loader(*args, **kwargs):
            steps.append(dict(labels=labels.clone()))
            yield inputs, labels

    def forward(self, *args, **kwargs):
        logits = original_forward(self, *args, **kwargs)
        if self.training:
            steps[-1]["logits"] = logits.detach().clone()
        return logits

    def sweep_step(optimizer, scaler, losses):
        steps[-1].update(losses=losses.detach().clone(), lrs=[group["lr"] for group in optimizer.param_groups])
        original_step(optimizer, scaler, losses)

    monkeypatch.setattr(data, "make_loader", make_loader)
    monkeypatch.setattr(eval_seg.SegModel, "forward", forward)
    monkeypatch.setattr(eval_seg, "sweep_step", sweep_step)
    results = eval_seg.main(seg_args(exp_dir, ["1e-2", "1e-3"], *SEG_RUN))
    return results, [step for step in steps if "losses" in step]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        exp_dir = tmp_path_factory.mktemp("seg")
        results, steps = recorded_seg_run(exp_dir, monkeypatch)
    return exp_dir, results, steps


def test_seg_training_loss_is_the_mean_over_labelled_pixels(seg_run):
    _, _, steps = seg_run
    assert len(steps) == 5
    for step in steps:
        labels, logits = step["labels"], step["logits"]  # (B, S, S), (H, B, K, S, S)
        assert (labels == data.IGNORE_LABEL).any() and (labels != data.IGNORE_LABEL).any()
        labelled = labels != data.IGNORE_LABEL
        for head, head_logits in enumerate(logits):
            # −log softmax of the true class, at every pixel with a class, averaged over those pixels
            scores = head_logits.permute(0, 2, 3, 1)[labelled].double()  # (P, K)
            true = labels[labelled]
            nll = [torch.logsumexp(s, 0) - s[t] for s, t in zip(scores, true)]
            torch.testing.assert_close(step["losses"][head].double(), sum(nll) / len(nll), rtol=1e-5, atol=1e-6)


def test_seg_learning_rate_is_warmup_times_poly_with_its_power(seg_run):
    _, _, steps = seg_run
    for t, step in enumerate(steps):
        scale = min(1.0, t / 2) * (1 - t / 5) ** 2  # --warmup-iters 2, --iters 5, --poly-power 2
        assert step["lrs"] == pytest.approx([1e-2 * scale, 1e-3 * scale], rel=1e-12, abs=0)


class Interrupted(Exception):
    pass


def test_seg_killed_and_resumed_equals_uninterrupted(seg_run, tmp_path, monkeypatch):
    straight_dir, straight_results, _ = seg_run

    def stop_after_epoch_1(state, path):
        save_atomic(state, path)
        if state["epoch"] == 1:
            raise Interrupted

    monkeypatch.setattr(eval_seg, "save_atomic", stop_after_epoch_1)
    with pytest.raises(Interrupted):
        eval_seg.main(seg_args(tmp_path, ["1e-2", "1e-3"], *SEG_RUN))
    monkeypatch.setattr(eval_seg, "save_atomic", save_atomic)
    resumed_results = eval_seg.main(seg_args(tmp_path, ["1e-2", "1e-3"], *SEG_RUN))
    straight = torch.load(straight_dir / "seg.pth", weights_only=True)
    resumed = torch.load(tmp_path / "seg.pth", weights_only=True)
    assert (resumed["epoch"], resumed["step"]) == (straight["epoch"], straight["step"]) == (3, 5)
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    assert resumed_results == straight_results


def per_image_confusion(model, dataset, num_classes):
    """(H, K, K) confusion of every head, one image at a time: whole-image logits (the crop covers the
    image), bilinearly resized to the label's resolution, argmax, counted pixel by pixel (255 left out)."""
    confusion = np.zeros((len(model.heads.heads), num_classes, num_classes), np.int64)
    with torch.no_grad():
        for i in range(len(dataset)):
            image, label = dataset[i]
            logits = model(image[None])[:, 0]  # (H, K, h, w)
            logits = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
            for head, prediction in enumerate(logits.argmax(1)):
                for true, predicted in zip(label.flatten().tolist(), prediction.flatten().tolist()):
                    if true != data.IGNORE_LABEL:
                        confusion[head, true, predicted] += 1
    return confusion


def test_seg_evaluate_equals_a_per_image_loop_with_bilinear_logits():
    torch.manual_seed(0)
    backbone = eval_seg.build_backbone("convnext_toy")
    stages = backbone.forward_stages(torch.zeros(1, 3, 32, 32))
    heads = eval_seg.seg_heads(sum(m.shape[1] for m in stages), 9, 2, seed=0)
    for head in heads.heads:  # heads whose argmax varies within an image
        torch.nn.init.normal_(head[1].weight, std=3.0)
        head[0].running_var.fill_(0.01)
    model = eval_seg.SegModel(backbone, heads, frozen=True).eval()
    # images at 20 px (the labels stay at 64 px): the logits are resized 3.2x before the argmax
    dataset = data.ToySegmentation("val", num_images=3, transform=data.SegValTransform(20))
    confusion = eval_seg.evaluate(model, dataset, 9, crop=32, stride=21, num_workers=0,
                                  device=torch.device("cpu"), rank=0, world_size=1)
    expected = per_image_confusion(model, dataset, 9)
    assert (expected.sum(axis=(1, 2)) == 3 * 64 * 64).all()
    assert (expected.sum(axis=1) > 0).sum() >= 4  # several classes predicted
    np.testing.assert_array_equal(confusion.numpy(), expected)


# --------------------------------------------------------------------------- eval_linear.py

# fine-tuning, 2 epochs of 2 steps (32 images, batch 16): a head and a backbone learning rate
LINEAR_FINETUNE = ["--weights", "finetune", "--lr-backbone", "0.05", "--epochs", "2", "--toy-images", "32"]


def linear_run(exp_dir, stop_after_epoch=None):
    """eval_linear.main fine-tuning (LINEAR_FINETUNE); the learning rates of every parameter group at every
    step (the head's group first, then the backbone's: (lr, number of parameters))."""
    step_lrs = []
    original_step = eval_linear.sweep_step

    def sweep_step(optimizer, scaler, losses):
        step_lrs.append([(group["lr"], len(group["params"])) for group in optimizer.param_groups])
        original_step(optimizer, scaler, losses)

    def save(state, path):
        save_atomic(state, path)
        if state["epoch"] == stop_after_epoch:
            raise Interrupted

    args = linear_args(exp_dir, ["0.2"])
    for flag, value in zip(LINEAR_FINETUNE[::2], LINEAR_FINETUNE[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(eval_linear, "sweep_step", sweep_step)
        monkeypatch.setattr(eval_linear, "save_atomic", save)
        try:
            eval_linear.main(args)
        except Interrupted:
            pass
    return step_lrs


@pytest.fixture(scope="module")
def linear_finetune_run(tmp_path_factory):
    exp_dir = tmp_path_factory.mktemp("linear")
    return exp_dir, linear_run(exp_dir)


def test_linear_schedule_per_step_and_the_backbone_has_its_own_learning_rate(linear_finetune_run):
    _, step_lrs = linear_finetune_run
    assert len(step_lrs) == 4
    backbone_params = len(list(eval_linear.build_backbone("convnext_toy").parameters()))
    for step, groups in enumerate(step_lrs):
        cosine = (1 + math.cos(math.pi * step / 4)) / 2  # 4 steps, from the peak towards 0
        assert groups == [(pytest.approx(0.2 * cosine, rel=1e-12, abs=0), 2),  # the head: weight, bias
                          (pytest.approx(0.05 * cosine, rel=1e-12, abs=0), backbone_params)]


def test_linear_killed_and_resumed_run_has_the_weights_of_an_uninterrupted_one(linear_finetune_run, tmp_path):
    straight_dir, straight_lrs = linear_finetune_run
    linear_run(tmp_path, stop_after_epoch=1)
    resumed_lrs = linear_run(tmp_path)
    assert resumed_lrs == straight_lrs[2:]  # the second epoch's steps, nothing repeated
    straight = torch.load(straight_dir / "linear.pth", weights_only=True)
    resumed = torch.load(tmp_path / "linear.pth", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 2
    for name, value in straight["model"].items():  # the fine-tuned backbone and the head, bit for bit
        assert torch.equal(resumed["model"][name], value), name
    momentum = straight["optimizer"]["state"]
    assert momentum.keys() == resumed["optimizer"]["state"].keys()
    for index, state in momentum.items():
        assert torch.equal(resumed["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"])
