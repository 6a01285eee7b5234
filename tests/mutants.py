"""Mutation testing of the suite: plant one plausible bug at a time and run the tests that should catch it.

    python tests/mutants.py                      # every mutant, each with its own test selection
    python tests/mutants.py --only train_view0_box --only seg_label_not_flipped
    python tests/mutants.py --tests tests/test_wiring.py   # every mutant against these tests only
    python tests/mutants.py --list

Each mutant is an exact string replacement in one file of the repository (the string must occur exactly
once). The file is rewritten in place, the tests run in a fresh pytest process (with a timeout and a
private bytecode cache, so that no stale .pyc of the original is ever imported), and the original text
is written back in a `finally`, also on Ctrl-C or SIGTERM. A mutant is CAUGHT when a test fails (the
failing tests are named), SURVIVED when all pass, TIMEOUT when the tests did not finish in --timeout. Not collected by pytest (its name is not test_*.py).
"""
import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# the test files that exercise each script (a missing file, e.g. in an older checkout, is skipped)
TRAIN_TESTS = ["tests/test_train.py", "tests/test_reliability.py", "tests/test_monitoring.py", "tests/test_wiring.py"]
LOSS_TESTS = ["tests/test_loss.py", "tests/test_wiring.py"]
MODEL_TESTS = ["tests/test_model.py", "tests/test_reliability.py", "tests/test_wiring.py"]
SEG_TESTS = ["tests/test_eval.py", "tests/test_wiring.py"]
LINEAR_TESTS = ["tests/test_eval.py", "tests/test_wiring.py"]
DATA_SEG_TESTS = ["tests/test_data.py", "tests/test_eval.py", "tests/test_wiring.py"]
DENSE_TESTS = ["tests/test_dense_knn.py"]

