"""dvsg_train.data: store checks, preloaded vs DataLoader batches, validation split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dvsprep.errors import MissingFileError, StoreError
from dvsprep.frames.store import open_frame_store

from dvsg_train.data import (
    Batches,
    FrameDataset,
    load_run_data,
    open_store,
    resolve_preload,
    split_train_val,
    to_network_input,
)
from dvsg_train.errors import ConfigError, DataMismatchError

from train_fixtures import make_learnable_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    path = root / "frames_T3_number.zarr"
    make_learnable_store(path, T=3, n_train=23, n_test=12)
    return path


def test_open_store_checks_T_and_finds_store_in_data_root(store, tmp_path):
    assert open_store(store, 3).T == 3
    assert open_store(store.parent, 3).path == store       # DATA_ROOT holding frames_T3_number.zarr
    with pytest.raises(DataMismatchError, match=r"T=3 .*-T 5"):
        open_store(store, 5)
    with pytest.raises(MissingFileError, match="no such frame store"):
        open_store(tmp_path / "absent.zarr", 3)
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(StoreError):
        open_store(tmp_path / "empty.zarr", 3)
    # A DATA_ROOT with stores of other T: the error names what is there and how to make the one asked for.
    with pytest.raises(MissingFileError, match=r"no frames_T5_number.zarr for -T 5 \(it holds frames_T3_number.zarr; "
                                               r"make one with dvsprep frames -T 5"):
        open_store(store.parent, 5)


def test_dataset_items_and_worker_loading(store):
    sp = open_frame_store(store).split("train")
    ds = FrameDataset(store, "train", np.array([4, 0, 7]))
    x, y = ds[1]
    assert x.dtype == torch.uint8 and x.shape == (3, 2, 128, 128)
    assert np.array_equal(x.numpy(), sp[0]) and y == sp.labels[0]
    assert ds.labels.tolist() == sp.labels[[4, 0, 7]].tolist()
    # one worker process opens the store itself and returns the same batch
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    frames, labels = next(iter(loader))
    assert np.array_equal(frames.numpy(), sp.load_all()[[4, 0, 7]])
    assert labels.tolist() == sp.labels[[4, 0, 7]].tolist()


def test_preloaded_and_loader_batches_are_identical(store):
    sp = open_frame_store(store).split("train")
    labels = torch.from_numpy(sp.labels)
    runs = []
    for preload in (True, False):
        gen = torch.Generator().manual_seed(5)
        kw = {"frames": torch.from_numpy(sp.load_all())} if preload else {"dataset": FrameDataset(store, "train")}
        b = Batches(labels, 5, shuffle=True, drop_last=True, generator=gen, **kw)
        assert len(b) == 4
        runs.append([[(f.clone(), l.clone()) for f, l in b] for _ in range(2)])   # two epochs
    for epoch_a, epoch_b in zip(*runs):
        assert len(epoch_a) == 4
        for (fa, la), (fb, lb) in zip(epoch_a, epoch_b):
            assert torch.equal(fa, fb) and torch.equal(la, lb)
    first = torch.cat([l for _, l in runs[0][0]])
    second = torch.cat([l for _, l in runs[0][1]])
    assert not torch.equal(first, second)                     # a new order every epoch
    test = Batches(labels, 5, shuffle=False, drop_last=False, frames=torch.from_numpy(sp.load_all()))
    assert [len(l) for _, l in test] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([l for _, l in test]), labels)


def test_to_network_input_transposes_once_and_converts():
    frames = torch.randint(0, 255, (4, 3, 2, 128, 128), dtype=torch.uint8)
    x, y = to_network_input(frames, torch.arange(4), torch.device("cpu"))
    assert x.shape == (3, 4, 2, 128, 128) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, frames.transpose(0, 1).float())
    f16 = torch.tensor([[[[[60000]]]]], dtype=torch.uint16).expand(1, 1, 2, 1, 1)
    assert to_network_input(f16, y[:1], torch.device("cpu"))[0].max() == 60000.0


def test_split_train_val_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(11), 10)
    tr, va = split_train_val(labels, 0.2, seed=3)
    assert len(va) == 22 and len(tr) == 88
    assert np.array_equal(np.bincount(labels[va], minlength=11), [2] * 11)
    assert not set(tr) & set(va) and sorted(np.concatenate([tr, va])) == list(range(110))
    tr2, va2 = split_train_val(labels, 0.2, seed=3)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, split_train_val(labels, 0.2, seed=4)[1])
    tr0, va0 = split_train_val(labels, 0.0, seed=3)
    assert len(va0) == 0 and len(tr0) == 110


def test_resolve_preload():
    cpu = torch.device("cpu")
    assert resolve_preload("none", 10, cpu) is None
    assert resolve_preload("cpu", 10, cpu) == cpu
    assert resolve_preload("auto", 10, cpu) == cpu
    assert resolve_preload("auto", 1 << 60, cpu) is None      # does not fit: read through workers
    with pytest.raises(ConfigError, match="--preload gpu needs a CUDA device"):
        resolve_preload("gpu", 10, cpu)


def test_load_run_data_uint16_and_validation(tmp_path):
    path = tmp_path / "frames_T2_number.zarr"
    make_learnable_store(path, T=2, n_train=22, n_test=11, dtype=np.uint16, big=300)
    data = load_run_data(path, T=2, batch_size=4, device=torch.device("cpu"), preload="cpu",
                         val_fraction=0.25, seed=0, generator=torch.Generator().manual_seed(0))
    assert data.train.frames.dtype == torch.uint16
    assert data.train.n_samples + data.val.n_samples == 22 and data.val.n_samples == 11
    assert data.test.n_samples == 11 and data.fingerprint == open_frame_store(path).fingerprint
    with pytest.raises(DataMismatchError, match="fewer than one batch"):
        load_run_data(path, T=2, batch_size=64, device=torch.device("cpu"))


def test_training_and_evaluation_share_one_preload_choice(store, tmp_path, monkeypatch):
    """load_run_data and evaluate_checkpoint both choose in `choose_feed`: the same --preload puts
    the frames in the same place, sized by the splits each of them reads."""
    import dvsg_train.data as data_module
    from dvsg_train import engine
    from dvsg_train.config import TrainConfig

    summary = engine.main(TrainConfig(data=str(store), out_dir=str(tmp_path), T=3, batch_size=6, epochs=1,
                                      channels=4, device="cpu", workers=0))
    ckpt = f"{summary['run_dir']}/checkpoint_latest.pt"
    asked, evaluated = [], []
    real = data_module.resolve_preload
    monkeypatch.setattr(data_module, "resolve_preload", lambda preload, nbytes, device, **kw:
                        asked.append((preload, nbytes)) or real(preload, nbytes, device, **kw))
    monkeypatch.setattr(engine, "evaluate", lambda model, batches, device, **kw: evaluated.append(batches)
                        or {"loss": 0.0, "acc": 0.0, "samples": 0, "confusion": None})
    sizes = {name: open_frame_store(store).split(name).nbytes for name in ("train", "test")}
    for preload in ("cpu", "none"):
        data = load_run_data(store, T=3, batch_size=6, device=torch.device("cpu"), preload=preload,
                             generator=torch.Generator().manual_seed(0))
        engine.evaluate_checkpoint(ckpt, str(store), device="cpu", preload=preload)
        test = evaluated[-1]
        assert (data.test.frames is None, test.frames is None) == (preload == "none",) * 2
        if preload == "cpu":
            assert torch.equal(test.frames, data.test.frames) and test.frames.device.type == "cpu"
        else:
            assert test.dataset.path == data.test.dataset.path and test.workers == data.test.workers == 0
    assert asked == [("cpu", sizes["train"] + sizes["test"]), ("cpu", sizes["test"]),
                     ("none", sizes["train"] + sizes["test"]), ("none", sizes["test"])]
