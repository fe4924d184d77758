"""Data-parallel training over several processes and machines (torchrun + DDP).

``torchrun --nproc-per-node N -m dvsg_train ...`` starts N copies of dvsg-train; each reads its
place from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), joins a process group (NCCL on GPUs, gloo on CPU) and trains its own replica on its
own device. Without WORLD_SIZE > 1 everything here is a no-op and the run is the single-process
one.

Batch semantics: ``-b`` is the batch of one process, the global batch is ``-b`` x WORLD_SIZE.
Every rank draws the same permutation of the split from the run's data-order generator and
takes its share of each global batch (`rank_share`), so a global batch is exactly the batch a
single process with ``-b`` x WORLD_SIZE would take, and DDP's gradient average over equal per-rank
batches equals the gradient of the mean loss over the global batch.

Errors in the set-up phases are agreed on (`agree`, `on_main`): a problem found by any rank is
raised on every rank, so no rank waits forever at a collective the failing one never reaches.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError, TrainError
# the environment helpers live in a torch-free module (the CLI needs them before any work)
from .launch_env import (ENV_LOCAL_RANK, ENV_LOCAL_WORLD, ENV_RANK, ENV_WORLD, FAILED_RANK_ATTR,  # noqa: F401
                         _env_int, env_rank)

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a rank waits at a collective (a slow store verification on another machine included).
TIMEOUT = datetime.timedelta(minutes=30)


def resolve_device(device: str | None) -> torch.device:
    """``None`` -> cuda when present, else cpu. A CUDA device that is not there is a ConfigError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a device torch knows ({exc})") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch sees no CUDA device here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its ranks, the world, its device, and whether it made the group."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, draws progress bars and writes the run's files."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: the one process per machine that downloads and verifies the store."""
        return self.local_rank == 0


def setup(device: str | None) -> DistEnv:
    """Read torchrun's environment and join the process group (when WORLD_SIZE > 1).

    Under DDP each rank uses ``cuda:LOCAL_RANK`` (``--device`` may say ``cuda`` or ``cpu``, not a
    device number) with NCCL, or the CPU with gloo. A process group that already exists (made by
    the caller) is used as it is and left for the caller to destroy."""
    world = _env_int(ENV_WORLD, 1)
    if world <= 1:
        return DistEnv(device=resolve_device(device))
    rank, local_rank = _env_int(ENV_RANK, -1), _env_int(ENV_LOCAL_RANK, -1)
    local_world = _env_int(ENV_LOCAL_WORLD, world)
    if not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise ConfigError(f"torchrun environment is inconsistent: RANK={os.environ.get(ENV_RANK)!r}, "
                          f"LOCAL_RANK={os.environ.get(ENV_LOCAL_RANK)!r}, WORLD_SIZE={world}, "
                          f"LOCAL_WORLD_SIZE={local_world} (start the run with torchrun)")
    wanted = torch.device(device) if device is not None else None
    if wanted is not None and wanted.type == "cuda" and wanted.index is not None:
        raise ConfigError(f"--device {device}: under torchrun every process uses cuda:LOCAL_RANK; "
                          "pass --device cuda (or choose GPUs with CUDA_VISIBLE_DEVICES)")
    dev = resolve_device(None if wanted is None else wanted.type)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this machine shows "
                              f"{torch.cuda.device_count()} CUDA device(s) for {local_world} processes "
                              "(lower --nproc-per-node)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise ConfigError(f"a process group of {dist.get_world_size()} (rank {dist.get_rank()}) exists, "
                              f"but the environment says WORLD_SIZE={world}, RANK={rank}")
        return DistEnv(dev, rank, world, local_rank, local_world, owns_group=False)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: start "
                          "distributed runs with torchrun")
    if backend == "nccl" and not dist.is_nccl_available():
        raise ConfigError("this torch build has no NCCL; multi-GPU training needs it (or use --device cpu)")
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    log.info("rank %d of %d (local %d of %d) on %s, %s backend", rank, world, local_rank,
             local_world, dev, backend)
    return DistEnv(dev, rank, world, local_rank, local_world, owns_group=True)


