"""The one prepared run of the CUDA checks (not collected by pytest): what only a GPU can show.

    python tests/gpu_check.py                          # on this machine's GPUs
    python tests/gpu_check.py --device cpu --smoke     # every check at toy sizes on a CPU (tests run it)

Every check runs train.py's real loop (under torchrun; `--train` below is train.main, with the host-sync
watch added where it applies) on a generated ImageFolder of ImageNet-sized JPEGs (matplotlib's photo, 500x375 q90), or
the evaluation scripts:
  convnext      convnext_small, AdamW, bf16, channels_last: finite losses; its steps are the baseline
  compile       the same with --compile
  no-host-sync  the steady-state steps of that run (after the first 3 and the log steps) issue no host
                synchronisation: torch.cuda.set_sync_debug_mode("error") from the loss of a non-log step
                to the next log step's diagnostics
  resnet50      resnet50, LARS, bf16; watched for host synchronisations on one GPU (with several, PyTorch's
                SyncBatchNorm synchronises in every BatchNorm layer)
  lars          the LARS step alone (its loop over the parameters) as a share of the resnet50 step
  table11       VICRegL (alpha 0.75) against VICReg (--alpha 1): step time and peak memory (paper Table 11)
  loader        images per second of one loading worker against what a GPU's steps consume: the workers
                a GPU needs
  ddp           with 2 or more GPUs: DDP's loss and gradients on a fixed global batch against one GPU's
  eval          --eval-freq 1 (the kNN), eval_linear.py and eval_seg.py for a few iterations with --amp, and
                eval_seg.py --knn (dense nearest-neighbour retrieval)
  resume        a run killed (SIGKILL) during its second epoch and started again with --deterministic
                ends with the weights of an uninterrupted --deterministic run, bit for bit
It prints one line per check (PASS, FAIL or SKIP: SKIP only where the machine lacks something, such as a
second GPU), then the figures, and writes them to OUT/gpu_check.json. OUT is emptied first.
"""
import argparse
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

TESTS_DIR = pathlib.Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
sys.path[:0] = [str(ROOT), str(TESTS_DIR)]

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmark import benchmark_jpegs  # noqa: E402

# what a run is made of, full size (CUDA) and toy size (--smoke); batch sizes are per GPU (process)
# crops: (size, number, min scale, max scale) of each view size, the ConvNeXt recipe's at full size;
# images: training images per GPU (per process), so that every run has as many steps on any number of GPUs
SIZES = {
    "full": dict(images=1536, image_size=(500, 375), val_images=256, convnext="convnext_small", resnet="resnet50",
                 crops=((224, 2, 0.4, 1.0), (96, 6, 0.08, 0.4)), num_matches=(20, 4), batch=64, resnet_batch=128,
                 mlp="8192-8192-8192", maps_mlp="512-512-512", workers=10),
    "smoke": dict(images=96, image_size=(64, 48), val_images=8, convnext="convnext_toy", resnet="resnet_toy",
                  crops=((32, 2, 0.3, 1.0), (16, 2, 0.1, 0.3)), num_matches=(4, 1), batch=8, resnet_batch=8,
                  mlp="32-32", maps_mlp="16-16", workers=0),
}
WARMUP_STEPS = 3  # steps before the host-sync watch starts (cuDNN autotuning, DDP's first iteration)


# ---------------------------------------------------------------------------------------------------
# `--train [--watch] ARGS`: train.main(ARGS), with --watch watched for host synchronisations between log steps

def watched_train_main(argv, watch):
    """train.main with torch.cuda.set_sync_debug_mode("error") from the arrival of every batch after the first
    WARMUP_STEPS, switched off again by the next log step's collapse diagnostics (a log step is the loop's one
    intended synchronisation; the end of an epoch, its checkpoint and kNN come after one). A synchronisation in
    between raises, and the run fails. On a CPU there is no host-device synchronisation to watch: the switches
    are only counted."""
    import train
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cuda" if torch.cuda.is_available() else "cpu"
    set_mode = torch.cuda.set_sync_debug_mode if device == "cuda" and watch else (lambda mode: None)
    steps = dict(seen=0, watched=0)
    collapse_diagnostics = train.collapse_diagnostics

    make_loader = train.data.make_loader

    def watched_batches(*args, **kwargs):
        for batch in make_loader(*args, **kwargs):
            if steps["seen"] >= WARMUP_STEPS:  # from here to the next log step: no synchronisation allowed
                steps["watched"] += 1
                set_mode("error")
            steps["seen"] += 1
            yield batch  # the loop copies it to the GPU, computes the loss, steps; then asks for the next

    def unwatch_then_diagnostics(*args, **kwargs):  # a log step (its copies, loss, backward, update watched)
        set_mode("default")
        return collapse_diagnostics(*args, **kwargs)

    train.data.make_loader, train.collapse_diagnostics = watched_batches, unwatch_then_diagnostics
    train.main(argv)
    if watch:
        print(f"sync watch: {steps['watched']} of {steps['seen']} steps watched", flush=True)


