"""Seconds per epoch of dvsg-train itself at the seed's settings on one GPU, beside
SpikingJelly 2.0's DVSGestureNet with its torch and triton neuron backends, on the same data.

Data: a frame store of the real release's shape (default 1176 train / 288 test samples, T=16,
uint8 [N, T, 2, 128, 128]) written with dvsprep's store writer. Its samples replicate 64
distinct synthetic ones per split (a class-dependent moving patch plus 2% noise events), so it
is written in seconds; dense convolutions cost the same whatever the values.

Ours (--variants lif_fp16, plif_fp16, lif_bf16, plif_bf16): dvsg-train's own entry point
(``dvsg_train.cli.train_main``, in this process) with the seed's settings (-T 16 -b 16
--channels 128, Adam lr 1e-3, CosALR) plus --cupy --amp --amp-dtype X --preload gpu; epoch
seconds are dvsg-train's own ``epoch_seconds`` (train + test evaluation), read from its
metrics.jsonl. The first epoch (kernel compilation, cuDNN autotuning) is reported, not timed.

SpikingJelly (sj_torch, sj_triton): DVSGestureNet(channels, LIFNode, ATan, detach_reset) in
multi-step mode, fp16 autocast + GradScaler, Adam, batches copied from pinned host memory each
step and loss.item() per step as its DVS Gesture example does; each backend in its own process
(SJ_LIF_CUDA_IMPLEMENTATION=torch|triton is read when spikingjelly is imported).

Results are written after every variant (--json, and bench.md in --work), so a run cut short
still reports what it measured; --time-limit skips variants that would start too late.

Usage: python benchmarks/bench_train_gpu.py --work DIR [--json F] [--time-limit S]
       [--variants ...] [--train 1176 --test 288 -T 16 -b 16 --channels 128 --epochs 2]
       [--device cpu]  (CPU smoke run: tiny sizes, torch neurons instead of --cupy)
       [--dry-run]     (print the plan and the dvsg-train command lines; needs no GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_CLASSES = 11
OURS = {"lif_fp16": ("lif", "fp16"), "plif_fp16": ("plif", "fp16"),
        "lif_bf16": ("lif", "bf16"), "plif_bf16": ("plif", "bf16")}
SJ = {"sj_torch": "torch", "sj_triton": "triton"}
# run order: the headline comparison first, so a cut-short run still has it
DEFAULT_ORDER = ("lif_fp16", "sj_torch", "sj_triton", "plif_fp16", "lif_bf16", "plif_bf16")
SEED_ARGS = ["--opt", "adam", "--lr", "1e-3", "--lr-scheduler", "CosALR"]


# --------------------------------------------------------------------------- data

def synthetic_split(n: int, T: int, seed: int, distinct: int = 64) -> dict:
    """Arrays of one split: ``distinct`` synthetic samples, replicated to n (see module doc)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k = min(n, distinct)
    labels = np.arange(k) % N_CLASSES
    frames = (rng.random((k, T, 2, 128, 128), dtype=np.float32) < 0.02).astype(np.uint8)
    for i, c in enumerate(labels):
        y0 = (int(c) * 11) % 112
        for t in range(T):
            x0 = (t * 8 + int(c) * 5) % 112
            frames[i, t, int(c) % 2, y0:y0 + 16, x0:x0 + 16] += (2 * (rng.random((16, 16)) < 0.6)).astype(np.uint8)
    idx = np.arange(n) % k
    frames = frames[idx]
    return {"frames": frames, "label": labels[idx],
            "recording": [f"user{1 + i // 48:02d}_synth" for i in range(n)],
            "row": np.arange(n) % 48, "t_start": np.arange(n, dtype=np.int64) * 1000,
            "t_end": np.arange(n, dtype=np.int64) * 1000 + 900,
            "n_events": frames.reshape(n, -1).sum(1, dtype=np.int64)}


def make_store(path: Path, n_train: int, n_test: int, T: int) -> str:
    """Write (or reuse) the benchmark's frame store; returns its fingerprint."""
    from dvsprep import open_frame_store
    from dvsprep.frames import write_frame_store_from_arrays

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        store = open_frame_store(str(path))
        if (store.T, len(store.split("train")), len(store.split("test"))) == (T, n_train, n_test):
            return store.fingerprint
    return write_frame_store_from_arrays(
        path, T=T, split_by="number", force=True, events_fingerprint="bench-train-gpu-synthetic",
        splits={"train": synthetic_split(n_train, T, 0), "test": synthetic_split(n_test, T, 1)})


# --------------------------------------------------------------------------- ours

