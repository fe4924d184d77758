"""What a process learns from torchrun's environment before torch is imported: its rank, for
dvsg-* commands that must know whether to print before any work (and torch) begins.

`dvsg_train.distributed` builds on these; this module imports neither torch nor numpy, so that
`--help`, `--version` and usage errors of the commands return at once.
"""
from __future__ import annotations

import os

from .errors import ConfigError

# Rendezvous variables torchrun (and torch.multiprocessing launchers) set for every worker.
ENV_RANK, ENV_WORLD, ENV_LOCAL_RANK, ENV_LOCAL_WORLD = "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"
# Attribute set on an exception raised on every rank because one rank (its value) failed.
FAILED_RANK_ATTR = "dvsg_failed_rank"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def env_rank() -> int:
    """This process's global rank from the environment (0 outside torchrun)."""
    return _env_int(ENV_RANK, 0)
