"""The CPU-runnable parts of the one-shot GPU check: scripts/gpu_check.sh (its budget, its plan,
its dry run, its CPU mode, its timeouts) and the two GPU benchmarks it runs."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_check(*args, cwd_script: Path = SCRIPT, env_extra=None, timeout=300):
    env = {**os.environ, "PY": sys.executable, **(env_extra or {})}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(["bash", str(cwd_script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# --------------------------------------------------------------------------- benchmarks

def test_synthetic_split_shape_and_values():
    bench = _load("bench_train_gpu")
    sp = bench.synthetic_split(70, 2, seed=0)
    assert sp["frames"].shape == (70, 2, 2, 128, 128) and sp["frames"].dtype == np.uint8
    assert set(np.unique(sp["frames"])) <= {0, 1, 2, 3}
    assert np.array_equal(sp["frames"][64], sp["frames"][0])        # 64 distinct, replicated
    assert sp["label"].tolist() == [i % 64 % 11 for i in range(70)]
    assert np.array_equal(sp["n_events"], sp["frames"].reshape(70, -1).sum(1))


def test_bench_dry_run_is_dvsg_train_at_the_seed_settings(capsys):
    bench = _load("bench_train_gpu")
    assert bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = {v: line for v in bench.DEFAULT_ORDER for line in out.splitlines()
             if line.strip().startswith(f"{v}:")}
    assert set(lines) == set(bench.DEFAULT_ORDER)
    for v in bench.OURS:
        assert re.search(r"dvsg-train .*-T 16 -b 16 --channels 128 --epochs 2 --opt adam --lr 1e-3 "
                         r"--lr-scheduler CosALR", lines[v])
        assert "--cupy --preload gpu --device cuda" in lines[v]
        assert f"--neuron {v.split('_')[0]} --amp --amp-dtype {v.split('_')[1]}" in lines[v]
    assert "SJ_LIF_CUDA_IMPLEMENTATION=triton" in lines["sj_triton"]
    assert "1176/288 samples" in out


def test_bench_cpu_smoke_run_writes_results_as_it_goes(tmp_path):
    bench = _load("bench_train_gpu")
    out_json = tmp_path / "b.json"
    rc = bench.main(["--device", "cpu", "--work", str(tmp_path / "w"), "--train", "4", "--test",
                     "2", "-T", "2", "-b", "2", "--channels", "2", "--epochs", "1",
                     "--variants", "lif_bf16,sj_torch", "--json", str(out_json)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert list(report["results"]) == ["lif_bf16", "sj_torch"]
    for r in report["results"].values():
        assert r["sec_per_epoch"] > 0 and len(r["epoch_seconds"]) == 1, r
        assert 0.0 <= r["test_acc"] <= 1.0
    assert report["best_ours"] == "lif_bf16" and report["sj_fastest"] == "sj_torch"
    assert report["speedup_vs_sj_fastest"] > 0
    md = (tmp_path / "w" / "bench.md").read_text()
    assert "| lif_bf16 |" in md and "| sj_torch |" in md
    assert not list(tmp_path.rglob("*.tmp"))


def test_bandwidth_accounting_and_dry_run(capsys):
    bw = _load("bench_lif_bandwidth")
    assert bw.bytes_per_element("forward", "half") == 8         # x, spikes (2 B), h (4 B)
    assert bw.bytes_per_element("forward_nograd", "bfloat16") == 4
    assert bw.bytes_per_element("plif_backward", "float") == 12
    assert bw.main(["--dry-run", "--n", "1000", "-T", "4"]) == 0
    out = capsys.readouterr().out
    assert "half      forward         0.00 GB" in out and len(out.splitlines()) == 12


# --------------------------------------------------------------------------- gpu_check.sh

def test_gpu_check_dry_run_checks_every_step():
    r = _gpu_check("--dry-run")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "limits add up to 480 s (budget 480 s" in r.stdout
    steps = re.findall(r"== step (\w+): timeout (\d+) s", r.stdout)
    assert [s for s, _ in steps] == ["a_cuda_tests", "b_kernels_big", "c_network",
                                     "d_train_cli", "e_epoch_bench", "f_bandwidth"]
    assert sum(int(t) for _, t in steps) <= 480
    counts = [int(n) for n in re.findall(r"collects (\d+) tests", r.stdout)]
    assert len(counts) == 3 and all(n > 0 for n in counts)
    assert "dvsg_train \"${args[@]}\" $D_TRAIN --epochs 2 --resume" in r.stdout


def test_gpu_check_refuses_limits_over_the_budget(tmp_path):
    r = _gpu_check("--dry-run", "--limit", "f_bandwidth=31")
    assert r.returncode == 1
    assert "error: step limits add up to 481 s, over the 480 s budget" in r.stderr


def test_gpu_check_cpu_mode_runs_the_train_resume_eval_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    r = _gpu_check("--cpu", env_extra={"OUT": str(out), "WORK": str(work)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert re.search(r"\| d_train_cli \| 0 \| 0 \| \d+ \|", summary)   # limit 0: none on a CPU
    log = (out / "d_train_cli.log").read_text()
    assert "d: epochs [0, 1]" in log and "confusion matrix written" in log
    assert sorted(p.name for p in out.iterdir()) == ["d_train_cli.log", "summary.md"]
    assert not work.exists()          # the work folder is removed at the end


def test_gpu_check_step_over_its_limit_is_cut_and_recorded(tmp_path):
    out = tmp_path / "out"
    """A --limit applies in --cpu mode too: three torch programs (train, resume, eval) never fit
    in 1 s, so the step is cut (timeout's exit 124) and the cut is recorded. How long the cut
    took is not asserted: speed belongs to benchmarks."""
    r = _gpu_check("--cpu", "--limit", "d_train_cli=1",
                   env_extra={"OUT": str(out), "WORK": str(tmp_path / "w")})
    assert r.returncode == 1
    assert re.search(r"\| d_train_cli \| 1 \| 124 \| \d+ \|", (out / "summary.md").read_text())
    assert "TIMED OUT after 1 s" in (out / "d_train_cli.log").read_text()


def test_fetch_wheels_script_names_pinned_wheels():
    text = (ROOT / "scripts" / "fetch_gpu_wheels.sh").read_text()
    assert re.search(r"zarr==\S+", text) and "spikingjelly==2.0.0" in text
    assert shutil.which("bash")
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "fetch_gpu_wheels.sh")]).returncode == 0
