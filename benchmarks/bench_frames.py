"""Frames benchmark: dvsprep framing vs SpikingJelly, frame-store codecs, and the store loader.

    python benchmarks/bench_frames.py [--samples 96] [--events 300000] [-j 2] [--only framing,codecs,loader]

framing  SpikingJelly's frame step as its DVS128Gesture builder runs it (per sample: load the
         events .npz, `integrate_events_by_fixed_frames_number`, save the frames .npz, on a thread
         pool) against `dvsprep frames` (events.h5 -> zarr store, -j processes); plus the bare
         in-memory integration of one sample, both split methods.
codecs   size and decode speed of candidate codecs for the frames array.
loader   samples/s reading T=16 samples from the store in random order (1 process and -j
         processes), and whole-split load time.

Events are synthetic but shaped like DVS128 Gesture samples: ~6 s, an arm sweeping around a
shoulder plus background noise and a few hot pixels.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import dvsprep
from dvsprep.events import EventsWriter
from dvsprep.frames import integrate, write_frame_store_from_arrays

H = W = 128


def gesture_events(rng: np.random.Generator, n: int, duration_us: int = 6_000_000) -> dict[str, np.ndarray]:
    """One synthetic sample: t sorted int64, x/y/p uint8 (arm 88%, noise 10%, hot pixels 2%)."""
    t = np.sort(rng.integers(0, duration_us, n)).astype(np.int64)
    phase = rng.uniform(0, 2 * np.pi)
    kind = rng.uniform(size=n)
    ang = phase + 2 * np.pi * 2 * t / duration_us
    along = rng.uniform(0, 1, n)
    sx, sy = 64.0, 92.0
    hx, hy = sx + 38 * np.cos(ang), sy - 10 - 30 * np.abs(np.sin(ang)) - 20
    x = sx + along * (hx - sx) + rng.normal(0, 2.5, n)
    y = sy + along * (hy - sy) + rng.normal(0, 2.5, n)
    noise = kind > 0.88
    x[noise] = rng.uniform(0, W, noise.sum())
    y[noise] = rng.uniform(0, H, noise.sum())
    hot = kind > 0.98
    hot_px = rng.integers(0, W, (5, 2))
    pick = rng.integers(0, 5, hot.sum())
    x[hot], y[hot] = hot_px[pick, 0], hot_px[pick, 1]
    p = (rng.uniform(size=n) < 0.5 + 0.3 * np.sign(np.sin(ang))).astype(np.uint8)
    return {"t": t, "x": np.clip(x, 0, W - 1).astype(np.uint8), "y": np.clip(y, 0, H - 1).astype(np.uint8), "p": p}


def make_release(root: Path, n_samples: int, n_events: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """events.h5 (all samples in the train split) plus SpikingJelly-style events .npz files."""
    rng = np.random.default_rng(seed)
    samples = [gesture_events(rng, int(rng.integers(n_events // 2, n_events * 3 // 2))) for _ in range(n_samples)]
    w = EventsWriter(root / "events.h5")
    for i, ev in enumerate(samples):
        w.append("train", ev, np.array([ev["t"].size]),
                 {"label": [i % 11], "row": [i], "t_start": [0], "t_end": [6_000_000], "recording": [f"user01_lab_{i:04d}"]})
    w.finish({"recordings": {}, "n_invalid_dropped": 0})
    from spikingjelly.datasets import utils as sju

    np_dir = root / "events_np"
    np_dir.mkdir()
    for i, ev in enumerate(samples):
        # As SpikingJelly's converter leaves them: int64 arrays (load_aedat_v3 builds them from
        # Python ints) saved with its np_savez (savez_compressed unless configured otherwise).
        sju.np_savez(np_dir / f"s{i:04d}.npz", **{k: np.asarray(v, dtype=np.int64) for k, v in ev.items()})
    return samples


def bench_framing(root: Path, samples: list, jobs: int) -> None:
    from spikingjelly import configure
    from spikingjelly.datasets import utils as sju

    T = 16
    print(f"\n== framing: {len(samples)} samples, {sum(s['t'].size for s in samples) / len(samples):.0f} events/sample, T={T}")
    ev = samples[0]
    for split_by in ("number", "time"):
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            ref = sju.integrate_events_by_fixed_frames_number(ev, split_by, T, H, W)
        sj = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            ours = integrate(ev["t"], ev["x"], ev["y"], ev["p"], T, split_by)
        us = (time.perf_counter() - t0) / reps
        assert np.array_equal(ref, ours)
        print(f"in-memory integration of one sample, {split_by:6s}: SpikingJelly {sj * 1e3:7.2f} ms   "
              f"dvsprep {us * 1e3:6.2f} ms   x{sj / us:5.1f}")

    loader = sju.load_npz_events if hasattr(sju, "load_npz_events") else (lambda f: dict(np.load(f)))
    files = sorted((root / "events_np").glob("*.npz"))
    # `dvsprep frames` opens events.h5 verified: its writer (EventsWriter, as convert) recorded the
    # verified-marker, so the first open on this machine is a stat; a copy of it elsewhere (or
    # verify=True) is verified in full. Time both once, apart from the frame steps; the ratio
    # "counting the first open" is that of `dvsprep frames` right after `dvsprep convert`.
    events = root / "events.h5"
    t0 = time.perf_counter()
    with dvsprep.open_events(events):
        pass
    verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with dvsprep.open_events(events, verify=True):
        pass
    full_s = time.perf_counter() - t0
    print(f"events.h5 ({sum(s['t'].size for s in samples) / 1e6:.0f} M events): first open on this machine "
          f"{verify_s * 1e3:.1f} ms (its writer recorded the marker); a full verification {full_s:.2f} s")
    read_s = pure_read(events)
    print(f"pure read of events.h5 (every event of every sample, t/x/y/p, one process, as dvsprep reads it: "
          f"scale-offset chunks decoded by numpy): {read_s:.2f} s")
    # Both sides run with their libraries imported, as SpikingJelly's already is here (torch
    # included); what each import costs a fresh command is printed apart.
    ours_import, sj_import = import_seconds("import dvsprep.frames.build, zarr"), import_seconds(
        "import spikingjelly.datasets.utils")
    print(f"imports in a fresh interpreter: dvsprep frames + zarr {ours_import:.2f} s, "
          f"spikingjelly.datasets {sj_import:.2f} s (not in the times below)")
    for split_by in ("number", "time"):
        out = root / f"sj_frames_{split_by}"
        out.mkdir()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=configure.max_threads_number_for_datasets_preprocess) as ex:
            list(ex.map(lambda f: sju.integrate_events_file_to_frames_file_by_fixed_frames_number(
                loader, str(f), str(out), split_by, T, H, W), files))
        sj = time.perf_counter() - t0
        us = build_seconds(root / "events.h5", root / f"frames_{split_by}.zarr", T, split_by, jobs)
        print(f"dataset frame step ({len(files)} samples), {split_by:6s}: SpikingJelly {sj:6.2f} s "
              f"({configure.max_threads_number_for_datasets_preprocess} threads, compressed={configure.save_datasets_compressed})   "
              f"dvsprep frames -j {jobs} {us:6.2f} s   x{sj / us:5.1f}   "
              f"(x{sj / (us + verify_s):4.1f} counting the first open of events.h5, "
              f"x{sj / (us + full_s):4.1f} counting a full verification of it)   "
              f"{(us + verify_s) / read_s:4.2f}x the pure read of events.h5 (first open included)")


def import_seconds(statement: str) -> float:
    """Seconds a fresh interpreter spends on `statement` (best of 3)."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    return min(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout) for _ in range(3))


