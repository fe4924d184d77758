"""Is the synthetic release learnable, and does it need time? A numpy-only check.

Softmax regression on three feature sets of every sample (T frames split by event count, as
SpikingJelly's `integrate_events_by_fixed_frames_number`, pooled to 16x16):
  (a) time-summed counts [2, 16, 16]: no time information;
  (b) T-frame counts [T, 2, 16, 16];
  (c) the model of (b) evaluated on the test frames in reversed time order.
It reports test accuracy over all 11 classes and the within-pair accuracy of the four arm
circles (clockwise vs counter-clockwise of the same arm; chance 50 %). Summed counts should
leave the pairs at chance, T frames should separate them, and reversing time should flip them.

    python scripts/synth_learnability.py [--release DIR] [-T 16] [--users 6 --test-users 2]

Without --release it writes a small synthetic release into a temporary folder first.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dvsprep.constants import N_CLASSES
from dvsprep.raw import cut_samples, list_recordings, open_release, parse_labels, read_aedat

POOL = 8                     # 128 / 8 = 16x16 features per polarity
PAIRS = ((3, 4), (5, 6))     # labels (0-based) of right-arm and left-arm CW / CCW


def frames_by_number(x: np.ndarray, y: np.ndarray, p: np.ndarray, T: int) -> np.ndarray:
    """Events of one sample -> counts float [T, 2, 128 // POOL, 128 // POOL]; frame i takes events
    [i*di, (i+1)*di), the last frame also the remainder (di = N // T)."""
    n = x.shape[0]
    di = n // T
    frame = np.minimum(np.arange(n) // max(di, 1), T - 1) if di else np.full(n, T - 1)
    side = 128 // POOL
    flat = ((frame * 2 + p) * side + y // POOL) * side + x // POOL
    return np.bincount(flat, minlength=T * 2 * side * side).reshape(T, 2, side, side).astype(np.float64)


def load(release: Path, T: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (frames float [N, T, 2, 16, 16], labels int [N])."""
    out: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for rec in list_recordings(release):
        ev = read_aedat(rec.aedat)
        rows = parse_labels(rec.labels)
        for part, label in zip(cut_samples(ev.t, rows), rows.label.tolist()):
            out[rec.split][0].append(frames_by_number(ev.x[part].astype(np.int64), ev.y[part].astype(np.int64),
                                                      ev.p[part].astype(np.int64), T))
            out[rec.split][1].append(label)
    return {s: (np.stack(f), np.array(lab)) for s, (f, lab) in out.items()}


def features(frames: np.ndarray) -> np.ndarray:
    """Counts -> shares of the sample's events (removes the event-rate differences), flattened."""
    flat = frames.reshape(frames.shape[0], -1)
    return flat / np.maximum(flat.sum(axis=1, keepdims=True), 1.0)


def fit_softmax(X: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 500, lr: float = 0.5):
    """Full-batch gradient descent on the mean cross-entropy + l2/2 |W|^2; returns (W, b, mean, std)."""
    mu, sd = X.mean(axis=0), X.std(axis=0) + 1e-6
    Z = (X - mu) / sd
    n, d = Z.shape
    W = np.zeros((d, N_CLASSES))
    b = np.zeros(N_CLASSES)
    Y = np.eye(N_CLASSES)[y]
    for _ in range(steps):
        logits = Z @ W + b
        logits -= logits.max(axis=1, keepdims=True)
        P = np.exp(logits)
        P /= P.sum(axis=1, keepdims=True)
        G = (P - Y) / n
        W -= lr * (Z.T @ G + l2 * W)
        b -= lr * G.sum(axis=0)
    return W, b, mu, sd


def scores(model, X: np.ndarray) -> np.ndarray:
    W, b, mu, sd = model
    return ((X - mu) / sd) @ W + b


def report(name: str, s: np.ndarray, y: np.ndarray) -> dict[str, float]:
    acc = float((s.argmax(axis=1) == y).mean())
    right = total = 0
    for a, b in PAIRS:
        for c, other in ((a, b), (b, a)):
            sel = y == c
            right += int((s[sel, c] > s[sel, other]).sum())
            total += int(sel.sum())
    pair = right / max(total, 1)
    print(f"{name:<38} accuracy {acc:6.1%}   CW-vs-CCW pair accuracy {pair:6.1%} ({total} samples)")
    return {"accuracy": acc, "pair_accuracy": pair}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--release", type=Path, help="existing release (folder holding DvsGesture/ or DvsGesture/)")
    ap.add_argument("-T", type=int, default=16)
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--test-users", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw = args.release
        if raw is None:
            from dvsprep.raw import write_release

            t0 = time.perf_counter()
            summary = write_release(tmp, users=args.users, test_users=args.test_users, seed=args.seed)
            print(f"synthetic release: {summary.samples} samples, {summary.events:,} events, "
                  f"{time.perf_counter() - t0:.1f} s")
            raw = Path(tmp)
        with open_release(raw) as release:
            data = load(release, args.T)
    (Ftr, ytr), (Fte, yte) = data["train"], data["test"]
    print(f"T = {args.T}; train {len(ytr)} samples, test {len(yte)} samples; features pooled to 16x16")
    summed = fit_softmax(features(Ftr.sum(axis=1)), ytr)
    report("(a) time-summed counts", scores(summed, features(Fte.sum(axis=1))), yte)
    framed = fit_softmax(features(Ftr), ytr)
    report(f"(b) {args.T} frames", scores(framed, features(Fte)), yte)
    report(f"(c) {args.T} frames, test time-reversed", scores(framed, features(Fte[:, ::-1])), yte)
    return 0


if __name__ == "__main__":
    sys.exit(main())
