"""What the augmentation recipe costs, and (with --accuracy) what it buys, on a frame store.

Cost (always): ``augment_batch`` with the ``seed-augment`` preset's recipe, and with each of its
parts (plus the augmentations it leaves out), against one training step (forward, MSE loss,
backward, Adam step) of the same network on the same batch: the first ``-b`` training samples
of the store, on ``--device``. Jobs run in turn, ``--repeats`` times round-robin (so background
load hits all alike); repeat r draws from ``augment_generator(0, 0, 0, r)`` as the r-th step of
an epoch would, so the recipe's mixup (probability 0.5 per batch) is on in some repeats and off
in others: the recipe's cost is the mean over the repeats, the parts' the median. On the CPU with
one thread (dvsg-train's default) the clock is this process's CPU time, which equals the wall
time on an idle machine and is not stretched by other processes sharing the cores; with more
threads or on CUDA it is the wall time (synchronised). Goal (issue 22): the whole recipe under
10% of a step on a CPU, under 5% on a GPU.

Accuracy (--accuracy): ``dvsg-train --seeds`` (run in this process) trains the same small network on the store without
augmentation and with the recipe (equal epochs, T, batch, channels, lr), then the
``dvsg-report`` table of the runs prints max and final test accuracy per run and mean +- std over
the seeds, and the seconds per epoch that the recipe adds.

--thinning also times exact alternatives to torch.binomial for the event drop on the same batch
(torch.binomial on the nonzero pixels only, a Bernoulli per event) and torch.rand over the batch.

Without --data the store is the built-in synthetic release (dvsprep synth, convert, frames -T T)
made in a temporary folder (about 30 s).

    python benchmarks/bench_augment.py                         # cost, synthetic release, CPU
    python benchmarks/bench_augment.py --accuracy              # plus 3 seeds x 2 runs x 20 epochs (~40 min, 2 cores)
    python benchmarks/bench_augment.py --data DATA_ROOT/frames_T16_number.zarr -T 16 -b 16 \\
        --channels 128 --device cuda --amp
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from dvsprep.constants import N_CLASSES  # noqa: E402
from dvsg_train.augment import augment_batch, augment_generator, parse_augment, thin  # noqa: E402
from dvsg_train.cli import train_main  # noqa: E402
from dvsg_train.compare import read_runs, report_text  # noqa: E402
from dvsg_train.data import open_store, to_network_input  # noqa: E402
from dvsg_train.model import build_model  # noqa: E402
from dvsg_train.presets import preset_values  # noqa: E402
from mirror_check import make_store  # noqa: E402

RECIPE = preset_values("seed-augment")["augment"]
GOAL = {"cpu": 0.10, "cuda": 0.05}


def parts(T: int) -> list[str]:
    """The recipe's parts one by one (mixup forced on: its cost when the coin says mix), then the
    augmentations the recipe leaves out."""
    spec = parse_augment(RECIPE)
    out = ["mirror", f"translate={spec.translate}", f"rotate={spec.rotate:g},shear={spec.shear:g}",
           f"mirror,translate={spec.translate},rotate={spec.rotate:g},shear={spec.shear:g}",
           f"drop={spec.drop:g}", "mixup=1", f"smooth={spec.smooth:g}", "cutout=16", "cutmix=1", "scale=0.1"]
    return out + ([f"subsample={T // 2}"] if T >= 2 else [])


def load_batch(store: Path, T: int, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first b training samples as the training loop feeds them: float32 [T, b, 2, H, W]."""
    split = open_store(store, T).split("train")
    if len(split) < b:
        raise SystemExit(f"bench_augment: {store} has {len(split)} training samples, fewer than -b {b}")
    frames = torch.stack([torch.from_numpy(split[i]) for i in range(b)])
    return to_network_input(frames, torch.from_numpy(split.labels[:b]), device)


