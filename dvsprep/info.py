"""`dvsprep info PATH`: what an events.h5 or a frame store holds."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .constants import N_CLASSES, SPLITS
from .frames import describe_frame_store
from .inputs import FRAME_STORE, InputKind, is_url, kind_of


def describe_events(path: str | os.PathLike) -> dict[str, Any]:
    """Summary of an events.h5: splits with sample/event counts per class, sizes, fingerprint."""
    from .events import EventsFile

    path = Path(path)
    with EventsFile(path) as ef:
        attrs = ef.attrs
        splits = {}
        for s in SPLITS:
            sp = ef.split(s)
            per_class = np.bincount(sp.labels, minlength=N_CLASSES) if len(sp) else np.zeros(N_CLASSES, int)
            splits[s] = {
                "n_samples": len(sp),
                "n_events": int(sp.offsets[-1]) if sp.offsets.size else 0,
                "n_recordings": len(set(sp.recordings)),
                "per_class": [int(c) for c in per_class],
            }
        return {
            "kind": "events",
            "path": str(path),
            "format": attrs.get("format"),
            "tool_version": attrs.get("tool_version"),
            "sensor_size": attrs.get("sensor_size"),
            "splits": splits,
            "n_invalid_dropped": attrs.get("n_invalid_dropped"),
            "size_bytes": path.stat().st_size,
            "fingerprint": ef.fingerprint,
        }


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Describe an events.h5 file or a frame store (directory, .zip, or http(s) URL)."""
    kind = kind_of(path, FRAME_STORE | {InputKind.EVENTS})
    if kind is InputKind.EVENTS:
        return describe_events(path)
    return describe_frame_store(str(path) if kind is InputKind.URL else Path(path))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_description(d: dict[str, Any]) -> list[str]:
    """Human-readable lines for `describe`'s dict."""
    url = d.get("source") if is_url(str(d.get("source"))) else None
    lines = [f"{url or d['path']}: {'events file' if d['kind'] == 'events' else 'frame store'} ({d['format']})"]
    if url:   # what the user asked about heads the lines; where it lies on this machine follows
        lines.append(f"  cached at {d['path']}")
    if d["kind"] == "frames":
        lines.append(f"  T={d['T']}  split_by={d['split_by']}  dtype={d['dtype']}  "
                     f"sensor={d['sensor_size'][0]}x{d['sensor_size'][1]}  codec={d.get('codec')}")
    else:
        lines.append(f"  tool_version={d['tool_version']}  sensor={d['sensor_size']}  "
                     f"invalid events dropped={d['n_invalid_dropped']}")
    for s, c in d["splits"].items():
        extra = f", {c['n_events']} events, {c['n_recordings']} recordings" if "n_events" in c else ""
        lines.append(f"  {s}: {c['n_samples']} samples{extra}")
        per = "  ".join(f"{k}:{n}" for k, n in enumerate(c["per_class"]))
        lines.append(f"    per class {per}")
    lines.append(f"  size on disk: {_size(d['size_bytes'])}")
    lines.append(f"  fingerprint: {d['fingerprint']}")
    if d.get("events_fingerprint"):
        lines.append(f"  from events: {d['events_fingerprint']}")
    return lines