def train_args(variant: str, args, store: Path, out_dir: Path) -> list[str]:
    """dvsg-train's command line for one of our variants."""
    neuron, amp = OURS[variant]
    cmd = ["--data", str(store), "-T", str(args.T), "-b", str(args.batch_size),
           "--channels", str(args.channels), "--epochs", str(args.epochs), *SEED_ARGS,
           "--neuron", neuron, "--amp", "--amp-dtype", amp, "--out-dir", str(out_dir),
           "--run-name", variant, "--force", "-j", "0", "-q"]
    if args.device == "cuda":
        cmd += ["--cupy", "--preload", "gpu", "--device", "cuda"]
    else:   # the CPU smoke run: torch neurons
        cmd += ["--preload", "cpu", "--device", "cpu"]
    return cmd


def run_ours(variant: str, args, store: Path, out_dir: Path) -> dict:
    from dvsg_train.cli import train_main

    cmd = train_args(variant, args, store, out_dir)
    t0 = time.perf_counter()
    try:
        train_main.main(args=cmd, prog_name="dvsg-train", standalone_mode=False)
    except SystemExit as exc:         # the CLI's one-line errors exit 1
        if exc.code not in (0, None):
            return {"error": f"dvsg-train exited {exc.code}", "command": cmd}
    rows = [json.loads(line) for line in (out_dir / variant / "metrics.jsonl").read_text().splitlines()]
    secs = [r["epoch_seconds"] for r in rows]
    timed = secs[1:] or secs
    return {"sec_per_epoch": min(timed), "epoch_seconds": secs,
            "train_samples_per_s": max(r["train_samples_per_s"] for r in rows),
            "test_acc": rows[-1]["test_acc"], "wall_seconds": time.perf_counter() - t0,
            "command": "dvsg-train " + " ".join(cmd)}


# --------------------------------------------------------------------------- SpikingJelly

