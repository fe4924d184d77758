"""Training throughput: our multi-step network vs SpikingJelly 2.0's DVSGestureNet, one process.

Every variant trains the same network (channels, T, batch) with Adam on the same batches on the
same device: integer frames are indexed from memory, moved to the device, transposed to
[T, B, ...] and converted to float, then forward, MSE loss, backward, step. Variants run in
turn, ``--repeats`` times round-robin (so background load hits all of them alike); the median
is reported, with ratios against SpikingJelly.

    python benchmarks/bench_train.py --device cpu -T 16 -b 4 --channels 32 --steps 5
    python benchmarks/bench_train.py --device cuda --store DATA_ROOT/frames_T16_number.zarr --epochs 1
    python benchmarks/bench_train.py --device cuda --random-store --epochs 1 --json bench.json

Variants live in VARIANTS: a name, how to build the model, whether it autocasts, and what it
needs to run. Add GPU variants (e.g. the cupy backend) there.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dvsprep.constants import N_CLASSES, N_POLARITIES, SENSOR_H, SENSOR_W  # noqa: E402
from dvsg_train.data import Batches, open_store, to_network_input  # noqa: E402
from dvsg_train.model import build_model  # noqa: E402

REAL_TRAIN_SAMPLES = 1176   # the release's train split (1176 train / 288 test)


@dataclass
class Variant:
    name: str
    build: Callable[[argparse.Namespace], torch.nn.Module]
    # model(x [T, B, ...]) -> rates [B, 11]; after_step resets state (SpikingJelly keeps some)
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    after_step: Callable[[torch.nn.Module], None] = lambda m: None
    amp: bool = False
    needs: Callable[[argparse.Namespace], str | None] = lambda a: None   # reason it cannot run


def _ours(net: str = "multistep", backend: str = "torch"):
    return lambda a: build_model(a.channels, net, "lif", backend)


def _spikingjelly(a: argparse.Namespace) -> torch.nn.Module:
    from spikingjelly.activation_based import functional, neuron, surrogate
    from spikingjelly.activation_based.model.parametric_lif_net import DVSGestureNet

    net = DVSGestureNet(channels=a.channels, spiking_neuron=neuron.LIFNode,
                        surrogate_function=surrogate.ATan(), detach_reset=True)
    functional.set_step_mode(net, "m")
    return net


def _sj_reset(model: torch.nn.Module) -> None:
    from spikingjelly.activation_based import functional

    functional.reset_net(model)


def _needs_cuda(a: argparse.Namespace) -> str | None:
    return None if a.device.startswith("cuda") else "needs --device cuda"


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("ours", _ours(), lambda m, x: m(x)),
    Variant("ours-stepwise", _ours("stepwise"), lambda m, x: m(x)),
    Variant("spikingjelly", _spikingjelly, lambda m, x: m(x).mean(0), _sj_reset),
    Variant("ours-amp", _ours(), lambda m, x: m(x), amp=True),
    Variant("spikingjelly-amp", _spikingjelly, lambda m, x: m(x).mean(0), _sj_reset, amp=True),
]}
DEFAULT_VARIANTS = {"cpu": ["ours", "spikingjelly"],
                    "cuda": ["ours", "spikingjelly", "ours-amp", "spikingjelly-amp"]}


def frames_source(a: argparse.Namespace, n_needed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Integer frames [N, T, 2, 128, 128] and labels [N] held in memory (as training preloads)."""
    if a.store:
        sp = open_store(a.store, a.T).split("train")
        n = len(sp) if n_needed <= 0 else min(len(sp), n_needed)
        frames = np.stack([sp[i] for i in range(n)])
        return torch.from_numpy(frames), torch.from_numpy(sp.labels[:n]), f"store {a.store}"
    n = REAL_TRAIN_SAMPLES if n_needed <= 0 else n_needed
    g = torch.Generator().manual_seed(0)
    shape = (n, a.T, N_POLARITIES, SENSOR_H, SENSOR_W)
    # sparse small counts, like event frames (the values do not change the work done)
    frames = ((torch.rand(shape, generator=g) < 0.05) * torch.randint(1, 4, shape, generator=g)).to(torch.uint8)
    return frames, torch.randint(0, N_CLASSES, (n,), generator=g), f"random frames, {n} samples"


