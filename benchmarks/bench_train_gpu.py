"""Seconds per training epoch on one GPU: our multi-step net (torch / cupy neurons, AMP,
bf16, channels_last) against SpikingJelly 2.0's DVSGestureNet with AMP, in one process.

Data: random event-count frames of the real shape (default 1176 train / 288 test samples,
T=16, uint8 [N, T, 2, 128, 128], ~10% of pixels non-zero with counts 1..3), generated on the
machine from a fixed seed. Dense convolutions cost the same whatever the values, so this times
the real workload without the 5 GB release. An epoch = one pass over the train split
(batches of -b, the last one short) plus one evaluation pass over the test split.

Variants (--variants, comma-separated):
  torch            ours, torch reference neurons, fp32
  cupy             ours, cupy neurons, fp32
  cupy_amp         ours, cupy neurons, autocast fp16 + GradScaler
  cupy_amp_bf16    ours, cupy neurons, autocast bf16 (no scaler)
  cupy_amp_bf16_cl ours, as cupy_amp_bf16 with channels_last activations
  sj_amp           SpikingJelly DVSGestureNet (multi-step LIF, ATan, detach_reset; its own
                   GPU neuron kernels), autocast fp16 + GradScaler, batches copied from host
                   memory each step and .item() per step, as in SpikingJelly's example loop
Ours keeps the frames on the GPU and reads the loss once per epoch.

Usage: python benchmarks/bench_train_gpu.py [--device cuda] [--json F] [--md F]
(CPU smoke run: --device cpu --train 8 --test 4 --channels 4 --variants torch,sj_amp)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

N_CLASSES = 11
ALL_VARIANTS = ("torch", "cupy", "cupy_amp", "cupy_amp_bf16", "cupy_amp_bf16_cl", "sj_amp")
CUDA_ONLY = {"cupy", "cupy_amp", "cupy_amp_bf16", "cupy_amp_bf16_cl"}


def make_frames(n: int, T: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random frames uint8 [n, T, 2, 128, 128] (10% non-zero, counts 1..3) and labels [n]."""
    g = torch.Generator(device=device).manual_seed(seed)
    frames = torch.empty((n, T, 2, 128, 128), dtype=torch.uint8, device=device)
    for i in range(0, n, 64):   # in slices: the float temporaries stay small
        k = min(64, n - i)
        shape = (k, T, 2, 128, 128)
        mask = torch.rand(shape, generator=g, device=device) < 0.1
        counts = torch.randint(1, 4, shape, generator=g, device=device, dtype=torch.uint8)
        frames[i:i + k] = counts * mask
    labels = torch.randint(0, N_CLASSES, (n,), generator=g, device=device)
    return frames, labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Ours:
    """Our MultiStepNet, frames resident on the device, no host sync inside an epoch."""

    def __init__(self, variant: str, channels: int, device: torch.device):
        from dvsg_train.model import build_model

        self.backend = "torch" if variant == "torch" else "cupy"
        self.amp_dtype = {"cupy_amp": torch.float16, "cupy_amp_bf16": torch.bfloat16,
                          "cupy_amp_bf16_cl": torch.bfloat16}.get(variant)
        self.channels_last = variant.endswith("_cl")
        self.device = device
        self.model = build_model(channels=channels, net="multistep", neuron="lif",
                                 backend=self.backend).to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

    def _input(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.transpose(0, 1)                               # [T, B, 2, H, W] uint8
        T, B = x.shape[:2]
        if self.channels_last:
            x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (T, B))
        else:
            x = x.contiguous()
        return x.float()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def epoch(self, frames, labels, test_frames, test_labels, batch_size: int, gen) -> dict:
        self.model.train()
        n = frames.shape[0]
        order = torch.randperm(n, generator=gen).to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            x, y = self._input(frames[idx]), labels[idx]
            with self._autocast():
                out = self.model(x)
            loss = F.mse_loss(out.float(), F.one_hot(y, N_CLASSES).float())
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            loss_sum += loss.detach() * y.numel()
            correct += (out.argmax(1) == y).sum()
        self.model.eval()
        test_correct = torch.zeros((), dtype=torch.long, device=self.device)
        with torch.no_grad():
            for i in range(0, test_frames.shape[0], batch_size):
                x, y = self._input(test_frames[i:i + batch_size]), test_labels[i:i + batch_size]
                with self._autocast():
                    out = self.model(x)
                test_correct += (out.argmax(1) == y).sum()
        return {"train_loss": float(loss_sum) / n, "train_acc": int(correct) / n,
                "test_acc": int(test_correct) / test_frames.shape[0]}