# ---------------------------------------------------------------------------------------------------
# the checks

class Check:
    def __init__(self, out, device, smoke):
        self.out, self.device, self.smoke = out, device, smoke
        self.size = SIZES["smoke" if smoke else "full"]
        self.gpus = torch.cuda.device_count() if device == "cuda" else 0
        self.procs = max(self.gpus, 1)  # one per GPU; one on a CPU (the ddp check: 2 gloo processes)
        self.figures, self.verdicts = {}, []
        # toy sizes on a CPU: one thread a process, as torchrun sets it (threads of processes that share
        # 2 cores only wait for each other)
        self.env = dict(os.environ, OMP_NUM_THREADS="1") if smoke else None

    def report(self, name, verdict, detail):
        self.verdicts.append(dict(check=name, verdict=verdict, detail=detail))
        print(f"{verdict} {name}: {detail}", flush=True)

    def run(self, name, command, timeout=900):
        """A command of the check, its output kept in OUT/<name>.log; (return code, output). A command
        still running after `timeout` seconds is killed with all its processes (return code -9)."""
        with open(self.out / f"{name}.log", "w") as log:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
        return code, (self.out / f"{name}.log").read_text()

    def torchrun(self, *args, nproc=None):
        """The command of a run under torchrun (a single CPU process of a smoke run: plain python, faster)."""
        nproc = nproc or self.procs
        if self.smoke and nproc == 1:
            return [sys.executable, *args]
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args]

    def train_args(self, exp, arch, batch, epochs=1, extra=(), watch=True):
        s = self.size
        views = []
        for i, name in enumerate(["size", "num", "min-scale", "max-scale"]):
            views += [f"--{name}-crops", *(str(crop[i]) for crop in s["crops"])]
        return [str(TESTS_DIR / "gpu_check.py"), "--train", *(["--watch"] if watch else []),
                "--data-dir", str(self.out / "data"), "--arch", arch, *views,
                "--num-matches", *map(str, s["num_matches"]),
                "--mlp", s["mlp"], "--maps-mlp", s["maps_mlp"], "--batch-size", str(batch * self.procs),
                "--epochs", str(epochs), "--warmup-epochs", "1", "--num-workers", str(s["workers"]),
                "--device", self.device, "--log-freq", str(max(1, s["images"] // batch // 2)),
                "--exp-dir", str(self.out / exp), *extra]

    def steps(self, exp):
        """(the step records, all the records) of a run's stats.jsonl."""
        records = [json.loads(line) for line in (self.out / exp / "stats.jsonl").read_text().splitlines()]
        return [r for r in records if "loss" in r], records

    # --- data
    def make_data(self):
        """An ImageFolder of copies of an ImageNet-sized JPEG (10 classes), train/ and val/."""
        jpeg = benchmark_jpegs()["ImageNet-sized 500x375 q90"]
        if self.smoke:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(jpeg)).convert("RGB").resize(self.size["image_size"]).save(buffer, "JPEG")
            jpeg = buffer.getvalue()
        for split, count in (("train", self.size["images"] * self.procs), ("val", self.size["val_images"])):
            for i in range(count):
                folder = self.out / "data" / split / f"class{i % 10}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{i:05d}.jpg").write_bytes(jpeg)

    # --- training runs
    def training(self, name, exp, arch, batch, extra=(), watch=True):
        """A 2-epoch run that logs twice an epoch; its figures come from the second half of the second
        epoch (the first intervals include the loaders' starts, cuDNN's autotuning and compilation)."""
        code, output = self.run(name, self.torchrun(*self.train_args(exp, arch, batch, 2, extra, watch)))
        if code != 0:
            last = [line for line in output.splitlines() if line.strip()][-3:]
            self.report(name, "FAIL", f"exit code {code}: {' | '.join(last)[-600:]}")
            return None
        steps, _ = self.steps(exp)
        finite = all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
        step_time = steps[-1]["step_time"]
        figures = dict(step_time_s=step_time, images_per_s=batch * self.procs / step_time,
                       max_memory_gib=steps[-1].get("max_memory_gib"), loss=steps[-1]["loss"])
        self.figures[name] = figures
        memory = f", peak {figures['max_memory_gib']:.1f} GiB" if figures["max_memory_gib"] else ""
        self.report(name, "PASS" if finite and len(steps) >= 2 else "FAIL",
                    f"{arch}, {extra_flags(extra)}: loss {steps[-1]['loss']:.3f}, {step_time:.3f} s/step, "
                    f"{figures['images_per_s']:.0f} img/s{memory}")
        return output

    def check_training(self):
        s = self.size
        amp = ["--amp", "bf16"] if self.device == "cuda" else []
        knn = ["--eval-freq", "1", "--eval-images", str(s["val_images"])]
        output = self.training("convnext", "convnext", s["convnext"], s["batch"], [*amp, *knn])
        if output is not None:
            line = [line for line in output.splitlines() if line.startswith("sync watch")][-1]
            if self.device != "cuda":
                self.report("no-host-sync", "SKIP", f"no CUDA: nothing to synchronise with ({line}, not enforced)")
            else:
                self.report("no-host-sync", "PASS" if int(line.split()[2]) > 0 else "FAIL",
                            f"set_sync_debug_mode('error') raised nowhere ({line})")
            records = [r for r in self.steps("convnext")[1] if "knn_top1" in r]
            self.report("eval-freq", "PASS" if [r["epoch"] for r in records] == [1, 2] else "FAIL",
                        f"kNN top-1 after each epoch: {[round(r['knn_top1'], 1) for r in records]}")
        self.training("compile", "compile", s["convnext"], s["batch"], [*amp, "--compile"])
        self.training("resnet50", "resnet", s["resnet"], s["resnet_batch"], [*amp, "--optimizer", "lars"],
                      watch=self.procs == 1)
        self.check_lars()
        self.training("vicreg", "vicreg", s["convnext"], s["batch"], [*amp, *knn, "--alpha", "1"])  # as convnext
        if "convnext" in self.figures and "vicreg" in self.figures:
            a, b = self.figures["convnext"], self.figures["vicreg"]
            time_ratio = a["step_time_s"] / b["step_time_s"]
            memory_ratio = a["max_memory_gib"] / b["max_memory_gib"] if a["max_memory_gib"] else None
            memory = (f", {memory_ratio:.3f}x peak memory ({a['max_memory_gib']:.1f} vs {b['max_memory_gib']:.1f} GiB)"
                      if memory_ratio else "")
            self.figures["table11"] = dict(time_ratio=time_ratio, memory_ratio=memory_ratio)
            self.report("table11", "PASS", f"VICRegL / VICReg: {time_ratio:.3f}x step time{memory}")

    def check_lars(self):
        """The optimiser step alone, LARS's loop over the parameters of the resnet50 run's model (as train.py
        builds it), against that run's whole step: is a torch._foreach_ version worth having?"""
        import train
        from model import VICRegL
        device = torch.device(self.device)
        model = VICRegL(self.size["resnet"], mlp=self.size["mlp"], maps_mlp=self.size["maps_mlp"]).to(device)
        optimizer = train.LARS(model.parameters(), lr=0.1, weight_decay=1e-6)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        optimizer.step()  # the momentum buffers
        sync()
        start = time.perf_counter()
        for _ in range(20):
            optimizer.step()
        sync()
        step_ms = (time.perf_counter() - start) / 20 * 1000
        share = step_ms / 1000 / self.figures["resnet50"]["step_time_s"] if "resnet50" in self.figures else None
        self.figures["lars"] = dict(step_ms=step_ms, parameters=len(list(model.parameters())), share_of_step=share)
        del model, optimizer  # give the GPU's memory back to the later runs
        if self.device == "cuda":
            torch.cuda.empty_cache()
        self.report("lars", "PASS", f"LARS step over {self.figures['lars']['parameters']} parameters: {step_ms:.1f} ms"
                    + (f", {100 * share:.1f} % of a resnet50 training step" if share else ""))

    def check_loader(self):
        import data
        dataset = data.ImageFiles(str(self.out / "data" / "train"), data.MultiCropTransform(*zip(*self.size["crops"])))
        batch = self.size["batch"]
        batches = iter(data.make_loader(dataset, batch, 1, epoch=0))
        next(batches)  # the worker has started
        start, count = time.perf_counter(), 0
        for _, labels, _ in batches:
            count += len(labels)
            if count >= 8 * batch:
                break
        per_worker = count / (time.perf_counter() - start)
        consumed = self.figures["convnext"]["images_per_s"] / self.procs if "convnext" in self.figures else None
        self.figures["loader"] = dict(images_per_s_per_worker=per_worker, consumed_per_gpu=consumed,
                                      workers_per_gpu=consumed / per_worker if consumed else None)
        detail = f"{per_worker:.1f} images/s per worker"
        if consumed:
            detail += f"; a GPU's steps take {consumed:.0f} images/s: {consumed / per_worker:.1f} workers per GPU"
        self.report("loader", "PASS", detail)

    def check_ddp(self):
        nproc = 2 if self.device == "cpu" else self.procs
        if nproc < 2:
            self.report("ddp", "SKIP", "one GPU: DDP needs 2 or more")
            return
        code, output = self.run("ddp", self.torchrun(str(TESTS_DIR / "gpu_check.py"), "--ddp-worker", "--device",
                                                     self.device, "--out", str(self.out), nproc=nproc))
        verdict = [line for line in output.splitlines() if line.startswith("ddp:")]
        ok = code == 0 and verdict and verdict[-1].startswith("ddp: equal")
        self.report("ddp", "PASS" if ok else "FAIL", verdict[-1] if verdict else f"exit code {code}")

    def check_evaluations(self):
        s = self.size
        amp = ["--amp", "bf16"] if self.device == "cuda" else ["--amp", "none"]
        common = ["--pretrained", str(self.out / "convnext" / "backbone.pth"), "--device", self.device, *amp,
                  "--num-workers", str(s["workers"])]
        linear = [str(ROOT / "eval_linear.py"), "--data-dir", str(self.out / "data"), "--arch", s["convnext"],
                  "--epochs", "1", "--batch-size", str(s["batch"] * self.procs), "--exp-dir", str(self.out / "linear"),
                  *common, *(["--size", "32", "--resize", "36"] if self.smoke else [])]
        seg = [str(ROOT / "eval_seg.py"), "--dataset", "toy", "--toy-images", str(16 * self.procs), "--arch",
               s["convnext"], "--iters", "5", "--batch-size", str(2 * self.procs), "--log-freq", "1",
               "--exp-dir", str(self.out / "seg"), *common]
        seg_knn = [str(ROOT / "eval_seg.py"), "--dataset", "toy", "--toy-images", str(64 * self.procs), "--arch",
                   s["convnext"], "--knn", "--batch-size", str(16 * self.procs), "--exp-dir", str(self.out / "seg_knn"),
                   *common]
        for name, command, key in (("eval_linear", linear, "top1"), ("eval_seg", seg, "miou"),
                                   ("eval_seg_knn", seg_knn, "miou")):
            code, _ = self.run(name, self.torchrun(*command))
            result = self.out / name.replace("eval_", "") / "results.json"
            if code == 0 and result.exists():
                self.report(name, "PASS", f"--amp {amp[1]}: {key} {json.loads(result.read_text())[key]:.1f}")
            else:
                self.report(name, "FAIL", f"exit code {code}")

    def check_resume(self):
        s = self.size
        extra = ["--deterministic"] + (["--amp", "bf16"] if self.device == "cuda" else [])
        straight = self.train_args("straight", s["convnext"], s["batch"], 2, extra)
        code, _ = self.run("resume-straight", self.torchrun(*straight))
        killed = self.train_args("killed", s["convnext"], s["batch"], 2, extra)
        with open(self.out / "resume-killed.log", "w") as log:
            proc = subprocess.Popen(self.torchrun(*killed), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=self.env)
            records, checkpoint = self.out / "killed" / "stats.jsonl", self.out / "killed" / "model.pth"
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline:  # kill it in the middle of the second epoch
                lines = records.read_text().splitlines() if records.exists() else []
                if checkpoint.exists() and any(json.loads(line).get("epoch") == 1 for line in lines):
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
            was_killed = proc.wait() != 0
        again, output = self.run("resume-again", self.torchrun(*killed))
        if code or again or not was_killed or "resumed from" not in output:
            self.report("resume", "FAIL", f"exit codes {code} (uninterrupted), {again} (resumed); killed during "
                        f"the run: {was_killed}")
            return
        a, b = (torch.load(self.out / d / "model.pth", weights_only=True)["model"] for d in ("straight", "killed"))
        same = all(torch.equal(a[k], b[k]) for k in a)
        step_time = self.steps("straight")[0][-1]["step_time"]
        self.figures["deterministic"] = dict(step_time_s=step_time, ratio=(
            step_time / self.figures["convnext"]["step_time_s"] if "convnext" in self.figures else None))
        cost = (f"; --deterministic steps take {self.figures['deterministic']['ratio']:.2f}x the convnext run's"
                if self.figures["deterministic"]["ratio"] else "")
        self.report("resume", "PASS" if same else "FAIL",
                    ("killed in epoch 2 and resumed: the weights of the uninterrupted run, bit for bit" if same else
                     "the resumed run's weights differ from the uninterrupted run's") + cost)


