"""Commands start at once: --help, --version and usage errors of every console entry point
import none of torch, spikingjelly, zarr and h5py (they are imported when work begins).

Each entry point runs in a fresh interpreter (the test process has them all loaded already);
the click main is called with each argument list in turn, and after each the heavy modules
present in sys.modules are printed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "spikingjelly", "zarr", "h5py")

_PROBE = r"""
import importlib, json, sys
mod, fn, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
main = getattr(importlib.import_module(mod), fn)
for args in runs:
    try:
        main(args, prog_name="prog", standalone_mode=True)
        code = 0
    except SystemExit as exc:
        code = exc.code
    loaded = [m for m in %r if m in sys.modules]
    print(json.dumps({"args": args, "code": code, "loaded": loaded}), flush=True)
""" % (HEAVY,)


def _probe(module: str, fn: str, runs: list[list[str]]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _PROBE, module, fn, json.dumps(runs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"args"')]
    assert len(lines) == len(runs), proc.stdout[-2000:] + proc.stderr[-2000:]
    return lines


def _dvsprep_commands() -> list[str]:
    from dvsprep.cli import main

    return sorted(main.commands)


ENTRY_POINTS = {
    "dvsg-train": ("dvsg_train.cli", "train_main", [
        (["--help"], 0), (["-h"], 0), (["--version"], 0),
        (["--lr"], 2), (["--bogus"], 2), (["--net", "nonet"], 2), (["-T", "0"], 2),
        (["--preset", "nopreset"], 2),
        (["--epochs", "3"], 2),                                  # no --data: a usage error of ours
        (["--init", "a.pt", "--resume", "b.pt"], 2),
        (["--resume", "b.pt", "--force"], 2),
    ]),
    "dvsg-eval": ("dvsg_train.cli", "eval_main", [
        (["--help"], 0), (["--checkpoint"], 2), (["--bogus"], 2), (["--data", "x"], 2),
        (["--checkpoint", "a.pt", "--data", "x", "--split", "nosplit"], 2),
    ]),
    "dvsg-export": ("dvsg_train.cli", "export_main", [
        (["--help"], 0), ([], 2), (["a.pt"], 2), (["a.pt", "-o", "m.nir", "--format", "onnx"], 2),
        (["a.pt", "-o", "m.nir", "--dt", "0"], 2),
    ]),
    "dvsg-report": ("dvsg_train.cli", "report_main", [
        (["--help"], 0), ([], 2), (["--bogus"], 2),
    ]),
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_dvsg_commands_parse_options_without_heavy_imports(name: str) -> None:
    module, fn, runs = ENTRY_POINTS[name]
    results = _probe(module, fn, [args for args, _ in runs])
    for (args, want_code), got in zip(runs, results):
        assert got == {"args": args, "code": want_code, "loaded": []}, name


def test_dvsprep_help_version_and_usage_errors_import_nothing_heavy() -> None:
    runs = [(["--help"], 0), (["--version"], 0), (["bogus"], 2), (["--bogus"], 2)]
    runs += [([cmd, "--help"], 0) for cmd in _dvsprep_commands()]
    runs += [(["frames", "-T"], 2), (["frames", "-T", "x"], 2), (["convert"], 2), (["pack"], 2),
             (["frames", "--split-by", "never"], 2)]
    results = _probe("dvsprep.cli", "main", [args for args, _ in runs])
    for (args, want_code), got in zip(runs, results):
        assert got == {"args": args, "code": want_code, "loaded": []}


def test_library_faces_import_nothing_heavy() -> None:
    code = ("import sys, dvsprep, dvsg_train, dvsg_train.cli, dvsprep.cli; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "[]"
