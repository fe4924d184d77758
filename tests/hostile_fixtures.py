"""Tiny stores and the tools to tamper with them, for the hostile-input and fuzz tests.

"Re-signed" means: a file is changed and the manifest is made again so every hash matches;
only the readers' own content checks can then catch the change."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numcodecs
import numpy as np

from dvsprep.events.store import EventsWriter, compute_manifest
from dvsprep.frames.store import write_frame_store_from_arrays
from dvsprep.integrity.manifest import canonical_json, dir_manifest, fingerprint, write_dir_manifest

T = 2


def tiny_store(path: Path, n_train: int = 6, n_test: int = 3, seed: int = 0) -> str:
    """A frame store of T=2 with a few sparse samples per split; returns its fingerprint."""
    rng = np.random.default_rng(seed)
    splits = {}
    for k, (name, n) in enumerate((("train", n_train), ("test", n_test))):
        frames = np.zeros((n, T, 2, 128, 128), np.uint8)
        for i in range(n):
            frames[i].reshape(-1)[rng.integers(0, frames[i].size, 50)] = rng.integers(1, 4, 50)
        splits[name] = {
            "frames": frames, "label": (np.arange(n) * 3 + k) % 11,
            "recording": [f"user{i // 2 + 1:02d}_lab" for i in range(n)], "row": np.arange(n) % 2,
            "t_start": np.arange(n) * 1000, "t_end": np.arange(n) * 1000 + 500,
            "n_events": frames.reshape(n, -1).sum(1),
        }
    return write_frame_store_from_arrays(path, T=T, split_by="number", splits=splits, events_fingerprint="ab" * 32)


def tiny_events(path: Path, sizes: tuple[int, int] = (5, 3), seed: int = 0) -> str:
    """A small events.h5 (a few hundred events per sample); returns its fingerprint."""
    rng = np.random.default_rng(seed)
    w = EventsWriter(path)
    for split, n in zip(("train", "test"), sizes):
        lens = rng.integers(1, 300, n)
        m = int(lens.sum())
        ev = {"t": np.sort(rng.integers(0, 1_000_000, m)).astype(np.int64),
              "x": rng.integers(0, 128, m).astype(np.uint8), "y": rng.integers(0, 128, m).astype(np.uint8),
              "p": rng.integers(0, 2, m).astype(np.uint8)}
        meta = {"label": np.arange(n) % 11, "row": np.arange(n) % 3, "t_start": np.zeros(n), "t_end": np.ones(n),
                "recording": [f"user{i // 3 + 1:02d}_lab" for i in range(n)]}
        w.append(split, ev, lens, meta)
    return w.finish({"recordings": {}, "n_invalid_dropped": 0})


def resign(store: Path) -> None:
    """Make the manifest of a (tampered) store directory match its files again."""
    write_dir_manifest(store, dir_manifest(store, kind="frames"))


def resign_events(path: Path) -> None:
    """Make the embedded manifest of a (tampered) events.h5 match its datasets again."""
    with h5py.File(path, "r+") as f:
        manifest = compute_manifest(f, str(path))
        f.attrs["manifest"] = canonical_json(manifest).decode("ascii")
        f.attrs["fingerprint"] = fingerprint(manifest)


def zstd(data: bytes) -> bytes:
    return numcodecs.Zstd(level=3).encode(data)


def vlen(items: list[bytes]) -> bytes:
    """zarr's vlen-utf8 chunk bytes (before compression) of raw byte strings."""
    out = len(items).to_bytes(4, "little")
    for b in items:
        out += len(b).to_bytes(4, "little") + b
    return out


def edit_json(store: Path, name: str, change) -> None:
    doc = json.loads((store / name).read_text())
    change(doc)
    (store / name).write_text(json.dumps(doc))


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), to show an input is untouched."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}
