"""Helpers for the export tests: the synthetic release's store, spikes of both simulators, and a
calibration that makes every layer of a (barely trained) network fire."""
from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from torch import nn

from dvsprep.cli import main as dvsprep_main
from dvsg_train.neuron import LIF, PLIF, MultiStepLIF, MultiStepPLIF

NEURONS = (LIF, PLIF, MultiStepLIF, MultiStepPLIF)


def synthetic_release_store(root: Path, T: int) -> Path:
    """dvsprep synth --scale small -> convert -> frames -T T; returns the store's path."""
    run = CliRunner().invoke
    for args in (["synth", str(root / "raw"), "--scale", "small"],
                 ["convert", str(root / "raw"), "-o", str(root / "data"), "-j", "1"],
                 ["frames", "-T", str(T), "-d", str(root / "data"), "-j", "1"]):
        res = run(dvsprep_main, args)
        assert res.exit_code == 0, res.output
    return root / "data" / f"frames_T{T}_number.zarr"


def our_run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Our model in eval mode on x [T, N, 2, 128, 128]: output [N, 11] and the spikes of every
    neuron layer, each [T, N, ...]."""
    model.eval()
    spikes: dict[int, list[torch.Tensor]] = {}
    neurons = [m for m in model.modules() if isinstance(m, NEURONS)]
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: spikes.setdefault(k, []).append(o.detach()))
             for k, m in enumerate(neurons)]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    # multi-step neurons give [T, N, ...] in one call; single-step ones [N, ...] per step
    return out, [s[0] if isinstance(neurons[k], (MultiStepLIF, MultiStepPLIF)) else torch.stack(s)
                 for k, s in sorted(spikes.items())]


def sj_run(path: Path, x: torch.Tensor, step_mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SpikingJelly's from_nir import of the file at ``path`` run on x [T, N, 2, 128, 128]: the
    mean over T of its per-step output [N, 11] and the spikes of its LIF nodes, each [T, N, ...]."""
    from spikingjelly.activation_based.nir_exchange.from_nir import import_from_nir

    gm = import_from_nir(str(path), step_mode=step_mode)
    spikes: dict[str, list[torch.Tensor]] = {}
    for name, m in gm.named_modules():
        inner = getattr(m, "module", None)
        if inner is not None and type(inner).__name__ == "LIFNode":
            m.register_forward_hook(lambda mod, i, o, n=name: spikes.setdefault(n, []).append(o[0].detach()))
    with torch.no_grad():
        if step_mode == "m":
            y, _ = gm(x)
        else:
            state, ys = None, []
            for t in range(x.shape[0]):
                y_t, state = gm(x[t], state)
                ys.append(y_t)
            y = torch.stack(ys)
    order = sorted(spikes, key=lambda n: int("".join(c for c in n if c.isdigit())))
    return y.mean(0), [s[0] if step_mode == "m" else torch.stack(s) for s in (spikes[n] for n in order)]


@torch.no_grad()
def make_active(model: nn.Module, x: torch.Tensor, rate_target: float = 1.0) -> None:
    """Set BatchNorm statistics and affine parameters and rescale the Linear weights so that every
    layer fires on x (a 1-2 epoch network on tiny data is silent past its first layers, which
    would make a comparison of spikes vacuous). Layer by layer, in forward order."""
    model.eval()
    layers = list(model.conv_fc)
    g = torch.Generator().manual_seed(0)
    for i, m in enumerate(layers):
        if isinstance(m, nn.BatchNorm2d):
            inputs = _inputs_of(model, m, x)                      # [T*N or N, C, H, W]
            m.running_mean.copy_(inputs.mean((0, 2, 3)))
            m.running_var.copy_(inputs.var((0, 2, 3)) + 0.01)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 1.0)
            m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
        elif isinstance(m, nn.Linear):
            inputs = _inputs_of(model, m, x)                      # [*, F]
            z = inputs @ m.weight.T
            count = inputs.sum(-1, keepdim=True)
            if count.mean() > 0:
                # z' = a z + c * count: mean ~ rate_target + 0.5, spread ~1.5 per neuron
                a = 1.5 / z.std().clamp_min(1e-6)
                c = (rate_target + 0.5 - a * z.mean()) / count.mean()
                m.weight.mul_(a).add_(c)


def _inputs_of(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    h = layer.register_forward_hook(lambda mod, i, o: seen.append(i[0].detach()))
    try:
        model(x)
    finally:
        h.remove()
    return torch.cat([s.reshape(-1, *s.shape[1:]) for s in seen])