def teardown(env: DistEnv) -> None:
    """Leave the process group this module made (no-op otherwise)."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


# ----------------------------------------------------------------------------- agreed errors

def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a TrainError with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return TrainError(f"{type(exc).__name__}: {exc}")


def _raise_first(failures: list[tuple[int, BaseException] | None], env: DistEnv,
                 own: BaseException | None) -> None:
    failed = [f for f in failures if f is not None]
    if not failed:
        return
    rank, exc = min(failed, key=lambda f: f[0])
    if rank == env.rank and own is not None:
        exc = own                      # the original, with its traceback
    setattr(exc, FAILED_RANK_ATTR, rank)
    raise exc


def agree(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raised anywhere, raise the lowest failing rank's exception
    on every rank (marked with FAILED_RANK_ATTR). Single process: just ``fn()``."""
    if not env.enabled:
        return fn()
    result: Any = None
    own: BaseException | None = None
    try:
        result = fn()
    except Exception as exc:
        own = exc
    failures: list[Any] = [None] * env.world_size
    dist.all_gather_object(failures, None if own is None else (env.rank, _portable(own)))
    _raise_first(failures, env, own)
    return result


def on_main(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its exception) to every rank."""
    if not env.enabled:
        return fn()
    box: list[Any] = [None]
    own: BaseException | None = None
    if env.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:
            own = exc
            box[0] = ("error", (0, _portable(exc)))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        _raise_first([value], env, own)
    return value


def local_main_first(env: DistEnv, first: Callable[[], T], rest: Callable[[], T]) -> T:
    """``first()`` on local rank 0 of every machine while the others wait, then ``rest()`` on
    the others (e.g. download and verify a store once per machine, then open the local copy)."""
    out = agree(env, first if env.is_local_main else (lambda: None))
    rest_out = agree(env, (lambda: None) if env.is_local_main else rest)
    return out if env.is_local_main else rest_out


def all_gather_object(env: DistEnv, obj: Any) -> list[Any]:
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- data and metrics

def rank_share(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's part of a global batch of indices: ``torch.tensor_split(batch, world_size)[rank]``.

    A full global batch of b x world gives every rank b contiguous indices; a short last batch
    (evaluation) gives sizes that differ by at most one, some possibly empty, so every sample is
    seen by exactly one rank and none is repeated to pad the split."""
    return torch.tensor_split(batch, world_size)[rank]


def share_size(n: int, rank: int, world_size: int) -> int:
    """len(rank_share(batch of n, rank, world_size)) without building it."""
    return n // world_size + (1 if rank < n % world_size else 0)


def all_reduce_sum(env: DistEnv, values: Tensor) -> Tensor:
    """Sum of ``values`` over all ranks (in place; returned). float64 keeps counts exact."""
    if env.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a rank's torch RNG (dropout masks) for one epoch under DDP: distinct per rank,
    and a pure function of (seed, epoch, rank) so a resumed run draws the same masks."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0] >> 1)


def broadcast_buffers(env: DistEnv, model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so every rank evaluates
    exactly the model rank 0 saves (each rank updated them from its own last batch)."""
    if not env.enabled:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


# ----------------------------------------------------------------------------- SyncBatchNorm

class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the union of every rank's batch, on any
    device and backend (torch's SyncBatchNorm runs on GPUs only; this one serves gloo on CPU).

    x [N, C, H, W]. Mean and biased variance come from all-reduced per-channel sums (float64);
    running statistics update as BatchNorm2d's do (unbiased variance). The state_dict is a
    BatchNorm2d's, so checkpoints load into the plain network.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        C = x.shape[1]
        xd = x.double()
        count = torch.full((1,), x.numel() // C, dtype=torch.float64, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight.double()
            shift = shift * self.weight.double() + self.bias.double()
        y = torch.addcmul(shift.view(1, C, 1, 1), xd, scale.view(1, C, 1, 1))
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers -> torch's SyncBatchNorm on CUDA, `SyncBatchNorm2d` elsewhere (same
    parameters and buffers, shared with the old layers)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats, device=device)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model


def wrap_model(env: DistEnv, model: nn.Module) -> nn.Module:
    """DistributedDataParallel around ``model`` (already on env.device); the model itself when
    single-process. DDP broadcasts rank 0's parameters and buffers when it is built."""
    if not env.enabled:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