def timer(device: torch.device, threads: int) -> tuple[Callable[[], float], str]:
    """The clock and its name: process CPU time on a one-thread CPU run, else synchronised wall time."""
    if device.type == "cpu" and threads == 1:
        return time.process_time, "CPU time of this process"
    if device.type == "cuda":
        return (lambda: (torch.cuda.synchronize(device), time.perf_counter())[1]), "wall time (synchronised)"
    return time.perf_counter, "wall time"


def measure_cost(a: argparse.Namespace, store: Path, dev: torch.device) -> float:
    """Print the cost table; return the recipe's cost as a share of a training step."""
    x, labels = load_batch(store, a.T, a.b, dev)
    model = build_model(a.channels, "multistep", "lif", "torch").to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.amp):
            out = model(x)
            loss = F.mse_loss(out.float(), F.one_hot(labels, N_CLASSES).float())
        loss.backward()
        opt.step()

    def job(spec_text: str) -> Callable[[int], object]:
        spec = parse_augment(spec_text)
        return lambda r: augment_batch(spec, x, labels, augment_generator(0, 0, 0, r, dev))

    jobs: dict[str, Callable[[int], object]] = {"train step": lambda r: step()}
    jobs.update({text: job(text) for text in parts(a.T)})
    jobs["recipe"] = job(RECIPE)
    clock, clock_name = timer(dev, a.threads)
    for j in jobs.values():          # warm-up (allocator, kernels, lazy inits)
        j(a.repeats)
    load = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(a.repeats):
        for name, j in jobs.items():
            t0 = clock()
            j(r)
            times[name].append(clock() - t0)
    step_s = statistics.median(times["train step"])
    recipe_s = statistics.fmean(times["recipe"])
    nz = (x > 0).double().mean().item()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"frames: {store}, train samples 0..{a.b - 1}: {nz:.1%} of the pixels nonzero, "
          f"mean count {x.double().mean().item():.3f}, max {x.max().item():g}")
    print(f"device {name}, T={a.T} b={a.b} channels={a.channels}{' bf16 autocast' if a.amp else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {clock_name}; "
          f"{a.repeats} repeats; load average {load[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'what':<44} {'ms/batch':>10} {'of a step':>10}")
    for job_name, ts in times.items():
        s = recipe_s if job_name == "recipe" else statistics.median(ts)
        label = "recipe (seed-augment; mean)" if job_name == "recipe" else job_name
        print(f"{label[:44]:<44} {s * 1e3:10.2f} {s / step_s:10.1%}")
    print(f"  (the recipe: {RECIPE})")
    share = recipe_s / step_s
    goal = GOAL.get(dev.type)
    if goal is not None:
        print(f"recipe: {share:.1%} of a training step; goal under {goal:.0%} on {dev.type}: "
              f"{'met' if share < goal else 'NOT met'}")
    return share


def thinning_samplers(x: torch.Tensor, keep: float) -> dict[str, Callable[[torch.Generator], torch.Tensor]]:
    """Exact ways to keep each event of the counts x with probability ``keep`` (what `thin` could
    use), and torch.rand over the batch: the least that any sampler drawing per pixel pays."""
    flat = x.reshape(-1)

    def binomial_nonzero(g: torch.Generator) -> torch.Tensor:
        nz = flat.nonzero().squeeze(1)
        out = torch.zeros_like(flat)
        out[nz] = torch.binomial(flat[nz], torch.full_like(flat[nz], keep), generator=g)
        return out

    def bernoulli_per_event(g: torch.Generator) -> torch.Tensor:
        nz = flat.nonzero().squeeze(1)
        event_pixel = torch.repeat_interleave(torch.arange(len(nz), device=x.device), flat[nz].long())
        kept = (torch.rand(len(event_pixel), generator=g, device=x.device) < keep).to(x.dtype)
        out = torch.zeros_like(flat)
        out[nz] = torch.zeros(len(nz), dtype=x.dtype, device=x.device).index_add_(0, event_pixel, kept)
        return out

    return {"torch.binomial (thin)": lambda g: thin(x, keep, g),
            "torch.binomial on the nonzero pixels": binomial_nonzero,
            "a Bernoulli per event": bernoulli_per_event,
            "torch.rand over the batch (a floor)": lambda g: torch.rand(x.shape, generator=g, device=x.device)}


