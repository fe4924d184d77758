"""Training and evaluation loops, and ``main(config)``: a whole run as the CLI starts it.

``main`` runs single-process or, under torchrun (WORLD_SIZE > 1), as one rank of a DDP run (see
`dvsg_train.distributed`): every rank trains its replica on its share of each global batch,
metrics are summed over ranks, and rank 0 alone logs, draws progress bars and writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dvsprep.atomic import check_output, clean_stale_temps, output_lock
from dvsprep.constants import N_CLASSES
from dvsprep.inputs import url_scheme

from . import __version__
from . import distributed
from .augment import AugmentSpec, augment_batch, augment_generator, check_spec_T
from .checkpoint import (
    LATEST,
    MAX,
    TrainingState,
    check_data,
    check_resume,
    checkpoint_run_dir,
    load_checkpoint,
    make_payload,
    restore_state,
    save_checkpoint,
)
from .config import TrainConfig
from .data import (Batches, check_eval_memory, choose_feed, load_run_data, open_store, resolve_store_path,
                   store_inputs, to_network_input)
from .distributed import DistEnv, resolve_device
from .errors import BackendUnavailableError, ConfigError, DataMismatchError, TrainError
from .export.network import NetworkWeights, has_linear_bias, load_network, load_weights, read_init_weights, store_T
from .model import build_model
from .neuron import check_backend
from .report import Scalars, epoch_line, write_curves, write_json, write_metrics

log = logging.getLogger(__name__)

AMP_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _autocast(device: torch.device, amp_dtype: str | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_TORCH_DTYPES[amp_dtype])


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between firing rates [B, 11] and targets [B, 11] (one-hot labels, or the soft targets
    of mixup / label smoothing), in float32."""
    return F.mse_loss(out.float(), target.float())


def _one_hot(labels: torch.Tensor) -> torch.Tensor:
    """labels [B] -> one-hot targets [B, 11] float32."""
    return F.one_hot(labels, N_CLASSES).float()


def _progress(iterable, enabled: bool, desc: str, total: int):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, unit="batch")