def extra_flags(flags):
    return " ".join(flags) or "defaults"


def ddp_worker(device_type):
    """Under torchrun: each rank's loss and gradients on its part of a fixed global batch, through DDP,
    against rank 0's 1-process computation of the whole batch (the test of tests/test_train.py, on GPUs)."""
    import torch.distributed as dist
    import train
    from test_train import fixed_global_batch, loss_and_grads, small_model_and_loss
    rank, world_size, local_rank = train.setup_distributed(device_type)
    torch.backends.cudnn.allow_tf32 = False  # float32 convolutions on both sides of the comparison
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    views, boxes, flips, labels = (x.to(device) if torch.is_tensor(x) else [v.to(device) for v in x]
                                   for x in fixed_global_batch(batch=4 * world_size))
    model, criterion = small_model_and_loss()
    ddp = train.wrap_ddp(model.to(device), device)
    part = slice(rank * 4, rank * 4 + 4)
    loss, grads = loss_and_grads(ddp, criterion, [v[part] for v in views], boxes[part], flips[part], labels[part])
    losses = [torch.zeros_like(loss) for _ in range(world_size)]
    dist.all_gather(losses, loss)
    dist.destroy_process_group()  # the reference below is one process's computation (no gather)
    if rank == 0:
        single, criterion = small_model_and_loss()
        reference_loss, reference_grads = loss_and_grads(single.to(device), criterion, views, boxes, flips, labels)
        worst = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                    for n, g in reference_grads.items())
        loss_gap = abs((sum(losses) / world_size - reference_loss).item())
        ok = worst < 1e-3 and loss_gap < 1e-4
        print(f"ddp: {'equal' if ok else 'DIFFERENT'}: {world_size} processes against 1, loss gap {loss_gap:.2e}, "
              f"largest relative gradient gap {worst:.2e}", flush=True)