def measure_thinning(a: argparse.Namespace, store: Path, dev: torch.device) -> None:
    """Print what each exact thinning sampler costs on the batch, and its kept share (about keep)."""
    x, _ = load_batch(store, a.T, a.b, dev)
    keep = 1 - parse_augment(RECIPE).drop
    clock, clock_name = timer(dev, a.threads)
    samplers = thinning_samplers(x, keep)
    g = torch.Generator(device=dev).manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(a.repeats + 1):           # the first round warms up
        for name, sample in samplers.items():
            t0 = clock()
            sample(g)
            times[name].append(clock() - t0)
    print(f"\nthinning samplers, keep {keep:g} ({clock_name}, median of {a.repeats}):")
    for name, sample in samplers.items():
        kept = "" if "floor" in name else f"   kept {sample(g).sum().item() / x.sum().item():.4f} of the events"
        print(f"  {name:<38} {statistics.median(times[name][1:]) * 1e3:8.2f} ms{kept}")


def train_seeds(a: argparse.Namespace, store: Path, out: Path, name: str, augment: str) -> list[Path]:
    """dvsg-train --seeds (in this process) into out/<name>_seed<N>; the run folders."""
    args = ["--data", str(store), "-T", str(a.T), "-b", str(a.b), "--channels", str(a.channels),
            "--lr", str(a.lr), "--epochs", str(a.epochs), "--device", a.device, "--out-dir", str(out),
            "--run-name", name, "--seeds", a.seeds, "-j", "0", "-q"]
    args += ["--augment", augment] if augment else []
    args += ["--amp"] if a.amp else []
    print(f"\n$ dvsg-train {' '.join(args)}")
    try:
        train_main.main(args=args, prog_name="dvsg-train")
    except SystemExit as exc:            # click's way to end; its usage and error lines are printed
        if exc.code:
            raise SystemExit(f"bench_augment: dvsg-train failed for {name!r} (exit {exc.code})") from None
    return [out / f"{name}_seed{s.strip()}" for s in a.seeds.split(",")]


def measure_accuracy(a: argparse.Namespace, store: Path, out: Path) -> None:
    """Train without augmentation and with the recipe over the seeds; print the dvsg-report table."""
    plain = train_seeds(a, store, out, "none", "")
    recipe = train_seeds(a, store, out, "recipe", RECIPE)
    runs = read_runs(plain + recipe)
    print(f"\nno augmentation vs the seed-augment recipe ({RECIPE}), {a.epochs} epochs, "
          f"T {a.T}, -b {a.b}, channels {a.channels}, lr {a.lr}, {a.device}:")
    print(report_text(runs))
    n = len(plain)
    per_epoch = [statistics.fmean(r.seconds_per_epoch for r in group) for group in (runs[:n], runs[n:])]
    print(f"seconds per epoch: {per_epoch[0]:.1f} without, {per_epoch[1]:.1f} with the recipe "
          f"({per_epoch[1] / per_epoch[0] - 1:+.0%}, measured in these runs, with whatever else ran)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="a frame store (default: the synthetic release, made here)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("-T", type=int, default=8)
    ap.add_argument("-b", type=int, default=8)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (dvsg-train's default: 1)")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the step (and --amp for the runs)")
    ap.add_argument("--thinning", action="store_true",
                    help="also time exact alternatives to torch.binomial for the event drop")
    ap.add_argument("--accuracy", action="store_true",
                    help="also train without augmentation and with the recipe over --seeds (minutes)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--out-dir", type=Path, help="keep the --accuracy runs here (default: a temporary folder)")
    a = ap.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # our lines and dvsg-train's in order, also in a log
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    with tempfile.TemporaryDirectory(prefix="bench_augment_") as tmp:
        store = a.data if a.data is not None else make_store(Path(tmp), a.T, 0)
        measure_cost(a, store, dev)
        if a.thinning:
            measure_thinning(a, store, dev)
        if a.accuracy:
            measure_accuracy(a, store, a.out_dir or Path(tmp) / "runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