def train_one_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                    device: torch.device, *, scaler: torch.amp.GradScaler | None = None,
                    amp_dtype: str | None = None, progress: bool = False,
                    dist_env: DistEnv | None = None, augment: AugmentSpec | None = None,
                    seed: int = 0, epoch: int = 0,
                    on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """One pass over ``batches`` with one optimizer step per batch (``on_batch(step)`` after each).

    amp_dtype: None, "fp16" (needs ``scaler``) or "bf16" (no scaler); autocast covers forward
    and loss. augment: augmentations of each batch on the device (None or an inactive spec:
    none; the targets are then exactly one-hot), drawn from ``augment_generator(seed, epoch,
    rank, step)`` with step the batch's index in the epoch and rank ``dist_env``'s (0 without
    DDP). Returns loss (mean MSE against the targets), acc (share of samples whose output's
    argmax is the target's argmax: the label without augmentation, the mirrored label of a
    mirrored sample, the larger share of a mixed one), samples, seconds, samples_per_s and
    output_rate (the mean of the network's outputs, firing rates: 0 when the output layer emitted
    no spike in the whole epoch); under DDP (``dist_env``, ``model`` wrapped in DDP) over the
    samples of all ranks.
    """
    if amp_dtype == "fp16" and scaler is None:
        raise ValueError("fp16 autocast needs a GradScaler")
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    out_sum = torch.zeros((), dtype=torch.float64, device=device)     # 0 after the epoch: no output spike
    n = 0
    start = time.perf_counter()
    rank = dist_env.rank if dist_env is not None else 0
    augmenting = augment is not None and augment.active
    for step, (frames, labels) in enumerate(_progress(batches, progress, "train", len(batches))):
        x, y = to_network_input(frames, labels, device)
        if augmenting:
            x, target = augment_batch(augment, x, y, augment_generator(seed, epoch, rank, step, device))
        else:
            target = _one_hot(y)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp_dtype):
            out = model(x)
            loss = _loss(out, target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach().double() * len(y)
        correct += (out.detach().argmax(1) == (target.argmax(1) if augmenting else y)).sum()
        out_sum += out.detach().sum(dtype=torch.float64)
        n += len(y)
        if on_batch is not None:
            on_batch(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(n), dtype=torch.float64, device=device),
                          out_sum])
    if dist_env is not None:
        distributed.all_reduce_sum(dist_env, totals)
    loss_total, correct_total, n_total, out_total = totals.tolist()
    n = int(n_total)
    if n == 0:
        raise TrainError("the train split produced no batch")
    return {"loss": loss_total / n, "acc": correct_total / n, "samples": n,
            "seconds": seconds, "samples_per_s": n / seconds, "output_rate": out_total / (n * N_CLASSES)}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, device: torch.device, *,
             amp_dtype: str | None = None, progress: bool = False,
             dist_env: DistEnv | None = None) -> dict[str, Any]:
    """Loss and accuracy over ``batches`` (eval mode), plus confusion [11, 11] (rows = true).
    Never augments: the samples as they are, the targets one-hot.

    Under DDP each rank passes its unwrapped model and its share of the split (every sample in
    exactly one rank's share); sums are reduced over ranks, so the result covers the split once."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(N_CLASSES * N_CLASSES, dtype=torch.int64, device=device)
    n = 0
    start = time.perf_counter()
    for frames, labels in _progress(batches, progress, "eval", len(batches)):
        x, y = to_network_input(frames, labels, device)
        with _autocast(device, amp_dtype):
            out = model(x)
            loss = _loss(out, _one_hot(y))
        loss_sum += loss.double() * len(y)
        # index_add_ into a fixed-size tensor: no host sync (bincount reads the max back)
        cell = y * N_CLASSES + out.argmax(1)
        confusion.index_add_(0, cell, torch.ones_like(cell))
        n += len(y)
    seconds = time.perf_counter() - start
    totals = torch.cat([loss_sum.view(1), torch.tensor([float(n)], dtype=torch.float64, device=device),
                        confusion.double()])
    if dist_env is not None:
        distributed.all_reduce_sum(dist_env, totals)
    loss_total, n = totals[0].item(), int(totals[1].item())
    conf = totals[2:].round().long().view(N_CLASSES, N_CLASSES).cpu().numpy()
    return {"loss": loss_total / max(n, 1), "acc": float(np.trace(conf)) / max(n, 1),
            "samples": n, "seconds": seconds, "confusion": conf}


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.opt == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(model.parameters(), lr=config.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """CosineAnnealingLR(T_max) or StepLR(step_size, gamma), stepped once per epoch; or None."""
    if config.lr_scheduler == "cosalr":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.resolved_T_max())
    if config.lr_scheduler == "steplr":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    return None


@dataclass(frozen=True)
class ResolvedRun:
    """A run after its one resolution step (`resolve_run`): every later step reads this, never
    the config as it was asked for.

    config: saved as it is in config.json and every checkpoint; env: this process's place and
    device; backend: "torch" or "cupy", what ``config.cupy`` (None: auto) came to on this
    machine; name: the run folder's name under out_dir for a fresh run."""

    config: TrainConfig
    env: DistEnv
    backend: str
    name: str

    @property
    def device(self) -> torch.device:
        return self.env.device


def resolve_run(config: TrainConfig, env: DistEnv) -> ResolvedRun:
    """Write the choices made for this machine into the config: device, world size, amp dtype,
    T_max (cosalr: --epochs when not given), and an absolute local data path (a bare --resume
    then finds the store from anywhere); cupy stays as asked, its backend is resolved beside it.
    BackendUnavailableError when --cupy cannot run here."""
    device = env.device
    backend = resolve_backend(config, device)
    data = config.data if url_scheme(config.data) else os.path.abspath(config.data)  # a URL stays as typed
    resolved = dataclasses.replace(
        config, device=str(device), world_size=env.world_size, data=data,
        amp_dtype=config.resolved_amp_dtype(device.type),
        T_max=config.resolved_T_max() if config.lr_scheduler == "cosalr" else config.T_max)
    # named from the options as given (the seed's "_amp", not the dtype it resolved to here)
    name = config.run_name or dataclasses.replace(config, world_size=env.world_size).default_run_name()
    return ResolvedRun(resolved, env, backend, name)


