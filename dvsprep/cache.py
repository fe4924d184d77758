"""The per-user cache folder dvsprep keeps its downloads (``stores/``, `dvsprep.frames.remote`)
and verified-markers (``verified/``, `dvsprep.integrity.trust`) in: the one place that decides
where they live."""
from __future__ import annotations

import os
from pathlib import Path

STORES_DIR = "stores"       # downloaded stores, one folder per URL
MARKERS_DIR = "verified"    # markers of files verified on this machine


def default_cache_dir() -> Path:
    """$DVSPREP_CACHE, else $XDG_CACHE_HOME/dvsprep, else ~/.cache/dvsprep."""
    env = os.environ.get("DVSPREP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dvsprep"


def cache_subdir(kind: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """`kind` (STORES_DIR or MARKERS_DIR) under `cache_dir`, or under the default cache."""
    if kind not in (STORES_DIR, MARKERS_DIR):
        raise ValueError(f"unknown cache folder {kind!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / kind
