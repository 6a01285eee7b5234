"""Speed and memory benchmarks of the project (one entry point; not collected by pytest).

Run all sections with `python tests/benchmark.py`, or some with `python tests/benchmark.py --only SECTION ...`.

transform: images/s of data.MultiCropTransform (2 x 224 + 6 x 96 views), its default augmentation on
tensors against simple=True, the same recipe composed from torchvision's transforms on PIL images (what
one would otherwise run), JPEG decode included, one thread (one loading worker), per CPU-second, on
matplotlib's grace_hopper.jpg photo and on an ImageNet-sized JPEG made from it.

loader: images/s of the whole DataLoader (data.make_loader over data.ImageFiles of JPEG files in a
temporary folder, the default MultiCropTransform, collation included) with N workers (--workers),
wall-clock: what sizes --num-workers.

local_loss: forward + backward of VICRegLLoss(alpha=0): the fast local criterion (all pairs at once, the
default) against the simple one (simple=True: loops over pairs and matched sets, one (C, C) covariance
per kept cell), at B=64, C=512, 2 views of 7x7 + 6 views of 3x3, float32 on CPU, measured side by side
(interleaved processes) in one run. Both use the same matching (matching.py), so only the criterion
differs.

quickstart: wall-clock seconds of the README's quickstart command (training + the kNN line), one run
after the other: the working tree, a baseline revision (--baseline-rev, default the main of before the
simple paths) with the quickstart command of its own README, and the working tree with --simple, each
with its kNN line. About 30 minutes on 2 cores; run it on an idle machine.

table11: the analogue of the paper's Table 11, VICRegL (alpha=0.75) against VICReg (alpha=1, no local
projector, no local loss) with the same backbone and views: one full training step (train.compute_loss
+ backward + AdamW step) on fixed random inputs. On CUDA: convnext_small, 2 x 224 + 6 x 96, batch 64,
bf16, channels_last, peak memory = torch.cuda.max_memory_allocated; on CPU: convnext_toy,
2 x 112 + 6 x 48, batch 32, float32 (see TABLE11_CONFIGS). Then the cost of BatchNorm statistics per
view: a ResNet VICRegL step (same views) with the backbone run once per view (the reference code's
behaviour and our default for BatchNorm backbones) against once per resolution (the views of one
resolution concatenated, as for LayerNorm backbones).

In local_loss, table11 and compile every measured variant runs in a fresh subprocess, so that its peak
resident memory (ru_maxrss) is its own; on CPU a process that only builds the inputs gives the baseline
that is subtracted.
"""

import argparse
import io
import json
import os
import pathlib
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from functools import partial

TESTS_DIR = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS_DIR.parent), str(TESTS_DIR)]

import matplotlib.cbook  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402
from loss import VICRegLLoss  # noqa: E402
from matching import location_grid  # noqa: E402
from model import VICRegL  # noqa: E402


