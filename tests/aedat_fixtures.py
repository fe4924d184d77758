"""Helpers that write tiny AEDAT files and releases for tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dvsprep.raw.aedat import header_bytes, polarity_packets, special_packet, write_aedat


def random_events(n: int, seed: int = 0, t0: int = 1_000, span: int = 1_000_000):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(t0, t0 + span, n)).astype(np.int64)
    x = rng.integers(0, 128, n).astype(np.uint8)
    y = rng.integers(0, 128, n).astype(np.uint8)
    p = rng.integers(0, 2, n).astype(np.uint8)
    return t, x, y, p


def write_recording(path: Path, t, x, y, p, *, events_per_packet: int = 97, specials: bool = True) -> None:
    pk = list(polarity_packets(t, x, y, p, events_per_packet=events_per_packet))
    if specials:
        pk.insert(1, special_packet(3, ts=int(t[0]) & 0x7FFFFFFF if len(t) else 0))
    write_aedat(path, pk)


def write_labels(path: Path, rows, crlf: bool = True) -> None:
    nl = "\r\n" if crlf else "\n"
    text = "class,startTime_usec,endTime_usec" + nl + "".join(f"{c},{s},{e}{nl}" for c, s, e in rows)
    path.write_bytes(text.encode())


def write_release(root: Path, recordings: dict[str, tuple], train: list[str], test: list[str]) -> Path:
    """recordings: stem -> (t, x, y, p, rows). Returns root/DvsGesture."""
    rel = root / "DvsGesture"
    rel.mkdir(parents=True)
    for i, (stem, (t, x, y, p, rows)) in enumerate(recordings.items()):
        write_recording(rel / f"{stem}.aedat", t, x, y, p)
        write_labels(rel / f"{stem}_labels.csv", rows, crlf=i % 2 == 0)
    (rel / "trials_to_train.txt").write_text("".join(f"{s}.aedat\r\n" for s in train))
    (rel / "trials_to_test.txt").write_text("".join(f"{s}.aedat\n" for s in test) + "\n")
    return rel


def small_release(root: Path) -> Path:
    """Three recordings: repeated classes, overlapping windows, an empty window, a lead-in."""
    recs = {}
    t, x, y, p = random_events(5000, seed=1, t0=100, span=2_000_000)
    recs["user01_lab"] = (t, x, y, p, [(1, 200_000, 500_000), (3, 500_000, 900_000), (3, 950_000, 1_300_000),
                                       (11, 1_400_000, 1_900_000)])
    t, x, y, p = random_events(4000, seed=2, t0=0, span=1_500_000)
    recs["user02_led"] = (t, x, y, p, [(2, 100_000, 600_000), (5, 550_000, 1_000_000), (7, 1_000_000, 1_000_000),
                                       (9, 1_100_000, 1_100_500)])
    t, x, y, p = random_events(3000, seed=3, t0=50, span=1_000_000)
    recs["user03_natural"] = (t, x, y, p, [(4, 0, 400_000), (6, 400_000, 1_000_100)])
    return write_release(root, recs, train=["user02_led", "user01_lab"], test=["user03_natural"])


__all__ = ["header_bytes", "random_events", "small_release", "write_labels", "write_recording", "write_release"]