def run_variant(v: Variant, a: argparse.Namespace, batches: Batches, device: torch.device,
                n_batches: int | None) -> dict:
    torch.manual_seed(0)
    model = v.build(a).to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp_dtype = None
    if v.amp:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    def step(frames, labels):
        x, y = to_network_input(frames, labels, device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = F.mse_loss(v.forward(model, x).float(), F.one_hot(y, N_CLASSES).float())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        v.after_step(model)
        return len(y)

    warm = iter(batches)
    for _ in range(a.warmup):
        step(*next(warm))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples = 0
    start = time.perf_counter()
    for i, (frames, labels) in enumerate(batches):
        if n_batches is not None and i >= n_batches:
            break
        samples += step(frames, labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-T", type=int, default=16)
    p.add_argument("-b", type=int, default=16, help="batch size")
    p.add_argument("--channels", type=int, default=128)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="time this many training steps per repeat")
    g.add_argument("--epochs", type=int, default=None, help="time this many full epochs per repeat")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--store", help="frame store (or DATA_ROOT) to read the train split from")
    src.add_argument("--random-store", action="store_true",
                     help=f"random frames of the real shape ({REAL_TRAIN_SAMPLES} train samples) (default)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: per device)")
    p.add_argument("--repeats", type=int, default=3, help="round-robin repeats; the median is kept")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and repeat")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    steps = a.steps if a.steps is not None else (None if a.epochs else 5)
    names = a.variants.split(",") if a.variants else DEFAULT_VARIANTS[device.type]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    variants = []
    for n in names:
        reason = VARIANTS[n].needs(a)
        if reason:
            print(f"skipping {n}: {reason}")
        else:
            variants.append(VARIANTS[n])

    n_needed = 0 if steps is None else (steps + a.warmup) * a.b
    frames, labels, source = frames_source(a, n_needed)
    frames = frames.to(device)
    batches = Batches(labels, a.b, shuffle=True, drop_last=True, frames=frames,
                      generator=torch.Generator().manual_seed(0))
    n_batches = None if steps is None else steps
    epochs = a.epochs or 1
    print(f"device {device}, T={a.T}, b={a.b}, channels={a.channels}, {source}, "
          f"{'%d steps' % steps if steps is not None else '%d epoch(s)' % epochs} per repeat, "
          f"{a.repeats} repeats, torch threads {torch.get_num_threads()}")
    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    for _ in range(a.repeats):
        for v in variants:
            total = {"samples": 0, "seconds": 0.0}
            for _ in range(epochs if steps is None else 1):
                r = run_variant(v, a, batches, device, n_batches)
                total["samples"] += r["samples"]
                total["seconds"] += r["seconds"]
            runs[v.name].append({**total, "samples_per_s": total["samples"] / total["seconds"]})
    results = []
    for v in variants:
        sps = [r["samples_per_s"] for r in runs[v.name]]
        results.append({"variant": v.name, "samples_per_s": statistics.median(sps),
                        "repeats_samples_per_s": sps,
                        "seconds_per_epoch_est": REAL_TRAIN_SAMPLES / statistics.median(sps)})
    by = {r["variant"]: r["samples_per_s"] for r in results}
    ratios = {}
    for r in results:
        base = "spikingjelly-amp" if r["variant"].endswith("amp") and "spikingjelly-amp" in by else "spikingjelly"
        if base in by and r["variant"] != base:
            ratios[f"{r['variant']}/{base}"] = r["samples_per_s"] / by[base]
    for r in results:
        print(f"{r['variant']:>18}: {r['samples_per_s']:8.2f} samples/s  "
              f"(~{r['seconds_per_epoch_est']:.1f} s per {REAL_TRAIN_SAMPLES}-sample epoch)")
    for k, x in ratios.items():
        print(f"{k}: {x:.2f}x")
    out = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(), "T": a.T, "batch_size": a.b,
           "channels": a.channels, "steps": steps, "epochs": None if steps is not None else epochs,
           "source": source, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "results": results, "ratios": ratios}
    try:
        import spikingjelly

        out["spikingjelly"] = getattr(spikingjelly, "__version__", "unknown")
    except ImportError:
        pass
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
