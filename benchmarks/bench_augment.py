"""What augmentation costs: the time of `augment_batch` per batch against one training step
(forward, MSE loss, backward, Adam step) of the same network on the same batch and device.

Each augmentation (and the whole recipe) and the training step run in turn, ``--repeats``
times round-robin, so background load hits all alike; medians are reported, with the ratio to
the step. Goal (issue: accuracy beyond the tutorial): the whole recipe under 5% of a step on a
GPU, under 10% on a CPU.

    python benchmarks/bench_augment.py --device cpu -T 16 -b 16 --channels 32
    python benchmarks/bench_augment.py --device cuda -T 16 -b 16 --channels 128 --amp
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dvsprep.constants import N_CLASSES, N_POLARITIES, SENSOR_H, SENSOR_W  # noqa: E402
from dvsg_train.augment import augment_batch, augment_generator, parse_augment  # noqa: E402
from dvsg_train.model import build_model  # noqa: E402

RECIPE = "mirror,translate=8,rotate=15,shear=10,scale=0.1,drop=0.1,cutout=16,mixup=0.5,cutmix=0.3,smooth=0.1"
PARTS = ["mirror", "translate=8", "rotate=15,shear=10,scale=0.1", "drop=0.1", "cutout=16",
         "subsample=12", "mixup=1", "cutmix=1", RECIPE]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("-T", type=int, default=16)
    ap.add_argument("-b", type=int, default=16)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the step (CUDA)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    g = torch.Generator(device=dev).manual_seed(0)
    frames = torch.randint(0, 6, (a.T, a.b, N_POLARITIES, SENSOR_H, SENSOR_W), generator=g, device=dev).float()
    labels = torch.randint(0, N_CLASSES, (a.b,), generator=g, device=dev)
    model = build_model(a.channels, "multistep", "lif", "torch").to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.amp):
            out = model(frames)
            loss = F.mse_loss(out.float(), F.one_hot(labels, N_CLASSES).float())
        loss.backward()
        opt.step()

    specs = {text: parse_augment(text) for text in PARTS}
    jobs = {"train step": step}
    for text, spec in specs.items():
        jobs[text] = (lambda spec=spec: augment_batch(spec, frames, labels, augment_generator(0, 0, 0, 0, dev)))
    for job in jobs.values():      # warm-up (allocator, kernels, lazy inits)
        job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(a.repeats):
        for name, job in jobs.items():
            _sync(dev)
            t0 = time.perf_counter()
            job()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    step_s = statistics.median(times["train step"])
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {name}, T={a.T} b={a.b} channels={a.channels}{' bf16' if a.amp else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {a.repeats}")
    print(f"{'what':<40} {'ms/batch':>10} {'of a step':>10}")
    for name, ts in times.items():
        s = statistics.median(ts)
        label = "recipe: " + name if name == RECIPE else name
        print(f"{label[:40]:<40} {s * 1e3:10.2f} {s / step_s:10.1%}")


if __name__ == "__main__":
    main()
