"""Checkpoints: atomic writes, safe loads (``weights_only=True``), and resume checks.

A checkpoint is a plain dict that ``torch.load(..., weights_only=True)`` accepts: tensors, numbers,
strings, lists and dicts only. RNG states are uint8 tensors, the config a plain dict.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from dvsprep.atomic import atomic_write

from . import __version__
from .config import MODEL_FIELDS, TrainConfig
from .errors import CheckpointError, ConfigError, ConfigMismatchError, DataMismatchError

FORMAT = "dvsg-train-checkpoint/1"
REQUIRED_KEYS = ("format", "epoch", "model", "optimizer", "scheduler", "scaler", "rng", "config",
                 "data_fingerprint", "history")
LATEST = "checkpoint_latest.pt"
MAX = "checkpoint_max.pt"


def rng_state(data_generator: torch.Generator, cuda_device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG a run draws from: torch CPU (dropout on CPU, init), CUDA (dropout on GPU), data order.

    The data-order generator is the same on every DDP rank, so rank 0's state is the global
    one. cuda_device: save only that GPU's state (a DDP rank touches no other GPU); None: all."""
    if not torch.cuda.is_available():
        cuda: list = []
    elif cuda_device is not None:
        cuda = [torch.cuda.get_rng_state(cuda_device)]
    else:
        cuda = torch.cuda.get_rng_state_all()
    return {"torch": torch.get_rng_state(), "cuda": cuda, "data": data_generator.get_state()}


def set_rng_state(state: dict[str, Any], data_generator: torch.Generator, *, data_only: bool = False) -> None:
    """Restore the RNGs of ``rng_state``; data_only: only the data order (DDP ranks reseed
    their dropout RNG per epoch, see `dvsg_train.distributed.rank_seed`)."""
    data_generator.set_state(state["data"])
    if data_only:
        return
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "version": __version__, **payload}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check a checkpoint (on CPU). Raises CheckpointError with one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message here is a page about weights_only; one line says what matters.
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch file, or it holds pickled "
                              f"objects that weights_only loading refuses)") from exc
    except Exception as exc:  # zip and EOF errors mean the same thing here
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a dvsg-train checkpoint (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: checkpoint config or model is not a dict")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], path: str | os.PathLike) -> TrainConfig:
    try:
        return TrainConfig.from_dict(ckpt["config"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: checkpoint holds an invalid config ({exc})") from exc


def check_resume(ckpt: dict[str, Any], path: str | os.PathLike, config: TrainConfig) -> None:
    """Raise ConfigMismatchError naming every setting that differs from the checkpoint's."""
    saved = checkpoint_config(ckpt, path).resume_key()
    now = config.resume_key()
    diffs = [f"{k} {saved[k]!r} vs {now[k]!r}" for k in saved if saved[k] != now[k]]
    if diffs:
        raise ConfigMismatchError(f"{path}: checkpoint was trained with another configuration "
                                  f"(checkpoint vs this run: {'; '.join(diffs)})")


def check_data(ckpt: dict[str, Any], path: str | os.PathLike, fingerprint: str, data: str) -> None:
    if ckpt["data_fingerprint"] != fingerprint:
        raise DataMismatchError(f"{path}: checkpoint was trained on a store with fingerprint "
                                f"{ckpt['data_fingerprint'][:16]}, but {data} has {fingerprint[:16]}")


def load_model_state(model: torch.nn.Module, ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        cfg = {k: ckpt["config"].get(k) for k in MODEL_FIELDS}
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: model weights do not fit the network {cfg} ({first})") from exc
