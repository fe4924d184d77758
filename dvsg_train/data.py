"""Training batches from a dvsprep frame store.

Two ways to feed the network, with the same sample order for the same generator:

- preloaded: a split is held in memory (CPU or GPU) in the store dtype (uint8/uint16) and batches
  are built by indexing it with a permutation;
- a DataLoader over `FrameDataset`, whose workers open the store themselves.

`choose_feed` makes that choice (``--preload``, sized by what fits in memory) for training and
evaluation alike.

Under DDP (``world_size`` > 1) ``batch_size`` is the batch of one rank: every rank draws the same
permutation and takes its share (`dvsg_train.distributed.rank_share`) of each global batch of
``batch_size * world_size`` samples. Training drops the last partial global batch (every rank
steps on equal batches); evaluation keeps it and splits it without padding, so each sample is
evaluated by exactly one rank.

A batch leaves here as integer frames [B, T, 2, H, W] and int64 labels [B]; `to_network_input`
moves it to the device, transposes once to [T, B, 2, H, W] and converts to float there.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from dvsprep.constants import FRAME_STORE_GLOB, N_CLASSES, ZARR_JSON
from dvsprep.errors import MissingFileError, ResourceLimitError
from dvsprep.frames import FrameSplit, FrameStore, frame_store_name, open_frame_store
from dvsprep.inputs import STORE_OR_DATA_ROOT, InputKind, is_url, kind_of
from dvsprep import resources
from dvsprep.constants import N_POLARITIES, SENSOR_H, SENSOR_W

from .distributed import rank_share, share_size
from .errors import ConfigError, DataMismatchError

log = logging.getLogger(__name__)

# Preload only when the frames take at most this share of the memory that is free.
PRELOAD_SHARE = 0.5

# torch says this in four lines at every epoch; `choose_feed` says it once, in one line.
warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)


def resolve_store_path(path: str | os.PathLike, T: int | None, why: str | None = None) -> str:
    """A store path (folder, .zip or URL), or a DATA_ROOT holding ``frames_T<T>_number.zarr``
    (dvsprep frames' default). Anything else is one line: MissingFileError / StoreError; `why`
    says where T comes from (default "-T <T>", the option; dvsg-eval has none: its checkpoint's)."""
    if kind_of(path, STORE_OR_DATA_ROOT, noun="frame store") is not InputKind.DATA_ROOT:
        return str(path)
    p = Path(path)
    others = sorted(q.name for q in p.glob(FRAME_STORE_GLOB) if q.is_dir())
    have = f"it holds {', '.join(others)}" if others else "it holds no frame store"
    if T is None:
        raise MissingFileError(f"{p}: a DATA_ROOT, not a frame store ({have}); pass the store path")
    candidate = p / frame_store_name(T, "number")
    if candidate.is_dir():
        return str(candidate)
    raise MissingFileError(f"{p}: no {candidate.name} for {why or f'-T {T}'} ({have}; make one with "
                           f"dvsprep frames -T {T} -d {p}, or pass the store path)")


def store_inputs(path: str | os.PathLike) -> list[Path]:
    """What a --data value reads, for refusing outputs written onto or into it: a store is
    itself, a DATA_ROOT stands for the frame stores it holds (an output beside them, such as
    DATA_ROOT/runs, is fine), a URL for nothing here."""
    if is_url(str(path)):
        return []
    p = Path(path)
    if p.is_dir() and not (p / ZARR_JSON).exists():
        return sorted(q for q in p.glob(FRAME_STORE_GLOB) if q.is_dir())
    return [p]


def open_store(path: str | os.PathLike, T: int | None = None, *, verify: bool = False,
               expected_fingerprint: str | None = None) -> FrameStore:
    """Open a frame store (or DATA_ROOT/frames_T<T>_number.zarr) and check its T when given.

    Every open is verified (a verified-marker of this machine makes that a stat of each file);
    ``verify`` hashes every file against the manifest regardless; ``expected_fingerprint`` (sha256
    or a prefix of >= 12 hex digits) must match the store's. Raises dvsprep's MissingFileError /
    StoreError (IntegrityError) for a missing, broken or different store and DataMismatchError
    when its T is not the one asked for."""
    store = open_frame_store(resolve_store_path(path, T), verify=verify,
                             expected_fingerprint=expected_fingerprint)
    if T is not None and store.T != T:
        raise DataMismatchError(f"{path}: store has T={store.T} frames per sample, but -T {T} was "
                                f"asked for (make a store with dvsprep frames -T {T} or pass -T {store.T})")
    return store


def split_train_val(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of train and validation samples, stratified by label.

    labels [N] int. Each class gives round(val_fraction * n_class) samples to validation (at
    least one when the class has two or more and val_fraction > 0), drawn with numpy's PCG64
    seeded by ``seed``, so the split is a pure function of (labels, val_fraction, seed).
    """
    labels = np.asarray(labels)
    if val_fraction <= 0:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val = []
    for c in range(N_CLASSES):
        idx = np.flatnonzero(labels == c)
        k = int(round(val_fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        val.append(rng.permutation(idx)[:k])
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


class FrameDataset(torch.utils.data.Dataset):
    """Samples of one split (optionally a subset); item i -> (frames uint8|uint16 [T, 2, H, W], label).

    The store is opened lazily in the process that reads, so DataLoader workers open their own.
    """

    def __init__(self, path: str | os.PathLike, split: str, indices: np.ndarray | None = None):
        self.path = str(path)
        self.split = split
        sp = open_frame_store(self.path).split(split)
        self.indices = np.arange(len(sp)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = torch.from_numpy(sp.labels[self.indices].astype(np.int64))
        self._sp: FrameSplit | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self._sp is None:
            self._sp = open_frame_store(self.path).split(self.split)
        frames = self._sp[int(self.indices[i])]
        return torch.from_numpy(np.ascontiguousarray(frames)), int(self.labels[i])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_sp"] = None
        return state


def batch_order(n: int, batch_size: int, shuffle: bool, drop_last: bool,
                generator: torch.Generator | None, rank: int = 0, world_size: int = 1) -> list[Tensor]:
    """This rank's index batches for one epoch.

    The epoch's order is a randperm from ``generator`` when shuffling, else 0..n-1, cut into
    global batches of ``batch_size * world_size`` (the last, short one dropped with
    ``drop_last``); the rank takes `rank_share` of each and skips shares that come out empty
    (only a short last batch can give one). world_size 1 is the single-process order."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    step = batch_size * world_size
    stop = n - n % step if drop_last else n
    shares = (rank_share(order[i:i + step], rank, world_size) for i in range(0, stop, step))
    return [b for b in shares if len(b)]


def n_batches(n: int, batch_size: int, drop_last: bool, rank: int = 0, world_size: int = 1) -> int:
    """len(batch_order(...)) without drawing the permutation."""
    step = batch_size * world_size
    full, rest = divmod(n, step)
    return full if drop_last else full + (1 if share_size(rest, rank, world_size) else 0)


class _BatchSampler(torch.utils.data.Sampler):
    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool,
                 generator: torch.Generator | None, rank: int = 0, world_size: int = 1):
        self.args = (n, batch_size, shuffle, drop_last, generator, rank, world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for b in batch_order(*self.args):
            yield b.tolist()

    def __len__(self) -> int:
        n, batch_size, _, drop_last, _, rank, world_size = self.args
        return n_batches(n, batch_size, drop_last, rank, world_size)


class Batches:
    """One split as batches, re-iterable once per epoch.

    frames: preloaded tensor [N, T, 2, H, W] (uint8/uint16, CPU or GPU) or None to read through
    a DataLoader over ``dataset``. generator: the data-order generator (its state is what a
    checkpoint saves); None with shuffle=False. batch_size: per rank; rank / world_size: this
    process's share of each global batch (see the module docstring).
    """

    def __init__(self, labels: Tensor, batch_size: int, *, shuffle: bool, drop_last: bool,
                 generator: torch.Generator | None = None, frames: Tensor | None = None,
                 dataset: FrameDataset | None = None, workers: int = 0, pin_memory: bool = False,
                 rank: int = 0, world_size: int = 1):
        if (frames is None) == (dataset is None):
            raise ValueError("Batches needs exactly one of frames (preloaded) or dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.labels = labels
        self.frames = frames
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = generator
        self.workers = workers
        self.pin_memory = pin_memory
        self._loader = None

    @property
    def n_samples(self) -> int:
        """Samples in the split (all ranks together)."""
        return len(self.labels)

    def __len__(self) -> int:
        """Batches this rank takes per epoch."""
        return n_batches(self.n_samples, self.batch_size, self.drop_last, self.rank, self.world_size)

    def _order_args(self) -> tuple:
        return (self.n_samples, self.batch_size, self.shuffle, self.drop_last, self.generator,
                self.rank, self.world_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.frames is not None:
            labels = self.labels.to(self.frames.device)
            batches = batch_order(*self._order_args())
            if not batches:
                return
            # The epoch's order goes to the device in one copy, not one blocking copy per batch.
            order = torch.cat(batches).to(self.frames.device)
            for idx in order.split([len(b) for b in batches]):
                yield self.frames[idx], labels[idx]
            return
        if self._loader is None:
            sampler = _BatchSampler(*self._order_args())
            # A private generator for worker seeds, so the loader never draws from the global
            # RNG (that one drives dropout and must not depend on how data is read).
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=sampler, num_workers=self.workers,
                pin_memory=self.pin_memory, persistent_workers=self.workers > 0,
                generator=torch.Generator().manual_seed(0))
        yield from self._loader


def to_network_input(frames: Tensor, labels: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Integer frames [B, T, 2, H, W] -> float32 [T, B, 2, H, W] on ``device`` (contiguous)."""
    frames = frames.to(device, non_blocking=True)
    x = frames.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    return x, labels.to(device, non_blocking=True)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    mem = resources.available_memory()
    if mem is not None:
        return mem
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _memory_name(device: torch.device) -> str:
    """How a memory refusal names `device`'s memory: "memory" for the host, "cuda memory"."""
    return "memory" if device.type == "cpu" else f"{device.type} memory"


# Peak memory of a forward pass without gradients, in float32 copies of the first block's
# output [T*B, channels, 128, 128]: conv, BatchNorm and neuron outputs plus the neuron's
# state (measured on CPU: 4.0-4.2 for the multi-step net, 2.5 for the stepwise one).
EVAL_ACTIVATION_COPIES = 4


def eval_batch_bytes(T: int, batch: int, channels: int) -> int:
    """Estimated peak memory of evaluating one batch: its float32 input and the activations."""
    plane = SENSOR_H * SENSOR_W
    return 4 * T * batch * plane * (N_POLARITIES + EVAL_ACTIVATION_COPIES * channels)


def check_eval_memory(who: str, T: int, batch: int, channels: int, device: torch.device) -> None:
    """Refuse (ResourceLimitError, the one wording) an evaluation whose batches cannot fit the
    memory free on `device`, before the first batch is allocated."""
    need, have = eval_batch_bytes(T, batch, channels), _available_bytes(device)
    if need > have:
        raise ResourceLimitError(resources.memory_refusal(
            who, f"evaluating batches of {batch} at T={T} with channels {channels}", need, have,
            "use a smaller -b", where=_memory_name(device)))


def resolve_preload(preload: str, nbytes: int, device: torch.device,
                    cpu_copies: int = 1, what: str = "the store") -> torch.device | None:
    """Where to hold the frames: a device, or None for the DataLoader path.

    "auto" picks the training device when the frames fit in PRELOAD_SHARE of its free memory,
    else CPU memory under the same rule, else None. "cpu" / "gpu" are refused (ConfigError
    naming `what` and the sizes) when the frames do not fit the memory that is free, before
    anything is allocated. cpu_copies: processes on this machine that each hold their own copy
    in CPU memory (DDP ranks)."""
    if preload == "none":
        return None
    if preload in ("cpu", "gpu"):
        where = torch.device("cpu") if preload == "cpu" else device
        if preload == "gpu" and device.type != "cuda":
            raise ConfigError(f"--preload gpu needs a CUDA device, but the run uses {device}")
        need = nbytes * (cpu_copies if where.type == "cpu" else 1)
        have = _available_bytes(where)
        if need > have:
            raise ConfigError(resources.memory_refusal(
                what, f"--preload {preload} (the frames)", need, have, "use --preload auto or none",
                where=_memory_name(where)))
        return where
    for where in ([device, torch.device("cpu")] if device.type == "cuda" else [torch.device("cpu")]):
        need = nbytes * (cpu_copies if where.type == "cpu" else 1)
        if need <= PRELOAD_SHARE * _available_bytes(where):
            return where
    return None


@dataclass
class Feed:
    """How a store's frames reach the batches, chosen once by `choose_feed`: held in memory on
    ``where`` (each split read once) or, where None, streamed by DataLoader workers."""

    path: str
    where: torch.device | None
    workers: int = 0
    pin_memory: bool = False
    _loaded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def batches(self, sp: FrameSplit, batch_size: int, indices: np.ndarray | None = None, *,
                train: bool = False, generator: torch.Generator | None = None,
                rank: int = 0, world_size: int = 1) -> Batches:
        """Batches of ``sp`` (or its ``indices``): shuffled from ``generator`` and without the
        last partial batch when ``train``, else in order and complete."""
        labels = torch.from_numpy(sp.labels if indices is None else sp.labels[indices])
        kw = dict(shuffle=train, drop_last=train, generator=generator if train else None,
                  rank=rank, world_size=world_size)
        if self.where is None:
            return Batches(labels, batch_size, dataset=FrameDataset(self.path, sp.name, indices),
                           workers=self.workers, pin_memory=self.pin_memory, **kw)
        if sp.name not in self._loaded:         # train and val share one read of the train split
            self._loaded[sp.name] = sp.load_all()
        frames = self._loaded[sp.name] if indices is None else self._loaded[sp.name][indices]
        return Batches(labels, batch_size, frames=torch.from_numpy(frames).to(self.where), **kw)


def _cpus() -> int:
    """CPUs this process may run on (torch's own count for its DataLoader warning)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def choose_feed(path: str, splits: Sequence[FrameSplit], preload: str, device: torch.device, *,
                workers: int = 0, cpu_copies: int = 1) -> Feed:
    """The preload-or-stream choice of training and evaluation alike: the ``splits`` of the
    store at ``path`` go where `resolve_preload` puts their frames (sized by the splits' nbytes),
    else they are streamed (pinned for a CUDA device)."""
    where = resolve_preload(preload, sum(sp.nbytes for sp in splits), device, cpu_copies=cpu_copies, what=path)
    if where is not None:
        log.info("preloading %s into %s memory", path, where.type)
    elif workers > _cpus():
        log.warning("-j %d: more DataLoader workers than the %d CPUs this process may use, which usually "
                    "slows loading", workers, _cpus())
    return Feed(path, where, workers, pin_memory=device.type == "cuda" and where is None)


@dataclass
class RunData:
    """The batches of a run: train (shuffled, drop_last), val (may be None) and test."""

    train: Batches
    val: Batches | None
    test: Batches
    fingerprint: str
    store_T: int
    preload_device: torch.device | None


def load_run_data(path: str | os.PathLike, *, T: int, batch_size: int, device: torch.device,
                  preload: str = "auto", val_fraction: float = 0.0, seed: int = 0,
                  workers: int = 0, generator: torch.Generator | None = None,
                  rank: int = 0, world_size: int = 1, local_world_size: int = 1,
                  expected_fingerprint: str | None = None) -> RunData:
    """Open the store, split off validation and build the three batch streams.

    The train stream draws its order from ``generator`` (the run's data-order generator, the
    same on every rank). batch_size is per rank; rank / world_size pick this process's share of
    every global batch; local_world_size ranks on this machine each preload their own copy."""
    store = open_store(path, T, expected_fingerprint=expected_fingerprint)
    path = str(store.path)
    train_sp, test_sp = store.split("train"), store.split("test")
    step = batch_size * world_size
    what = f"one batch of {batch_size}" if world_size == 1 else \
        f"one global batch of {step} (-b {batch_size} x {world_size} processes)"
    if len(train_sp) < step:
        raise DataMismatchError(f"{path}: train split has {len(train_sp)} samples, fewer than "
                                f"{what} (batches drop the last partial one)")
    if len(test_sp) == 0:
        raise DataMismatchError(f"{path}: test split is empty")
    train_idx, val_idx = split_train_val(train_sp.labels, val_fraction, seed)
    if len(train_idx) < step:
        raise DataMismatchError(f"{path}: after holding out {len(val_idx)} samples for validation, "
                                f"{len(train_idx)} train samples remain, fewer than {what}")
    feed = choose_feed(path, (train_sp, test_sp), preload, device, workers=workers, cpu_copies=local_world_size)
    share = dict(rank=rank, world_size=world_size)
    if val_fraction > 0:
        train = feed.batches(train_sp, batch_size, train_idx, train=True, generator=generator, **share)
        val = feed.batches(train_sp, batch_size, val_idx, **share)
    else:
        train, val = feed.batches(train_sp, batch_size, train=True, generator=generator, **share), None
    return RunData(train=train, val=val, test=feed.batches(test_sp, batch_size, **share),
                   fingerprint=store.fingerprint, store_T=store.T, preload_device=feed.where)
