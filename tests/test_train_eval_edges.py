"""dvsg_train.engine's evaluation of a checkpoint (`evaluate_checkpoint`, what dvsg-eval runs),
`main`'s own few lines and `cpu_has_bf16`, with exact values and no training: the checkpoint is
a seeded network saved as a run saves it, and the expected loss, accuracy and confusion are
computed here from the arrays the store was written from, batch by batch, with plain torch."""
from __future__ import annotations

import copy
import io
import logging
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvsg_train import data as data_module
from dvsg_train import engine
from dvsg_train.config import TrainConfig
from dvsg_train.data import eval_batch_bytes
from dvsg_train.errors import ConfigError, DataMismatchError
from dvsg_train.model import build_model
from dvsprep.errors import IntegrityError, MissingFileError, ResourceLimitError
from dvsprep.frames.store import open_frame_store
from train_fixtures import make_learnable_store, save_run_checkpoint, split_arrays, spy

T, CHANNELS, BATCH, EPOCH = 3, 4, 5, 2
N_TRAIN, N_TEST = 23, 12


def _network() -> torch.nn.Module:
    """A seeded network whose first convolution is scaled up so that it fires on these frames:
    the outputs differ between samples, so a wrong model, batch or split shows in every number."""
    torch.manual_seed(7)
    model = build_model(CHANNELS, "multistep", "plif")
    with torch.no_grad():
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        first.weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data_root = root / "DATA"
    data_root.mkdir()
    store = data_root / f"frames_T{T}_number.zarr"
    make_learnable_store(store, T=T, n_train=N_TRAIN, n_test=N_TEST)
    fingerprint = open_frame_store(store).fingerprint
    model = _network()
    config = TrainConfig(data=str(store), T=T, batch_size=BATCH, channels=CHANNELS, epochs=5, neuron="plif",
                         device="cpu", workers=0)
    ckpt = root / "run" / "checkpoint_latest.pt"
    ckpt.parent.mkdir()
    save_run_checkpoint(ckpt, model, config, fingerprint, epoch=EPOCH)
    return {"root": root, "data_root": data_root, "store": store, "ckpt": str(ckpt), "model": model,
            "fingerprint": fingerprint}


def _expected(model: torch.nn.Module, seed: int, n: int, batch: int) -> dict:
    """The evaluation by hand: the split's frames as written (train_fixtures' seeds: train 1, test
    101), batch by batch in order, MSE against one-hot targets, summed in float64 over samples."""
    arrays = split_arrays(n, T, seed)
    frames, labels = torch.from_numpy(arrays["frames"]), torch.from_numpy(arrays["label"]).long()
    model = copy.deepcopy(model).eval()
    loss_sum, confusion = 0.0, np.zeros((11, 11), dtype=np.int64)
    with torch.no_grad():
        for s in range(0, n, batch):
            x = frames[s:s + batch].transpose(0, 1).float().contiguous()     # [T, B, 2, H, W]
            y = labels[s:s + batch]
            out = model(x)
            loss_sum += float(F.mse_loss(out.float(), F.one_hot(y, 11).float()).double()) * len(y)
            for true, pred in zip(y.tolist(), out.argmax(1).tolist()):
                confusion[true, pred] += 1
    return {"loss": loss_sum / n, "acc": float(np.trace(confusion)) / n, "samples": n, "confusion": confusion}


# ----------------------------------------------------------------------------- the result

MODEL_CONFIG = {"channels": CHANNELS, "net": "multistep", "neuron": "plif", "tau": 2.0, "linear_bias": False}