def sj_worker(args) -> int:
    """In a child process (SJ_LIF_CUDA_IMPLEMENTATION already set): train SpikingJelly's
    DVSGestureNet on the store and print one line ``SJ_RESULT {json}``."""
    import torch
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional, neuron, surrogate
    from spikingjelly.activation_based.model.parametric_lif_net import DVSGestureNet

    from dvsprep import open_frame_store

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    store = open_frame_store(args.store)
    data = {}
    for split in ("train", "test"):
        sp = store.split(split)
        frames = torch.from_numpy(sp.load_all())
        data[split] = (frames.pin_memory() if device.type == "cuda" else frames,
                       torch.from_numpy(sp.labels.astype("int64")))
    torch.manual_seed(0)
    model = DVSGestureNet(channels=args.channels, spiking_neuron=neuron.LIFNode,
                          surrogate_function=surrogate.ATan(), detach_reset=True).to(device)
    functional.set_step_mode(model, "m")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    gen = torch.Generator().manual_seed(1)
    b = args.batch_size
    times, accs = [], []
    for _ in range(args.epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.train()
        frames, labels = data["train"]
        order = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(labels) - b + 1, b):
            idx = order[i:i + b]
            x = frames[idx].to(device, non_blocking=True).float().transpose(0, 1)
            y = labels[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                out = model(x).mean(0)
                loss = F.mse_loss(out, F.one_hot(y, N_CLASSES).float())
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss.item()
            functional.reset_net(model)
        model.eval()
        correct = 0
        frames, labels = data["test"]
        with torch.no_grad():
            for i in range(0, len(labels), b):
                x = frames[i:i + b].to(device, non_blocking=True).float().transpose(0, 1)
                y = labels[i:i + b].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    out = model(x).mean(0)
                correct += int((out.argmax(1) == y).sum())
                functional.reset_net(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        accs.append(correct / len(labels))
    timed = times[1:] or times
    print("SJ_RESULT " + json.dumps({"sec_per_epoch": min(timed), "epoch_seconds": times,
                                     "test_acc": accs[-1]}), flush=True)
    return 0


def run_sj(variant: str, args, store: Path, timeout: float) -> dict:
    env = {**os.environ, "SJ_LIF_CUDA_IMPLEMENTATION": SJ[variant]}
    cmd = [sys.executable, os.path.abspath(__file__), "--sj-worker", "--store", str(store),
           "--device", args.device, "--channels", str(args.channels), "-b", str(args.batch_size),
           "--epochs", str(args.epochs)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("SJ_RESULT "):
            return json.loads(line[len("SJ_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}


# --------------------------------------------------------------------------- report

def summarize(report: dict) -> None:
    res = report["results"]
    ours = {k: r["sec_per_epoch"] for k, r in res.items() if k in OURS and "sec_per_epoch" in r}
    sj = {k: r["sec_per_epoch"] for k, r in res.items() if k in SJ and "sec_per_epoch" in r}
    report.pop("verdict", None)
    if ours:
        best = min(ours, key=ours.get)
        report["best_ours"] = best
        verdict = f"best of ours: {best} {ours[best]:.3f} s/epoch (target <= 1 s on an H200)"
        if sj:
            fastest = min(sj, key=sj.get)
            report["sj_fastest"] = fastest
            report["speedup_vs_sj_fastest"] = sj[fastest] / ours[best]
            verdict += (f"; {report['speedup_vs_sj_fastest']:.2f}x SpikingJelly's fastest "
                        f"({fastest}, {sj[fastest]:.3f} s/epoch; target >= 5x)")
        report["verdict"] = verdict


def markdown(report: dict) -> str:
    res = report["results"]
    sj_best = min((r["sec_per_epoch"] for k, r in res.items() if k in SJ and "sec_per_epoch" in r),
                  default=None)
    c = report["config"]
    lines = [f"epoch time on {report['environment'].get('device', '?')}: {c['train']}/{c['test']} "
             f"samples, T={c['T']}, b={c['batch_size']}, {c['channels']} channels",
             "", "| variant | s/epoch | epochs (s) | test acc | vs SJ fastest |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | |")
            continue
        ratio = f"{sj_best / r['sec_per_epoch']:.2f}x" if sj_best and name in OURS else ""
        epochs = ", ".join(f"{s:.2f}" for s in r["epoch_seconds"])
        lines.append(f"| {name} | {r['sec_per_epoch']:.3f} | {epochs} | {r['test_acc']:.3f} | {ratio} |")
    if report.get("verdict"):
        lines += ["", report["verdict"]]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _environment(device: str) -> dict:
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__}
    if device == "cuda" and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({os.cpu_count()} cores)"
    for mod in ("cupy", "triton", "spikingjelly"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=None, help="store and run folders (default: a temp dir)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--train", type=int, default=1176)
    p.add_argument("--test", type=int, default=288)
    p.add_argument("-T", type=int, default=16)
    p.add_argument("-b", "--batch-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="epochs per variant; the first is warm-up")
    p.add_argument("--variants", default=",".join(DEFAULT_ORDER))
    p.add_argument("--json", type=Path, help="write the results here (after every variant)")
    p.add_argument("--time-limit", type=float, default=170.0,
                   help="seconds for the whole benchmark; variants that cannot start in time are skipped")
    p.add_argument("--sj-timeout", type=float, default=70.0, help="seconds per SpikingJelly process")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--sj-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(OURS) - set(SJ))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(DEFAULT_ORDER)}")
    args.variant_list = variants
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.sj_worker:
        return sj_worker(args)
    if args.work is None:
        args.work = Path("TMPDIR" if args.dry_run else tempfile.mkdtemp(prefix="bench_train_gpu_"))
    work = args.work
    store = work / f"frames_T{args.T}_number.zarr"
    if args.dry_run:
        print(f"   store {store}: {args.train}/{args.test} samples, T={args.T}")
        for v in args.variant_list:
            line = ("dvsg-train " + " ".join(train_args(v, args, store, work / "runs")) if v in OURS
                    else f"SJ_LIF_CUDA_IMPLEMENTATION={SJ[v]} DVSGestureNet, {args.epochs} epochs")
            print(f"   {v}: {line}")
        return 0
    start = time.perf_counter()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
            return 1
    t0 = time.perf_counter()
    fingerprint = make_store(store, args.train, args.test, args.T)
    report = {"config": {k: getattr(args, k) for k in ("train", "test", "T", "batch_size",
                                                       "channels", "epochs", "device")},
              "store": {"path": str(store), "fingerprint": fingerprint,
                        "seconds_to_write": time.perf_counter() - t0},
              "environment": _environment(args.device), "results": {}}
    print(f"store {store} ({report['store']['seconds_to_write']:.1f} s)", flush=True)
    for v in args.variant_list:
        left = args.time_limit - (time.perf_counter() - start)
        if left < 15:
            r = {"error": f"skipped: {left:.0f} s of the time limit left"}
        elif v in OURS:
            try:
                r = run_ours(v, args, store, work / "runs")
            except Exception as exc:      # one failing variant must not hide the others
                r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            if args.device == "cuda":
                import torch

                torch.cuda.empty_cache()
        else:
            r = run_sj(v, args, store, min(args.sj_timeout, left - 5))
        report["results"][v] = r
        shown = f"{r['sec_per_epoch']:.3f} s/epoch" if "sec_per_epoch" in r else r["error"]
        print(f"{v:>10}: {shown}", flush=True)
        summarize(report)
        if args.json:
            _write_atomic(args.json, json.dumps(report, indent=2) + "\n")
        _write_atomic(work / "bench.md", markdown(report))
    print(markdown(report))
    return 0 if any("sec_per_epoch" in r for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
