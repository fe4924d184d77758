"""TrainConfig: everything a training run depends on. The CLI only builds one of these."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ExportError

if TYPE_CHECKING:
    from .augment_spec import AugmentSpec

# The choices of dvsg-train's options live here, with no torch import, so that --help and usage
# errors return at once (model.py uses NETS and NEURONS from here).
NETS = ("multistep", "stepwise")
NEURONS = ("lif", "plif")
OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("cosalr", "steplr", "none")
PRELOAD = ("auto", "cpu", "gpu", "none")
AMP_DTYPES = ("fp16", "bf16")

# Fields that change the numbers a run produces: a checkpoint only resumes a run that agrees
# on all of them. (epochs may grow; device, workers, paths and preload do not change results.)
# batch_size stands for the global batch, batch_size * world_size: a run may resume on another
# number of processes when -b x processes stays the same (see `resume_key`).
RESUME_FIELDS = ("T", "batch_size", "channels", "net", "neuron", "tau", "opt", "lr", "momentum",
                 "lr_scheduler", "step_size", "gamma", "T_max", "amp", "amp_dtype", "seed",
                 "val_fraction", "augment")
# Fields that fix the model's shape: dvsg-eval needs these from a checkpoint.
MODEL_FIELDS = ("channels", "net", "neuron", "tau")
# Fields a bare --resume takes from the checkpoint besides RESUME_FIELDS: they do not change the
# numbers of a run's epochs (or, like cupy and threads, only within rounding), but a resumed run
# keeps them unless they are given again.
CARRIED_FIELDS = ("epochs", "data", "data_fingerprint", "cupy", "threads", "sync_bn", "preset")
MAX_LR = 1e3                       # no optimizer here trains with a step beyond this
_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


def _in(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {rule}, got {value!r:.60}")


# Range rules of single fields: TrainConfig.validate applies them, and dvsg-train's options call
# them as they are parsed (`check_field`), so both refuse the same values in the same words.
FIELD_RULES = {
    "lr": lambda v: _in(0 < v <= MAX_LR, "lr", f"> 0 and at most {MAX_LR:g}", v),   # nan, inf too
    "momentum": lambda v: _in(0 <= v < 1, "momentum", "in [0, 1)", v),
    "gamma": lambda v: _in(0 < v < math.inf, "gamma", "a finite number > 0", v),
    "seed": lambda v: _in(0 <= v < 2 ** 64, "seed", "an integer in [0, 2**64)", v),
    "device": lambda v: _in(isinstance(v, str) and bool(_DEVICE.fullmatch(v)), "device",
                            "cpu, cuda or cuda:N", v),
}


def check_field(name: str, value: Any) -> None:
    """The range rule of field ``name`` (FIELD_RULES; None is always allowed): ConfigError."""
    rule = FIELD_RULES.get(name)
    if rule is not None and value is not None:
        rule(value)


# The types each field may hold (checked before use: a checkpoint's config comes from a file).
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}


@dataclass
class TrainConfig:
    """A training run. Units: lr per step; step_size, T_max in epochs; val_fraction of train."""

    data: str
    out_dir: str = "logs"
    T: int = 16
    batch_size: int = 16
    epochs: int = 64
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    channels: int = 128
    net: str = "multistep"
    neuron: str = "lif"
    tau: float = 2.0
    cupy: bool | None = False              # None: the CUDA kernels when the run is on CUDA (presets)
    amp: bool = False
    amp_dtype: str | None = None           # None: fp16 on CUDA, bf16 on CPU
    opt: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    lr_scheduler: str = "cosalr"
    step_size: int = 32
    gamma: float = 0.1
    T_max: int | None = None               # None: epochs
    device: str | None = None              # None: cuda when present, else cpu
    seed: int = 0
    preload: str = "auto"
    val_fraction: float = 0.0
    resume: str | None = None
    init: str | None = None                # start from these weights (ours or SpikingJelly's)
    run_name: str | None = None
    force: bool = False
    progress: bool = False
    sync_bn: bool = False                  # DDP: BatchNorm statistics over the global batch
    data_fingerprint: str | None = None    # the store must have this fingerprint (or prefix)
    world_size: int = 1                    # processes the run is spread over (set by the engine)
    threads: int = 1                       # torch CPU threads; 0: torch's default (one per core)
    preset: str | None = None              # the --preset the values came from (recorded only)
    augment: str = ""                      # --augment SPEC, canonical (AugmentSpec.text()); "": none

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all processes: -b x world size."""
        return self.batch_size * self.world_size

    def __post_init__(self) -> None:
        self.validate()

    def check_types(self) -> None:
        """Every field holds a value of its annotated type (bool is not an int, floats are finite)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = tuple(t for name in str(f.type).split("|") for t in _TYPES[name.strip()])
            if isinstance(value, bool) and bool not in allowed:
                allowed = ()
            if not isinstance(value, allowed):
                raise ConfigError(f"{f.name} must be {f.type}, got {type(value).__name__} {value!r:.60}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")

    def validate(self) -> None:
        self.check_types()

        def positive(name: str) -> None:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")

        for name in ("T", "batch_size", "epochs", "channels", "step_size", "world_size"):
            positive(name)
        if self.workers < 0:
            raise ConfigError(f"workers (-j) must be >= 0, got {self.workers}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        for name, allowed in (("net", NETS), ("neuron", NEURONS), ("opt", OPTIMIZERS),
                              ("lr_scheduler", SCHEDULERS), ("preload", PRELOAD)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.amp_dtype is not None and self.amp_dtype not in AMP_DTYPES:
            raise ConfigError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {self.amp_dtype!r}")
        for name in FIELD_RULES:
            check_field(name, getattr(self, name))
        if not self.tau > 1:
            raise ConfigError(f"tau must be > 1, got {self.tau}")
        if self.T_max is not None and self.T_max < 1:
            raise ConfigError(f"T_max must be >= 1, got {self.T_max}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.data_fingerprint is not None:
            fp = str(self.data_fingerprint).strip().lower()
            if not 12 <= len(fp) <= 64 or any(c not in "0123456789abcdef" for c in fp):
                raise ConfigError(f"data_fingerprint must be 12 to 64 hex digits (a store's sha256 "
                                  f"or its prefix), got {self.data_fingerprint!r}")
        self.augment = self.augment_spec().text()     # canonical: one spelling per augmentation
        if self.cupy and self.net != "multistep":
            raise ConfigError("--cupy runs the multi-step neurons; it cannot be used with --net stepwise")

    def augment_spec(self) -> "AugmentSpec":
        """The training augmentations (`dvsg_train.augment`); ConfigError for a bad --augment or
        time-step options that need more than T steps."""
        from .augment_spec import check_spec_T, parse_augment

        spec = parse_augment(self.augment)
        check_spec_T(spec, self.T)
        return spec

    @property
    def backend(self) -> str:
        """The neuron backend asked for: "cupy", "torch", or "auto" (cupy when on CUDA)."""
        return "auto" if self.cupy is None else "cupy" if self.cupy else "torch"

    def resolved_T_max(self) -> int:
        return self.epochs if self.T_max is None else self.T_max

    def resolved_amp_dtype(self, device_type: str) -> str | None:
        """None without AMP; otherwise fp16 (GradScaler) or bf16 (no scaler)."""
        if not self.amp:
            return None
        if self.amp_dtype is not None:
            return self.amp_dtype
        return "fp16" if device_type == "cuda" else "bf16"

    def default_run_name(self) -> str:
        """The seed's ``T16_b16_adam_lr0.001_c128[_amp]`` plus what we add to it (b: the global batch)."""
        name = f"T{self.T}_b{self.global_batch_size}_{self.opt}_lr{self.lr}_c{self.channels}"
        if self.neuron != "lif":
            name += f"_{self.neuron}"
        if self.net != "multistep":
            name += f"_{self.net}"
        if self.amp:
            name += "_amp" if self.amp_dtype is None else f"_amp{self.amp_dtype}"
        if self.cupy:
            name += "_cupy"
        if self.val_fraction:
            name += f"_val{self.val_fraction:g}"
        if self.sync_bn:
            name += "_syncbn"
        if self.augment:
            # mirror,translate=8,mixup=0.5 -> _aug-mirror-translate8-mixup0.5
            name += "_aug-" + self.augment.replace(",", "-").replace("=", "")
        return name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict (e.g. a checkpoint's); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def resume_key(self) -> dict[str, Any]:
        """The values that must agree between a checkpoint and the run that resumes it."""
        d = {k: getattr(self, k) for k in RESUME_FIELDS}
        # the global batch decides the sample order and the steps; how it is spread over
        # processes does not (beyond floating-point reduction order)
        del d["batch_size"]
        d["global_batch_size"] = self.global_batch_size
        d["T_max"] = self.resolved_T_max() if self.lr_scheduler == "cosalr" else None
        if self.lr_scheduler != "steplr":
            d["step_size"] = d["gamma"] = None
        if self.opt != "sgd":
            d["momentum"] = None
        return d


# Every field's default where it is a plain value: dvsg-train's options take theirs from here, so
# the CLI and the library (TrainConfig(...)) start from the same run. workers has none: its
# default (min(4, CPUs)) is computed when a TrainConfig is made, and the CLI leaves it to that.
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                            if f.default is not dataclasses.MISSING}


def check_dt(dt: float) -> float:
    """dvsg-export's time step rule (seconds per step): a finite number > 0; ExportError otherwise.
    Here, with no torch import, so that the CLI checks --dt before any work."""
    if not 0 < dt < math.inf:
        raise ExportError(f"dt must be a finite number of seconds > 0, got {dt!r}")
    return dt