def test_the_test_split_evaluated_by_hand(tiny, caplog):
    caplog.set_level(logging.WARNING, logger="dvsg_train.engine")
    got = engine.evaluate_checkpoint(tiny["ckpt"], str(tiny["store"]), device="cpu")
    want = _expected(tiny["model"], 101, N_TEST, BATCH)
    assert 0 < want["acc"] < 1 and len({float(v) for v in want["confusion"].ravel()}) > 2   # not trivial
    assert set(got) == {"loss", "acc", "samples", "seconds", "confusion", "epoch", "split", "config", "source"}
    # the same float32 batch losses summed in the same order: equal, not close
    assert got["loss"] == want["loss"] and got["acc"] == want["acc"] and got["samples"] == N_TEST
    assert np.array_equal(got["confusion"], want["confusion"])
    assert got["epoch"] == EPOCH and got["split"] == "test" and got["source"] == "dvsg-train"
    assert got["config"] == {**MODEL_CONFIG, "T": T}
    assert caplog.records == []                      # trained on this very store: no fingerprint warning


def test_the_train_split_and_a_batch_size_of_its_own(tiny, monkeypatch):
    batches = spy(monkeypatch, engine, "evaluate")
    got = engine.evaluate_checkpoint(tiny["ckpt"], str(tiny["store"]), split="train", device="cpu", batch_size=4)
    want = _expected(tiny["model"], 1, N_TRAIN, 4)
    assert (got["loss"], got["acc"], got["samples"], got["split"]) == (want["loss"], want["acc"], N_TRAIN, "train")
    assert np.array_equal(got["confusion"], want["confusion"])
    assert [len(y) for _, y in batches[0][0][1]] == [4, 4, 4, 4, 4, 3]


def test_the_checkpoints_batch_size_by_default(tiny, monkeypatch):
    calls = spy(monkeypatch, engine, "evaluate")
    engine.evaluate_checkpoint(tiny["ckpt"], str(tiny["store"]), device="cpu")
    (model, batches, device), kw = calls[0]
    assert [len(y) for _, y in batches] == [5, 5, 2] and device == torch.device("cpu") and kw == {}
    assert not model.training


def test_preload_and_workers_reach_the_feed(tiny, monkeypatch):
    calls = spy(monkeypatch, engine, "choose_feed")
    engine.evaluate_checkpoint(tiny["ckpt"], str(tiny["store"]), device="cpu")
    engine.evaluate_checkpoint(tiny["ckpt"], str(tiny["store"]), device="cpu", preload="none", workers=1)
    (path, splits, preload, device), kw = calls[0]
    assert (path, preload, device, kw) == (str(tiny["store"]), "auto", torch.device("cpu"), {"workers": 0})
    assert [len(s) for s in splits] == [N_TEST]
    (_, _, preload, _), kw = calls[1]
    assert (preload, kw) == ("none", {"workers": 1})


def test_a_device_that_is_not_there_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"^--device cuda:99: "):
        engine.evaluate_checkpoint(tiny["ckpt"], str(tiny["store"]), device="cuda:99")


# ----------------------------------------------------------------------------- which store, which T

def test_a_data_root_gives_the_store_of_the_checkpoints_T(tiny, tmp_path):
    """A DATA_ROOT holding T=2 and T=3 stores: the checkpoint's T=3 one, by its real path."""
    root = tmp_path / "DATA"
    root.mkdir()
    (root / f"frames_T{T}_number.zarr").symlink_to(tiny["store"], target_is_directory=True)
    make_learnable_store(root / "frames_T2_number.zarr", T=2, n_train=4, n_test=3)
    got = engine.evaluate_checkpoint(tiny["ckpt"], str(root), device="cpu")
    assert got["samples"] == N_TEST and got["config"]["T"] == T
    assert got["loss"] == _expected(tiny["model"], 101, N_TEST, BATCH)["loss"]


def test_a_data_root_without_the_checkpoints_T_names_where_T_comes_from(tiny, tmp_path):
    root = tmp_path / "DATA"
    root.mkdir()
    make_learnable_store(root / "frames_T2_number.zarr", T=2, n_train=4, n_test=3)
    with pytest.raises(MissingFileError) as err:
        engine.evaluate_checkpoint(tiny["ckpt"], str(root), device="cpu")
    assert str(err.value) == (f"{root}: no frames_T3_number.zarr for T=3, what {tiny['ckpt']} was trained with "
                              f"(it holds frames_T2_number.zarr; make one with dvsprep frames -T 3 -d {root}, "
                              "or pass the store path)")


