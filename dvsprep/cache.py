"""The per-user cache folder dvsprep keeps its downloads (`dvsprep.remote`, ``stores/``) and
verified-markers (`dvsprep.trust`, ``verified/``) in."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$DVSPREP_CACHE, else $XDG_CACHE_HOME/dvsprep, else ~/.cache/dvsprep."""
    env = os.environ.get("DVSPREP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dvsprep"