def main():
    parser = argparse.ArgumentParser(description="The CUDA checks of the project, in one run (tests/gpu_check.py).")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="every check at toy sizes (for a CPU)")
    parser.add_argument("--out", default=str(ROOT / "exp" / "gpu_check"), help="runs, logs and gpu_check.json")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    if len(sys.argv) > 1 and sys.argv[1] == "--train":
        watch = len(sys.argv) > 2 and sys.argv[2] == "--watch"
        return watched_train_main(sys.argv[2 + watch:], watch)
    args = parser.parse_args()
    if args.ddp_worker:
        return ddp_worker(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --device cpu --smoke")
    out = pathlib.Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # a run in a folder of finished runs would only resume them
    out.mkdir(parents=True)
    check = Check(out, args.device, args.smoke)
    start = time.time()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"gpu_check: {check.gpus} x {name}" if args.device == "cuda" else "gpu_check: cpu (smoke)", flush=True)
    check.make_data()
    check.check_training()
    check.check_loader()
    check.check_ddp()
    check.check_evaluations()
    check.check_resume()
    print("figures:")
    for key, value in check.figures.items():
        print(f"  {key}: {json.dumps(value)}")
    summary = dict(device=args.device, gpu=name, gpus=check.gpus, smoke=args.smoke, date=time.strftime("%Y-%m-%d"),
                   torch=torch.__version__, seconds=round(time.time() - start), checks=check.verdicts,
                   figures=check.figures)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    counts = {v: sum(c["verdict"] == v for c in check.verdicts) for v in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {time.time() - start:.0f} s")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