# (name, file, original text, mutated text, test files)
MUTANTS = [
    # train.py: which grid reaches the criterion
    ("train_view0_box", "train.py", "location_grid(boxes[:, v], flips[:, v]", "location_grid(boxes[:, 0], flips[:, v]",
     TRAIN_TESTS),
    ("train_view0_flip", "train.py", "location_grid(boxes[:, v], flips[:, v]", "location_grid(boxes[:, v], flips[:, 0]",
     TRAIN_TESTS),
    ("train_ignore_flips_always", "train.py", "flips = torch.zeros_like(flips) if args.ignore_flips else flips",
     "flips = torch.zeros_like(flips)", TRAIN_TESTS),
    ("train_ignore_flips_never", "train.py", "flips = torch.zeros_like(flips) if args.ignore_flips else flips",
     "flips = flips", TRAIN_TESTS),
    # train.py: flags that never reach the criterion
    ("train_no_gamma_rule", "train.py", "gamma_rule=args.gamma_rule,", "", TRAIN_TESTS),
    ("train_no_local_terms", "train.py", "local_terms=args.local_terms, simple=args.simple)",
     "simple=args.simple)", TRAIN_TESTS),
    ("train_no_simple", "train.py", "local_terms=args.local_terms, simple=args.simple)",
     "local_terms=args.local_terms)", TRAIN_TESTS),
    ("train_no_num_large_views", "train.py", "num_large_views=args.num_crops[0],", "", TRAIN_TESTS),
    ("train_no_feature_matches", "train.py", "feature_matches=args.feature_matches,", "", TRAIN_TESTS),
    ("train_no_local_matching", "train.py", "local_matching=args.local_matching,", "", TRAIN_TESTS),
    ("train_coefficients_swapped", "train.py", "inv_coeff=args.inv_coeff, var_coeff=args.var_coeff",
     "inv_coeff=args.var_coeff, var_coeff=args.inv_coeff", TRAIN_TESTS),
    ("train_no_alpha", "train.py", "criterion = VICRegLLoss(alpha=args.alpha,", "criterion = VICRegLLoss(", TRAIN_TESTS),
    # train.py: the learning rate the loop applies
    ("train_lr_one_step_late", "train.py", "lr = learning_rate(step, total_steps", "lr = learning_rate(step + 1, total_steps",
     TRAIN_TESTS),
    ("train_lr_not_scaled_by_batch", "train.py", "peak_lr = args.base_lr * args.batch_size / 256",
     "peak_lr = args.base_lr", TRAIN_TESTS),
    # the random state of the initial weights
    ("model_draw_before_backbone", "model.py", "        self.backbone = build_backbone(arch, drop_path_rate=drop_path_rate)",
     "        torch.rand(1)\n        self.backbone = build_backbone(arch, drop_path_rate=drop_path_rate)", MODEL_TESTS),
    ("train_baseline_not_reseeded", "train.py", "    torch.manual_seed(args.seed)\n    random_init",
     "    random_init", TRAIN_TESTS),
    # loss.py: more than two large views
    ("loss_two_large_views_only", "loss.py", "for a in range(self.num_large_views) for b",
     "for a in range(min(self.num_large_views, 2)) for b", LOSS_TESTS),
    ("loss_paper_rule_two_large", "loss.py", "self.num_matches[0] if v < self.num_large_views",
     "self.num_matches[0] if v < 2", LOSS_TESTS),
    # eval_seg.py (and its data)
    ("seg_label_not_flipped", "data.py", "image, label = image.flip(-1), label.flip(-1)",
     "image, label = image.flip(-1), label", DATA_SEG_TESTS),
    ("seg_mask_bilinear", "data.py", "mask = _resize_short_side(mask, short_side, Image.NEAREST)",
     "mask = _resize_short_side(mask, short_side, Image.BILINEAR)", DATA_SEG_TESTS),
    ("seg_255_is_a_class", "eval_seg.py", "F.cross_entropy(head_logits, labels, ignore_index=data.IGNORE_LABEL)",
     "F.cross_entropy(head_logits, labels.clamp(max=num_classes - 1))", SEG_TESTS),
    ("seg_eval_nearest", "eval_seg.py", 'size=label.shape[-2:], mode="bilinear", align_corners=False)',
     'size=label.shape[-2:], mode="nearest")', SEG_TESTS),
    ("seg_poly_power_ignored", "eval_seg.py", "args.warmup_iters, args.poly_power)", "args.warmup_iters, 0.9)",
     SEG_TESTS),
    ("seg_warmup_one_step_early", "eval_seg.py", "min(1.0, step / warmup_steps)", "min(1.0, (step + 1) / warmup_steps)",
     SEG_TESTS),
    ("seg_resume_at_step_0", "eval_seg.py", 'start_epoch, step = ckpt["epoch"], ckpt["step"]',
     'start_epoch, step = ckpt["epoch"], 0', SEG_TESTS),
    # eval_seg.py --knn and train.py's dense_miou: dense nearest-neighbour retrieval
    ("dense_no_temperature", "eval_seg.py", "F.softmax(similarity / temperature, dim=1)", "F.softmax(similarity, dim=1)",
     DENSE_TESTS),
    ("dense_one_neighbour_short", "eval_seg.py", "topk(min(k, len(memory_features)), dim=1)",
     "topk(min(k - 1, len(memory_features)), dim=1)", DENSE_TESTS),
    ("dense_ignored_as_background", "eval_seg.py", "labels < num_classes), labels, num_classes)",
     "labels < num_classes), labels, 0)", DENSE_TESTS),
    ("dense_cells_of_another_image", "eval_seg.py", "cells[rank + world_size * torch.arange(done, done + len(images))]",
     "cells[rank + torch.arange(done, done + len(images))]", DENSE_TESTS),
    ("dense_nearest_upsampling", "eval_seg.py", "scores = F.interpolate(scores, size=label.shape[-2:], mode=\"bilinear\", "
     "align_corners=False)", "scores = F.interpolate(scores, size=label.shape[-2:], mode=\"nearest\")", DENSE_TESTS),
    ("train_dense_k_20", "train.py", "backbone, *dense_sets, eval_seg.DENSE_KNN_K,", "backbone, *dense_sets, 20,",
     DENSE_TESTS),
    ("train_dense_seg_data_dir_ignored", "train.py",
     "eval_seg.dense_knn_datasets(args.seg_dataset, args.seg_data_dir, None)",
     "eval_seg.dense_knn_datasets(args.seg_dataset, args.data_dir, None)", DENSE_TESTS),
    # eval_linear.py
    ("linear_cosine_one_step_late", "eval_linear.py", "math.pi * step / total_steps", "math.pi * (step + 1) / total_steps",
     LINEAR_TESTS),
    ("linear_backbone_gets_head_lr", "eval_linear.py", "lr=args.lr_backbone, peak_lr=args.lr_backbone",
     "lr=args.lr_head[0], peak_lr=args.lr_head[0]", LINEAR_TESTS),
    ("linear_resume_at_step_0", "eval_linear.py", "step = start_step = start_epoch * steps_per_epoch",
     "step = start_step = 0", LINEAR_TESTS),
    ("eval_resume_without_optimizer", "train.py",
     '        optimizer.load_state_dict(ckpt["optimizer"])\n        load_scaler_state(scaler, ckpt.get("scaler"))',
     '        load_scaler_state(scaler, ckpt.get("scaler"))', LINEAR_TESTS),
]


