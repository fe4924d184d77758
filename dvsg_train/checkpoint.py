"""Checkpoints: atomic writes, safe loads (``weights_only=True``), a digest, field checks, and
resume checks.

File format (``dvsg-train-checkpoint/2``). The file is a torch file that ``torch.load(...,
weights_only=True)`` reads as a small container dict::

    {"format": "dvsg-train-checkpoint/2", "sha256": <64 hex>, "payload": uint8 tensor [n]}

``payload`` holds the bytes of ``torch.save(checkpoint dict)`` and ``sha256`` is their digest. The
digest covers exactly the bytes that are later deserialized, so it does not depend on how torch
lays out its zip archive (alignment padding, record order, CRCs it may or may not check): one
changed byte of the checkpoint changes either the container (unreadable, wrong format or digest
string) or the payload bytes (digest mismatch), and both are refused before the payload is
unpickled. Only then is the payload loaded (again ``weights_only=True``: tensors, numbers,
strings, lists and dicts) and every field checked for type and range before anything uses it
(`validate_checkpoint`). The digest detects accidents and tampering without a key; it is not a
signature (whoever can write the file can write a new digest), and the field checks keep even a
re-signed file from reaching the code as anything but well-formed values.

The checkpoint dict: format, version, epoch, model (state dict), optimizer, scheduler, scaler,
rng (uint8 tensors), config (TrainConfig as a dict), data_fingerprint, history (one dict of
numbers per finished epoch) and run (id, name: the run folder relative to --out-dir, dir: the
absolute folder when it was saved).

This module owns the format both ways: `make_payload` builds the dict from a run's live state,
`save_checkpoint` wraps it, `load_checkpoint` / `validate_checkpoint` check it on the way back,
and `restore_state` puts it into a run again.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dvsprep.atomic import publishing

from . import __version__
from .config import CARRIED_FIELDS, MODEL_FIELDS, RESUME_FIELDS, TrainConfig
from .errors import CheckpointError, ConfigError, ConfigMismatchError, DataMismatchError
from .model import build_model

FORMAT = "dvsg-train-checkpoint/2"
OLD_FORMATS = ("dvsg-train-checkpoint/1",)
REQUIRED_KEYS = ("format", "epoch", "model", "optimizer", "scheduler", "scaler", "rng", "config",
                 "data_fingerprint", "history", "run")
CONTAINER_KEYS = {"format", "sha256", "payload"}
LATEST = "checkpoint_latest.pt"
MAX = "checkpoint_max.pt"
# what one epoch's record may hold, and which of its numbers the trainer reads
HISTORY_REQUIRED = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
MAX_DEPTH = 8
_FC1 = 22                          # the first Linear layer (a bias there: SpikingJelly's weights)


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


# ----------------------------------------------------------------------------- building and restoring

@dataclass
class TrainingState:
    """The live objects of a run that a checkpoint saves and restores. model: the bare model
    (not its DDP wrapper); scheduler / scaler: None when the run has none (scaler: fp16 only);
    data_generator: the data-order generator."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    scaler: torch.amp.GradScaler | None
    data_generator: torch.Generator


def make_payload(state: TrainingState, *, epoch: int, config: TrainConfig, data_fingerprint: str,
                 history: list[dict[str, Any]], run_id: str, run_dir: Path,
                 cuda_device: torch.device | None = None) -> dict[str, Any]:
    """The checkpoint dict after ``epoch`` (`save_checkpoint` adds format and version).

    config: the run's resolved config; cuda_device: see `rng_state`. Every key here is one that
    `validate_checkpoint` requires (REQUIRED_KEYS) and checks."""
    return {
        "epoch": epoch, "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": rng_state(state.data_generator, cuda_device), "config": config.to_dict(),
        "data_fingerprint": data_fingerprint, "history": history,
        "run": {"id": run_id, "name": run_dir.name, "dir": str(run_dir)},
    }