def peak_rss_mib():
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_in_subprocess(call):
    """Run `benchmark.<call>` in a fresh Python process; return the JSON object of its last line."""
    code = f"import benchmark; benchmark.{call}"
    out = subprocess.run([sys.executable, "-c", code], cwd=TESTS_DIR, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# transform: data.MultiCropTransform on tensors vs the recipe from torchvision's transforms (simple=True)

def benchmark_jpegs():
    """{name: JPEG file bytes}: matplotlib's grace_hopper.jpg as it is (512 x 600), and an ImageNet-sized
    photo made from it: resized to 500 pixels wide, the centre 500 x 375 kept, saved at quality 90."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    photo = pathlib.Path(path).read_bytes()
    with Image.open(io.BytesIO(photo)) as img:
        resized = img.convert("RGB").resize((500, round(img.height * 500 / img.width)), Image.BICUBIC)
    top = (resized.height - 375) // 2
    buffer = io.BytesIO()
    resized.crop((0, top, 500, top + 375)).save(buffer, "JPEG", quality=90)
    return {"grace_hopper.jpg 512x600": photo, "ImageNet-sized 500x375 q90": buffer.getvalue()}


def decode_and_transform(transform, jpeg):
    """What a loading worker does per image: decode the file's bytes (as data.ImageFiles), transform."""
    with Image.open(io.BytesIO(jpeg)) as file:
        return transform(file.convert("RGB"))


def images_per_cpu_second(pipelines, jpeg, rounds, seconds):
    """{name: images per second of CPU time of this process (one thread)}: what one loader worker
    delivers on a core of its own, unaffected by other processes sharing the machine. The pipelines
    take turns, `rounds` times `seconds` each, so that a slow spell of the machine hits them all."""
    counts, times = dict.fromkeys(pipelines, 0), dict.fromkeys(pipelines, 0.0)
    for transform in pipelines.values():  # warm-up
        decode_and_transform(transform, jpeg)
    for _ in range(rounds):
        for name, transform in pipelines.items():
            start = time.process_time()
            while time.process_time() - start < seconds:
                decode_and_transform(transform, jpeg)
                counts[name] += 1
            times[name] += time.process_time() - start
    return {name: counts[name] / times[name] for name in pipelines}


def bench_transform(rounds=5, seconds=1.0):
    """Images/s of data.MultiCropTransform on tensors and with simple=True (torchvision's transforms on
    PIL images), decode included, one thread (one data-loading worker), on both benchmark photos."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    pipelines = {"tensors": data.MultiCropTransform(), "torchvision": data.MultiCropTransform(simple=True)}
    print("transform: data.MultiCropTransform, 2x224 + 6x96 views, one thread (= one loader worker), "
          "JPEG decode included, images per CPU-second")
    print(f"  {'photo':28s} {'on tensors (default)':>24s} {'torchvision (simple=True)':>26s} {'ratio':>7s}")
    try:
        for photo, jpeg in benchmark_jpegs().items():
            rates = images_per_cpu_second(pipelines, jpeg, rounds, seconds)
            print(f"  {photo:28s} {rates['tensors']:17.1f} img/s {rates['torchvision']:19.1f} img/s "
                  f"{rates['tensors'] / rates['torchvision']:6.2f}x")
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# loader: the whole DataLoader, N workers

def bench_loader(workers=(1, 2), num_images=320, batch_size=32):
    """The whole input pipeline: data.make_loader over data.ImageFiles of `num_images` copies of the
    ImageNet-sized JPEG written to a temporary folder, the default MultiCropTransform, collation
    included, for each number of workers. Two figures: images/s of wall-clock, from the arrival of the
    batches the workers made first (started together, with the workers) to the last batch; and images
    per CPU-second of the workers (all batches over the CPU time of the worker processes, read when
    they have exited), which a machine shared with other processes does not change."""
    jpeg = benchmark_jpegs()["ImageNet-sized 500x375 q90"]
    print(f"loader: data.make_loader, data.ImageFiles of {num_images} JPEG files (500x375 q90), "
          f"data.MultiCropTransform 2x224 + 6x96, batch {batch_size}, collation included, "
          f"{os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory() as root:
        folder = pathlib.Path(root, "photos")
        folder.mkdir()
        for i in range(num_images):
            (folder / f"{i:04d}.jpg").write_bytes(jpeg)
        dataset = data.ImageFiles(root, data.MultiCropTransform())
        for num_workers in workers:
            cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            batches = iter(data.make_loader(dataset, batch_size, num_workers, epoch=0))
            for _ in range(num_workers):
                next(batches)
            start, count = time.perf_counter(), 0
            for _, labels, _ in batches:
                count += len(labels)
            wall_rate = count / (time.perf_counter() - start)
            del batches  # joins the workers, whose CPU time then counts in RUSAGE_CHILDREN
            cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            worker_cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
            print(f"  {num_workers} worker{'s' if num_workers > 1 else ' '}: {wall_rate:7.1f} images/s wall-clock, "
                  f"{num_images - num_images % batch_size:5d} images in {worker_cpu:5.1f} s of worker CPU = "
                  f"{(num_images - num_images % batch_size) / worker_cpu:5.1f} images per worker CPU-second")


# ---------------------------------------------------------------------------------------------------
# local_loss: the fast local criterion (the default) vs the simple one (simple=True)

LOCAL_VIEWS = [(7, 7)] * 2 + [(3, 3)] * 6
LOCAL_BATCH, LOCAL_CHANNELS, EMBEDDING_DIM = 64, 512, 512


def local_loss_inputs(seed=0):
    """Multi-crop inputs in float32: embeddings (B, D), maps (B, h, w, C), grids (B, h, w, 2)."""
    generator = torch.Generator().manual_seed(seed)
    embeddings, maps, grids = [], [], []
    for h, w in LOCAL_VIEWS:
        embeddings.append(torch.randn(LOCAL_BATCH, EMBEDDING_DIM, generator=generator))
        maps.append(torch.randn(LOCAL_BATCH, h, w, LOCAL_CHANNELS, generator=generator))
        top_left = torch.rand(LOCAL_BATCH, 2, generator=generator) * 100
        extent = 30 + torch.rand(LOCAL_BATCH, 2, generator=generator) * 120
        flips = torch.rand(LOCAL_BATCH, generator=generator) < 0.5
        grids.append(location_grid(torch.cat([top_left, extent], dim=1), flips, (h, w)))
    return embeddings, maps, grids


def run_local_variant(variant, repeats):
    """In a fresh process: time forward + backward of VICRegLLoss(alpha=0) with the "fast" or the "simple"
    local criterion (one untimed warm-up call, then `repeats` timed ones), print a JSON line with the
    times, the loss and stats values and the process's peak RSS. "inputs_only" builds the inputs only."""
    torch.manual_seed(0)
    embeddings, maps, grids = local_loss_inputs()
    criterion = VICRegLLoss(alpha=0.0, simple=variant == "simple")
    times, cpu_times, loss, stats = [], [], None, {}
    for repeat in range(repeats + 1 if variant != "inputs_only" else 0):
        leaves = [t.clone().requires_grad_() for t in embeddings + maps]
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, stats = criterion(leaves[:len(LOCAL_VIEWS)], leaves[len(LOCAL_VIEWS):], grids)
        loss.backward()
        if repeat > 0:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    print(json.dumps({"times": times, "cpu_times": cpu_times, "loss": None if loss is None else loss.item(),
                      "stats": {name: value.item() for name, value in stats.items()},
                      "peak_rss_mib": peak_rss_mib()}))


def bench_local_loss(rounds=2):
    print(f"local_loss: local criterion, forward + backward, float32 CPU ({torch.get_num_threads()} threads): "
          f"B={LOCAL_BATCH}, C={LOCAL_CHANNELS}, views {LOCAL_VIEWS}, alpha=0 (global part included, D={EMBEDDING_DIM})")
    baseline = measure_in_subprocess("run_local_variant('inputs_only', 0)")
    variants = {"fast": "VICRegLLoss() (all pairs at once)", "simple": "VICRegLLoss(simple=True) (loops)"}
    repeats = {"fast": 3, "simple": 1}  # timed calls per process; the simple criterion takes tens of seconds
    results = {variant: [] for variant in variants}
    for _ in range(rounds):  # interleaved: a slow spell of a shared machine hits both
        for variant in variants:
            results[variant].append(measure_in_subprocess(f"run_local_variant({variant!r}, {repeats[variant]})"))
    wall = {v: statistics.median(t for r in results[v] for t in r["times"]) for v in variants}
    cpu = {v: statistics.median(t for r in results[v] for t in r["cpu_times"]) for v in variants}
    print(f"  {rounds} interleaved processes per variant, each a warm-up call then timed calls; median wall-clock "
          f"and CPU time (all threads of the process; steadier when the machine is shared):")
    for variant, name in variants.items():
        print(f"    {name:36s} {wall[variant]:.3f} s wall, {cpu[variant]:.3f} s CPU "
              f"({rounds} x {repeats[variant]} timed calls)")
    print(f"  fast / simple: {wall['fast'] / wall['simple']:.3f}x wall, {cpu['fast'] / cpu['simple']:.3f}x CPU "
          f"({wall['simple'] / wall['fast']:.1f}x faster)")
    print(f"  peak memory = ru_maxrss of a fresh process per variant; a process that only builds the "
          f"inputs peaks at {baseline['peak_rss_mib']:.0f} MiB:")
    for variant, name in variants.items():
        peak = max(r["peak_rss_mib"] for r in results[variant])
        print(f"    {name:36s} {peak:.0f} MiB (+{peak - baseline['peak_rss_mib']:.0f} MiB)")
    fast, simple = results["fast"][0], results["simple"][0]
    stats_diff = max(abs(fast["stats"][name] - simple["stats"][name]) for name in fast["stats"])
    print(f"  loss {fast['loss']:.6f} vs {simple['loss']:.6f}: max abs difference "
          f"{abs(fast['loss'] - simple['loss']):.2e} (stats: {stats_diff:.2e})")


# ---------------------------------------------------------------------------------------------------
# table11: VICRegL (alpha=0.75) vs VICReg (alpha=1), one full training step

TABLE11_CONFIGS = {
    # the paper's ConvNeXt-S views and heads, batch 64 on one GPU
    "cuda": dict(arch="convnext_small", size_crops=(224, 96), num_crops=(2, 6), batch_size=64,
                 mlp="8192-8192-8192", maps_mlp="512-512-512", amp="bf16", warmup=5, steps=20),
    # CPU-sized, one thread, seconds per step: the paper's 7x7 large and 3x3 small maps (stride 16)
    "cpu": dict(arch="convnext_toy", size_crops=(112, 48), num_crops=(2, 6), batch_size=32,
                mlp="2048-2048-2048", maps_mlp="512-512-512", amp=None, warmup=1, steps=3),
}
TABLE11_ALPHAS = {"VICReg (alpha=1)": 1.0, "VICRegL (alpha=0.75)": 0.75}
# the BatchNorm rows: a ResNet in place of the ConvNeXt, its backbone once per resolution or once per view
PER_VIEW_ARCHS = {"cuda": "resnet50", "cpu": "resnet18"}
PER_VIEW_VARIANTS = {"once per resolution": False, "once per view": True}


def training_step_inputs(config, device):
    """Fixed random views (channels_last on CUDA), crop boxes inside a 256 x 256 seed image, flips, labels."""
    generator = torch.Generator().manual_seed(0)
    B = config["batch_size"]
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    views = [torch.randn(B, 3, size, size, generator=generator).to(device, memory_format=memory_format)
             for size, count in zip(config["size_crops"], config["num_crops"]) for _ in range(count)]
    extent = 32 + torch.rand(B, len(views), 2, generator=generator) * 224  # (B, V, 2) height, width
    top_left = torch.rand(B, len(views), 2, generator=generator) * (256 - extent)
    boxes = torch.cat([top_left, extent], dim=2).to(device)  # (B, V, 4)
    flips = (torch.rand(B, len(views), generator=generator) < 0.5).to(device)
    labels = torch.randint(0, 1000, (B,), generator=generator).to(device)
    return views, boxes, flips, labels


def run_step_variant(alpha, device_type, compile_model=False, arch=None, backbone_per_view=None):
    """In a fresh process: time the full training step of one variant, print a JSON line with the
    per-step wall and CPU times, the peak memory and the host-device synchronisations of a step.
    arch replaces the config's backbone; backbone_per_view, when given, overrides the model's choice."""
    config = TABLE11_CONFIGS[device_type]
    device = torch.device(device_type)
    if device.type == "cpu":  # one thread: CPU time is then the work itself, not spinning threads
        torch.set_num_threads(1)
    inputs = training_step_inputs(config, device)
    if alpha is None:  # baseline process: the inputs only
        print(json.dumps({"peak_rss_mib": peak_rss_mib()}))
        return
    torch.manual_seed(0)
    model = VICRegL(arch or config["arch"], mlp=config["mlp"], maps_mlp=config["maps_mlp"], drop_path_rate=0.1,
                    local=alpha < 1).to(device)
    if backbone_per_view is not None:
        model.backbone_per_view = backbone_per_view
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    criterion = VICRegLLoss(alpha=alpha, num_large_views=config["num_crops"][0])
    optimizer = train.build_optimizer(model, types.SimpleNamespace(optimizer="adamw", weight_decay=0.05), 1e-4)
    amp_dtype = {"bf16": torch.bfloat16, None: None}[config["amp"]]
    step_model = torch.compile(model) if compile_model else model

    def step():
        loss, stats, _ = train.compute_loss(step_model, criterion, *inputs, amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    compile_start = time.perf_counter()
    for _ in range(config["warmup"]):
        step()
    synchronize()
    warmup_s = time.perf_counter() - compile_start
    syncs = None
    if device.type == "cuda":  # count the host-device synchronisations inside one step
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
        torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught]
        synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(config["steps"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    print(json.dumps({"times": times, "cpu_times": cpu_times, "peak_mib": peak, "loss": loss.item(),
                      "syncs": syncs, "warmup_s": warmup_s}))


def measure_steps(calls, rounds):
    """{name: times, cpu_times, peak_mib, syncs} of run_step_variant calls, each in a fresh process.
    The variants are interleaved over rounds (A, B, A, B, ...): a slow spell of a shared machine hits
    them all."""
    results = {name: {"times": [], "cpu_times": [], "peak_mib": [], "syncs": []} for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            result = measure_in_subprocess(call)
            for key in ("times", "cpu_times"):
                results[name][key] += result[key]
            results[name]["peak_mib"].append(result["peak_mib"])
            results[name]["syncs"] = result["syncs"]
    return results


def print_step_rows(results, batch_size, baseline, device_type):
    """One line per variant: median step time (wall, CPU), images/s, peak memory above `baseline`.
    Returns {name: (wall, cpu, peak)}."""
    rows = {}
    print(f"  {'':22s} {'step (wall)':>12s} {'step (CPU)':>11s} {'images/s':>9s} {'peak memory':>12s}")
    for name, result in results.items():
        wall, cpu = statistics.median(result["times"]), statistics.median(result["cpu_times"])
        peak = max(result["peak_mib"]) - baseline
        rows[name] = (wall, cpu, peak)
        cpu_text = f"{cpu:9.3f} s" if device_type == "cpu" else f"{'-':>11s}"
        print(f"  {name:22s} {wall:10.3f} s {cpu_text} {batch_size / wall:9.1f} {peak:8.0f} MiB")
    return rows


def bench_table11(rounds=None):
    """VICRegL vs VICReg training step: images/s, step time and peak memory, and their ratios; then a
    ResNet's step with its backbone once per view vs once per resolution."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    config = TABLE11_CONFIGS[device_type]
    rounds = rounds or (1 if device_type == "cuda" else 2)
    views = " + ".join(f"{n}x{s}" for s, n in zip(config["size_crops"], config["num_crops"]))
    device_name = torch.cuda.get_device_name() if device_type == "cuda" else "CPU, 1 thread"
    print(f"table11: full training step (forward + loss + backward + AdamW), {config['arch']}, views {views}, "
          f"batch {config['batch_size']}, mlp {config['mlp']}, maps-mlp {config['maps_mlp']}, "
          f"{config['amp'] or 'float32'}, drop-path 0.1, on {device_name}")
    results = measure_steps({name: f"run_step_variant({alpha}, {device_type!r})"
                             for name, alpha in TABLE11_ALPHAS.items()}, rounds)
    baseline = 0.0
    if device_type == "cpu":
        baseline = measure_in_subprocess("run_step_variant(None, 'cpu')")["peak_rss_mib"]
        print(f"  peak memory = ru_maxrss of a fresh process per variant minus {baseline:.0f} MiB of a process "
              f"that only builds the inputs; times: median over {rounds} interleaved processes x "
              f"{config['steps']} steps")
    else:
        print(f"  peak memory = torch.cuda.max_memory_allocated over {config['steps']} steps (weights, AdamW "
              f"state and activations); times: median of {config['steps']} steps, synchronised")
    rows = print_step_rows(results, config["batch_size"], baseline, device_type)
    (vicreg_wall, vicreg_cpu, vicreg_peak), (vicregl_wall, vicregl_cpu, vicregl_peak) = rows.values()
    cpu_ratio = f", {vicregl_cpu / vicreg_cpu:.3f}x CPU time" if device_type == "cpu" else ""
    print(f"  VICRegL / VICReg: step time {vicregl_wall / vicreg_wall:.3f}x wall{cpu_ratio} (bar 1.10x; the "
          f"paper's code 1.18x), peak memory {vicregl_peak / vicreg_peak:.3f}x (bar 1.15x; the paper's code 1.39x)")
    if device_type == "cuda":
        for name, result in results.items():
            print(f"  host-device synchronisations in one step, {name}: {len(result['syncs'])} "
                  f"{result['syncs'][:3]}")

    arch = PER_VIEW_ARCHS[device_type]
    print(f"  BatchNorm statistics per view: VICRegL (alpha=0.75) step of {arch} (same views, batch, heads), "
          f"backbone once per resolution (views concatenated) vs once per view (the reference; our default)")
    results = measure_steps({name: f"run_step_variant(0.75, {device_type!r}, arch={arch!r}, "
                                   f"backbone_per_view={per_view})" for name, per_view in PER_VIEW_VARIANTS.items()},
                            rounds)
    rows = print_step_rows(results, config["batch_size"], baseline, device_type)
    (batched_wall, batched_cpu, batched_peak), (per_view_wall, per_view_cpu, per_view_peak) = rows.values()
    cpu_ratio = f", {per_view_cpu / batched_cpu:.3f}x CPU time" if device_type == "cpu" else ""
    print(f"  per view / per resolution: step time {per_view_wall / batched_wall:.3f}x wall{cpu_ratio}, "
          f"peak memory {per_view_peak / batched_peak:.3f}x")


def bench_compile():
    """CUDA only: VICRegL step with and without torch.compile (the table11 CUDA config)."""
    if not torch.cuda.is_available():
        print("compile: skipped (needs CUDA)")
        return
    config = TABLE11_CONFIGS["cuda"]
    print(f"compile: VICRegL (alpha=0.75) step, {config['arch']}, batch {config['batch_size']}, {config['amp']}")
    for compile_model in (False, True):
        result = measure_in_subprocess(f"run_step_variant(0.75, 'cuda', compile_model={compile_model})")
        wall = statistics.median(result["times"])
        print(f"  torch.compile={compile_model!s:5s}: {wall:.3f} s/step, {config['batch_size'] / wall:.1f} images/s, "
              f"peak {result['peak_mib']:.0f} MiB, warm-up (incl. compilation) {result['warmup_s']:.0f} s")


BENCHMARKS = {"transform": bench_transform, "loader": bench_loader, "local_loss": bench_local_loss,
              "table11": bench_table11, "compile": bench_compile}


# ---------------------------------------------------------------------------------------------------
# quickstart: the README's toy command, wall-clock, now, at a baseline revision, and with --simple

QUICKSTART = ["train.py", "--dataset", "toy", "--epochs", "3", "--base-lr", "0.032",  # the README's
              "--mlp", "32", "--maps-mlp", "32"]
BASELINE_QUICKSTART = ["train.py", "--dataset", "toy"]  # the README's command at the default --baseline-rev


def run_quickstart(code_dir, command, extra=()):
    """(wall seconds, the kNN line) of a quickstart command run from code_dir, in a fresh EXP_DIR."""
    with tempfile.TemporaryDirectory() as exp_dir:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, *command, "--exp-dir", exp_dir, *extra], cwd=code_dir,
                                capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"quickstart in {code_dir} failed:\n{result.stderr}")
    return seconds, result.stdout.strip().splitlines()[-1]


def bench_quickstart(baseline_rev, epochs=None):
    """One after the other on an otherwise idle machine: the working tree, the baseline revision (a
    `git archive` of it), and the working tree with --simple; --quickstart-epochs sets the epochs of all three."""
    extra = [] if epochs is None else ["--epochs", str(epochs)]
    root = TESTS_DIR.parent
    print(f"quickstart: python {' '.join(QUICKSTART)} {' '.join(extra)} (baseline: python "
          f"{' '.join(BASELINE_QUICKSTART)} {' '.join(extra)}), wall-clock, training + the kNN line")
    with tempfile.TemporaryDirectory() as baseline_dir:
        archive = subprocess.run(["git", "-C", str(root), "archive", baseline_rev], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", baseline_dir], input=archive.stdout, check=True)
        rows = [("working tree", run_quickstart(root, QUICKSTART, extra)),
                (f"baseline {baseline_rev}", run_quickstart(baseline_dir, BASELINE_QUICKSTART, extra)),
                ("working tree, --simple", run_quickstart(root, QUICKSTART, [*extra, "--simple"]))]
    now = rows[0][1][0]
    for name, (seconds, knn_line) in rows:
        print(f"  {name:<28} {seconds:7.1f} s  ({seconds / now:.2f}x the working tree's)\n    {knn_line}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted([*BENCHMARKS, "quickstart"]),
                        help="run these sections (default: all)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="loader section: the numbers of DataLoader workers to measure (each >= 1)")
    parser.add_argument("--baseline-rev", default="f5838ea",
                        help="quickstart section: the revision to compare with (default: main before the "
                        "simple paths, the collapse diagnostics and the channels-last CPU path)")
    parser.add_argument("--quickstart-epochs", type=int, default=None,
                        help="quickstart section: run the three commands for this many epochs (default: their own)")
    args = parser.parse_args()
    if min(args.workers) < 1:
        parser.error("--workers: each number of workers must be at least 1")
    sections = dict(BENCHMARKS, loader=partial(bench_loader, workers=args.workers),
                    quickstart=partial(bench_quickstart, args.baseline_rev, args.quickstart_epochs))
    for name, bench in sections.items():
        if args.only is None or name in args.only:
            bench()


if __name__ == "__main__":
    main()
