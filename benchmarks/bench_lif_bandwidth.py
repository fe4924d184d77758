"""Achieved memory bandwidth of the cupy neuron kernels, beside the GPU's.

Bytes each kernel must move per neuron and step (s = storage bytes of the dtype):
  forward            read x (s), write spikes (s), write h (4)            = 2s + 4
  forward, no_grad   read x (s), write spikes (s)                         = 2s
  LIF/PLIF backward  read dL/ds (s), read h (4), write dL/dx (s)          = 2s + 4
GB/s = those bytes / kernel time (CUDA events, median of --reps after a warm-up). Beside it:
a device-to-device copy of the same size through torch (what the memory system delivers to a
streaming kernel here) and the GPU's nominal bandwidth (4.8 TB/s for an H200, or --peak-gbs).
Target: >= 70% of the nominal bandwidth.

Usage: python benchmarks/bench_lif_bandwidth.py [--n 16777216] [-T 16] [--reps 20]
       [--json F] [--time-limit S] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

NOMINAL_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}
DTYPES = ("half", "bfloat16", "float")
STORE_BYTES = {"half": 2, "bfloat16": 2, "float": 4}


def bytes_per_element(kernel: str, dtype: str) -> int:
    """Bytes a kernel must read and write per neuron and time step (see the module docstring)."""
    s = STORE_BYTES[dtype]
    return {"forward": 2 * s + 4, "forward_nograd": 2 * s, "lif_backward": 2 * s + 4,
            "plif_backward": 2 * s + 4}[kernel]


def plan(args) -> list[tuple[str, str, int]]:
    """(dtype, kernel, bytes moved per call) for every measurement."""
    kernels = ("forward", "forward_nograd", "lif_backward", "plif_backward")
    return [(d, k, bytes_per_element(k, d) * args.T * args.n) for d in DTYPES for k in kernels]


def _time(fn, reps: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def measure(args) -> dict:
    import torch

    from dvsg_train import cupy_lif

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = args.peak_gbs or next((v for k, v in NOMINAL_GBS.items() if k in name), None)
    report = {"device": name, "nominal_gbs": peak, "T": args.T, "n": args.n, "results": []}
    start = time.perf_counter()
    src = torch.empty(args.T * args.n * 4 // 2, dtype=torch.float16, device=dev)
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), args.reps)
    report["d2d_copy_gbs"] = 2 * src.numel() * 2 / copy_s / 1e9
    del src, dst
    for dtype, kernel, nbytes in plan(args):
        if time.perf_counter() - start > args.time_limit:
            report["stopped"] = f"time limit {args.time_limit} s reached"
            break
        tdtype = cupy_lif.DTYPES[dtype][0]
        g = torch.Generator(device=dev).manual_seed(0)
        x = (torch.randn(args.T, args.n, generator=g, device=dev) * 0.8 + 0.6).to(tdtype)
        decay = torch.tensor(0.5, device=dev)
        w = torch.tensor(0.0, device=dev, requires_grad=True)

        def fwd(grad=True):
            xi = x.requires_grad_(grad)
            return cupy_lif.lif_multistep_cupy(xi, w.sigmoid() if kernel == "plif_backward" else decay,
                                               1.0, 0.0, 2.0, True)

        if kernel == "forward":
            seconds = _time(lambda: fwd(True), args.reps)
        elif kernel == "forward_nograd":
            with torch.no_grad():
                seconds = _time(lambda: fwd(False), args.reps)
        else:
            s = fwd(True)
            gs = torch.ones_like(s)
            seconds = _time(lambda: torch.autograd.grad(s, [x], gs, retain_graph=True), args.reps)
            del s, gs
        gbs = nbytes / seconds / 1e9
        row = {"dtype": dtype, "kernel": kernel, "ms": seconds * 1e3, "gbs": gbs,
               "of_nominal": gbs / peak if peak else None,
               "of_d2d_copy": gbs / report["d2d_copy_gbs"]}
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        x.requires_grad_(False)
        del x
    return report


def markdown(report: dict) -> str:
    lines = [f"kernels on {report['device']}: T={report['T']}, n={report['n']}; "
             f"device copy {report['d2d_copy_gbs']:.0f} GB/s, nominal {report['nominal_gbs']} GB/s",
             "", "| dtype | kernel | ms | GB/s | of nominal | of d2d copy |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        nom = f"{r['of_nominal']:.0%}" if r["of_nominal"] else "-"
        lines.append(f"| {r['dtype']} | {r['kernel']} | {r['ms']:.3f} | {r['gbs']:.0f} | {nom} | "
                     f"{r['of_d2d_copy']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2 ** 24, help="neurons (default 2**24)")
    ap.add_argument("-T", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--peak-gbs", type=float, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--time-limit", type=float, default=25.0,
                    help="stop starting new measurements after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; needs no GPU")
    args = ap.parse_args(argv)
    if args.dry_run:
        for dtype, kernel, nbytes in plan(args):
            print(f"   {dtype:9s} {kernel:15s} {nbytes / 1e9:.2f} GB per call")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    report = measure(args)
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
