"""TrainConfig: dvsg-train's option defaults are TrainConfig's, and a run's config is resolved in
one step (`engine.resolve_run`) whose result is what the run reads and records."""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
from pathlib import Path

import pytest
import torch

from dvsg_train.cli import _FIELD, _train_config, eval_main, train_main
from dvsg_train.config import DEFAULTS, TrainConfig
from dvsg_train.distributed import DistEnv
from dvsg_train.engine import evaluate_checkpoint, resolve_run
from dvsg_train.errors import BackendUnavailableError

# options of dvsg-train that set no TrainConfig field (--seeds: one run per seed)
NOT_FIELDS = {"quiet", "debug", "version", "help", "seeds"}
# TrainConfig fields no option sets: the CLI (progress: stderr is a terminal) and the engine
# (world_size: from torchrun's environment) fill them in; tau only comes from the library
NO_OPTION = {"progress", "world_size", "tau"}


def _plain(value):
    return str(value) if isinstance(value, Path) else value


def test_every_train_option_defaults_to_its_field():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    seen = set()
    for param in train_main.params:
        if param.name in NOT_FIELDS:
            continue
        name = _FIELD.get(param.name, param.name)
        assert name in fields, f"option {param.opts} sets no TrainConfig field"
        seen.add(name)
        field = fields[name]
        if field.default is dataclasses.MISSING:
            # data: required by TrainConfig, optional with --resume; workers: TrainConfig's
            # default_factory (min(4, CPUs)) decides, so the option has none of its own
            assert param.default is None, param.opts
            continue
        got = _plain(param.default)
        assert (type(got), got) == (type(field.default), field.default), param.opts
    assert set(fields) - seen == NO_OPTION


def test_a_bare_command_line_gives_the_library_config():
    ctx = train_main.make_context("dvsg-train", ["--data", "d"])
    with ctx:
        cli = _train_config(ctx)
    assert cli.to_dict() == TrainConfig(data="d", progress=cli.progress).to_dict()
    assert DEFAULTS == {f.name: f.default for f in dataclasses.fields(TrainConfig)
                        if f.default is not dataclasses.MISSING}


def test_eval_options_default_to_evaluate_checkpoint():
    signature = inspect.signature(evaluate_checkpoint).parameters
    for param in eval_main.params:
        if param.name in signature and signature[param.name].default is not inspect.Parameter.empty:
            assert param.default == signature[param.name].default, param.opts
    assert {p.name for p in eval_main.params} >= {"split", "device", "batch_size", "workers", "preload"}


def test_resolve_run_writes_in_the_choices_of_this_machine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asked = TrainConfig(data="store.zarr", amp=True, epochs=5, device=None, workers=0)
    run = resolve_run(asked, DistEnv(device=torch.device("cpu")))
    cfg = run.config
    assert (cfg.data, cfg.device, cfg.world_size) == (os.path.join(str(tmp_path), "store.zarr"), "cpu", 1)
    assert (cfg.amp_dtype, cfg.T_max, cfg.cupy) == ("bf16", 5, False)
    assert (run.backend, run.device) == ("torch", torch.device("cpu"))
    # the folder is named from the options as given: "_amp", not the dtype it came to here
    assert run.name == "T16_b16_adam_lr0.001_c128_amp"
    assert asked.data == "store.zarr" and asked.amp_dtype is None          # the asked config is left alone
    two = resolve_run(dataclasses.replace(asked, data="http://h/s.zip", lr_scheduler="steplr", run_name="R"),
                      DistEnv(device=torch.device("cpu"), world_size=2))
    assert (two.config.data, two.config.T_max, two.config.world_size, two.name) == ("http://h/s.zip", None, 2, "R")
    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(BackendUnavailableError):    # --cupy is checked here, before any work
            resolve_run(dataclasses.replace(asked, cupy=True), DistEnv(device=torch.device("cpu")))
