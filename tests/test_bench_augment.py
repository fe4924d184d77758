"""benchmarks/bench_augment.py: its exact thinning alternatives are thinning, and the bench
runs end to end (cost table, thinning table, no augmentation vs the recipe over seeds) on a
small store."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from train_fixtures import make_learnable_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_augment", ROOT / "benchmarks" / "bench_augment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_thinning_samplers_keep_each_event_with_probability_keep(bench):
    counts = torch.tensor([0, 1, 2, 5, 20, 0, 3], dtype=torch.float32)
    x = counts.repeat(40_000).view(4, 10, 7_000)            # 280,000 pixels, 1,240,000 events
    for keep in (0.0, 1.0):
        for name, sample in bench.thinning_samplers(x, keep).items():
            if "floor" not in name:
                assert torch.equal(sample(torch.Generator().manual_seed(0)).view_as(x), x * keep), name
    samplers = {n: s for n, s in bench.thinning_samplers(x, 0.9).items() if "floor" not in n}
    assert len(samplers) == 3
    for name, sample in samplers.items():
        kept = sample(torch.Generator().manual_seed(1)).view_as(x)
        assert torch.equal(kept, kept.round()) and (kept >= 0).all() and (kept <= x).all(), name
        # per count n: mean 0.9 n, variance 0.09 n (binomial), over 40,000 pixels each
        for j, n in enumerate(counts.tolist()):
            k = kept[..., j::7].double()
            if n == 0:
                assert (k == 0).all()
                continue
            se = (0.09 * n / k.numel()) ** 0.5
            assert abs(k.mean().item() - 0.9 * n) < 5 * se, (name, n)
            assert abs(k.var().item() / (0.09 * n) - 1) < 0.05, (name, n)


def test_bench_runs_cost_thinning_and_accuracy(bench, tmp_path, capfd):
    store = tmp_path / "frames_T4_number.zarr"
    make_learnable_store(store, T=4, n_train=8, n_test=11, seed=3)
    runs = tmp_path / "runs"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--data", str(store), "-T", "4", "-b", "4", "--channels", "2", "--repeats", "2",
                           "--thinning", "--accuracy", "--epochs", "1", "--seeds", "0", "--out-dir", str(runs),
                           "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capfd.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.strip()]
    for part in ["train", "mirror", "drop=0.1", "mixup=1", "recipe"]:
        assert part in rows
    assert f"  (the recipe: {bench.RECIPE})" in out
    assert "% of a training step; goal under 10% on cpu: " in out
    assert "a Bernoulli per event" in out and "torch.rand over the batch (a floor)" in out
    for name, augment in (("none", ""), ("recipe", bench.RECIPE)):
        for seed in (0,):
            config = json.loads((runs / f"{name}_seed{seed}" / "config.json").read_text())
            assert (config["augment"], config["seed"], config["epochs"], config["channels"]) == (augment, seed, 1, 2)
            assert str(runs / f"{name}_seed{seed}") in out                 # a row of the report table
    assert "over seeds (mean +- sample std):" in out and "seconds per epoch: " in out
