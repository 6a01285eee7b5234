"""Benchmarks (not collected by pytest). Run all sections with `python tests/benchmark.py`, or one with
`python tests/benchmark.py --only local_loss`.

local_loss: forward + backward of the local criterion, VICRegLLoss(alpha=0) vs the naive per-slot
reference of tests/naive_loss.py (one C x C covariance per kept slot), at B=64, C=512, 2 views of 7x7 +
6 views of 3x3, float32 on CPU. Both use the same matching (matching.nearest_neighbors), so only the
criterion differs. Each variant runs in a fresh subprocess so that its peak resident memory
(ru_maxrss) is its own.
"""

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

TESTS_DIR = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS_DIR.parent), str(TESTS_DIR)]

import torch  # noqa: E402

from loss import VICRegLLoss  # noqa: E402
from matching import location_grid, nearest_neighbors  # noqa: E402
from naive_loss import naive_vicregl_loss  # noqa: E402

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
    """In a fresh process: time forward + backward of one variant, print a JSON line with the median
    time, the loss and stats values and the process's peak RSS."""
    torch.manual_seed(0)
    embeddings, maps, grids = local_loss_inputs()
    if variant == "vicregl":
        criterion = VICRegLLoss(alpha=0.0)
    elif variant == "naive":
        criterion = lambda e, m, g: naive_vicregl_loss(e, m, g, alpha=0.0, nearest_neighbors=nearest_neighbors)
    times, cpu_times, loss, stats = [], [], None, {}
    for _ in range(repeats if variant != "inputs_only" else 0):
        leaves = [t.clone().requires_grad_() for t in embeddings + maps]
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, stats = criterion(leaves[:len(LOCAL_VIEWS)], leaves[len(LOCAL_VIEWS):], grids)
        loss.backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"time_s": statistics.median(times) if times else None,
                      "cpu_time_s": statistics.median(cpu_times) if cpu_times else None,
                      "loss": None if loss is None else loss.item(),
                      "stats": {name: value.item() for name, value in stats.items()},
                      "peak_rss_mib": peak_rss_mib}))


def measure_in_subprocess(variant, repeats):
    code = f"import benchmark; benchmark.run_local_variant({variant!r}, {repeats})"
    out = subprocess.run([sys.executable, "-c", code], cwd=TESTS_DIR, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_local_loss():
    print(f"local criterion, forward + backward, float32 CPU ({torch.get_num_threads()} threads): "
          f"B={LOCAL_BATCH}, C={LOCAL_CHANNELS}, views {LOCAL_VIEWS}, alpha=0 (global part included, D={EMBEDDING_DIM})")
    baseline = measure_in_subprocess("inputs_only", 0)
    ours = measure_in_subprocess("vicregl", 5)
    naive = measure_in_subprocess("naive", 1)  # minutes per run on 2 cores
    print("  wall-clock and CPU time (all threads of the process; steadier when the machine is shared):")
    print(f"    VICRegLLoss (Gram per slot, cached whole maps): {ours['time_s']:.3f} s wall, "
          f"{ours['cpu_time_s']:.3f} s CPU (median of 5 runs)")
    print(f"    naive per-slot C x C covariance:                {naive['time_s']:.3f} s wall, "
          f"{naive['cpu_time_s']:.3f} s CPU (1 run)")
    print(f"  speed-up: {naive['time_s'] / ours['time_s']:.1f}x wall, {naive['cpu_time_s'] / ours['cpu_time_s']:.1f}x CPU")
    print(f"  peak memory = ru_maxrss of a fresh process per variant; a process that only builds the "
          f"inputs peaks at {baseline['peak_rss_mib']:.0f} MiB:")
    for name, result in (("VICRegLLoss", ours), ("naive", naive)):
        print(f"    {name:12s} {result['peak_rss_mib']:.0f} MiB "
              f"(+{result['peak_rss_mib'] - baseline['peak_rss_mib']:.0f} MiB)")
    stats_diff = max(abs(ours["stats"][name] - naive["stats"][name]) for name in ours["stats"])
    print(f"  loss {ours['loss']:.6f} vs {naive['loss']:.6f}: max abs difference {abs(ours['loss'] - naive['loss']):.2e} "
          f"(stats: {stats_diff:.2e})")


BENCHMARKS = {"local_loss": bench_local_loss}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BENCHMARKS), help="run one section")
    args = parser.parse_args()
    for name, bench in BENCHMARKS.items():
        if args.only in (None, name):
            bench()


if __name__ == "__main__":
    main()
