"""What a run leaves for people: the per-epoch line, metrics.jsonl, curves, confusion matrices."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dvsprep.constants import GESTURE_NAMES

from dvsprep.atomic import publishing

from .errors import TrainError

log = logging.getLogger(__name__)


def epoch_line(r: dict[str, Any]) -> str:
    """The seed's per-epoch line, plus validation (when held out), time and throughput."""
    line = (f"epoch = {r['epoch']}, train_loss ={r['train_loss']: .4f}, train_acc ={r['train_acc']: .4f}, ")
    if r.get("val_acc") is not None:
        line += f"val_loss ={r['val_loss']: .4f}, val_acc ={r['val_acc']: .4f}, "
    line += (f"test_loss ={r['test_loss']: .4f}, test_acc ={r['test_acc']: .4f}, "
             f"max_test_acc ={r['max_test_acc']: .4f}, epoch_time ={r['epoch_seconds']: .1f} s, "
             f"train speed ={r['train_samples_per_s']: .1f} samples/s")
    return line


def check_output_file(path: Path) -> None:
    """Refuse at once (TrainError naming ``path``) an output file that cannot be written: its
    folder is missing or not a writable folder, or ``path`` is a folder."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise TrainError(f"{path}: is a directory, not a file to write")
    if not parent.is_dir():
        raise TrainError(f"{path}: no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainError(f"{path}: directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise TrainError(f"{path}: file is not writable")


# The files of a run folder are rewritten whole every epoch, by design (force=True); each still
# goes through the output protocol: locked, written aside, renamed, one line on a full disk.

def write_metrics(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """metrics.jsonl: one JSON object per finished epoch (rewritten whole, so resume truncates)."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
    with publishing(path, "metrics", force=True) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    with publishing(path, "run settings", force=True) as tmp:
        tmp.write_text(text)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_curves(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """PNG with loss (left) and accuracy (right) per epoch for train, val (if any) and test."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val", "test"):
        if history and history[0].get(f"{split}_acc") is not None:
            ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], label=split)
            ax_acc.plot(epochs, [r[f"{split}_acc"] for r in history], label=split)
    ax_loss.set(xlabel="epoch", ylabel="MSE loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        with publishing(path, "curves", force=True) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """confusion [C, C] (rows = true class) -> accuracy per class [C] (nan for absent classes)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    totals = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(confusion) / totals, np.nan)


def confusion_text(confusion: np.ndarray, names: Sequence[str] = GESTURE_NAMES) -> str:
    """Per-class accuracy table and the confusion matrix (rows true, columns predicted)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    acc = per_class_accuracy(confusion)
    width = max(len(n) for n in names)
    lines = ["per-class accuracy:"]
    for i, name in enumerate(names):
        a = "   n/a" if np.isnan(acc[i]) else f"{acc[i]:6.3f}"
        lines.append(f"  {i:2d} {name:<{width}} {a}  ({confusion[i, i]}/{confusion[i].sum()})")
    cell = max(4, len(str(confusion.max())) + 1)
    lines.append("confusion matrix (rows: true class, columns: predicted):")
    lines.append(" " * 5 + "".join(f"{j:>{cell}d}" for j in range(len(names))))
    for i in range(len(names)):
        lines.append(f"  {i:2d} " + "".join(f"{v:>{cell}d}" for v in confusion[i]))
    return "\n".join(lines)


def write_confusion_png(path: Path, confusion: np.ndarray, title: str,
                        names: Sequence[str] = GESTURE_NAMES) -> None:
    """Draw the confusion matrix as a PNG into `path` as given: the caller publishes it
    (dvsg-eval passes the temporary of its `publishing`, held for the whole evaluation)."""
    plt = _pyplot()
    confusion = np.asarray(confusion, dtype=np.int64)
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, labels=names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels=names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    high = confusion.max() / 2 if confusion.size else 0
    for i in range(confusion.shape[0]):
        for j in range(confusion.shape[1]):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if confusion[i, j] > high else "black")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


class Scalars:
    """TensorBoard scalars; quietly absent (one warning) when tensorboard is not installed."""

    def __init__(self, log_dir: Path, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            log.warning("TensorBoard scalars not written (%s); pip install tensorboard", exc)
            self._writer = None
            return
        self._writer = SummaryWriter(os.fspath(log_dir), purge_step=purge_step)

    def add(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and value is not None:
                self._writer.add_scalar(key, value, record["epoch"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
