"""Verification speed against a bare hashlib sha256 loop over the same bytes.

    python benchmarks/bench_verify.py [--samples 400] [--events 300000] [--jobs 1,2] [--keep DIR]

Writes an events.h5 of gesture-like samples (as `dvsprep convert` writes it), the T=16 frame
store of it (`dvsprep frames`) and that store packed into a zip (`dvsprep pack`), then times a
full verification of each (`dvsprep verify`, i.e. `dvsprep.verify_path`, markers ignored) with
every `-j` given (frame stores twice: with `--decode`, as the first verification of content new
to the machine, which decodes every sample; and as after its writer, which only hashes), against a bare loop that reads the same files with 8 MiB preads and sha256s
them on one core, and against sha256 alone over the same bytes already in memory. Prints MB/s
(of the bytes on disk), wall and CPU seconds, and the ratios "verify / bare loop". The target
(DESIGN.md): verification at >= 80% of sha256's speed. Each time is the best of --repeat runs,
from the page cache; the machine's load is printed alongside.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dvsprep  # noqa: E402
from dvsprep.events import EventsWriter  # noqa: E402
from bench_frames import gesture_events  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_events(path: Path, n_samples: int, n_events: int, seed: int = 0) -> None:
    """Samples of both splits (4 in 5 train), appended a recording (12 samples) at a time as
    convert appends them."""
    rng = np.random.default_rng(seed)
    w = EventsWriter(path)
    try:
        for first in range(0, n_samples, 12):
            n = min(12, n_samples - first)
            evs = [gesture_events(rng, int(rng.integers(n_events // 2, n_events * 3 // 2))) for _ in range(n)]
            cat = {k: np.concatenate([e[k] for e in evs]) for k in ("t", "x", "y", "p")}
            rec = f"user{first // 12 + 1:02d}_lab"
            w.append("test" if (first // 12) % 5 == 4 else "train", cat, np.array([e["t"].size for e in evs]),
                     {"label": np.arange(n) % 11, "row": np.arange(n), "t_start": np.zeros(n, np.int64),
                      "t_end": np.full(n, 6_000_000, np.int64), "recording": [rec] * n})
        w.finish({"recordings": {}, "n_invalid_dropped": 0})
    except BaseException:
        w.abort()
        raise


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def bare_loop(files: list[Path]) -> tuple[float, float]:
    """(wall, cpu) seconds of reading every file with 8 MiB preads and sha256ing it, one core."""
    w, c = time.perf_counter(), _cpu()
    for f in files:
        h = hashlib.sha256()
        fd = os.open(f, os.O_RDONLY)
        try:
            off = 0
            while chunk := os.pread(fd, 8 << 20, off):
                h.update(chunk)
                off += len(chunk)
        finally:
            os.close(fd)
        h.hexdigest()
    return time.perf_counter() - w, _cpu() - c


def sha256_only(files: list[Path]) -> float:
    """Seconds sha256 takes over the files' bytes held in memory (one core)."""
    blobs = [f.read_bytes() for f in files]
    t = time.perf_counter()
    for b in blobs:
        hashlib.sha256(b).hexdigest()
    return time.perf_counter() - t


def verify(path: Path, jobs: int, decode: bool = False) -> tuple[float, float]:
    from dvsprep.verify import verify_path

    w, c = time.perf_counter(), _cpu()
    report = verify_path(path, jobs=jobs, decode=decode)
    wall, cpu = time.perf_counter() - w, _cpu() - c
    assert report.ok, report.lines()
    return wall, cpu


def best(fn, repeat: int) -> tuple[float, ...]:
    return min((fn() for _ in range(repeat)), key=lambda r: r[0] if isinstance(r, tuple) else r)


def bench(label: str, path: Path, jobs: list[int], repeat: int) -> dict:
    files = _files(path)
    size = sum(f.stat().st_size for f in files)
    mb = size / 1e6
    bare_w, bare_c = best(lambda: bare_loop(files), repeat)
    pure = best(lambda: sha256_only(files), repeat)
    print(f"\n== {label}: {path.name}, {len(files)} file(s), {mb:.0f} MB")
    print(f"sha256 over the bytes in memory:      {mb / pure:7.0f} MB/s  ({pure:.3f} s)")
    print(f"bare loop, 8 MiB preads + sha256:     {mb / bare_w:7.0f} MB/s  ({bare_w:.3f} s wall, {bare_c:.3f} s cpu)")
    out = {"bytes": size, "sha256_s": pure, "bare_s": bare_w}
    # a frame store's samples are decoded the first time its content is verified on a machine
    # (--decode: always); after that (or after its writer), a full verification only hashes
    modes = [("", False)] if path.suffix == ".h5" else [(" --decode", True), ("", False)]
    for flag, decode in modes:
        for j in jobs:
            w, c = best(lambda: verify(path, j, decode), repeat)
            print(f"dvsprep verify{flag} -j {j}:{' ' * (18 - len(flag))}{mb / w:7.0f} MB/s  ({w:.3f} s wall, "
                  f"{c:.3f} s cpu)   {bare_w / w:4.2f}x the bare loop, {pure / w:4.2f}x sha256 alone "
                  f"(cpu: {bare_c / c:4.2f}x the bare loop's)")
            out[f"verify{flag.strip(' -')}_j{j}_s"] = w
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--events", type=int, default=300_000, help="mean events per sample")
    ap.add_argument("--jobs", default=f"1,{os.cpu_count()}", help="comma-separated -j values to time")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    args = ap.parse_args(argv)
    jobs = sorted({int(j) for j in args.jobs.split(",")})
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_verify_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(f"python {sys.version.split()[0]}, numpy {np.__version__}, cpus {os.cpu_count()}, "
              f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        os.environ["DVSPREP_CACHE"] = str(root / "cache")   # the markers and records of what it writes
        events, store, zipped = root / "events.h5", root / "frames_T16_number.zarr", root / "frames_T16_number.zip"
        if not events.exists():
            make_events(events, args.samples, args.events)
        if not store.exists():
            dvsprep.build_frame_store(events, store, T=16, split_by="number", jobs=max(jobs))
        if not zipped.exists():
            dvsprep.pack_store(store, zipped)
        for label, path in (("events.h5", events), ("frame store (directory)", store), ("frame store (zip)", zipped)):
            bench(label, path, jobs, args.repeat)
        print(f"\nload after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
