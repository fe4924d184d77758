"""AMP through the real train_one_epoch / evaluate on CPU (torch runs fp16 and bf16 autocast and
an fp16 GradScaler there too): what autocast must change, and what the scaler must do.
(Exact resume with the scaler's state: tests/test_train_resume.py.)"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dvsg_train import engine
from dvsg_train.data import Batches
from dvsg_train.engine import evaluate, train_one_epoch
from dvsg_train.model import build_model

CPU = torch.device("cpu")
T, B = 2, 2


def _batches(n: int, seed: int = 0, batch_size: int = B, shuffle: bool = True) -> Batches:
    g = torch.Generator().manual_seed(seed)
    frames = (torch.rand(n, T, 2, 128, 128, generator=g) < 0.2).to(torch.uint8) * 2
    labels = torch.arange(n) % 11
    return Batches(labels, batch_size, shuffle=shuffle, drop_last=shuffle,
                   generator=torch.Generator().manual_seed(seed) if shuffle else None,
                   frames=frames)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(channels=2)


def _output_dtypes(model: nn.Module) -> dict[str, set]:
    """Output dtypes of the first conv, first linear and first neuron, per forward."""
    seen: dict[str, set] = {"conv": set(), "linear": set(), "neuron": set()}
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    neuron = next(m for m in model.modules() if hasattr(m, "v_threshold"))
    for key, m in (("conv", conv), ("linear", linear), ("neuron", neuron)):
        m.register_forward_hook(lambda m, i, o, key=key: seen[key].add(o.dtype))
    return seen


@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_autocast_runs_convs_and_neurons_in_the_amp_dtype(amp):
    model = _model()
    seen = _output_dtypes(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu") if amp == "fp16" else None
    r = train_one_epoch(model, _batches(4), opt, CPU, scaler=scaler, amp_dtype=amp)
    want = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert seen == {"conv": {want}, "linear": {want}, "neuron": {want}}
    assert math.isfinite(r["loss"]) and r["samples"] == 4
    # parameters (and so the optimizer's state) stay fp32 under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    seen_eval = _output_dtypes(model)
    evaluate(model, _batches(3, shuffle=False), CPU, amp_dtype=amp)
    assert seen_eval["conv"] == {want}


def test_fp16_gradscaler_scales_skips_inf_steps_and_backs_off(monkeypatch):
    """Four batches, an inf gradient injected in the second: that step is skipped and the scale
    halves; two clean steps later (growth_interval 2) it doubles again. The gradient the
    parameters receive is the scaled one, unscaled exactly before the optimizer sees it."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_factor=2.0,
                                  backoff_factor=0.5, growth_interval=2)
    batch = {"i": -1}
    watched = model.conv_fc[0].weight
    seen_by_hook, seen_by_step, scales, stepped = [], [], [], []

    def count_batches(module, args):
        batch["i"] += 1

    def grad_hook(g):
        seen_by_hook.append(g.detach().clone())
        return g * math.inf if batch["i"] == 1 else g

    model.register_forward_pre_hook(count_batches)
    watched.register_hook(grad_hook)
    real_step, real_update = opt.step, scaler.update

    def step(*a, **k):
        stepped.append(batch["i"])
        seen_by_step.append(watched.grad.detach().clone())
        return real_step(*a, **k)

    def update(*a, **k):
        real_update(*a, **k)
        scales.append(scaler.get_scale())

    monkeypatch.setattr(opt, "step", step)
    monkeypatch.setattr(scaler, "update", update)
    r = train_one_epoch(model, _batches(8), opt, CPU, scaler=scaler, amp_dtype="fp16")
    assert r["samples"] == 8 and math.isfinite(r["loss"])
    assert stepped == [0, 2, 3]                       # the inf step never reached Adam
    assert scales == [256.0, 128.0, 128.0, 256.0]
    assert all(int(s["step"]) == 3 for s in opt.state.values())
    # batch 0: the hook saw dL/dw * 256, Adam got exactly dL/dw
    assert seen_by_step[0].abs().max() > 0
    assert torch.equal(seen_by_hook[0] / 256.0, seen_by_step[0])
    assert torch.equal(seen_by_hook[2] / 128.0, seen_by_step[1])


def test_fp16_needs_a_scaler():
    model = _model()
    with pytest.raises(ValueError, match="GradScaler"):
        train_one_epoch(model, _batches(2), torch.optim.SGD(model.parameters(), lr=0.1), CPU,
                        amp_dtype="fp16")


class _Lookup(nn.Module):
    """Predicts class (3 * id) % 11 for the sample whose id is written in its first pixel."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):                       # x [T, B, 2, H, W]
        ids = x[0, :, 0, 0, 0].long()
        return nn.functional.one_hot((3 * ids) % 11, 11).float() + self.dummy


def test_evaluate_confusion_and_accuracy_exact():
    n = 29
    frames = torch.zeros(n, 1, 2, 128, 128, dtype=torch.uint8)
    frames[:, 0, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    labels = (torch.arange(n) * 7) % 11
    batches = Batches(labels, 4, shuffle=False, drop_last=False, frames=frames)   # last batch short
    r = evaluate(_Lookup(), batches, CPU)
    pred = (3 * torch.arange(n)) % 11
    want = torch.zeros(11, 11, dtype=torch.int64)
    for t, p in zip(labels.tolist(), pred.tolist()):
        want[t, p] += 1
    assert (r["confusion"] == want.numpy()).all() and r["samples"] == n
    assert r["acc"] == int((pred == labels).sum()) / n


def test_preloaded_batches_follow_batch_order():
    """The epoch's order moves to the device once; batches are still batch_order's."""
    from dvsg_train.data import batch_order

    b = _batches(11, seed=5, batch_size=3)
    order = batch_order(11, 3, True, True, torch.Generator().manual_seed(5))
    got = list(b)
    assert len(got) == 3 == len(order)
    for (frames, labels), idx in zip(got, order):
        assert torch.equal(frames, b.frames[idx]) and torch.equal(labels, b.labels[idx])


# --------------------------------------------------------------------------- CUDA

def _syncs(fn) -> int:
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [None, "bf16"])
def test_cuda_no_host_sync_per_batch(amp):
    """Preloaded batches, training (no GradScaler) and evaluation sync the host a fixed number
    of times per epoch, however many batches it has."""
    dev = torch.device("cuda")
    counts = []
    for n in (4, 12):
        model = _model().to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        b = _batches(n)
        b.frames, b.labels = b.frames.to(dev), b.labels.to(dev)
        e = _batches(n, shuffle=False)
        e.frames, e.labels = e.frames.to(dev), e.labels.to(dev)
        train_one_epoch(model, b, opt, dev, amp_dtype=amp)     # warm-up (cuDNN, allocator)
        counts.append(_syncs(lambda: (train_one_epoch(model, b, opt, dev, amp_dtype=amp),
                                      evaluate(model, e, dev, amp_dtype=amp))))
    assert counts[0] == counts[1], counts


@pytest.mark.cuda
def test_cuda_engine_turns_on_cudnn_benchmark(tmp_path, monkeypatch):
    from dvsg_train.config import TrainConfig
    from train_fixtures import make_learnable_store

    make_learnable_store(tmp_path / "s.zarr", T=2, n_train=4, n_test=2)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    engine.main(TrainConfig(data=str(tmp_path / "s.zarr"), T=2, batch_size=2, epochs=1,
                            channels=2, out_dir=str(tmp_path / "runs"), device="cuda"))
    assert torch.backends.cudnn.benchmark is True
