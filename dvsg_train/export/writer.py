"""``dvsg-export``: a checkpoint's network written as a NIR graph or a SpikingJelly state dict."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dvsprep.atomic import atomic_write, output_lock, same_or_inside
from dvsprep.errors import InputOutputClashError, MissingFileError

from ..errors import ExportError
from .network import load_network
from .nir_graph import DT, import_nir, network_to_nir
from .sj_state import to_spikingjelly_state

FORMATS = ("nir", "spikingjelly")


def _check_output(src: Path, out: Path) -> None:
    if not out.parent.is_dir():
        raise MissingFileError(f"{out.parent}: output directory does not exist")
    if out.is_dir():
        raise ExportError(f"{out}: is a directory; give a file name")
    if same_or_inside(out, src):
        raise InputOutputClashError(f"{out}: the output is the input checkpoint")


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str = "nir",
                      dt: float = DT) -> dict[str, Any]:
    """Write the network of ``checkpoint`` (ours or the SpikingJelly tutorial's) to ``out``.

    fmt "nir": the eval-mode network as a NIR graph (``nir.write``; see `nir_graph`), time step
    ``dt`` seconds; "spikingjelly": a state dict for DVSGestureNet(channels=128). The file
    appears complete or not at all. Returns what was written (format, path, network fields)."""
    src, out = Path(checkpoint), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_output(src, out)
    if fmt == "nir":
        nir = import_nir()                 # before any work: say how to get it
    trained = load_network(src)
    fields = trained.config
    with output_lock(out, "export"):
        if fmt == "nir":
            graph = network_to_nir(trained.model, dt=dt, metadata={
                "source": trained.weights.source, "neuron": fields["neuron"], "channels": fields["channels"]})
            atomic_write(out, lambda tmp: nir.write(tmp, graph))
        else:
            state = to_spikingjelly_state(trained.model.state_dict())
            atomic_write(out, lambda tmp: torch.save(state, tmp))
    return {"format": fmt, "path": str(out), "dt": dt if fmt == "nir" else None, **fields}