def restore_state(ckpt: dict[str, Any], path: str | os.PathLike, state: TrainingState, *,
                  data_only_rng: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Load every state of a loaded (validated) checkpoint into ``state``; returns (history,
    first epoch to train). data_only_rng: see `set_rng_state`. CheckpointError if a state does not fit."""
    load_model_state(state.model, ckpt, path)
    try:
        state.optimizer.load_state_dict(ckpt["optimizer"])
        if state.scheduler is not None:
            state.scheduler.load_state_dict(ckpt["scheduler"])
        if state.scaler is not None:
            state.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], state.data_generator, data_only=data_only_rng)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: optimizer/scheduler/RNG state does not fit "
                              f"this run ({(str(exc).splitlines() or [''])[0][:160]})") from exc
    return [dict(r) for r in ckpt["history"]], ckpt["epoch"] + 1


def _payload_bytes(payload: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus format and version) in the digest container, through the output
    protocol (`dvsprep.atomic.publishing`), replacing `path`."""
    data = _payload_bytes({"format": FORMAT, "version": __version__, **payload})
    container = {"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(),
                 "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    # a run replaces its checkpoints every epoch by design (force), still locked, written aside
    # and renamed: a kill or a full disk leaves the previous one whole
    # Serialized in memory and written with plain writes: torch.save onto a full disk says only
    # "[enforce fail at inline_container.cc] unexpected pos" (a RuntimeError), where a write
    # raises ENOSPC, which the protocol turns into one line naming the checkpoint.
    buf = io.BytesIO()
    torch.save(container, buf)
    with publishing(path, "checkpoint", force=True) as tmp:
        tmp.write_bytes(buf.getbuffer())


def _torch_load(source: Any, path: Path) -> Any:
    """torch.load(weights_only=True); every failure of the unpickler or the zip reader is one line.

    Exception, not BaseException: Ctrl-C (KeyboardInterrupt) and SystemExit pass through. A
    MemoryError is said as such, not as "not a checkpoint" (the file may be fine)."""
    try:
        with warnings.catch_warnings():
            # torch's notes on what it loads (sparse invariants, storage types) would come before
            # the one line of a refusal; what is loaded is checked here anyway
            warnings.simplefilter("ignore")
            return torch.load(source, map_location="cpu", weights_only=True)
    except MemoryError as exc:
        raise CheckpointError(f"{path}: ran out of memory while loading it as a checkpoint") from exc
    except pickle.UnpicklingError as exc:
        # torch's own message here is a page about weights_only; one line says what matters.
        raise CheckpointError(f"{path}: not a checkpoint (not a torch file, or it holds pickled "
                              f"objects that weights_only loading refuses)") from exc
    except Exception as exc:  # zip, EOF, IndexError, KeyError, struct.error... mean the same thing here
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: not a checkpoint (unreadable torch file: "
                              f"{type(exc).__name__}: {first})") from exc


def read_torch_file(path: str | os.PathLike) -> tuple[Any, int]:
    """(the object, the file's size) of ``torch.load(path, weights_only=True)``: a regular file
    only (a FIFO, device or folder is refused before it is opened, so nothing blocks on it); every
    failure to read it is a one-line CheckpointError naming ``path``."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except (OSError, ValueError) as exc:   # ValueError: a NUL in the name
        raise CheckpointError(f"{path}: cannot read the checkpoint ({getattr(exc, 'strerror', None) or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file"
        raise CheckpointError(f"{path}: not a checkpoint file ({what})")
    try:
        # O_NONBLOCK: should a FIFO replace the file between stat and open, opening does not wait
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a checkpoint file (not a regular file)")
        os.set_blocking(fd, True)
        return _torch_load(f, path), st.st_size


def _size(n: int) -> str:
    return f"{n} bytes" if n < 10_000 else f"{n / 1e6:.3g} MB" if n < 1e11 else f"{n:.3g} bytes"


def check_tensor_sizes(tensors: list[tuple[str, torch.Tensor]], path: str | os.PathLike, nbytes: int) -> None:
    """Refuse, before anything allocates them, tensors that declare more data than the file holds.

    torch.save stores every tensor's storage in the file, but a tensor's shape may cover its
    storage many times over (stride 0: ``torch.zeros(1).expand(2048, 2048, 3, 3)`` loads from
    4 bytes; the first copy or op allocates all of it). Each tensor must be dense: its shape needs
    no more bytes than its storage holds; and all together no more than the ``nbytes`` they were
    read from. Sparse and other non-strided layouts are refused."""
    total = 0
    for where, t in tensors:
        if t.layout is not torch.strided or t.is_quantized:
            raise CheckpointError(f"{path}: tensor {where} is not a dense tensor ({t.layout})")
        dense = t.numel() * t.element_size()
        stored = t.untyped_storage().nbytes()
        if dense > stored:
            raise CheckpointError(f"{path}: tensor {where} declares shape {tuple(t.shape)} ({_size(dense)}) from "
                                  f"{_size(stored)} of data (an expanded or overlapping tensor): not a checkpoint "
                                  f"of real weights")
        total += dense
    if total > nbytes:
        raise CheckpointError(f"{path}: its tensors declare {_size(total)}, more than the {_size(nbytes)} the "
                              f"checkpoint holds (tensors sharing their data): not a checkpoint of real weights")


def state_mismatch(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """The first difference between a state dict and a network's (missing or unexpected keys,
    a shape or kind of number): one phrase naming the layer and both shapes; None when it fits."""
    missing = [k for k in expected if k not in state]
    if missing:
        return f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        return f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"
    for k, want in expected.items():
        got = state[k]
        if tuple(got.shape) != tuple(want.shape):
            return (f"size mismatch for {k}: shape {tuple(got.shape)} in the checkpoint, "
                    f"{tuple(want.shape)} in the network")
        if got.is_complex() or got.is_floating_point() != want.is_floating_point():
            return f"{k} holds {got.dtype}, the network {want.dtype}"
    return None


def network_state(fields: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict (shapes and dtypes only: on the meta device, nothing allocated) of the
    network of these model fields (channels, net, neuron, tau, linear_bias)."""
    with torch.device("meta"):
        model = build_model(fields["channels"], fields.get("net", "multistep"), fields["neuron"], "torch",
                            fields["tau"], fields.get("linear_bias", False))
    return model.state_dict()


def check_weights(state: dict[str, torch.Tensor], path: str | os.PathLike, fields: dict[str, Any]) -> None:
    """Model weights that fit the network of ``fields`` (see `state_mismatch`) and are finite:
    CheckpointError in one line otherwise. Call `check_tensor_sizes` first: the finite check
    reads every element."""
    problem = state_mismatch(state, network_state(fields))
    if problem:
        shown = {k: fields[k] for k in ("channels", "net", "neuron", "tau") if k in fields}
        raise CheckpointError(f"{path}: model weights do not fit the network {shown} ({problem})")
    check_finite(state.items(), path, "weight")


def check_finite(tensors, path: str | os.PathLike, what: str) -> None:
    for key, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise CheckpointError(f"{path}: {what} {key} holds {bad} values: refusing to use it")


def _open_container(obj: Any, path: Path, nbytes: int) -> bytes:
    """The payload bytes of a container whose digest matches; CheckpointError otherwise."""
    if not isinstance(obj, dict) or not isinstance(obj.get("format"), str):
        raise CheckpointError(f"{path}: not a dvsg-train checkpoint (no format field)")
    fmt = obj["format"]
    if fmt in OLD_FORMATS:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} carries no digest and cannot be checked "
                              f"(written by an older dvsg-train; expected {FORMAT!r})")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: not a dvsg-train checkpoint (format {fmt[:60]!r}, expected {FORMAT!r})")
    if set(obj) != CONTAINER_KEYS:
        raise CheckpointError(f"{path}: checkpoint container has keys {sorted(map(str, obj))[:6]}, "
                              f"expected {sorted(CONTAINER_KEYS)}")
    digest, payload = obj["sha256"], obj["payload"]
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise CheckpointError(f"{path}: checkpoint digest is not a sha256 hex string")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise CheckpointError(f"{path}: checkpoint payload is not a byte tensor")
    check_tensor_sizes([("payload", payload)], path, nbytes)
    data = payload.contiguous().numpy().tobytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise CheckpointError(f"{path}: checkpoint is corrupt: its payload has sha256 {actual[:16]}, "
                              f"but the checkpoint records {digest[:16]}")
    return data


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint on CPU: container, digest, payload, then `validate_checkpoint`.

    Raises CheckpointError with one line naming ``path`` for anything that is not an intact,
    well-formed dvsg-train checkpoint."""
    obj, nbytes = read_torch_file(path)
    return checkpoint_from(obj, nbytes, path)


def checkpoint_from(obj: Any, nbytes: int, path: str | os.PathLike) -> dict[str, Any]:
    """`load_checkpoint` of a file already read by `read_torch_file` (its object and size)."""
    path = Path(path)
    data = _open_container(obj, path, nbytes)
    ckpt = _torch_load(io.BytesIO(data), path)
    validate_checkpoint(ckpt, path, len(data))
    return ckpt


# ----------------------------------------------------------------------------- field checks

def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: checkpoint {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_tree(value: Any, path: Path, where: str, depth: int = 0,
                tensors: list[tuple[str, torch.Tensor]] | None = None) -> None:
    """Only tensors, numbers, strings, None, and dicts (str/int keys), lists and tuples of them.
    tensors: collects (where, tensor) of every tensor found."""
    if depth > MAX_DEPTH:
        raise _bad(path, f"{where} is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, torch.Tensor):
        if tensors is not None:
            tensors.append((where, value))
        return
    if isinstance(value, (int, float, str, type(None))):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise _bad(path, f"{where} has a key of type {type(k).__name__}")
            _check_tree(v, path, f"{where}[{k!r:.40}]", depth + 1, tensors)
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_tree(v, path, f"{where}[{i}]", depth + 1, tensors)
        return
    raise _bad(path, f"{where} holds a {type(value).__name__}")


def _check_rng(rng: Any, path: Path) -> None:
    if not isinstance(rng, dict) or set(rng) != {"torch", "cuda", "data"}:
        raise _bad(path, "rng must be a dict of torch, cuda and data states")
    size = torch.get_rng_state().numel()
    for name in ("torch", "data"):
        t = rng[name]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != size:
            raise _bad(path, f"rng {name} state must be a uint8 tensor of {size} bytes")
    if not isinstance(rng["cuda"], list) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in rng["cuda"]):
        raise _bad(path, "rng cuda states must be a list of uint8 tensors")


def _check_history(history: Any, epoch: int, path: Path) -> None:
    if not isinstance(history, list) or len(history) != epoch + 1:
        n = len(history) if isinstance(history, list) else type(history).__name__
        raise _bad(path, f"history must list the {epoch + 1} finished epochs, found {n}")
    for i, r in enumerate(history):
        if not isinstance(r, dict) or not all(isinstance(k, str) for k in r):
            raise _bad(path, f"history[{i}] is not a dict of named numbers")
        missing = [k for k in HISTORY_REQUIRED if k not in r]
        if missing:
            raise _bad(path, f"history[{i}] lacks {', '.join(missing)}")
        for k, v in r.items():
            if not (v is None or _is_number(v)):
                raise _bad(path, f"history[{i}][{k!r:.40}] is {type(v).__name__}, not a number")
        if r["epoch"] != i or not _is_int(r["epoch"]):
            raise _bad(path, f"history[{i}] is for epoch {r['epoch']!r}, expected {i}")
        for k in ("train_acc", "test_acc", "val_acc", "max_test_acc"):
            v = r.get(k)
            if v is not None and not (0.0 <= v <= 1.0):
                raise _bad(path, f"history[{i}][{k!r}] = {v!r} is not an accuracy in [0, 1]")
        for k in HISTORY_REQUIRED[1:]:
            if r[k] is None:
                raise _bad(path, f"history[{i}][{k!r}] is missing a value")


def _check_run(run: Any, path: Path) -> None:
    if not isinstance(run, dict) or set(run) != {"id", "name", "dir"}:
        raise _bad(path, "run must be a dict of id, name and dir")
    if not isinstance(run["id"], str) or not _HEX32.match(run["id"]):
        raise _bad(path, "run id is not 32 hex digits")
    name = run["name"]
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise _bad(path, f"run name {name!r:.60} is not a folder name")
    if not isinstance(run["dir"], str) or "\0" in run["dir"]:
        raise _bad(path, "run dir is not a path")


def validate_checkpoint(ckpt: Any, path: str | os.PathLike, nbytes: int | None = None) -> None:
    """Check every field's type and range (see the module docstring); CheckpointError otherwise.

    nbytes: the size of the payload it was loaded from; every tensor must be dense and (when
    nbytes is given) all of them fit in it (`check_tensor_sizes`). The model weights must fit the network of the
    checkpoint's config (names, shapes) and, like the optimizer state, be finite."""
    path = Path(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise _bad(path, f"payload is not a {FORMAT} dict")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if not isinstance(ckpt.get("version", ""), str):
        raise _bad(path, "version is not a string")
    tensors: list[tuple[str, torch.Tensor]] = []
    _check_tree(ckpt, path, "payload", tensors=tensors)
    # dense tensors always (the finite check below reads every element); within nbytes when known
    check_tensor_sizes(tensors, path, nbytes if nbytes is not None else 2 ** 63)
    config = checkpoint_config(ckpt, path)
    epoch = ckpt["epoch"]
    if not _is_int(epoch) or not 0 <= epoch < config.epochs:
        raise _bad(path, f"epoch {epoch!r:.40} is not an epoch of its run (0 to {config.epochs - 1})")
    model = ckpt["model"]
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise _bad(path, "model is not a state dict of named tensors")
    opt = ckpt["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or \
            not isinstance(opt.get("param_groups"), list) or not all(isinstance(g, dict) for g in opt["param_groups"]):
        raise _bad(path, "optimizer is not an optimizer state dict")
    for name in ("scheduler", "scaler"):
        if ckpt[name] is not None and not isinstance(ckpt[name], dict):
            raise _bad(path, f"{name} state is neither None nor a dict")
    if not isinstance(ckpt["data_fingerprint"], str) or not _HEX64.match(ckpt["data_fingerprint"]):
        raise _bad(path, "data_fingerprint is not a sha256 hex string")
    _check_rng(ckpt["rng"], path)
    _check_history(ckpt["history"], epoch, path)
    _check_run(ckpt["run"], path)
    fields = {k: getattr(config, k) for k in MODEL_FIELDS}
    check_weights(model, path, {**fields, "linear_bias": f"conv_fc.{_FC1}.bias" in model})
    check_finite(((where, t) for where, t in tensors if where.startswith("payload['optimizer']")),
                 path, "optimizer state")


def checkpoint_config(ckpt: dict[str, Any], path: str | os.PathLike) -> TrainConfig:
    """The checkpoint's TrainConfig; every field type- and range-checked (CheckpointError)."""
    cfg = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(cfg, dict) or not all(isinstance(k, str) for k in cfg):
        raise CheckpointError(f"{path}: checkpoint config is not a dict")
    try:
        return TrainConfig.from_dict(cfg)
    except (ConfigError, TypeError, ValueError) as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: checkpoint holds an invalid config ({first})") from exc


def check_resume(ckpt: dict[str, Any], path: str | os.PathLike, config: TrainConfig) -> None:
    """Raise ConfigMismatchError naming every setting that differs from the checkpoint's."""
    saved = checkpoint_config(ckpt, path).resume_key()
    now = config.resume_key()
    diffs = [f"{k} {saved[k]!r} vs {now[k]!r}" for k in saved if saved[k] != now[k]]
    if diffs:
        raise ConfigMismatchError(f"{path}: checkpoint was trained with another configuration "
                                  f"(checkpoint vs this run: {'; '.join(diffs)})")
    done = ckpt["epoch"] + 1 if _is_int(ckpt.get("epoch")) else 0     # a validated checkpoint has one
    if config.epochs < done:
        raise ConfigMismatchError(f"{path}: the run has done {done} epochs; --epochs {config.epochs} would "
                                  f"end it before that (give --epochs {done} or more, or leave it out)")


def check_data(ckpt: dict[str, Any], path: str | os.PathLike, fingerprint: str, data: str) -> None:
    if ckpt["data_fingerprint"] != fingerprint:
        raise DataMismatchError(f"{path}: checkpoint was trained on a store with fingerprint "
                                f"{ckpt['data_fingerprint'][:16]}, but {data} has {fingerprint[:16]}")


def load_model_state(model: torch.nn.Module, ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    cfg = {k: ckpt["config"].get(k) for k in MODEL_FIELDS}
    problem = state_mismatch(ckpt["model"], model.state_dict())
    if problem:
        raise CheckpointError(f"{path}: model weights do not fit the network {cfg} ({problem})")
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__)[:200]
        raise CheckpointError(f"{path}: model weights do not fit the network {cfg} ({detail})") from exc


# ----------------------------------------------------------------------------- bare --resume

# The option that sets each field a resumed run must keep (for messages).
OPTION_NAMES = {"T": "-T", "batch_size": "-b", "global_batch_size": "-b", "channels": "--channels",
                "net": "--net", "neuron": "--neuron", "tau": "tau", "opt": "--opt", "lr": "--lr",
                "momentum": "--momentum", "lr_scheduler": "--lr-scheduler", "step_size": "--step-size",
                "gamma": "--gamma", "T_max": "--T-max", "amp": "--amp", "amp_dtype": "--amp-dtype",
                "seed": "--seed", "val_fraction": "--val-fraction", "augment": "--augment"}
# Fields of a run's place and of one invocation: never taken from a checkpoint.
_NOT_SETTINGS = ("out_dir", "run_name", "resume", "force", "preset")


def checkpoint_run_dir(checkpoint: str | os.PathLike) -> Path:
    """The run folder of a checkpoint: the folder the file is in (wherever it was moved to)."""
    return Path(os.path.realpath(checkpoint)).parent


def resume_config(path: str | os.PathLike, given: dict[str, Any], world_size: int = 1) -> TrainConfig:
    """The TrainConfig that continues the run of checkpoint ``path`` (``dvsg-train --resume``).

    Every setting that shapes the run's numbers (RESUME_FIELDS) and the carried ones
    (CARRIED_FIELDS: epochs, data, cupy, threads, ...) come from the checkpoint; ``given`` holds
    the options typed on the command line (field name -> value): those that do not change the
    numbers (device, workers, preload, epochs, data, ...) are used, and one that conflicts with
    the checkpoint is refused (ConfigMismatchError naming the option). The run folder is the
    one the checkpoint file is in; an --out-dir/--run-name that names another folder is refused.
    world_size: processes of this run (-b defaults to the saved global batch / world_size).
    """
    ckpt = load_checkpoint(path)
    saved = checkpoint_config(ckpt, path)
    folder = checkpoint_run_dir(path)
    problems: list[str] = []
    if "out_dir" in given or "run_name" in given:
        asked = Path(given.get("out_dir", folder.parent)) / given.get("run_name", folder.name)
        if Path(os.path.realpath(asked)) != folder:
            opts = " and ".join(o for o, k in (("--out-dir", "out_dir"), ("--run-name", "run_name")) if k in given)
            problems.append(f"{opts} name {asked}, but the checkpoint's run is in {folder} "
                            f"(copy that folder to branch off)")
    if "preset" in given and given["preset"] != saved.preset:
        problems.append(f"--preset {given['preset']} (the run used {saved.preset or 'no preset'})")
    values = {k: getattr(saved, k) for k in RESUME_FIELDS + CARRIED_FIELDS}
    values.update({k: v for k, v in given.items() if k not in _NOT_SETTINGS})
    values.update(out_dir=str(folder.parent), run_name=folder.name, resume=str(path), world_size=world_size)
    if "batch_size" not in given:
        gb = saved.global_batch_size
        if gb % world_size:
            problems.append(f"the run's global batch of {gb} does not split over {world_size} processes (pass -b)")
        else:
            values["batch_size"] = gb // world_size
    try:
        config = TrainConfig.from_dict(values)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    was, now = saved.resume_key(), config.resume_key()
    for k in was:
        if was[k] != now[k]:
            problems.append(f"{OPTION_NAMES.get(k, k)} gives {k} {now[k]!r}, the run has {was[k]!r}")
    if problems:
        raise ConfigMismatchError(f"{path}: {'; '.join(problems)}: a resumed run keeps its checkpoint's "
                                  f"settings (leave those options out, or start a new run)")
    config.world_size = 1               # the engine sets it from the environment
    return config
