"""Compare finished (or running) runs: what `dvsg-report RUN_DIR...` prints and draws.

Pure functions over parsed run folders (no torch): `read_run` checks and parses a folder's
config.json and metrics.jsonl, `report_text` makes the table (one row per run with the settings
that differ between the runs, max and final test accuracy, accuracy at the best validation epoch,
seconds per epoch) and the mean +- std over seeds of the runs whose settings differ only in the
seed, and `write_report_png` overlays their curves.
"""
from __future__ import annotations

import json
import math
import stat
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dvsprep.atomic import publishing

from .errors import TrainError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
# the files a run folder holds that a report must never be written onto
RUN_FILES = (CONFIG, METRICS, "curves.png", "checkpoint_latest.pt", "checkpoint_max.pt")
MAX_CONFIG_BYTES = 1 << 20
MAX_METRICS_BYTES = 64 << 20
# config.json keys that name where and how a run was started, not what it computes: never shown
# as a difference, never used to group runs (the store is identified by data_fingerprint, the
# run by its folder)
NOT_SETTINGS = frozenset({"run_id", "run_dir", "run_name", "out_dir", "data", "resume", "force", "progress",
                          "workers", "preload"})
# what metrics.jsonl must hold in every record (numbers; val_* may be null)
_ACC = ("train_acc", "test_acc")
_NUM = ("train_loss", "test_loss", "epoch_seconds")


@dataclass
class Run:
    """One run folder as read: its config.json (a dict) and metrics.jsonl (one dict per epoch)."""

    path: str                         # as given on the command line
    config: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def has_val(self) -> bool:
        return self.records[0].get("val_acc") is not None

    @property
    def max_test_acc(self) -> float:
        return max(r["test_acc"] for r in self.records)

    @property
    def final_test_acc(self) -> float:
        return self.records[-1]["test_acc"]

    @property
    def best_val(self) -> dict[str, Any] | None:
        """The record of the first epoch with the highest validation accuracy (the one
        checkpoint_max.pt holds), or None without validation."""
        if not self.has_val:
            return None
        return max(self.records, key=lambda r: r["val_acc"])

    @property
    def seconds_per_epoch(self) -> float:
        return statistics.fmean(r["epoch_seconds"] for r in self.records)

    def settings(self) -> dict[str, Any]:
        """The config without NOT_SETTINGS: what decides the run's numbers."""
        return {k: v for k, v in self.config.items() if k not in NOT_SETTINGS}