def resolve_backend(config: TrainConfig, device: torch.device) -> str:
    """"torch" or "cupy". --cupy must work here (BackendUnavailableError otherwise); the presets'
    auto (cupy None) takes the CUDA kernels on a CUDA device when CuPy is installed, else torch."""
    if config.backend != "auto":
        check_backend(config.backend)
        return config.backend
    if device.type != "cuda" or config.net != "multistep":
        return "torch"
    try:
        check_backend("cupy")
    except BackendUnavailableError as exc:
        log.warning("torch neurons instead of the CUDA kernels: %s", exc)
        return "torch"
    return "cupy"


def cpu_has_bf16() -> bool | None:
    """Whether this CPU computes bf16 in hardware (x86 avx512_bf16 / amx_bf16, Arm bf16);
    None where /proc/cpuinfo does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith(("flags", "Features"))), None)
    except (OSError, IndexError):
        return None
    if flags is None:
        return None
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))


def _warn_slow_amp(config: TrainConfig, device: torch.device) -> None:
    """AMP on a CPU without bf16 hardware is emulated: say so once (the run still does what was asked).
    config: resolved (amp_dtype None means no AMP)."""
    if device.type != "cpu" or config.amp_dtype is None:
        return
    if config.amp_dtype == "fp16":
        log.warning("--amp fp16 on the CPU is emulated and usually slower than fp32; leave --amp out on CPU")
    elif cpu_has_bf16() is False:
        log.warning("--amp on this CPU (no avx512_bf16/amx_bf16) emulates bf16: expect it several times "
                    "slower than fp32; leave --amp out on CPU")


def _summary(history: list[dict[str, Any]], run_dir: Path, fingerprint: str) -> dict[str, Any]:
    if not history:
        return {"run_dir": str(run_dir), "epochs": 0, "data_fingerprint": fingerprint}
    final = history[-1]
    best = max(history, key=lambda r: r["val_acc"] if r.get("val_acc") is not None else r["test_acc"])
    out = {"run_dir": str(run_dir), "epochs": len(history), "data_fingerprint": fingerprint,
           "max_test_acc": max(r["test_acc"] for r in history),
           "final_test_acc": final["test_acc"], "final_epoch": final["epoch"]}
    if final.get("val_acc") is not None:
        # accuracy-B of the PLIF paper: the test accuracy of the model chosen on validation.
        out.update(best_val_acc=best["val_acc"], best_val_epoch=best["epoch"],
                   test_acc_at_best_val=best["test_acc"])
    return out


def main(config: TrainConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or continue, with ``config.resume``) a training run; returns a summary dict.

    Writes into ``config.out_dir/<run name>/``: config.json, metrics.jsonl, curves.png,
    TensorBoard scalars, checkpoint_latest.pt and checkpoint_max.pt (chosen on validation
    accuracy when --val-fraction holds some out, else on test accuracy as the seed did). A
    resumed run continues in the folder its checkpoint is in and never writes anywhere else; the
    run holds a lock on its folder while it trains (a second writer is refused).

    ``config.threads`` sets torch's CPU threads for the run (restored afterwards).

    Under torchrun (WORLD_SIZE > 1) this is one rank of a DDP run: it joins the process group
    from the environment (and leaves it at the end), and only rank 0 writes files, logs epoch
    lines and calls ``on_epoch``; every rank returns the same summary.
    """
    config.validate()
    env = distributed.setup(config.device)
    threads = torch.get_num_threads()
    try:
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        return _run(config, env, on_epoch)
    finally:
        torch.set_num_threads(threads)
        distributed.teardown(env)


def _verify_store(config: TrainConfig) -> str:
    """Hash every file of the store against its manifest (and the expected fingerprint); on a
    URL this is also the download into the machine's cache. Returns the fingerprint."""
    t0 = time.perf_counter()
    store = open_store(config.data, config.T, verify=True, expected_fingerprint=config.data_fingerprint)
    log.info("verified %s: %d files match fingerprint %s (%.1f s)", store.source,
             len(store.manifest["files"]), store.fingerprint, time.perf_counter() - t0)
    return store.fingerprint


# ----------------------------------------------------------------------------- the run's steps

def _run_dir(run: ResolvedRun) -> Path:
    """Where the run writes: the checkpoint's own folder on resume (an explicit run_name that
    names another folder is refused), else out_dir/<run_name or the default name>."""
    config = run.config
    if not config.resume:
        return Path(os.path.abspath(Path(config.out_dir) / run.name))
    folder = checkpoint_run_dir(config.resume)
    if config.run_name is not None:
        asked = Path(config.out_dir) / config.run_name
        if Path(os.path.realpath(asked)) != folder:
            raise ConfigError(f"{config.resume}: --run-name/--out-dir name {asked}, but the checkpoint "
                              f"belongs to the run in {folder}; a resumed run continues in its own "
                              f"folder (copy that folder to branch off)")
    return folder