class Stop(Exception):
    """SIGTERM, turned into an exception so that the `finally` that restores the file runs."""


def stop(signum, frame):
    raise Stop


def failing_tests(output):
    """Node ids of the tests pytest reported as FAILED or ERROR (from its -rfE summary)."""
    return sorted({m.group(2) for m in re.finditer(r"^(FAILED|ERROR) (\S+)", output, re.MULTILINE)})


def run_mutant(name, path, old, new, tests, timeout, extra_args):
    """Plant one mutant, run its tests, restore the file. Returns (verdict, failing tests, seconds)."""
    target = ROOT / path
    original = target.read_text()
    if original.count(old) != 1:
        return "STALE", [f"the original text occurs {original.count(old)} times in {path}"], 0.0
    tests = [t for t in tests if (ROOT / t.split("::")[0]).exists()]
    start = time.time()
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, PYTHONPYCACHEPREFIX=cache)  # a private bytecode cache: never the original's .pyc
        try:
            target.write_text(original.replace(old, new))
            try:
                out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                                      *extra_args, *tests], cwd=ROOT, env=env, capture_output=True, text=True,
                                     timeout=timeout)
            except subprocess.TimeoutExpired:  # neither verdict: a hang or a slow machine, rerun with more time
                return "TIMEOUT", [f"no verdict after {timeout} s"], time.time() - start
        finally:
            target.write_text(original)
    failed = failing_tests(out.stdout)
    if out.returncode == 0:
        return "SURVIVED", [], time.time() - start
    if not failed:  # pytest itself failed (collection, usage): show why rather than a verdict
        return "BROKEN", [out.stdout[-2000:] + out.stderr[-2000:]], time.time() - start
    return "CAUGHT", failed, time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="run this mutant (repeatable)")
    parser.add_argument("--tests", nargs="+", help="test files or node ids instead of each mutant's own selection")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, passed through")
    parser.add_argument("--first-failure", action="store_true", help="pytest -x: stop at the first failing test")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per mutant")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m[0] in args.only]
    if args.only and len(mutants) != len(set(args.only)):
        parser.error(f"unknown mutant in {args.only}; --list shows them")
    if args.list:
        for name, path, old, new, tests in mutants:
            print(f"{name}: {path}: {old!r} -> {new!r}")
        return
    extra = (["-x"] if args.first_failure else []) + (["-k", args.keyword] if args.keyword else [])
    signal.signal(signal.SIGTERM, stop)
    results = {}
    for name, path, old, new, tests in mutants:
        verdict, failed, seconds = run_mutant(name, path, old, new, args.tests or tests, args.timeout, extra)
        results[name] = dict(verdict=verdict, failed=failed, seconds=round(seconds, 1))
        print(f"{name}: {verdict} ({seconds:.0f} s){': ' + ', '.join(failed) if failed else ''}", flush=True)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    survived = [name for name, r in results.items() if r["verdict"] != "CAUGHT"]
    print(f"{len(results) - len(survived)} of {len(results)} caught" + (f"; not caught: {', '.join(survived)}"
                                                                        if survived else ""))
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