def test_a_store_of_another_T_is_refused(tiny, tmp_path):
    other = tmp_path / "T2.zarr"
    make_learnable_store(other, T=2, n_train=4, n_test=3)
    with pytest.raises(DataMismatchError) as err:
        engine.evaluate_checkpoint(tiny["ckpt"], str(other), device="cpu")
    assert str(err.value) == (f"{other}: store has T=2 frames per sample, but {tiny['ckpt']} was trained with "
                              "T=3; evaluate it on a store made with dvsprep frames -T 3")


def test_another_stores_fingerprint_is_one_warning_naming_both(tiny, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dvsg_train.engine")
    other = tmp_path / "other.zarr"
    make_learnable_store(other, T=T, n_train=4, n_test=6, seed=9)
    got = engine.evaluate_checkpoint(tiny["ckpt"], str(other), device="cpu")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tiny['ckpt']} was trained on a store with another fingerprint than {other}"]
    want = _expected(tiny["model"], 109, 6, BATCH)
    assert (got["loss"], got["acc"], got["samples"]) == (want["loss"], want["acc"], 6)


# ----------------------------------------------------------------------------- memory

def test_memory_for_one_batch_exactly_is_enough_and_one_byte_less_is_not(tiny, monkeypatch):
    need = eval_batch_bytes(T, BATCH, CHANNELS)
    monkeypatch.setattr(data_module, "_available_bytes", lambda device: need)
    assert engine.evaluate_checkpoint(tiny["ckpt"], str(tiny["store"]), device="cpu")["samples"] == N_TEST
    monkeypatch.setattr(data_module, "_available_bytes", lambda device: need - 1)
    with pytest.raises(ResourceLimitError) as err:
        engine.evaluate_checkpoint(tiny["ckpt"], str(tiny["store"]), device="cpu")
    assert str(err.value).startswith(f"{tiny['ckpt']}: evaluating batches of {BATCH} at T={T} with channels "
                                     f"{CHANNELS} needs about ")


def test_a_split_of_one_sample_is_sized_as_a_batch_of_one(tiny, tmp_path, monkeypatch):
    """Batches are never larger than the split: one test sample needs one sample's memory."""
    one = tmp_path / "one.zarr"
    make_learnable_store(one, T=T, n_train=2, n_test=1)
    monkeypatch.setattr(data_module, "_available_bytes", lambda device: eval_batch_bytes(T, 1, CHANNELS))
    assert engine.evaluate_checkpoint(tiny["ckpt"], str(one), device="cpu")["samples"] == 1
    monkeypatch.setattr(data_module, "_available_bytes", lambda device: eval_batch_bytes(T, 1, CHANNELS) - 1)
    with pytest.raises(ResourceLimitError, match=r"evaluating batches of 1 at T=3 "):
        engine.evaluate_checkpoint(tiny["ckpt"], str(one), device="cpu")


# ----------------------------------------------------------------------------- main's own lines

def _config(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{"data": str(tmp_path / "none.zarr"), "out_dir": str(tmp_path), "T": T, "batch_size": 2,
                          "epochs": 1, "channels": CHANNELS, "device": "cpu", "workers": 0, **kw})


@pytest.mark.parametrize("threads,inside", [(1, 1), (2, 2), (0, 3)])
def test_main_runs_with_the_threads_asked_and_restores_them(tmp_path, monkeypatch, threads, inside):
    """threads 0 leaves torch's own number (3 here); 1 and 2 set it; afterwards it is 3 again."""
    seen = []
    monkeypatch.setattr(engine, "_run", lambda config, env, on_epoch: seen.append(
        (torch.get_num_threads(), env.device)) or {"done": True})
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert engine.main(_config(tmp_path, threads=threads)) == {"done": True}
        assert seen == [(inside, torch.device("cpu"))] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_main_refuses_a_device_that_is_not_there(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "_run", lambda *a: pytest.fail("ran without the device asked"))
    with pytest.raises(ConfigError, match=r"^--device cuda:99: "):
        engine.main(_config(tmp_path, device="cuda:99"))


