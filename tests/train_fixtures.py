"""Tiny frame stores for the dvsg_train tests: a learnable pattern per class plus noise."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dvsprep.constants import N_CLASSES, SENSOR_H, SENSOR_W
from dvsprep.frames.store import write_frame_store_from_arrays

BLOCK = 16


def synthetic_frames(n: int, T: int, seed: int, dtype=np.uint8, big: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """frames [n, T, 2, 128, 128] and labels [n]: class c draws a 16x16 patch of count-2 events
    in row band c, on polarity c % 2, moving right over time; 2% of pixels carry one noise event.
    ``big`` > 0 adds that count to one pixel (to force uint16 stores)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % N_CLASSES
    rng.shuffle(labels)
    frames = (rng.random((n, T, 2, SENSOR_H, SENSOR_W)) < 0.02).astype(dtype)
    for i, c in enumerate(labels):
        y0 = (int(c) * 11) % (SENSOR_H - BLOCK)
        for t in range(T):
            x0 = (t * 8 + int(c) * 5) % (SENSOR_W - BLOCK)
            patch = (rng.random((BLOCK, BLOCK)) < 0.6).astype(dtype) * 2
            frames[i, t, int(c) % 2, y0:y0 + BLOCK, x0:x0 + BLOCK] += patch
    if big:
        frames[0, 0, 0, 0, 0] = big
    return frames, labels


def split_arrays(n: int, T: int, seed: int, dtype=np.uint8, big: int = 0) -> dict:
    frames, labels = synthetic_frames(n, T, seed, dtype, big)
    return {
        "frames": frames,
        "label": labels,
        "recording": [f"user{seed:02d}_lab" for _ in range(n)],
        "row": np.arange(n),
        "t_start": np.arange(n, dtype=np.int64) * 1000,
        "t_end": np.arange(n, dtype=np.int64) * 1000 + 900,
        "n_events": frames.reshape(n, -1).sum(1, dtype=np.int64),
    }


def make_learnable_store(path: Path, T: int = 4, n_train: int = 66, n_test: int = 33, seed: int = 1,
               dtype=np.uint8, big: int = 0) -> str:
    """Write a frame store at ``path`` whose classes a network can learn (`synthetic_frames`);
    returns its fingerprint."""
    return write_frame_store_from_arrays(
        path, T=T, split_by="number",
        splits={"train": split_arrays(n_train, T, seed, dtype, big),
                "test": split_arrays(n_test, T, seed + 100, dtype, big)},
        events_fingerprint="synthetic-test-store")


def save_run_checkpoint(path: Path, model, config, fingerprint: str, epoch: int = 0) -> None:
    """Save ``model`` (untrained is fine) as the dvsg-train checkpoint a run with ``config`` writes
    after ``epoch``: its optimizer's and scheduler's fresh state, placeholder history records, a new run id."""
    import uuid

    import torch

    from dvsg_train.checkpoint import TrainingState, make_payload, save_checkpoint
    from dvsg_train.engine import make_optimizer, make_scheduler

    optimizer = make_optimizer(model, config)
    state = TrainingState(model, optimizer, make_scheduler(optimizer, config), None, torch.Generator().manual_seed(0))
    record = {"epoch": 0, "train_loss": 0.5, "train_acc": 0.25, "test_loss": 0.5, "test_acc": 0.25}
    save_checkpoint(path, make_payload(state, epoch=epoch, config=config, data_fingerprint=fingerprint,
                                       history=[{**record, "epoch": e} for e in range(epoch + 1)],
                                       run_id=uuid.uuid4().hex, run_dir=Path(path).parent))


def spy(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that records each call's (args, kwargs) in the list
    returned and calls the real function."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kw):
        calls.append((args, kw))
        return real(*args, **kw)
    monkeypatch.setattr(module, name, wrapper)
    return calls


# ----------------------------------------------------------------------------- the run-step tests' store

STEP_T, STEP_TRAIN, STEP_TEST = 3, 23, 12


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A learnable T=3 store of 23 train and 12 test samples, for tests of the run's steps (import
    ``store`` and ``fp`` into the test module to use them)."""
    path = tmp_path_factory.mktemp("steps") / "s.zarr"
    make_learnable_store(path, T=STEP_T, n_train=STEP_TRAIN, n_test=STEP_TEST)
    return path


@pytest.fixture(scope="module")
def fp(store) -> str:
    from dvsprep.frames.store import open_frame_store

    return open_frame_store(store).fingerprint


def step_config(store, tmp_path, **kw):
    """A tiny run on ``store``: 4 channels, batches of 2, 3 epochs on the CPU, runs under tmp_path/runs."""
    from dvsg_train.config import TrainConfig

    return TrainConfig(**{"data": str(store), "out_dir": str(tmp_path / "runs"), "T": STEP_T, "batch_size": 2,
                          "epochs": 3, "channels": 4, "device": "cpu", "workers": 0, **kw})
