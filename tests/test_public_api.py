"""The public faces `import dvsprep` / `import dvsg_train`: the names resolve, the imports stay
light, and the README's examples that use them run."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import dvsg_train
import dvsprep
from aedat_fixtures import small_release
from dvsprep.errors import MissingFileError, StoreError
from train_fixtures import make_learnable_store

REPO = Path(__file__).resolve().parents[1]
DVSPREP_NAMES = ["build_frame_store", "convert_release", "open_events", "open_frame_store", "pack_store", "verify_path"]
DVSG_TRAIN_NAMES = ["FrameDataset", "TrainConfig", "evaluate_checkpoint", "train"]


def test_dvsprep_names_are_the_wings_own():
    from dvsprep import events, frames, verify

    assert dvsprep.__all__ == DVSPREP_NAMES
    assert dvsprep.open_frame_store is frames.open_frame_store
    assert dvsprep.build_frame_store is frames.build_frame_store
    assert dvsprep.pack_store is frames.pack_store
    assert dvsprep.open_events is events.open_events
    assert dvsprep.convert_release is events.convert_release
    assert dvsprep.verify_path is verify.verify_path
    assert dir(dvsprep) == sorted([*DVSPREP_NAMES, "__version__"])
    assert isinstance(dvsprep.__version__, str)


def test_dvsg_train_names_are_the_modules_own():
    from dvsg_train import config, data, engine

    assert dvsg_train.__all__ == DVSG_TRAIN_NAMES
    assert dvsg_train.FrameDataset is data.FrameDataset
    assert dvsg_train.TrainConfig is config.TrainConfig
    assert dvsg_train.train is engine.main
    assert dvsg_train.evaluate_checkpoint is engine.evaluate_checkpoint
    assert dir(dvsg_train) == sorted([*DVSG_TRAIN_NAMES, "__version__"])


@pytest.mark.parametrize("module", [dvsprep, dvsg_train])
def test_unknown_names_are_attribute_errors(module):
    with pytest.raises(AttributeError, match=f"module '{module.__name__}' has no attribute 'open_store'"):
        module.open_store  # noqa: B018
    assert not hasattr(module, "engine_main")
    with pytest.raises(ImportError):
        exec(f"from {module.__name__} import nothing_like_this", {})
    # submodules still import as before, past the package's __getattr__
    exec(f"from {module.__name__} import errors", {})


_LOADED = """
import sys
import {stmt}
print(sorted(m for m in ("torch", "zarr", "h5py", "numpy", "spikingjelly") if m in sys.modules))
"""


@pytest.mark.parametrize("stmt, allowed", [
    ("dvsprep", []), ("dvsg_train", []), ("dvsprep, dvsg_train", []),
    ("dvsprep.cli", []),                                  # `dvsprep --help`
])
def test_the_faces_import_nothing_heavy(stmt, allowed):
    r = subprocess.run([sys.executable, "-c", _LOADED.format(stmt=stmt)], capture_output=True, text=True,
                       cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == repr(allowed)


def test_open_events(tmp_path):
    rel = small_release(tmp_path / "raw")
    dvsprep.convert_release(rel, tmp_path / "data", jobs=1)
    path = tmp_path / "data" / "events.h5"
    with dvsprep.open_events(path) as ev:
        assert len(ev.split("train")) == 8 and len(ev.split("test")) == 2
        fp = ev.fingerprint
    with dvsprep.open_events(str(path), verify=True) as ev:
        assert ev.fingerprint == fp
    with pytest.raises(MissingFileError) as e:
        dvsprep.open_events(tmp_path / "nope.h5")
    assert str(e.value) == f"{tmp_path / 'nope.h5'}: no such events file"
    with pytest.raises(StoreError) as e:
        dvsprep.open_events(tmp_path / "data")
    assert str(e.value) == f"{tmp_path / 'data'}: not an events.h5 file; it is a DATA_ROOT"
    import h5py

    with h5py.File(path, "r+") as f:   # one changed timestamp
        f["test/t"][0] += 1
    with pytest.raises(StoreError, match="events file NOT intact"):
        dvsprep.open_events(path)


def readme_block(name: str) -> str:
    """The python block after the README's `<!-- tested: NAME ... -->` marker."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"<!-- tested: {re.escape(name)}\b[^\n]*-->\n```python\n(.*?)\n```\n", text, flags=re.DOTALL)
    assert m, f"README.md has no python block marked 'tested: {name}'"
    return m.group(1)


def _set(code: str, line: str, value: str) -> str:
    """Replace the one README line that starts with `line` by `value` (it must be there once)."""
    hits = [ln for ln in code.splitlines() if ln.startswith(line)]
    assert len(hits) == 1, f"{line!r} in the README block: {hits}"
    return code.replace(hits[0], value)


def test_readme_reading_api_runs(tmp_path, monkeypatch):
    rel = small_release(tmp_path / "raw")
    dvsprep.convert_release(rel, tmp_path / "data", jobs=1)
    make_learnable_store(tmp_path / "data" / "frames_T16_number.zarr", T=16, n_train=3, n_test=2)
    monkeypatch.chdir(tmp_path)          # the block names data/... relative to where it runs
    scope: dict = {}
    exec(compile(readme_block("reading-api"), "README.md:reading-api", "exec"), scope)
    assert scope["sp"][0].shape == (16, 2, 128, 128)
    assert sorted(scope["ev"]) == ["p", "t", "x", "y"]


def test_readme_training_loop_runs(tmp_path, capsys):
    store = tmp_path / "frames_T4_number.zarr"
    fp = make_learnable_store(store, T=4, n_train=20, n_test=7)
    code = readme_block("training-loop")
    code = _set(code, "STORE = ", f"STORE = {str(store)!r}")
    code = _set(code, "WORKERS = ", "WORKERS = 2")     # worker processes, as in the README
    exec(compile(code, "README.md:training-loop", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{store}: T=4, fingerprint {fp[:16]}"
    acc = re.fullmatch(r"test accuracy (\d\.\d{3})", out[1])
    assert acc and 0.0 <= float(acc.group(1)) <= 1.0 and len(out) == 2


def test_readme_nir_import_runs(tmp_path, monkeypatch):
    """The README's three lines that load an exported NIR graph into SpikingJelly, on the export
    of a 4-channel network; its output equals our network's (the export is exact)."""
    pytest.importorskip("nir")
    pytest.importorskip("spikingjelly.activation_based.nir_exchange.from_nir")
    import torch
    from click.testing import CliRunner

    from dvsg_train.cli import export_main
    from dvsg_train.model import build_model

    model = build_model(4, linear_bias=True).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 2)     # large enough to spike
    torch.save({"net": model.state_dict(), "epoch": 1}, tmp_path / "net.pth")
    res = CliRunner().invoke(export_main, [str(tmp_path / "net.pth"), "-o", str(tmp_path / "model.nir")])
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(tmp_path)          # the block reads model.nir where it runs
    frames = (torch.rand(3, 2, 2, 128, 128, generator=g) < 0.2).float()
    scope: dict = {"frames": frames}
    exec(compile(readme_block("nir-import"), "README.md:nir-import", "exec"), scope)
    with torch.no_grad():
        ours = model(frames)
    assert scope["rates"].shape == (2, 11) and ours.sum() > 0    # the network spikes: not all zeros
    assert torch.equal(scope["rates"].argmax(1), ours.argmax(1)) and torch.allclose(scope["rates"], ours, atol=1e-6)