# ----------------------------------------------------------------------------- cpu_has_bf16

def _cpuinfo(monkeypatch, text: str | None) -> None:
    def fake_open(path, *a, **kw):
        assert path == "/proc/cpuinfo"
        if text is None:
            raise FileNotFoundError(path)
        return io.StringIO(text)
    monkeypatch.setattr(engine, "open", fake_open, raising=False)


@pytest.mark.parametrize("text,want", [
    ("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 avx2\n", True),      # x86, AVX-512 BF16
    ("processor\t: 0\nflags\t\t: fpu sse amx_bf16\n", True),               # x86, AMX
    ("processor\t: 0\nflags\t\t: fpu sse avx2 bf16_x\n", False),           # no bf16 flag: whole names only
    ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", True),            # Arm
    ("processor\t: 0\nFeatures\t: fp asimd i8mm\n", False),
    ("flags\t\t: x:y:z amx_bf16\n", True),                                  # only the first ':' separates
    ("flags\t\t: amx_bf16 p:q\n", True),
    ("flags:amx_bf16 sse\n", True),                                         # no space around ':'
    ("flags\t\t: fpu\nflags\t\t: amx_bf16\n", False),                       # the first flags line counts
    ("processor\t: 0\nmodel name\t: bf16 amx_bf16\n", None),               # no flags line: unknown
    ("flags\n", None),                                                      # no ':' at all: unknown
    (None, None),                                                           # no /proc/cpuinfo
])
def test_cpu_has_bf16_reads_the_flags_line(monkeypatch, text, want):
    _cpuinfo(monkeypatch, text)
    assert engine.cpu_has_bf16() is want


# ----------------------------------------------------------------------------- _verify_store

def test_verify_store_returns_the_fingerprint_of_the_store_at_the_configs_T(tiny, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    # engine's clock alone (the store's own code keeps the real one): 2.5 s between its two reads
    monkeypatch.setattr(engine, "time", types.SimpleNamespace(perf_counter=iter([100.0, 102.5]).__next__))
    config = _config(tmp_path, data=str(tiny["store"]))
    assert engine._verify_store(config) == tiny["fingerprint"]
    assert [r.getMessage() for r in caplog.records] == [
        f"verified {tiny['store']}: 31 files match fingerprint {tiny['fingerprint']} (2.5 s)"]
    monkeypatch.undo()
    assert engine._verify_store(_config(tmp_path, data=str(tiny["data_root"]))) == tiny["fingerprint"]
    with pytest.raises(DataMismatchError, match=r"T=3 .*-T 2"):
        engine._verify_store(_config(tmp_path, data=str(tiny["store"]), T=2))


def test_verify_store_checks_the_expected_fingerprint(tiny, tmp_path):
    with pytest.raises(IntegrityError) as err:
        engine._verify_store(_config(tmp_path, data=str(tiny["store"]), data_fingerprint="0" * 64))
    assert str(err.value) == (f"{tiny['store']}: fingerprint {tiny['fingerprint'][:16]}... differs from the "
                              f"expected {'0' * 16}...")


def test_verify_store_hashes_every_file(tmp_path, monkeypatch):
    """A byte changed after the store was written is caught by every open here (its ctime moves
    past the marker's), so what _verify_store adds, hashing even under a valid marker, shows only
    in what it asks of open_store: verify=True, the config's T and fingerprint."""
    store = tmp_path / "s.zarr"
    make_learnable_store(store, T=T, n_train=4, n_test=3)
    fingerprint = open_frame_store(store).fingerprint
    calls = spy(monkeypatch, engine, "open_store")
    config = _config(tmp_path, data=str(store), data_fingerprint=fingerprint[:12])
    assert engine._verify_store(config) == fingerprint
    assert calls == [((str(store), T), {"verify": True, "expected_fingerprint": config.data_fingerprint})]
    shard = store / "train" / "frames" / "c" / "0" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError) as err:
        engine._verify_store(config)
    assert str(err.value) == (f"{store}: frame store NOT intact: 1 corrupt (of 31 files): corrupt "
                              "train/frames/c/0/0/0/0/0 (sha256 differs from the manifest) (dvsprep verify lists them)")