class _SpikingJelly:
    """SpikingJelly 2.0 DVSGestureNet trained the way its DVS Gesture example does."""

    def __init__(self, channels: int, device: torch.device):
        from spikingjelly.activation_based import functional, neuron, surrogate
        from spikingjelly.activation_based.model import parametric_lif_net

        self.functional = functional
        self.device = device
        self.model = parametric_lif_net.DVSGestureNet(
            channels=channels, spiking_neuron=neuron.LIFNode,
            surrogate_function=surrogate.ATan(), detach_reset=True).to(device)
        functional.set_step_mode(self.model, "m")
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)

    def epoch(self, frames, labels, test_frames, test_labels, batch_size: int, gen) -> dict:
        self.model.train()
        n = frames.shape[0]
        order = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            frame = frames[idx].to(self.device, non_blocking=True).float().transpose(0, 1)
            label = labels[idx].to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                out_fr = self.model(frame).mean(0)
                loss = F.mse_loss(out_fr, F.one_hot(label, N_CLASSES).float())
            self.opt.zero_grad()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            loss_sum += loss.item() * label.numel()
            correct += (out_fr.argmax(1) == label).float().sum().item()
            self.functional.reset_net(self.model)
        self.model.eval()
        test_correct = 0
        with torch.no_grad():
            for i in range(0, test_frames.shape[0], batch_size):
                frame = test_frames[i:i + batch_size].to(self.device).float().transpose(0, 1)
                label = test_labels[i:i + batch_size].to(self.device)
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                    out_fr = self.model(frame).mean(0)
                test_correct += (out_fr.argmax(1) == label).float().sum().item()
                self.functional.reset_net(self.model)
        return {"train_loss": loss_sum / n, "train_acc": correct / n,
                "test_acc": test_correct / test_frames.shape[0]}


def run_variant(variant: str, args, device, data) -> dict:
    frames, labels, test_frames, test_labels = data
    torch.manual_seed(0)
    if variant == "sj_amp":
        # SpikingJelly's loop reads batches from host memory.
        runner = _SpikingJelly(args.channels, device)
        frames, labels = frames.cpu(), labels.cpu()
        test_frames, test_labels = test_frames.cpu(), test_labels.cpu()
        if device.type == "cuda":
            frames, test_frames = frames.pin_memory(), test_frames.pin_memory()
    else:
        runner = _Ours(variant, args.channels, device)
    gen = torch.Generator().manual_seed(1)
    times, metrics = [], []
    for e in range(args.warmup + args.epochs):
        _sync(device)
        t0 = time.perf_counter()
        m = runner.epoch(frames, labels, test_frames, test_labels, args.batch_size, gen)
        _sync(device)
        if e >= args.warmup:
            times.append(time.perf_counter() - t0)
            metrics.append(m)
    del runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"sec_per_epoch": sum(times) / len(times), "epoch_times": times,
            "last_epoch": metrics[-1]}


def _environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import cupy
            env["cupy"] = cupy.__version__
        except Exception as exc:  # reported, not fatal: the cupy variants then fail visibly
            env["cupy"] = f"unavailable ({exc})"
    try:
        import spikingjelly
        env["spikingjelly"] = getattr(spikingjelly, "__version__", "installed")
    except ImportError:
        env["spikingjelly"] = "not installed"
    return env


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"Training epoch ({cfg['train']} train + {cfg['test']} test samples, T={cfg['T']}, "
             f"b={cfg['batch_size']}, {cfg['channels']} channels) on "
             f"{report['environment'].get('gpu', report['environment']['device'])}",
             "", "| variant | s/epoch | vs sj_amp |", "| --- | ---: | ---: |"]
    sj = report["results"].get("sj_amp", {}).get("sec_per_epoch")
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | |")
            continue
        ratio = f"{sj / r['sec_per_epoch']:.2f}x" if sj else ""
        lines.append(f"| {name} | {r['sec_per_epoch']:.3f} | {ratio} |")
    if report.get("verdict"):
        lines += ["", report["verdict"]]
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train", type=int, default=1176)
    p.add_argument("--test", type=int, default=288)
    p.add_argument("-T", type=int, default=16)
    p.add_argument("-b", "--batch-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first (compile, autotune)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS))
    p.add_argument("--json", help="write the results here")
    p.add_argument("--md", help="write a markdown table here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(ALL_VARIANTS)}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    frames, labels = make_frames(args.train, args.T, seed=0, device=device)
    test_frames, test_labels = make_frames(args.test, args.T, seed=1, device=device)
    data = (frames, labels, test_frames, test_labels)

    report = {"config": {k: getattr(args, k) for k in
                         ("train", "test", "T", "batch_size", "channels", "epochs", "warmup")},
              "data": "random uint8 frames [N, T, 2, 128, 128], 10% non-zero, counts 1..3, "
                      "generated on the device (seed 0 train, 1 test)",
              "environment": _environment(device), "results": {}}
    for v in variants:
        if v in CUDA_ONLY and device.type != "cuda":
            report["results"][v] = {"error": "needs CUDA"}
            continue
        try:
            r = run_variant(v, args, device, data)
        except Exception as exc:   # one failing variant must not hide the others' numbers
            r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        report["results"][v] = r
        shown = f"{r['sec_per_epoch']:.3f} s/epoch" if "sec_per_epoch" in r else r["error"]
        print(f"{v:>18}: {shown}", flush=True)

    timed = {k: r["sec_per_epoch"] for k, r in report["results"].items() if "sec_per_epoch" in r}
    ours = {k: t for k, t in timed.items() if k != "sj_amp"}
    if ours:
        best = min(ours, key=ours.get)
        report["best_ours"] = best
        verdict = f"best of ours: {best} {ours[best]:.3f} s/epoch"
        if "sj_amp" in timed:
            report["speedup_vs_sj_amp"] = timed["sj_amp"] / ours[best]
            verdict += f", {report['speedup_vs_sj_amp']:.2f}x SpikingJelly+AMP"
        report["verdict"] = verdict
        print(verdict)
    if args.json:
        _write_atomic(args.json, json.dumps(report, indent=2) + "\n")
    if args.md:
        _write_atomic(args.md, markdown(report))
    return 0 if timed else 1


if __name__ == "__main__":
    sys.exit(main())
