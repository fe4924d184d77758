"""--preset: each preset resolves to its documented values, explicit options win, config.json records it."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dvsg_train.cli import _train_config, train_main
from dvsg_train.presets import PRESETS

from train_fixtures import make_learnable_store

SEED = dict(T=16, batch_size=16, epochs=256, channels=128, net="multistep", neuron="lif", tau=2.0, opt="adam",
            lr=1e-3, lr_scheduler="cosalr", T_max=64, amp=True, cupy=None, val_fraction=0.0, seed=0,
            preset="seed")
PLIF = dict(T=20, batch_size=16, epochs=1024, channels=128, net="multistep", neuron="plif", tau=2.0, opt="adam",
            lr=1e-3, lr_scheduler="cosalr", T_max=64, amp=False, cupy=None, val_fraction=0.0, seed=2020,
            preset="plif")
# the seed's run plus the published augmentations (README "Presets"), in canonical order
SEED_AUGMENT = {**SEED, "preset": "seed-augment",
                "augment": "mirror,translate=5,rotate=30,shear=17,drop=0.1,mixup=0.5,smooth=0.1"}


def resolve(*args: str):
    ctx = train_main.make_context("dvsg-train", list(args))
    with ctx:
        return _train_config(ctx)


@pytest.mark.parametrize("name, want", [("seed", SEED), ("plif", PLIF), ("seed-augment", SEED_AUGMENT)])
def test_preset_resolves_to_documented_values(name, want):
    cfg = resolve("--data", "d", "--preset", name)
    assert {k: getattr(cfg, k) for k in want} == want
    assert cfg.backend == "auto"            # CUDA kernels when the run is on CUDA, else torch
    assert set(PRESETS) == {"seed", "plif", "seed-augment"}
    assert cfg.augment == want.get("augment", "")          # the tutorial and the paper: no augmentation


def test_explicit_options_override_a_preset():
    cfg = resolve("--data", "d", "--preset", "seed", "-T", "4", "--epochs", "3", "--no-cupy", "--no-amp",
                  "--lr-scheduler", "StepLR", "--channels", "8")
    assert (cfg.T, cfg.epochs, cfg.cupy, cfg.amp, cfg.lr_scheduler, cfg.channels) == (4, 3, False, False, "steplr", 8)
    assert (cfg.batch_size, cfg.T_max, cfg.preset) == (16, 64, "seed")       # the rest from the preset
    # an explicit option wins even when it equals the option's default
    assert resolve("--data", "d", "--preset", "plif", "--seed", "0").seed == 0
    assert resolve("--data", "d", "--preset", "plif", "--T-max", "7").T_max == 7
    # no preset: the plain defaults, no CUDA kernels unless asked for
    plain = resolve("--data", "d")
    assert (plain.T, plain.epochs, plain.cupy, plain.amp, plain.T_max, plain.preset) == (16, 64, False, False, None, None)


def test_config_json_records_the_preset_and_resolved_values(tmp_path):
    make_learnable_store(tmp_path / "frames_T4_number.zarr", T=4, n_train=12, n_test=11)
    res = CliRunner().invoke(train_main, ["--data", str(tmp_path), "--preset", "seed", "-T", "4", "-b", "6",
                                          "--epochs", "1", "--channels", "4", "--device", "cpu", "-j", "0",
                                          "--out-dir", str(tmp_path / "runs"), "-q"])
    assert res.exit_code == 0, res.output       # the seed preset runs on a CPU-only machine
    config = json.loads((tmp_path / "runs" / "T4_b6_adam_lr0.001_c4_amp" / "config.json").read_text())
    assert config["preset"] == "seed" and config["T_max"] == 64 and config["epochs"] == 1
    assert config["amp"] is True and config["amp_dtype"] == "bf16" and config["cupy"] is None
    assert config["backend"] == "torch" and config["threads"] == 1


def test_unknown_preset_is_a_usage_error():
    res = CliRunner().invoke(train_main, ["--data", "d", "--preset", "tutorial"])
    assert res.exit_code == 2 and "'tutorial' is not one of" in res.output