def _previous_run(config: TrainConfig, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint to continue (checked against this run's resolved settings), or None for a
    fresh run."""
    # the run folder is an output of the protocol: never the store it reads or inside it, nor a
    # folder holding it or the --init checkpoint (a fresh start with --force removes checkpoints);
    # the folder itself is reused by design (force), its files are published one by one
    inputs = [*store_inputs(config.data)] + ([config.init] if config.init and not config.resume else [])
    check_output(run_dir, "training run", force=True, inputs=inputs, kind="dir", parent=False)
    if config.resume:
        ckpt = load_checkpoint(config.resume)
        check_resume(ckpt, config.resume, config)
        return ckpt
    resolve_store_path(config.data, config.T)  # a mistyped --data is said first, not masked by the next line
    if (run_dir / LATEST).exists() and not config.force:
        raise TrainError(f"{run_dir} already holds a run; continue it with --resume "
                         f"{run_dir / LATEST}, start over with --force, or pick --run-name")
    return None


def _load_data(run: ResolvedRun, ckpt: dict[str, Any] | None) -> tuple[Any, torch.Generator]:
    """Verify the store (once per machine), open it on every rank, agree on its fingerprint and
    check it against the checkpoint's. Seeds the run and returns (RunData, data-order generator)."""
    config, env = run.config, run.env
    # local rank 0 hashes every file (and downloads a URL into the cache once), then every rank
    # opens its local copy
    verified = distributed.local_main_first(env, lambda: _verify_store(config), lambda: None)
    torch.manual_seed(config.seed)
    data_gen = torch.Generator().manual_seed(config.seed)
    data = distributed.agree(env, lambda: load_run_data(
        config.data, T=config.T, batch_size=config.batch_size, device=env.device, preload=config.preload,
        val_fraction=config.val_fraction, seed=config.seed, workers=config.workers, generator=data_gen,
        rank=env.rank, world_size=env.world_size, local_world_size=env.local_world_size,
        expected_fingerprint=config.data_fingerprint))
    if verified is not None and data.fingerprint != verified:
        raise DataMismatchError(f"{config.data}: the store changed while it was opened "
                                f"(fingerprint {verified[:16]} became {data.fingerprint[:16]})")
    prints = distributed.all_gather_object(env, data.fingerprint)
    if len(set(prints)) > 1:
        other = next(r for r, fp in enumerate(prints) if fp != prints[0])
        err = DataMismatchError(f"{config.data}: rank {other} has a store with fingerprint {prints[other][:16]}, "
                                f"rank 0 one with {prints[0][:16]}: every machine must hold the same store")
        setattr(err, distributed.FAILED_RANK_ATTR, other)
        raise err
    log.info("data %s (fingerprint %s): %d train, %d val, %d test samples", config.data,
             data.fingerprint, data.train.n_samples, data.val.n_samples if data.val else 0,
             data.test.n_samples)
    check_spec_T(config.augment_spec(), data.store_T)      # crop/subsample fit the store's T
    if ckpt is not None:
        check_data(ckpt, config.resume, data.fingerprint, config.data)
    return data, data_gen


def _folder_run_id(run_dir: Path) -> str | None:
    """The run id in a folder's config.json; None when there is none. TrainError if unreadable."""
    path = run_dir / "config.json"
    if not path.exists():
        return None
    try:
        run_id = json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError, RecursionError) as exc:
        raise TrainError(f"{path}: unreadable run config ({type(exc).__name__}); "
                         f"not writing into a folder whose run is unknown") from exc
    return run_id if isinstance(run_id, str) else ""


def _claim_run_folder(held: contextlib.ExitStack, run_dir: Path, config: TrainConfig,
                      ckpt: dict[str, Any] | None) -> str:
    """Lock the run folder for this run (kept until ``held`` closes) and make sure it is this
    run's: a resumed run's folder holds its own run or nothing; a fresh run's holds no
    checkpoint unless --force. Returns the run id (new for a fresh run)."""
    held.enter_context(output_lock(run_dir, "training run"))
    clean_stale_temps(run_dir)
    found = _folder_run_id(run_dir)
    if ckpt is None:
        if (run_dir / LATEST).exists() and not config.force:
            raise TrainError(f"{run_dir} already holds a run; continue it with --resume "
                             f"{run_dir / LATEST}, start over with --force, or pick --run-name")
        return uuid.uuid4().hex
    run_id = ckpt["run"]["id"]
    latest = run_dir / LATEST
    if found is not None and found != run_id:
        raise TrainError(f"{run_dir} holds another run (id {found[:12] or 'unknown'}, the checkpoint's is "
                         f"{run_id[:12]}); a resumed run never writes into another run's folder")
    if found is None and latest.exists() and not os.path.samefile(latest, config.resume):
        raise TrainError(f"{run_dir} holds another run's {LATEST}; a resumed run never writes into "
                         f"another run's folder")
    if ckpt["run"]["dir"] != str(run_dir):
        log.info("run folder %s was moved here from %s", run_dir, ckpt["run"]["dir"])
    return run_id


def _build_training(run: ResolvedRun, data_gen: torch.Generator, ckpt: dict[str, Any] | None = None,
                    init: NetworkWeights | None = None) -> TrainingState:
    """Model (SyncBatchNorm when asked under DDP), optimizer, scheduler and fp16 GradScaler.
    ``init``: start from these weights (--init); Linear biases only for SpikingJelly's weights."""
    config, device = run.config, run.device
    linear_bias = has_linear_bias(ckpt["model"]) if ckpt is not None else bool(init and init.linear_bias)
    model = build_model(config.channels, config.net, config.neuron, run.backend, config.tau, linear_bias).to(device)
    if init is not None:
        load_weights(model, init)
        log.info("starting from the weights of %s (%s checkpoint)", config.init, init.source)
    if config.sync_bn and run.env.enabled:
        model = distributed.convert_sync_batchnorm(model, device)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler(device.type) if config.amp_dtype == "fp16" else None
    return TrainingState(model, optimizer, scheduler, scaler, data_gen)


def _start_run_folder(run_dir: Path, run: ResolvedRun, fresh: bool, run_id: str, fingerprint: str) -> None:
    """config.json with the resolved settings; a fresh start (--force) first removes the outputs
    of the run it replaces, so that nothing of it is left mixed with ours."""
    rc, backend = run.config, run.backend
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        for old in [run_dir / LATEST, run_dir / MAX, run_dir / "metrics.jsonl", run_dir / "curves.png",
                    *run_dir.glob("events.out.tfevents.*")]:
            old.unlink(missing_ok=True)
    write_json(run_dir / "config.json", {**rc.to_dict(), "run_id": run_id, "run_dir": str(run_dir),
                                         "backend": backend, "data_fingerprint": fingerprint,
                                         "version": __version__, "torch": torch.__version__})


# The dead-network warning (once per run, the first training epoch in which the output layer
# emitted no spike at all): the loss is then exactly 1/11 and the accuracy chance.
SILENT_OUTPUT = ("the output layer emitted no spike in training epoch %d (loss 1/11 = 0.0909, chance "
                 "accuracy): the network is silent at --lr %g, --channels %d and its loss cannot fall until it "
                 "spikes; a larger --lr (at --channels 8 on the synthetic release: 0.005 or more) or more "
                 "--channels usually helps")


FORECAST_BATCHES = 5      # batches timed, after the first (warm-up), before the forecast
FORECAST_SECONDS = 30.0   # ... or fewer, once they took this long (a slow CPU run says it sooner)


def duration_text(seconds: float) -> str:
    """A duration as people say it: 42 s, 12.5 min, 9.1 h, 3.2 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class RunForecast:
    """Times the first batches of a run's first epoch and logs, once, what the whole run will take
    at that pace: epochs x batches per epoch x seconds per batch. The first batch, which warms up
    kernels and caches, is not counted; the forecast comes after FORECAST_BATCHES more, or sooner
    once those took FORECAST_SECONDS; evaluation adds to it. Call it after each batch."""

    def __init__(self, epochs: int, batches: int, device: torch.device,
                 clock: Callable[[], float] = time.perf_counter):
        self.epochs, self.batches, self.device, self.clock = epochs, batches, device, clock
        self.at = min(FORECAST_BATCHES, batches - 1)   # the step after which to say it at the latest
        self.t0: float | None = None
        self.said: str | None = None

    def __call__(self, step: int) -> None:
        if self.said is not None or self.at < 1 or step > self.at:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)          # the batches are done, not only queued
        now = self.clock()
        if step == 0:
            self.t0 = now
            return
        if step < self.at and now - self.t0 < FORECAST_SECONDS:
            return
        per_batch = (now - self.t0) / step
        self.said = (f"projected time: about {duration_text(per_batch * self.batches * self.epochs)} for "
                     f"{self.epochs} epoch{'s' if self.epochs != 1 else ''} of {self.batches} batches "
                     f"({per_batch:.2f} s per batch over batches 2-{step + 1}; evaluation comes on top)")
        log.info("%s", self.said)


def _select(r: dict[str, Any]) -> float:
    """The number checkpoint_max.pt is chosen on: validation accuracy when held out, else test."""
    return r["val_acc"] if r.get("val_acc") is not None else r["test_acc"]


def _train_epochs(run: ResolvedRun, run_dir: Path, run_id: str, state: TrainingState, net: nn.Module,
                  data: Any, history: list[dict[str, Any]], start_epoch: int,
                  on_epoch: Callable[[dict[str, Any]], None] | None) -> None:
    """Epochs start_epoch..epochs-1: train, step the scheduler, evaluate, then (rank 0) save the
    checkpoints, metrics, curves and scalars of each epoch. net: the model as trained (DDP-wrapped
    under DDP)."""
    config, env = run.config, run.env
    model, optimizer, scheduler, scaler = state.model, state.optimizer, state.scheduler, state.scaler
    device, amp_dtype = env.device, config.amp_dtype
    best_so_far = max((_select(r) for r in history), default=-1.0)
    scalars = Scalars(run_dir, purge_step=start_epoch) if env.is_main else None
    progress = config.progress and env.is_main
    dist_env = env if env.enabled else None
    augment = config.augment_spec()
    cuda_rng = device if env.enabled and device.type == "cuda" else None
    warned_silent = False
    try:
        for epoch in range(start_epoch, config.epochs):
            if env.enabled:
                # each rank its own dropout masks, reproducible on resume whatever the world size was
                torch.manual_seed(distributed.rank_seed(config.seed, epoch, env.rank))
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            forecast = RunForecast(config.epochs - start_epoch, len(data.train), device) \
                if epoch == start_epoch and env.is_main else None
            train = train_one_epoch(net, data.train, optimizer, device, scaler=scaler,
                                    amp_dtype=amp_dtype, progress=progress, dist_env=dist_env,
                                    augment=augment, seed=config.seed, epoch=epoch, on_batch=forecast)
            if train["output_rate"] == 0 and not warned_silent and env.is_main:
                warned_silent = True            # once per run: every rank has the same (reduced) rate
                log.warning(SILENT_OUTPUT, epoch, config.lr, config.channels)
            if scheduler is not None:
                scheduler.step()
            distributed.broadcast_buffers(env, model)
            val = evaluate(model, data.val, device, amp_dtype=amp_dtype, dist_env=dist_env) if data.val else None
            test = evaluate(model, data.test, device, amp_dtype=amp_dtype, progress=progress, dist_env=dist_env)
            record = {
                "epoch": epoch, "lr": lr,
                "train_loss": train["loss"], "train_acc": train["acc"],
                "val_loss": val["loss"] if val else None, "val_acc": val["acc"] if val else None,
                "test_loss": test["loss"], "test_acc": test["acc"],
                "max_test_acc": max([test["acc"]] + [r["test_acc"] for r in history]),
                "epoch_seconds": time.perf_counter() - t0,
                "train_samples_per_s": train["samples_per_s"],
            }
            if env.enabled:
                # rank 0's clock, so every rank keeps the same history
                record["epoch_seconds"], record["train_samples_per_s"] = distributed.on_main(
                    env, lambda: (record["epoch_seconds"], record["train_samples_per_s"]))
            history.append(record)
            improved = _select(record) > best_so_far
            best_so_far = max(best_so_far, _select(record))
            if not env.is_main:
                continue
            payload = make_payload(state, epoch=epoch, config=config, data_fingerprint=data.fingerprint,
                                   history=history, run_id=run_id, run_dir=run_dir, cuda_device=cuda_rng)
            save_checkpoint(run_dir / LATEST, payload)
            if improved:
                save_checkpoint(run_dir / MAX, payload)
            write_metrics(run_dir / "metrics.jsonl", history)
            write_curves(run_dir / "curves.png", history)
            scalars.add(record)
            if on_epoch is not None:
                on_epoch(record)
            else:
                log.info("%s", epoch_line(record))
    finally:
        if scalars is not None:
            scalars.close()


def _run(config: TrainConfig, env: DistEnv, on_epoch: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True    # shapes are fixed: pick the fastest conv once
    run = resolve_run(config, env)
    config = run.config                          # from here on only the resolved config exists
    _warn_slow_amp(config, env.device)
    if env.enabled:
        log.info("DDP over %d processes: -b %d per process, global batch %d%s", env.world_size,
                 config.batch_size, config.global_batch_size, ", SyncBatchNorm" if config.sync_bn else "")
    # rank 0 reads the checkpoint and hands it over: other machines need not see the file
    run_dir, ckpt = distributed.on_main(env, lambda: (lambda d: (d, _previous_run(config, d)))(_run_dir(run)))
    # --init: a new run from a checkpoint's weights (ours or SpikingJelly's), checked before any work
    init = distributed.on_main(env, lambda: read_init_weights(
        config.init, config.channels, config.net, config.neuron, config.tau)) if config.init and ckpt is None else None
    data, data_gen = _load_data(run, ckpt)
    with contextlib.ExitStack() as held:
        # the folder is locked only once the store checked out: a refused store writes nothing
        run_id = distributed.on_main(env, lambda: _claim_run_folder(held, run_dir, config, ckpt))
        state = _build_training(run, data_gen, ckpt, init)
        history: list[dict[str, Any]] = []
        start_epoch = 0
        if ckpt is not None:
            history, start_epoch = restore_state(ckpt, config.resume, state, data_only_rng=env.enabled)
            log.info("resuming from %s after epoch %d", config.resume, ckpt["epoch"])
        net = distributed.wrap_model(env, state.model)     # DDP: rank 0's weights go to every rank
        if env.is_main:
            _start_run_folder(run_dir, run, ckpt is None, run_id, data.fingerprint)
        if start_epoch >= config.epochs:
            log.info("checkpoint already at epoch %d of %d; nothing to train", start_epoch - 1, config.epochs)
        else:
            _train_epochs(run, run_dir, run_id, state, net, data, history, start_epoch, on_epoch)
        distributed.barrier(env)        # the run's files are complete when any rank returns
    return _summary(history, run_dir, data.fingerprint)


def evaluate_checkpoint(checkpoint: str, data: str, *, split: str = "test", device: str | None = None,
                        batch_size: int | None = None, workers: int = 0,
                        preload: str = "auto") -> dict[str, Any]:
    """Evaluate a checkpoint's model on one split of a store: loss, acc, confusion [11, 11].

    The checkpoint is ours or a SpikingJelly DVSGestureNet one (the seed tutorial's; any T)."""
    net = load_network(checkpoint)
    dev = resolve_device(device)
    T = store_T(data, net.weights)     # a SpikingJelly checkpoint records no T
    # opened without a T check, to say what dvsg-eval (which has no -T) needs
    store = open_store(resolve_store_path(data, T, why=f"T={T}, what {checkpoint} was trained with"))
    if T is not None and store.T != T:
        raise DataMismatchError(f"{data}: store has T={store.T} frames per sample, but {checkpoint} was trained "
                                f"with T={T}; evaluate it on a store made with dvsprep frames -T {T}")
    data = str(store.path)
    if net.weights.data_fingerprint is not None and store.fingerprint != net.weights.data_fingerprint:
        log.warning("%s was trained on a store with another fingerprint than %s", checkpoint, data)
    sp = store.split(split)
    batch_size = batch_size or net.weights.batch_size
    feed = choose_feed(data, (sp,), preload, dev, workers=workers)
    check_eval_memory(checkpoint, store.T, min(batch_size, max(1, len(sp))), net.weights.channels, dev)
    batches = feed.batches(sp, batch_size)
    model = net.model.to(dev)
    result = evaluate(model, batches, dev)
    result.update(epoch=net.weights.epoch, split=split, config={**net.config, "T": store.T},
                  source=net.weights.source)
    return result