def _read_text(path: Path, limit: int, what: str) -> str:
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):       # a FIFO or device would block or never end
            raise TrainError(f"{path}: not a regular file, not the run's {what}")
        size = st.st_size
        if size > limit:
            raise TrainError(f"{path}: {size} bytes, more than a dvsg-train {what} holds ({limit})")
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise TrainError(f"{path}: no such file (not a dvsg-train run folder, or no finished epoch yet)") from None
    except IsADirectoryError:
        raise TrainError(f"{path}: is a directory, not the run's {what}") from None
    except OSError as exc:
        raise TrainError(f"{path}: cannot read the run's {what} ({exc.strerror or exc})") from exc
    if len(raw) > limit:
        raise TrainError(f"{path}: more than a dvsg-train {what} holds ({limit} bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrainError(f"{path}: corrupt {what}: not UTF-8 text (byte {exc.start})") from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_record(r: Any, path: Path, line: int, epoch: int, val: bool | None) -> bool:
    """Check one metrics record; returns whether it holds validation numbers."""
    where = f"{path}: line {line}"
    if not isinstance(r, dict):
        raise TrainError(f"{where}: corrupt metrics: not a JSON object")
    if r.get("epoch") != epoch or not isinstance(r.get("epoch"), int) or isinstance(r.get("epoch"), bool):
        raise TrainError(f"{where}: corrupt metrics: epoch {r.get('epoch')!r:.40}, expected {epoch}")
    for key in _ACC + _NUM:
        v = r.get(key)
        if not _number(v):
            raise TrainError(f"{where}: corrupt metrics: {key} is {v!r:.40}, not a number")
    for key in _ACC:
        if not 0 <= r[key] <= 1:
            raise TrainError(f"{where}: corrupt metrics: {key} {r[key]!r} outside [0, 1]")
    if not r["epoch_seconds"] >= 0 or math.isinf(r["epoch_seconds"]):
        raise TrainError(f"{where}: corrupt metrics: epoch_seconds {r['epoch_seconds']!r}")
    has_val = r.get("val_acc") is not None
    if has_val and not (_number(r["val_acc"]) and 0 <= r["val_acc"] <= 1):
        raise TrainError(f"{where}: corrupt metrics: val_acc is {r['val_acc']!r:.40}, not an accuracy")
    if val is not None and has_val != val:
        raise TrainError(f"{where}: corrupt metrics: validation accuracy in some epochs only")
    return has_val


def read_run(run_dir: str | Path) -> Run:
    """Read and check RUN_DIR/config.json and RUN_DIR/metrics.jsonl (TrainError naming the file:
    missing, unreadable, not JSON, not what dvsg-train writes)."""
    given = str(run_dir)
    folder = Path(run_dir)
    if not folder.is_dir():
        raise TrainError(f"{given}: no such run folder" if not folder.exists()
                         else f"{given}: not a run folder (give the folder that holds {CONFIG} and {METRICS})")
    cpath, mpath = folder / CONFIG, folder / METRICS
    try:
        config = json.loads(_read_text(cpath, MAX_CONFIG_BYTES, "run config"))
    except (ValueError, RecursionError) as exc:
        raise TrainError(f"{cpath}: corrupt run config: not JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise TrainError(f"{cpath}: corrupt run config: not a JSON object")
    bad = next((k for k, v in config.items() if not isinstance(v, (str, int, float, bool, type(None)))), None)
    if bad is not None:
        raise TrainError(f"{cpath}: corrupt run config: {bad} is not a plain value")
    seed = config.get("seed")
    if "seed" in config and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TrainError(f"{cpath}: corrupt run config: seed is {seed!r:.40}, not an integer")
    records: list[dict[str, Any]] = []
    val = None
    text = _read_text(mpath, MAX_METRICS_BYTES, "metrics")
    for line, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            if line < text.count("\n") + 1:
                raise TrainError(f"{mpath}: line {line}: corrupt metrics: empty line")
            continue
        try:
            r = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise TrainError(f"{mpath}: line {line}: corrupt metrics: not JSON ({type(exc).__name__})") from None
        val = _check_record(r, mpath, line, len(records), val)
        records.append(r)
    if not records:
        raise TrainError(f"{mpath}: no finished epoch in the metrics")
    return Run(given, config, records)


def read_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """`read_run` of each; a folder given twice is an error (TrainError)."""
    seen: dict[str, str] = {}
    runs = []
    for d in run_dirs:
        run = read_run(d)
        key = str(Path(d).resolve())
        if key in seen:
            raise TrainError(f"{d}: the same run folder as {seen[key]}, given twice")
        seen[key] = str(d)
        runs.append(run)
    return runs


def run_files(run_dirs: Sequence[str | Path]) -> list[Path]:
    """The files of the run folders a report must not be written onto (the report's inputs)."""
    return [Path(d) / name for d in run_dirs for name in RUN_FILES]


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """The settings (config keys but NOT_SETTINGS) whose values are not the same in every run,
    sorted; a key missing from some runs counts as differing."""
    settings = [r.settings() for r in runs]
    keys = sorted({k for s in settings for k in s})
    return [k for k in keys
            if len({json.dumps(s[k], sort_keys=True) if k in s else "<missing>" for s in settings}) > 1]


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if v == "":
        return "none"       # an empty option (e.g. augment: no augmentation), not a blank cell
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and len(v) > 24:       # a fingerprint or a path: its start tells them apart
        return v[:16] + "..."
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std None for a single value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _mean_std_text(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.4f}" + (" (n=1, no std)" if std is None else f" +- {std:.4f}")


def groups(runs: Sequence[Run]) -> list[list[Run]]:
    """The runs grouped by their settings without the seed (runs that differ only in the seed),
    in the order of first appearance."""
    out: dict[str, list[Run]] = {}
    for r in runs:
        key = json.dumps({k: v for k, v in r.settings().items() if k != "seed"}, sort_keys=True)
        out.setdefault(key, []).append(r)
    return list(out.values())


def report_text(runs: Sequence[Run]) -> str:
    """The table of `dvsg-report`: one row per run, then mean +- std per group of seeds."""
    keys = differing_keys(runs)
    val = any(r.has_val for r in runs)
    header = ["run", *keys, "epochs", "max test", "final test"]
    if val:
        header += ["best val", "test at best val"]
    header.append("s/epoch")
    rows = []
    for r in runs:
        s = r.settings()
        total = r.config.get("epochs")
        done = str(len(r.records)) + (f"/{total}" if isinstance(total, int) and total != len(r.records) else "")
        row = [r.path, *(_value(s.get(k)) if k in s else "(none)" for k in keys), done,
               f"{r.max_test_acc:.4f}", f"{r.final_test_acc:.4f}"]
        if val:
            b = r.best_val
            row += [f"{b['val_acc']:.4f} (epoch {b['epoch']})", f"{b['test_acc']:.4f}"] if b else ["-", "-"]
        row.append(f"{r.seconds_per_epoch:.1f}")
        rows.append(row)
    lines = _table(header, rows)
    shown = [k for k in keys if k != "seed"]
    lines += ["", "over seeds (mean +- sample std):"]
    head = ["runs", "seeds", "max test", "final test"] + (["test at best val"] if val else [])
    grows = []
    for g in groups(runs):
        s = g[0].settings()
        label = ", ".join(f"{k}={_value(s.get(k)) if k in s else '(none)'}" for k in shown) or "all runs"
        row = [f"{label} (n={len(g)})", ",".join(_value(r.config.get("seed")) for r in g),
               _mean_std_text([r.max_test_acc for r in g]), _mean_std_text([r.final_test_acc for r in g])]
        if val:
            row.append(_mean_std_text([r.best_val["test_acc"] for r in g]) if all(r.has_val for r in g) else "-")
        grows.append(row)
    lines += _table(head, grows)
    return "\n".join(lines)


def write_report_png(path: Path, runs: Sequence[Run], *, force: bool) -> None:
    """PNG overlaying every run's test accuracy (left) and train (dashed) / test loss (right) per
    epoch, published through the output protocol (refuses an existing file without ``force``
    and any of the runs' own files)."""
    from .report import _pyplot

    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        epochs = [x["epoch"] for x in r.records]
        label = Path(r.path).name or r.path
        ax_acc.plot(epochs, [x["test_acc"] for x in r.records], color=color, label=label)
        ax_loss.plot(epochs, [x["test_loss"] for x in r.records], color=color, label=f"{label} test")
        ax_loss.plot(epochs, [x["train_loss"] for x in r.records], color=color, linestyle="--",
                     label=f"{label} train")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy", ylim=(0, 1))
    ax_loss.set(xlabel="epoch", ylabel="MSE loss", title="loss (dashed: train)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    try:
        with publishing(path, "report", force=force, inputs=run_files([r.path for r in runs])) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
