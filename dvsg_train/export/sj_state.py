"""SpikingJelly 2.0 ``DVSGestureNet`` state dicts, both ways.

Our networks keep their layers in ``conv_fc`` at DVSGestureNet's indices, so the names agree;
DVSGestureNet differs in two ways that decide what maps:

- its Linear layers have biases (ours none): ours -> theirs writes zero biases; theirs -> ours
  builds our network with biases (``linear_bias``) and keeps them;
- its hidden layer is fixed at 512 (``Linear(channels*16, 512)``), ours is channels*4: only
  channels 128 maps either way.

The seed tutorial (``spikingjelly.activation_based.examples.classify_dvsg``) saves
``{'net': net.state_dict(), 'optimizer', 'lr_scheduler', 'epoch', 'max_test_acc'}``; the state
dict has the same keys whether the network ran step by step (``step_mode='s'``) or multi-step
(``'m'``), with ``LIFNode`` (no parameters) or ``ParametricLIFNode`` (``conv_fc.<i>.w``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, ExportError

SJ_HIDDEN = 512
FC1, FC2 = 22, 25                  # the Linear layers in conv_fc (ours and DVSGestureNet's)
CONV0, PLIF0 = 0, 2                # the first convolution and the first neuron
# Wrappers whose prefixes a saved state dict may carry (DDP, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def to_spikingjelly_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our network's state dict as one DVSGestureNet(channels=128) loads with strict=True.

    Same keys and tensors, plus zero biases for Linear layers that have none. Raises
    ExportError (one line) when the hidden layer is not DVSGestureNet's 512."""
    hidden = state[f"conv_fc.{FC1}.weight"].shape[0]
    channels = state[f"conv_fc.{CONV0}.weight"].shape[0]
    if hidden != SJ_HIDDEN:
        raise ExportError(f"SpikingJelly's DVSGestureNet has a hidden layer of {SJ_HIDDEN}, this network "
                          f"(channels {channels}) one of {hidden}: only channels 128 maps onto it")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        out[key] = value.detach().clone()
        for fc in (FC1, FC2):
            if key == f"conv_fc.{fc}.weight" and f"conv_fc.{fc}.bias" not in state:
                out[f"conv_fc.{fc}.bias"] = torch.zeros(value.shape[0], dtype=value.dtype)
    return out


def find_spikingjelly_state(obj: Any) -> dict[str, Tensor] | None:
    """The DVSGestureNet state dict in a loaded file: the tutorial's checkpoint (its ``net``) or a
    bare state dict (what ``dvsg-export --format spikingjelly`` writes); None when it is neither.
    Wrapper prefixes (``module.``, ``_orig_mod.``) are removed."""
    if isinstance(obj, dict) and isinstance(obj.get("net"), dict):
        obj = obj["net"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return None
    state = {}
    for key, value in obj.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    if not isinstance(state.get(f"conv_fc.{CONV0}.weight"), Tensor):
        return None
    if not all(isinstance(v, Tensor) for v in state.values()):
        return None
    return state


def spikingjelly_fields(state: dict[str, Tensor], path: str) -> dict[str, Any]:
    """Our model fields for a DVSGestureNet state dict: channels, neuron, tau, linear_bias.

    Raises CheckpointError (one line, naming ``path``) for a state dict our network cannot
    hold: another layout, or a hidden layer other than channels*4."""
    try:
        conv0 = state[f"conv_fc.{CONV0}.weight"]
        fc1 = state[f"conv_fc.{FC1}.weight"]
    except KeyError as exc:
        raise CheckpointError(f"{path}: not a DVSGestureNet state dict (no {exc.args[0]})") from None
    if conv0.dim() != 4 or tuple(conv0.shape[1:]) != (2, 3, 3) or fc1.dim() != 2:
        raise CheckpointError(f"{path}: not a DVSGestureNet state dict (conv_fc.0.weight {tuple(conv0.shape)}, "
                              f"conv_fc.{FC1}.weight {tuple(fc1.shape)})")
    channels, hidden = int(conv0.shape[0]), int(fc1.shape[0])
    if hidden != channels * 4:
        raise CheckpointError(f"{path}: SpikingJelly network with channels {channels} and a hidden layer of "
                              f"{hidden}; ours has channels*4 = {channels * 4} (only channels 128 maps "
                              f"onto DVSGestureNet's fixed {SJ_HIDDEN})")
    biases = [f"conv_fc.{fc}.bias" in state for fc in (FC1, FC2)]
    if biases[0] != biases[1]:
        raise CheckpointError(f"{path}: DVSGestureNet state dict with a bias on only one Linear layer")
    neuron = "plif" if f"conv_fc.{PLIF0}.w" in state else "lif"
    # LIFNode's tau is not in a state dict; the tutorial uses LIFNode's default, 2.0. A PLIF's
    # starting tau does not matter once its w is loaded.
    return {"channels": channels, "neuron": neuron, "tau": 2.0, "linear_bias": biases[0]}