# ----------------------------------------------------------------------------- a SpikingJelly checkpoint

def test_a_spikingjelly_checkpoint_takes_T_from_the_data_roots_one_store(tmp_path):
    """SpikingJelly's state dict records no T: a DATA_ROOT's one frames_T<T>_number.zarr gives it.
    (DVSGestureNet is channels 128 only: one test sample keeps this cheap.)"""
    from dvsg_train.export.writer import export_checkpoint

    torch.manual_seed(3)
    model = build_model(128, "multistep", "plif").eval()
    config = TrainConfig(data=str(tmp_path), T=T, batch_size=BATCH, channels=128, epochs=5, neuron="plif")
    ours, sj = tmp_path / "c.pt", tmp_path / "net.pth"
    save_run_checkpoint(ours, model, config, "ab" * 32)
    export_checkpoint(ours, sj, "spikingjelly")
    root = tmp_path / "DATA"
    root.mkdir()
    make_learnable_store(root / f"frames_T{T}_number.zarr", T=T, n_train=2, n_test=1)
    want = _expected(model, 101, 1, 1)
    for data in (root, root / f"frames_T{T}_number.zarr"):
        got = engine.evaluate_checkpoint(str(sj), str(data), device="cpu")
        assert (got["samples"], got["config"]["T"], got["source"]) == (1, T, "spikingjelly")
        assert got["acc"] == want["acc"] and np.array_equal(got["confusion"], want["confusion"])
    make_learnable_store(root / "frames_T2_number.zarr", T=2, n_train=2, n_test=1)
    with pytest.raises(DataMismatchError) as err:
        engine.evaluate_checkpoint(str(sj), str(root), device="cpu")
    assert str(err.value) == (f"{root}: {sj} does not record T and this folder holds frames_T2_number.zarr, "
                              "frames_T3_number.zarr; pass the frame store's path")


# ----------------------------------------------------------------------------- _warn_slow_amp

FP16_ON_CPU = "--amp fp16 on the CPU is emulated and usually slower than fp32; leave --amp out on CPU"
BF16_EMULATED = ("--amp on this CPU (no avx512_bf16/amx_bf16) emulates bf16: expect it several times slower "
                 "than fp32; leave --amp out on CPU")


@pytest.mark.parametrize("device,amp_dtype,bf16,said", [
    ("cpu", "fp16", True, [FP16_ON_CPU]),         # fp16 on a CPU warns whatever the hardware
    ("cpu", "fp16", False, [FP16_ON_CPU]),        # ... once, not twice
    ("cpu", "bf16", False, [BF16_EMULATED]),
    ("cpu", "bf16", True, []),
    ("cpu", "bf16", None, []),                     # unknown hardware: no claim
    ("cpu", None, False, []),                      # no AMP
    ("cuda", "fp16", False, []),                   # only named: AMP on a GPU is its hardware's
    ("cuda", "bf16", False, []),
])
def test_warn_slow_amp_says_one_line_only_for_amp_emulated_on_the_cpu(monkeypatch, caplog, device, amp_dtype,
                                                                       bf16, said):
    caplog.set_level(logging.WARNING, logger="dvsg_train.engine")
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: bf16)
    config = TrainConfig(data="x", amp=amp_dtype is not None, amp_dtype=amp_dtype)
    engine._warn_slow_amp(config, torch.device(device))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, s) for s in said]
