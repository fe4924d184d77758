"""``dvsg-export``: a checkpoint's network written as a NIR graph or a SpikingJelly state dict."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dvsprep.atomic import check_output, publishing

from ..errors import ExportError
from .network import load_network
from .nir_graph import DT, check_dt, import_nir, network_to_nir
from .sj_state import to_spikingjelly_state

FORMATS = ("nir", "spikingjelly")


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str = "nir",
                      dt: float = DT, *, force: bool = False) -> dict[str, Any]:
    """Write the network of ``checkpoint`` (ours or the SpikingJelly tutorial's) to ``out``.

    fmt "nir": the eval-mode network as a NIR graph (``nir.write``; see `nir_graph`), time step
    ``dt`` seconds; "spikingjelly": a state dict for DVSGestureNet(channels=128). The file goes
    through the output protocol (`dvsprep.atomic.publishing`): an existing ``out`` is replaced
    only with ``force``, never the checkpoint itself, and it appears complete or not at all.
    Returns what was written (format, path, network fields)."""
    src, out = Path(checkpoint), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_output(out, "export", force=force, inputs=[src])
    if fmt == "nir":
        check_dt(dt)
        nir = import_nir()                 # before any work: say how to get it
    trained = load_network(src)
    fields = trained.config
    with publishing(out, "export", force=force, inputs=[src]) as tmp:
        if fmt == "nir":
            graph = network_to_nir(trained.model, dt=dt, metadata={
                "source": trained.weights.source, "neuron": fields["neuron"], "channels": fields["channels"]})
            nir.write(tmp, graph)
        else:
            torch.save(to_spikingjelly_state(trained.model.state_dict()), tmp)
    return {"format": fmt, "path": str(out), "dt": dt if fmt == "nir" else None, **fields}