def build_seconds(events: Path, out: Path, T: int, split_by: str, jobs: int) -> float:
    """Seconds of `dvsprep.build_frame_store` in a process of its own with its libraries imported:
    `dvsprep frames` never loads torch, and forking workers from this process (torch and
    SpikingJelly loaded) costs more than the command's own forks do."""
    code = ("import sys, time, dvsprep\n"
            "from dvsprep.frames.store import zarr_module\n"
            "zarr_module()\n"
            "t = time.perf_counter()\n"
            f"dvsprep.build_frame_store({str(events)!r}, {str(out)!r}, T={T}, split_by={split_by!r}, jobs={jobs})\n"
            "print(time.perf_counter() - t)\n")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def pure_read(events: Path) -> float:
    """Seconds to read every event of events.h5 (best of 3): the floor of any frame step."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        with dvsprep.open_events(events) as ev:
            for name in ("train", "test"):
                sp = ev.split(name)
                if len(sp):
                    sp.events(0, len(sp))
        best = min(best, time.perf_counter() - t0)
    return best


CODECS = [
    {"name": "zstd", "level": 1},
    {"name": "zstd", "level": 3},
    {"name": "zstd", "level": 9},
    {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"},
    {"name": "blosc", "cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"},
    {"name": "blosc", "cname": "zstd", "clevel": 3, "shuffle": "noshuffle"},
    {"name": "gzip", "level": 6},
]


def _frames_of(samples: list, T: int = 16) -> np.ndarray:
    fr = np.stack([integrate(s["t"], s["x"], s["y"], s["p"], T, "number") for s in samples])
    assert fr.max() <= 255
    return fr.astype(np.uint8)


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def bench_codecs(root: Path, samples: list) -> None:
    frames = _frames_of(samples)
    n = frames.shape[0]
    raw = frames.nbytes
    print(f"\n== codecs: {n} samples of T=16 uint8 ({raw / n / 1024:.0f} KiB raw each)")
    print(f"{'codec':44s} {'ratio':>6s} {'KiB/sample':>10s} {'write s':>8s} {'read samples/s':>15s}")
    meta = {"label": np.arange(n) % 11, "recording": [f"r{i}" for i in range(n)], "row": np.arange(n),
            "t_start": np.zeros(n), "t_end": np.zeros(n), "n_events": np.zeros(n)}
    rng = np.random.default_rng(1)
    order = rng.permutation(n)
    for spec in CODECS:
        path = root / f"codec_{len(list(root.glob('codec_*')))}.zarr"
        t0 = time.perf_counter()
        write_frame_store_from_arrays(path, T=16, splits={"train": {"frames": frames, **meta}}, codec=spec)
        wt = time.perf_counter() - t0
        size = _dir_bytes(path / "train" / "frames")
        sp = dvsprep.open_frame_store(path).split("train")
        for i in order[:8]:
            sp[i]  # warm the page cache and shard indexes
        reps = max(1, 2000 // n)
        t0 = time.perf_counter()
        for _ in range(reps):
            for i in order:
                sp[i]
        rate = reps * n / (time.perf_counter() - t0)
        label = ",".join(f"{k}={v}" for k, v in spec.items())
        print(f"{label:44s} {raw / size:6.1f} {size / n / 1024:10.1f} {wt:8.2f} {rate:15.0f}")


_SPLIT = None


def _open_split(path: str) -> None:
    global _SPLIT
    _SPLIT = dvsprep.open_frame_store(path).split("train")


def _read_random(idx: list[int]) -> float:
    t0 = time.perf_counter()
    for i in idx:
        _SPLIT[i]
    return time.perf_counter() - t0


def bench_loader(store: Path, jobs: int) -> None:
    sp = dvsprep.open_frame_store(store).split("train")
    n = len(sp)
    rng = np.random.default_rng(2)
    print(f"\n== loader: {store.name}, {n} samples, dtype {sp.frames.dtype}")
    idx = [int(i) for i in np.concatenate([rng.permutation(n) for _ in range(max(1, 6000 // n))])]
    _open_split(str(store))
    _read_random(idx[:32])
    dt = _read_random(idx)
    print(f"random-order sample reads, 1 process: {len(idx) / dt:8.0f} samples/s ({dt / len(idx) * 1e3:.3f} ms each)")
    parts = [idx[k::jobs] for k in range(jobs)]
    with mp.get_context("spawn").Pool(jobs, initializer=_open_split, initargs=(str(store),)) as pool:
        pool.map(_read_random, [p[:32] for p in parts])  # opening and warm-up outside the timing
        t0 = time.perf_counter()
        pool.map(_read_random, parts)
        dt = time.perf_counter() - t0
    print(f"random-order sample reads, {jobs} processes: {len(idx) / dt:8.0f} samples/s")
    t0 = time.perf_counter()
    allf = sp.load_all()
    dt = time.perf_counter() - t0
    print(f"whole split load_all: {dt:6.2f} s for {n} samples ({allf.nbytes / 2**20:.0f} MiB, {n / dt:.0f} samples/s)")
    t0 = time.perf_counter()
    via_zarr = np.asarray(sp.frames[:])
    dt = time.perf_counter() - t0
    assert np.array_equal(allf, via_zarr)
    print(f"whole split via zarr frames[:]: {dt:6.2f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--events", type=int, default=300_000, help="mean events per sample")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--only", default="framing,codecs,loader")
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_frames_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(f"python {sys.version.split()[0]}, numpy {np.__version__}, cpus {os.cpu_count()}")
        samples = make_release(root, args.samples, args.events)
        if "framing" in parts:
            bench_framing(root, samples, args.jobs)
        if "codecs" in parts:
            bench_codecs(root, samples[:64])
        if "loader" in parts:
            store = root / "frames_number.zarr"
            if not store.exists():
                dvsprep.build_frame_store(root / "events.h5", store, T=16, split_by="number", jobs=args.jobs)
            bench_loader(store, args.jobs)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
