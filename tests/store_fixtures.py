"""Small frame stores of random sparse frames at T=64 (8 samples per shard, so each split spans
several shards), for the tests of sharing, packing, verifying and reading stores (fast to write)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dvsprep.frames.store import samples_per_shard, write_frame_store_from_arrays

T = 64  # 8 samples per shard at uint8, so a few samples span several shards
SHARD = samples_per_shard(T, np.uint8)


def split_arrays(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, T, 2, 128, 128), np.uint8)
    idx = rng.integers(0, frames[0].size, (n, 300))
    for i in range(n):
        frames[i].reshape(-1)[idx[i]] = rng.integers(1, 6, 300)
    return {
        "frames": frames,
        "label": (np.arange(n) * 7 + seed) % 11,
        "recording": [f"user{i // 4 + 1:02d}_lab" for i in range(n)],
        "row": np.arange(n) % 4,
        "t_start": np.arange(n) * 1000,
        "t_end": np.arange(n) * 1000 + 500,
        "n_events": frames.reshape(n, -1).sum(1),
    }


def make_multishard_store(path: Path, n_train: int = 20, n_test: int = 5) -> tuple[str, dict]:
    """Write a store of random sparse frames at `path` (each split over several shards);
    returns (fingerprint, splits written)."""
    splits = {"train": split_arrays(n_train, 1), "test": split_arrays(n_test, 2)}
    fp = write_frame_store_from_arrays(path, T=T, split_by="number", splits=splits, events_fingerprint="cd" * 32)
    return fp, splits


def spec_number(ev: dict, T: int) -> np.ndarray:
    """split_by "number" by its definition (the tests' oracle, not the code's): with di = N // T,
    event j goes to frame min(j // di, T - 1) (every event to the last frame when N < T), channel
    p != 0. [T, 2, 128, 128] int64 counts."""
    H = W = 128
    n = ev["x"].size
    di = n // T
    frame = np.minimum(np.arange(n) // di, T - 1) if di else np.full(n, T - 1)
    key = ((frame * 2 + (ev["p"] != 0)) * H + ev["y"].astype(np.int64)) * W + ev["x"].astype(np.int64)
    return np.bincount(key, minlength=T * 2 * H * W).reshape(T, 2, H, W)
