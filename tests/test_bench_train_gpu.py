"""CPU smoke test of benchmarks/bench_train_gpu.py: every code path but the GPU timing."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_train_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_frames_shape_and_values():
    bench = _load()
    frames, labels = bench.make_frames(3, 2, seed=0, device=torch.device("cpu"))
    assert frames.shape == (3, 2, 2, 128, 128) and frames.dtype == torch.uint8
    assert int(frames.max()) <= 3 and 0.05 < float((frames > 0).float().mean()) < 0.15
    assert labels.shape == (3,) and int(labels.max()) < 11


def test_cpu_smoke_run_writes_json_and_markdown(tmp_path):
    bench = _load()
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    rc = bench.main(["--device", "cpu", "--train", "4", "--test", "2", "-T", "2", "-b", "2",
                     "--channels", "2", "--epochs", "1", "--warmup", "0",
                     "--variants", "torch,cupy,sj_amp", "--json", str(out_json),
                     "--md", str(out_md)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert report["results"]["cupy"] == {"error": "needs CUDA"}
    for name in ("torch", "sj_amp"):
        r = report["results"][name]
        assert r["sec_per_epoch"] > 0 and len(r["epoch_times"]) == 1
        assert 0.0 <= r["last_epoch"]["test_acc"] <= 1.0
    assert report["best_ours"] == "torch" and report["speedup_vs_sj_amp"] > 0
    md = out_md.read_text()
    assert "| torch |" in md and "| cupy | error: needs CUDA |" in md
    assert list(tmp_path.iterdir()) and not list(tmp_path.glob("*.tmp"))
