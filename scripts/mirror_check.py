"""Is the mirror's label map right? Train without mirroring, then classify mirrored test samples.

On the synthetic release a person's right hand appears on the image's left and circles have a
screen sense, as on the real one. A network trained WITHOUT mirroring (no --augment) is asked
about the test samples mirrored (x -> W-1-x). If `dvsprep.constants.MIRROR_LABEL` is right, it
names a mirrored sample's mirrored label about as often as it names a plain sample's label, and
on the swapped classes (right/left hand wave, right/left arm circles) it names the unmirrored
label about as rarely as chance. Prints:

  plain test accuracy                          (the network's own accuracy)
  mirrored, against MIRROR_LABEL[label]        (all 11 classes)
  swapped classes, mirrored: vs mirrored labels / vs unmirrored labels / plain accuracy on them

    python scripts/mirror_check.py [--store frames_T8_number.zarr] [-T 8] [--epochs 12] [--channels 8]

Without --store it writes a small synthetic release into a temporary folder and makes its
frame store first (dvsprep synth, convert, frames). About 3-6 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dvsprep.constants import GESTURE_NAMES, MIRROR_LABEL, N_CLASSES

SWAPPED = tuple(c for c in range(N_CLASSES) if MIRROR_LABEL[c] != c)     # 1, 2, 3, 4, 5, 6


def mirror_frames(frames: np.ndarray) -> np.ndarray:
    """Frames [..., H, W] seen in a mirror: x -> W-1-x."""
    return np.ascontiguousarray(frames[..., ::-1])


def mirror_scores(plain: np.ndarray, mirrored: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracies from predicted classes [N] on the plain and on the mirrored samples, labels [N].

    plain: share of plain samples classified as their label; mirrored_vs_mirror_label: share of
    mirrored samples classified as MIRROR_LABEL[label]; on the classes the mirror swaps (SWAPPED):
    swapped_plain, swapped_vs_mirror_label, swapped_vs_label (the mirrored sample classified as
    its unmirrored label: what a flip without relabelling teaches); swapped_n samples."""
    plain, mirrored, labels = (np.asarray(a, dtype=np.int64) for a in (plain, mirrored, labels))
    mapped = np.asarray(MIRROR_LABEL, dtype=np.int64)[labels]
    sw = np.isin(labels, SWAPPED)
    share = lambda hit, sel: float(hit[sel].mean()) if sel.any() else float("nan")
    every = np.ones(len(labels), dtype=bool)
    return {"plain": share(plain == labels, every),
            "mirrored_vs_mirror_label": share(mirrored == mapped, every),
            "swapped_plain": share(plain == labels, sw),
            "swapped_vs_mirror_label": share(mirrored == mapped, sw),
            "swapped_vs_label": share(mirrored == labels, sw),
            "swapped_n": int(sw.sum())}


def predict(model: torch.nn.Module, frames: np.ndarray, batch: int = 16) -> np.ndarray:
    """Classes [N] of integer frames [N, T, 2, H, W] (eval mode, CPU)."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            x = torch.from_numpy(frames[i:i + batch]).transpose(0, 1).float()
            out.append(model(x).argmax(1).numpy())
    return np.concatenate(out)


def make_store(work: Path, T: int, seed: int) -> Path:
    """synthetic release -> events -> frames_T<T>_number.zarr under ``work``."""
    from click.testing import CliRunner

    from dvsprep.cli import main as dvsprep

    for args in (["synth", str(work / "raw"), "--seed", str(seed)],
                 ["convert", str(work / "raw"), "-o", str(work / "data")],
                 ["frames", "-T", str(T), "-d", str(work / "data")]):
        res = CliRunner().invoke(dvsprep, args)
        if res.exit_code != 0:
            raise SystemExit(f"dvsprep {' '.join(args)} failed: {res.output.strip()}")
    return work / "data" / f"frames_T{T}_number.zarr"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="an existing frame store (else a small synthetic one is made)")
    ap.add_argument("-T", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("-b", "--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from dvsg_train import TrainConfig, train
    from dvsg_train.data import open_store
    from dvsg_train.export.network import load_network

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = args.store or make_store(Path(tmp), args.T, args.seed)
        summary = train(TrainConfig(data=str(store), out_dir=str(Path(tmp) / "runs"), T=args.T,
                                    batch_size=args.batch_size, epochs=args.epochs, channels=args.channels,
                                    lr=args.lr, device="cpu", workers=0, seed=args.seed))
        model = load_network(f"{summary['run_dir']}/checkpoint_latest.pt").model
        test = open_store(store, args.T).split("test")
        frames, labels = test.load_all(), test.labels
        r = mirror_scores(predict(model, frames), predict(model, mirror_frames(frames)), labels)
        seconds = time.perf_counter() - t0
    names = ", ".join(f"{GESTURE_NAMES[c]} <-> {GESTURE_NAMES[MIRROR_LABEL[c]]}" for c in SWAPPED
                      if c < MIRROR_LABEL[c])
    print(f"trained without mirroring: T {args.T}, channels {args.channels}, {args.epochs} epochs, "
          f"lr {args.lr}, seed {args.seed}; {len(labels)} test samples ({seconds:.0f} s)")
    print(f"plain test accuracy                               {r['plain']:.3f}")
    print(f"mirrored test samples vs MIRROR_LABEL[label]      {r['mirrored_vs_mirror_label']:.3f}")
    print(f"swapped classes ({r['swapped_n']} samples: {names}):")
    print(f"  plain samples vs their labels                   {r['swapped_plain']:.3f}")
    print(f"  mirrored samples vs mirrored labels             {r['swapped_vs_mirror_label']:.3f}")
    print(f"  mirrored samples vs unmirrored labels           {r['swapped_vs_label']:.3f}   (chance {1 / N_CLASSES:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
