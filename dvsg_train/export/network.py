"""A trained network from a checkpoint: ours (dvsg-train) or SpikingJelly's (the seed tutorial's).

Both are read with ``torch.load(weights_only=True)``: tensors and plain containers only.
``read_weights`` gives the weights and the model fields they need (for ``dvsg-train --init``);
``load_network`` builds the model in eval mode (for ``dvsg-eval`` and ``dvsg-export``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dvsprep.inputs import STORE_OR_DATA_ROOT, InputKind, kind_of

from ..checkpoint import (
    check_tensor_sizes,
    check_weights,
    checkpoint_config,
    checkpoint_from,
    network_state,
    read_torch_file,
    state_mismatch,
)
from ..errors import CheckpointError, DataMismatchError
from ..model import build_model
from .sj_state import FC1, find_spikingjelly_state, spikingjelly_fields

OURS, SPIKINGJELLY = "dvsg-train", "spikingjelly"
SJ_BATCH_SIZE = 16                 # the tutorial's default -b


@dataclass
class NetworkWeights:
    """A checkpoint's model weights and the fields our network needs to hold them."""

    path: str
    source: str                    # OURS or SPIKINGJELLY
    state: dict[str, Tensor]
    channels: int
    neuron: str
    tau: float
    linear_bias: bool
    net: str = "multistep"
    T: int | None = None           # frames per sample it was trained on (None: not recorded)
    batch_size: int = SJ_BATCH_SIZE
    epoch: int | None = None
    data_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, net: str | None = None, backend: str = "torch") -> nn.Module:
        """A fresh network of this shape (``net``: multistep / stepwise, default the checkpoint's)."""
        return build_model(self.channels, net or self.net, self.neuron, backend, self.tau, self.linear_bias)

    @property
    def model_fields(self) -> dict[str, Any]:
        return {"channels": self.channels, "net": self.net, "neuron": self.neuron, "tau": self.tau,
                "linear_bias": self.linear_bias}


@dataclass
class TrainedNetwork:
    """A checkpoint's network, built, loaded and in eval mode on the CPU."""

    model: nn.Module
    weights: NetworkWeights

    @property
    def config(self) -> dict[str, Any]:
        return {**self.weights.model_fields, "T": self.weights.T}


def has_linear_bias(state: dict[str, Any]) -> bool:
    """Whether a state dict of our layout carries Linear biases (SpikingJelly-trained weights)."""
    return f"conv_fc.{FC1}.bias" in state


def store_T(data: str | os.PathLike, weights: NetworkWeights) -> int | None:
    """The T to open ``data`` with for these weights: the checkpoint's; for a SpikingJelly
    checkpoint (which does not record T) None for a store path or URL, and for a DATA_ROOT the T
    of its one ``frames_T<T>_number.zarr``."""
    if weights.T is not None or kind_of(data, STORE_OR_DATA_ROOT, noun="frame store") is not InputKind.DATA_ROOT:
        return weights.T
    root = Path(data)
    found = sorted((int(m.group(1)), p.name) for p in root.glob("frames_T*_number.zarr")
                   if (m := re.fullmatch(r"frames_T(\d+)_number\.zarr", p.name)))
    if len(found) != 1:
        have = ", ".join(name for _, name in found) or "no frames_T<T>_number.zarr"
        raise DataMismatchError(f"{root}: {weights.path} does not record T and this folder holds {have}; "
                                "pass the frame store's path")
    return found[0][0]


def read_weights(path: str | os.PathLike) -> NetworkWeights:
    """The weights in a dvsg-train checkpoint or in a SpikingJelly DVSGestureNet checkpoint (the
    tutorial's ``{'net': state_dict, ...}`` or a bare state dict). Raises CheckpointError.

    Read once (a regular file only); before anything is built, every weight must be a dense
    tensor within the file's size, fit the network the weights claim (names and shapes, for the
    channels of the first convolution) and be finite."""
    path = Path(path)
    obj, nbytes = read_torch_file(path)
    if not isinstance(obj, dict) or "format" not in obj:
        state = find_spikingjelly_state(obj)
        if state is None:
            raise CheckpointError(f"{path}: neither a dvsg-train checkpoint nor a SpikingJelly DVSGestureNet "
                                  "checkpoint ({'net': state_dict, ...} or a state dict)")
        check_tensor_sizes(list(state.items()), path, nbytes)
        fields = spikingjelly_fields(state, str(path))
        check_weights(state, path, fields)
        epoch = obj.get("epoch") if isinstance(obj, dict) and "net" in obj else None
        return NetworkWeights(str(path), SPIKINGJELLY, state, **fields,
                              epoch=epoch if isinstance(epoch, int) else None)
    ckpt = checkpoint_from(obj, nbytes, path)  # a broken or foreign format: its own message
    cfg = checkpoint_config(ckpt, path)
    return NetworkWeights(str(path), OURS, ckpt["model"], cfg.channels, cfg.neuron, cfg.tau,
                          has_linear_bias(ckpt["model"]), net=cfg.net, T=cfg.T, batch_size=cfg.batch_size,
                          epoch=int(ckpt["epoch"]), data_fingerprint=ckpt["data_fingerprint"])


def load_weights(model: nn.Module, weights: NetworkWeights, network: dict[str, Any] | None = None) -> None:
    """Load ``weights`` into ``model`` (strict); CheckpointError in one line when they do not fit.
    ``network``: how to name the model's shape in that message (default: the checkpoint's)."""
    problem = state_mismatch(weights.state, model.state_dict())
    if problem:
        raise CheckpointError(f"{weights.path}: weights do not fit the network "
                              f"{network or weights.model_fields} ({problem})")
    try:
        model.load_state_dict(weights.state)
    except (RuntimeError, KeyError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        # line 0 is "Error(s) in loading state_dict for ...", line 1 the first problem
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__)[:200]
        raise CheckpointError(f"{weights.path}: weights do not fit the network "
                              f"{network or weights.model_fields} ({detail})") from exc


def read_init_weights(path: str | os.PathLike, channels: int, net: str, neuron: str,
                      tau: float) -> NetworkWeights:
    """``dvsg-train --init``: a checkpoint's weights (ours or SpikingJelly's), checked to fit the
    network the run trains (channels, neuron); only the weights are taken, no optimizer state
    or epoch. Raises CheckpointError in one line when they do not fit."""
    weights = read_weights(path)
    target = {"channels": channels, "net": net, "neuron": neuron, "tau": tau}
    # against the network's shapes on the meta device: nothing is allocated for a misfit
    problem = state_mismatch(weights.state, network_state({**target, "linear_bias": weights.linear_bias}))
    if problem:
        raise CheckpointError(f"{weights.path}: weights do not fit the network {target} ({problem})")
    return weights


def load_network(path: str | os.PathLike, net: str | None = None) -> TrainedNetwork:
    """The network of a checkpoint (ours or SpikingJelly's), in eval mode on the CPU."""
    weights = read_weights(path)
    model = weights.build(net)
    load_weights(model, weights)
    return TrainedNetwork(model.eval(), weights)
