"""dvsg_train.data at its edges, with exact values: where a --data path leads, the validation split
per class, the batches of one rank of a DDP world (preloaded and through a DataLoader), the
memory sizes and refusals of --preload and of evaluation at their byte boundaries, and the
choice of feed. Every expected value is written out by hand (or by a few lines of specification
here); the memory free is a stand-in, so every boundary is exact. Fast: one tiny store (T=1)."""
from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch

import dvsg_train.data as data_mod
from dvsg_train.data import (
    Batches,
    Feed,
    FrameDataset,
    _BatchSampler,
    batch_order,
    check_eval_memory,
    choose_feed,
    eval_batch_bytes,
    load_run_data,
    n_batches,
    open_store,
    resolve_preload,
    resolve_store_path,
    split_train_val,
    store_inputs,
    to_network_input,
)
from dvsg_train.errors import ConfigError, DataMismatchError
from dvsprep.errors import MissingFileError, ResourceLimitError, StoreError
from dvsprep.frames import open_frame_store

from train_fixtures import make_learnable_store

CPU = torch.device("cpu")
CUDA = torch.device("cuda")      # only named: every byte count of it comes from a stand-in
MiB = 2 ** 20


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """DATA_ROOT/frames_T1_number.zarr: train labels [4, 0, 1, 2, 3], test labels [1, 0, 2]."""
    root = tmp_path_factory.mktemp("root")
    path = root / "frames_T1_number.zarr"
    make_learnable_store(path, T=1, n_train=5, n_test=3)
    return path


# ----------------------------------------------------------------------------- paths

def test_resolve_store_path_of_a_store_a_zip_or_url_is_that_path_as_text(store, tmp_path):
    assert resolve_store_path(store, 1) == str(store)
    assert resolve_store_path(store, None) == str(store)
    assert type(resolve_store_path(store, 1)) is str
    assert resolve_store_path("https://example.org/s.zarr", 4) == "https://example.org/s.zarr"


def test_resolve_store_path_in_a_data_root(tmp_path):
    root = tmp_path / "root"
    for name in ("frames_T5_time.zarr", "frames_T3_number.zarr"):
        (root / name).mkdir(parents=True)
    (root / "frames_T9_number.zarr").write_text("a file, not a store")     # not listed: not a folder
    assert resolve_store_path(root, 3) == str(root / "frames_T3_number.zarr")
    assert type(resolve_store_path(root, 3)) is str
    with pytest.raises(MissingFileError) as e:
        resolve_store_path(root, 7)
    assert str(e.value) == (f"{root}: no frames_T7_number.zarr for -T 7 (it holds frames_T3_number.zarr, "
                            f"frames_T5_time.zarr; make one with dvsprep frames -T 7 -d {root}, or pass the store path)")
    with pytest.raises(MissingFileError) as e:
        resolve_store_path(root, 9, why="T=9, what x.pt was trained with")
    assert str(e.value) == (f"{root}: no frames_T9_number.zarr for T=9, what x.pt was trained with (it holds "
                            f"frames_T3_number.zarr, frames_T5_time.zarr; make one with dvsprep frames -T 9 -d "
                            f"{root}, or pass the store path)")
    with pytest.raises(MissingFileError) as e:
        resolve_store_path(root, None)
    assert str(e.value) == (f"{root}: a DATA_ROOT, not a frame store (it holds frames_T3_number.zarr, "
                            f"frames_T5_time.zarr); pass the store path")


def test_resolve_store_path_in_a_data_root_without_stores(tmp_path):
    (tmp_path / "events.h5").write_bytes(b"")        # a DATA_ROOT by its events file alone
    with pytest.raises(MissingFileError) as e:
        resolve_store_path(tmp_path, 2)
    assert str(e.value) == (f"{tmp_path}: no frames_T2_number.zarr for -T 2 (it holds no frame store; make one "
                            f"with dvsprep frames -T 2 -d {tmp_path}, or pass the store path)")
    with pytest.raises(MissingFileError) as e:
        resolve_store_path(tmp_path, None)
    assert str(e.value) == f"{tmp_path}: a DATA_ROOT, not a frame store (it holds no frame store); pass the store path"


def test_store_inputs(store, tmp_path):
    root = tmp_path / "root"
    for name in ("frames_T5_time.zarr", "frames_T3_number.zarr"):
        (root / name).mkdir(parents=True)
    (root / "frames_T9_number.zarr").write_text("")
    assert store_inputs(root) == [root / "frames_T3_number.zarr", root / "frames_T5_time.zarr"]
    assert store_inputs(str(store)) == [store]                  # a store (it has zarr.json) is itself
    assert store_inputs(root / "frames_T9_number.zarr") == [root / "frames_T9_number.zarr"]   # a file
    assert store_inputs(tmp_path / "absent") == [tmp_path / "absent"]
    assert store_inputs("https://example.org/a.zarr") == []
    assert store_inputs("s3://bucket/a.zarr") == []


def test_open_store_refuses_another_T_in_one_exact_line(store):
    assert open_store(store).T == 1 and open_store(store, 1).T == 1
    assert open_store(store.parent, 1).path == store
    with pytest.raises(DataMismatchError) as e:
        open_store(store, 2)
    assert str(e.value) == (f"{store}: store has T=1 frames per sample, but -T 2 was asked for "
                            f"(make a store with dvsprep frames -T 2 or pass -T 1)")


# ----------------------------------------------------------------------------- the validation split

def _split_spec(labels, fraction, seed):
    """The split by its definition: per class 0..10 in order, a PCG64 permutation of its indices
    cut at k = round(fraction * n) clamped to [1, n - 1] (n >= 2) or 0 (n < 2)."""
    rng = np.random.default_rng(seed)
    val = []
    for c in range(11):
        idx = [i for i, label in enumerate(labels) if label == c]
        k = round(fraction * len(idx))
        k = min(max(k, 1), len(idx) - 1) if len(idx) >= 2 else 0
        val += list(rng.permutation(np.array(idx, dtype=np.int64))[:k])
    val = sorted(int(v) for v in val)
    return [i for i in range(len(labels)) if i not in val], val


def test_split_train_val_exact_indices_against_its_specification():
    labels = np.array([0, 10, 0, 3, 10, 0, 3, 0, 5, 10, 10, 0, 3])    # class 0 first, 10 last, 5 alone
    for fraction, seed in ((0.5, 0), (0.25, 3), (1e-9, 1), (0.99, 2)):
        tr, va = split_train_val(labels, fraction, seed)
        want_tr, want_va = _split_spec(labels, fraction, seed)
        assert (tr.tolist(), va.tolist()) == (want_tr, want_va), (fraction, seed)
        assert tr.dtype == va.dtype == np.int64
    # by hand: fraction 1e-9 still takes one of each class with two or more (0, 3, 10), none of 5
    assert len(split_train_val(labels, 1e-9, 1)[1]) == 3
    # by hand at 0.5: class 0 (5 samples) round(2.5) = 2, class 3 (3) round(1.5) = 2, class 10 (4) 2
    assert len(split_train_val(labels, 0.5, 0)[1]) == 6


def test_split_train_val_sizes_by_hand():
    # a class of 1 gives nothing, of 2 gives 1 whatever the fraction, of 3 at 0.5 gives round(1.5) = 2
    labels = np.array([7, 2, 2, 9, 9, 9])
    for fraction, want in ((0.5, {7: 0, 2: 1, 9: 2}), (0.01, {7: 0, 2: 1, 9: 1}), (0.9, {7: 0, 2: 1, 9: 2})):
        tr, va = split_train_val(labels, fraction, seed=5)
        assert {c: int((labels[va] == c).sum()) for c in (7, 2, 9)} == want
        assert sorted(tr.tolist() + va.tolist()) == list(range(6))
    tr, va = split_train_val(labels, 0.0, seed=5)
    assert tr.tolist() == [0, 1, 2, 3, 4, 5] and va.shape == (0,) and va.dtype == np.int64


# ----------------------------------------------------------------------------- batch order

def _ids(batches):
    return [b.tolist() for b in batches]


def test_batch_order_one_rank_in_order_by_hand():
    assert _ids(batch_order(7, 3, False, False, None)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert _ids(batch_order(7, 3, False, True, None)) == [[0, 1, 2], [3, 4, 5]]
    assert _ids(batch_order(6, 3, False, True, None)) == [[0, 1, 2], [3, 4, 5]]
    assert _ids(batch_order(6, 3, False, False, None)) == [[0, 1, 2], [3, 4, 5]]
    assert _ids(batch_order(2, 3, False, True, None)) == []
    assert _ids(batch_order(2, 3, False, False, None)) == [[0, 1]]
    assert _ids(batch_order(0, 3, False, False, None)) == []


def test_batch_order_ranks_share_each_global_batch_by_hand():
    # n 11, -b 2, world 2: global batches [0-3] [4-7] and the short [8, 9, 10]
    assert _ids(batch_order(11, 2, False, True, None, 0, 2)) == [[0, 1], [4, 5]]
    assert _ids(batch_order(11, 2, False, True, None, 1, 2)) == [[2, 3], [6, 7]]
    assert _ids(batch_order(11, 2, False, False, None, 0, 2)) == [[0, 1], [4, 5], [8, 9]]
    assert _ids(batch_order(11, 2, False, False, None, 1, 2)) == [[2, 3], [6, 7], [10]]
    # n 9, -b 2, world 4: one full global batch of 8 and [8], which only rank 0 gets a share of
    assert _ids(batch_order(9, 2, False, False, None, 0, 4)) == [[0, 1], [8]]
    assert _ids(batch_order(9, 2, False, False, None, 1, 4)) == [[2, 3]]
    assert _ids(batch_order(9, 2, False, False, None, 3, 4)) == [[6, 7]]
    assert _ids(batch_order(9, 2, False, True, None, 0, 4)) == [[0, 1]]
    # n 10, -b 1, world 4: the short global batch [8, 9] gives ranks 0 and 1 one each
    assert _ids(batch_order(10, 1, False, False, None, 1, 4)) == [[1], [5], [9]]
    assert _ids(batch_order(10, 1, False, False, None, 2, 4)) == [[2], [6]]


def test_batch_order_shuffled_is_the_generators_randperm_cut_the_same_way():
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(4)).tolist()
    assert perm != list(range(11))
    got = _ids(batch_order(11, 2, True, False, torch.Generator().manual_seed(4), 1, 2))
    assert got == [perm[2:4], perm[6:8], perm[10:11]]
    got = _ids(batch_order(11, 3, True, True, torch.Generator().manual_seed(4)))
    assert got == [perm[0:3], perm[3:6], perm[6:9]]


@pytest.mark.parametrize("n,bs,drop,rank,world,want", [
    (7, 3, False, 0, 1, 3), (7, 3, True, 0, 1, 2), (6, 3, False, 0, 1, 2), (6, 3, True, 0, 1, 2),
    (2, 3, True, 0, 1, 0), (2, 3, False, 0, 1, 1), (0, 3, False, 0, 1, 0),
    (11, 2, True, 1, 2, 2), (11, 2, False, 1, 2, 3), (11, 2, False, 0, 2, 3),
    (9, 2, False, 0, 4, 2), (9, 2, False, 1, 4, 1), (9, 2, False, 3, 4, 1), (9, 2, True, 0, 4, 1),
    (10, 1, False, 1, 4, 3), (10, 1, False, 2, 4, 2), (10, 1, True, 1, 4, 2),
])
def test_n_batches_by_hand_and_as_batch_order_counts(n, bs, drop, rank, world, want):
    assert n_batches(n, bs, drop, rank, world) == want
    assert len(batch_order(n, bs, False, drop, None, rank, world)) == want


def test_n_batches_defaults_are_one_process():
    assert n_batches(7, 3, False) == 3 and n_batches(7, 3, True) == 2
    # rank 0 by default: the short last global batch of 1 (5 = 2 x 2 + 1) is rank 0's alone
    assert n_batches(5, 2, False, world_size=2) == 2 and n_batches(5, 2, False, 1, 2) == 1


def test_batch_sampler_yields_lists_and_counts_this_ranks_batches():
    s = _BatchSampler(11, 2, False, False, None, 1, 2)
    assert list(s) == [[2, 3], [6, 7], [10]] and len(s) == 3
    s = _BatchSampler(9, 2, False, False, None, 1, 4)
    assert list(s) == [[2, 3]] and len(s) == 1
    s = _BatchSampler(11, 2, False, True, None, 0, 2)
    assert list(s) == [[0, 1], [4, 5]] and len(s) == 2
    s = _BatchSampler(7, 3, True, False, torch.Generator().manual_seed(4))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(4)).tolist()
    assert list(s) == [perm[0:3], perm[3:6], perm[6:]] and len(s) == 3
    assert _BatchSampler(5, 2, False, False, None).args == (5, 2, False, False, None, 0, 1)


# ----------------------------------------------------------------------------- Batches

def _frames(n):
    """frames [n, 1, 2, 1, 1] int16 carrying the sample's index (and -index)."""
    f = torch.zeros(n, 1, 2, 1, 1, dtype=torch.int16)
    f[:, 0, 0, 0, 0] = torch.arange(n, dtype=torch.int16)
    f[:, 0, 1, 0, 0] = -torch.arange(n, dtype=torch.int16)
    return f


class Items(torch.utils.data.Dataset):
    """Sample i -> (frames of `_frames`, label 100 + i)."""

    def __init__(self, n):
        self.f = _frames(n)

    def __len__(self):
        return len(self.f)

    def __getitem__(self, i):
        return self.f[i], 100 + i


def test_batches_refuses_both_or_neither_source_and_a_rank_outside_the_world():
    labels = torch.arange(4)
    msg = "Batches needs exactly one of frames (preloaded) or dataset"
    with pytest.raises(ValueError) as e:
        Batches(labels, 2, shuffle=False, drop_last=False)
    assert str(e.value) == msg
    with pytest.raises(ValueError) as e:
        Batches(labels, 2, shuffle=False, drop_last=False, frames=_frames(4), dataset=Items(4))
    assert str(e.value) == msg
    for rank, world in ((2, 2), (-1, 2), (1, 1), (0, 0)):
        with pytest.raises(ValueError) as e:
            Batches(labels, 2, shuffle=False, drop_last=False, frames=_frames(4), rank=rank, world_size=world)
        assert str(e.value) == f"rank {rank} outside a world of {world}"
    for rank, world in ((0, 2), (1, 2), (0, 1), (3, 4)):
        b = Batches(labels, 2, shuffle=False, drop_last=False, frames=_frames(4), rank=rank, world_size=world)
        assert (b.rank, b.world_size) == (rank, world)


def test_batches_defaults():
    b = Batches(torch.arange(5), 2, shuffle=False, drop_last=False, frames=_frames(5))
    assert (b.rank, b.world_size, b.generator, b.dataset, b.workers, b.pin_memory) == (0, 1, None, None, 0, False)
    assert (b.batch_size, b.shuffle, b.drop_last, b.n_samples, len(b)) == (2, False, False, 5, 3)


def test_preloaded_batches_of_one_rank_by_hand():
    labels = torch.arange(11) + 100
    b = Batches(labels, 2, shuffle=False, drop_last=False, frames=_frames(11), rank=1, world_size=2)
    assert b.n_samples == 11 and len(b) == 3
    got = [(f[:, 0, 0, 0, 0].tolist(), f[:, 0, 1, 0, 0].tolist(), y.tolist()) for f, y in b]
    assert got == [([2, 3], [-2, -3], [102, 103]), ([6, 7], [-6, -7], [106, 107]), ([10], [-10], [110])]
    b = Batches(labels, 2, shuffle=False, drop_last=True, frames=_frames(11), rank=0, world_size=2)
    assert len(b) == 2
    assert [y.tolist() for _, y in b] == [[100, 101], [104, 105]]


def test_preloaded_shuffled_batches_follow_the_generator_epoch_after_epoch():
    gen = torch.Generator().manual_seed(9)
    b = Batches(torch.arange(7) + 100, 3, shuffle=True, drop_last=True, generator=gen, frames=_frames(7))
    ref = torch.Generator().manual_seed(9)
    for _ in range(2):
        perm = torch.randperm(7, generator=ref).tolist()
        got = [(f[:, 0, 0, 0, 0].tolist(), y.tolist()) for f, y in b]
        assert got == [(perm[0:3], [100 + i for i in perm[0:3]]), (perm[3:6], [100 + i for i in perm[3:6]])]


def test_preloaded_batches_with_no_batch_yield_nothing():
    b = Batches(torch.arange(2), 3, shuffle=False, drop_last=True, frames=_frames(2))
    assert len(b) == 0 and list(b) == []
    b = Batches(torch.arange(1), 2, shuffle=False, drop_last=False, frames=_frames(1), rank=1, world_size=2)
    assert len(b) == 0 and list(b) == []


def test_loader_batches_of_one_rank_by_hand_and_the_loader_is_built_once():
    b = Batches(torch.arange(11) + 100, 2, shuffle=False, drop_last=False, dataset=Items(11), rank=1, world_size=2)
    assert len(b) == 3
    for _ in range(2):
        got = [(f[:, 0, 0, 0, 0].tolist(), y.tolist()) for f, y in b]
        assert got == [([2, 3], [102, 103]), ([6, 7], [106, 107]), ([10], [110])]
    loader = b._loader
    assert loader is not None and list(b) and b._loader is loader
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (0, False, False)
    assert len(loader) == 3


def test_loader_batches_pass_pin_memory_and_never_draw_from_the_global_rng():
    b = Batches(torch.arange(4), 2, shuffle=True, drop_last=True, dataset=Items(4),
                generator=torch.Generator().manual_seed(1), pin_memory=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with pytest.warns(UserWarning, match="pin_memory"):       # no accelerator here: torch says so
        batches = list(b)
    assert torch.equal(torch.get_rng_state(), before)
    assert b._loader.pin_memory is True and len(batches) == 2
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(1)).tolist()
    assert [y.tolist() for _, y in batches] == [[100 + i for i in perm[:2]], [100 + i for i in perm[2:]]]


def test_loader_is_built_with_the_workers_and_a_private_generator(monkeypatch):
    built = []

    class Loader:
        def __init__(self, dataset, **kw):
            built.append((dataset, kw))

        def __iter__(self):
            return iter([])
    monkeypatch.setattr(torch.utils.data, "DataLoader", Loader)
    ds = Items(4)
    for workers, persistent in ((0, False), (1, True), (2, True)):
        b = Batches(torch.arange(4), 2, shuffle=False, drop_last=False, dataset=ds, workers=workers,
                    pin_memory=bool(workers % 2), rank=1, world_size=2)
        assert list(b) == [] and list(b) == [] and len(built) == 1          # built once, at the first epoch
        dataset, kw = built.pop()
        assert dataset is ds and sorted(kw) == ["batch_sampler", "generator", "num_workers", "persistent_workers",
                                                 "pin_memory"]
        assert (kw["num_workers"], kw["persistent_workers"], kw["pin_memory"]) == (workers, persistent, bool(workers % 2))
        assert kw["generator"].initial_seed() == 0
        assert kw["batch_sampler"].args == (4, 2, False, False, None, 1, 2)


def test_preloaded_batches_go_to_the_frames_device():
    meta = torch.device("meta")
    b = Batches(torch.arange(5) + 100, 2, shuffle=False, drop_last=False, frames=torch.empty(5, 1, 2, 1, 1, device=meta))
    got = [(f.device, f.shape[0], y.device) for f, y in b]
    assert got == [(meta, 2, meta), (meta, 2, meta), (meta, 1, meta)]


def test_to_network_input_is_contiguous_float32_time_first():
    frames = _frames(3).expand(3, 1, 2, 1, 4).clone()
    x, y = to_network_input(frames.repeat(1, 2, 1, 1, 1), torch.tensor([5, 6, 7]), CPU)
    assert x.shape == (2, 3, 2, 1, 4) and x.dtype == torch.float32 and x.is_contiguous()
    assert x[1, 2, 1, 0, 3].item() == -2.0 and x[0, 1, 0, 0, 0].item() == 1.0
    assert y.tolist() == [5, 6, 7]
    # both go to the device asked for ("meta": a device without data, so not this CPU)
    meta = torch.device("meta")
    x, y = to_network_input(frames, torch.tensor([5, 6, 7]), meta)
    assert (x.device, y.device, x.shape, x.dtype) == (meta, meta, (1, 3, 2, 1, 4), torch.float32)


# ----------------------------------------------------------------------------- memory

def test_eval_batch_bytes_by_hand():
    # 4 bytes x T x B x 128 x 128 x (2 polarities + 4 copies x channels)
    assert eval_batch_bytes(1, 1, 0) == 4 * 16384 * 2 == 131072
    assert eval_batch_bytes(2, 3, 1) == 4 * 2 * 3 * 16384 * 6 == 2359296
    assert eval_batch_bytes(16, 8, 128) == 4 * 16 * 8 * 16384 * 514 == 4311744512


def _free(monkeypatch, **by_type):
    monkeypatch.setattr(data_mod, "_available_bytes", lambda device: by_type[device.type])


def test_check_eval_memory_at_the_byte_boundary(monkeypatch):
    need = eval_batch_bytes(2, 3, 1)          # 2359296 bytes = 2.25 MiB
    _free(monkeypatch, cpu=need)
    check_eval_memory("ck.pt", 2, 3, 1, CPU)                 # exactly fits
    _free(monkeypatch, cpu=need - 1)
    with pytest.raises(ResourceLimitError) as e:
        check_eval_memory("ck.pt", 2, 3, 1, CPU)
    assert str(e.value) == ("ck.pt: evaluating batches of 3 at T=2 with channels 1 needs about 2.2 MiB of memory, "
                            "but only 2.2 MiB is free (use a smaller -b)")
    _free(monkeypatch, cuda=MiB)
    with pytest.raises(ResourceLimitError) as e:
        check_eval_memory("ck.pt", 2, 3, 1, CUDA)
    assert str(e.value) == ("ck.pt: evaluating batches of 3 at T=2 with channels 1 needs about 2.2 MiB of cuda memory, "
                            "but only 1.0 MiB is free (use a smaller -b)")


def test_resolve_preload_none_and_gpu_without_cuda():
    assert resolve_preload("none", 1, CPU) is None
    assert resolve_preload("none", 1, CUDA) is None
    with pytest.raises(ConfigError) as e:
        resolve_preload("gpu", 1, CPU)
    assert str(e.value) == "--preload gpu needs a CUDA device, but the run uses cpu"


def test_resolve_preload_cpu_fits_up_to_every_free_byte_of_each_copy(monkeypatch):
    _free(monkeypatch, cpu=30 * MiB, cuda=0)
    assert resolve_preload("cpu", 10 * MiB, CPU, cpu_copies=3) == CPU
    assert resolve_preload("cpu", 30 * MiB, CUDA) == CPU                 # the CPU's memory, even for a GPU run
    assert resolve_preload("cpu", 20 * MiB, CPU) == CPU                  # more than the auto share, asked for
    with pytest.raises(ConfigError) as e:
        resolve_preload("cpu", 10 * MiB + 1, CPU, cpu_copies=3, what="s.zarr")
    assert str(e.value) == ("s.zarr: --preload cpu (the frames) needs about 30.0 MiB of memory, but only 30.0 MiB "
                            "is free (use --preload auto or none)")
    with pytest.raises(ConfigError) as e:
        resolve_preload("cpu", 31 * MiB, CPU)
    assert str(e.value) == ("the store: --preload cpu (the frames) needs about 31.0 MiB of memory, but only 30.0 MiB "
                            "is free (use --preload auto or none)")


def test_resolve_preload_gpu_counts_one_copy_of_the_gpus_memory(monkeypatch):
    _free(monkeypatch, cpu=0, cuda=8 * MiB)
    assert resolve_preload("gpu", 8 * MiB, CUDA, cpu_copies=4) == CUDA
    with pytest.raises(ConfigError) as e:
        resolve_preload("gpu", 8 * MiB + 1, CUDA, what="s.zarr")
    assert str(e.value) == ("s.zarr: --preload gpu (the frames) needs about 8.0 MiB of cuda memory, but only 8.0 MiB "
                            "is free (use --preload auto or none)")


def test_resolve_preload_auto_takes_half_of_the_free_memory_gpu_first(monkeypatch):
    _free(monkeypatch, cpu=60 * MiB, cuda=20 * MiB)
    assert resolve_preload("auto", 10 * MiB, CUDA) == CUDA               # exactly half the GPU's
    assert resolve_preload("auto", 10 * MiB + 1, CUDA) == CPU            # then the CPU's
    assert resolve_preload("auto", 30 * MiB, CUDA) == CPU
    assert resolve_preload("auto", 30 * MiB + 1, CUDA) is None
    assert resolve_preload("auto", 10 * MiB, CUDA, cpu_copies=3) == CUDA  # one copy on the GPU
    assert resolve_preload("auto", 11 * MiB, CUDA, cpu_copies=3) is None  # three copies on the CPU: 33 > 30
    assert resolve_preload("auto", 10 * MiB + 1, CUDA, cpu_copies=3) is None
    assert resolve_preload("auto", 30 * MiB, CPU) == CPU                 # a CPU run never looks at a GPU
    assert resolve_preload("auto", 30 * MiB + 1, CPU) is None
    assert resolve_preload("auto", 15 * MiB, CPU, cpu_copies=2) == CPU
    assert resolve_preload("auto", 15 * MiB + 1, CPU, cpu_copies=2) is None
    _free(monkeypatch, cpu=60 * MiB, cuda=0)
    assert resolve_preload("auto", 1, CUDA) == CPU
    # a device that is neither (--device mps, say) is never preloaded onto by auto: CPU memory only
    _free(monkeypatch, cpu=60 * MiB, meta=60 * MiB)
    assert resolve_preload("auto", 1, torch.device("meta")) == CPU


def test_available_bytes_of_each_source(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: calls.append(device) or (123, 456))
    assert data_mod._available_bytes(CUDA) == 123 and calls == [CUDA]
    monkeypatch.setattr(data_mod.resources, "available_memory", lambda: 777)
    assert data_mod._available_bytes(CPU) == 777
    monkeypatch.setattr(data_mod.resources, "available_memory", lambda: None)
    pages = {"SC_AVPHYS_PAGES": 5, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    assert data_mod._available_bytes(CPU) == 20480
    for exc in (ValueError, OSError, AttributeError):
        def refuse(name, exc=exc):
            raise exc(name)
        monkeypatch.setattr(os, "sysconf", refuse)
        assert data_mod._available_bytes(CPU) == 0


# ----------------------------------------------------------------------------- feeds

def test_choose_feed_preloads_or_streams_and_says_so(store, monkeypatch, caplog):
    sp = open_frame_store(store).split("train")          # 5 samples of 2 x 128 x 128 uint8: 163840 bytes
    asked = []
    monkeypatch.setattr(data_mod, "_cpus", lambda: 2)
    real = data_mod.resolve_preload
    monkeypatch.setattr(data_mod, "resolve_preload", lambda *a, **kw: asked.append((a, kw)) or real(*a, **kw))
    caplog.set_level(logging.INFO, logger="dvsg_train.data")
    feed = choose_feed(str(store), (sp, sp), "cpu", CPU, workers=3, cpu_copies=2)
    assert asked == [(("cpu", 327680, CPU), {"cpu_copies": 2, "what": str(store)})]
    assert (feed.path, feed.where, feed.workers, feed.pin_memory) == (str(store), CPU, 3, False)
    assert [r.getMessage() for r in caplog.records] == [f"preloading {store} into cpu memory"]
    caplog.clear()
    feed = choose_feed(str(store), (sp,), "none", CPU, workers=2)
    assert (feed.where, feed.workers, feed.pin_memory) == (None, 2, False) and caplog.records == []
    assert asked[1] == (("none", 163840, CPU), {"cpu_copies": 1, "what": str(store)})     # one copy by default
    feed = choose_feed(str(store), (sp,), "none", CPU, workers=3)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "-j 3: more DataLoader workers than the 2 CPUs this process may use, which usually slows loading")]
    caplog.clear()
    feed = choose_feed(str(store), (sp,), "none", CUDA)
    assert (feed.where, feed.workers, feed.pin_memory) == (None, 0, True) and caplog.records == []
    _free(monkeypatch, cpu=1 << 40, cuda=1 << 40)
    feed = choose_feed(str(store), (sp,), "auto", CUDA)
    assert (feed.where, feed.pin_memory) == (CUDA, False)


def test_cpus_falls_back_to_the_cpu_count(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert data_mod._cpus() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert data_mod._cpus() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert data_mod._cpus() == 1


def test_feed_batches_preloaded_read_each_split_once(store, monkeypatch):
    sp = open_frame_store(store).split("train")
    everything = sp.load_all()
    reads = []
    monkeypatch.setattr(type(sp), "load_all", lambda self: reads.append(self.name) or everything)
    feed = Feed(str(store), CPU)
    gen = torch.Generator().manual_seed(0)
    train = feed.batches(sp, 2, np.array([4, 1, 3]), train=True, generator=gen, rank=1, world_size=2)
    val = feed.batches(sp, 2, np.array([0, 2]))
    assert reads == ["train"]                                 # train and val share one read
    assert (train.shuffle, train.drop_last, train.generator, train.rank, train.world_size) == (True, True, gen, 1, 2)
    assert train.labels.tolist() == [3, 0, 2] and torch.equal(train.frames, torch.from_numpy(everything[[4, 1, 3]]))
    assert (val.shuffle, val.drop_last, val.generator, val.rank, val.world_size) == (False, False, None, 0, 1)
    assert val.labels.tolist() == [4, 1] and torch.equal(val.frames, torch.from_numpy(everything[[0, 2]]))
    full = feed.batches(sp, 2, generator=gen)                 # not train: no generator, in order
    assert full.generator is None and full.labels.tolist() == [4, 0, 1, 2, 3]
    assert torch.equal(full.frames, torch.from_numpy(everything)) and reads == ["train"]
    assert (train.batch_size, full.batch_size) == (2, 2)
    meta = torch.device("meta")                               # held on the feed's device
    on = Feed(str(store), meta).batches(sp, 3, np.array([1, 2]))
    assert on.frames.device == meta and on.frames.shape == (2, 1, 2, 128, 128) and on.batch_size == 3


def test_feed_batches_streamed_through_a_dataset(store):
    sp = open_frame_store(store).split("train")
    feed = Feed(str(store), None, workers=0, pin_memory=False)
    b = feed.batches(sp, 2, np.array([3, 0]), train=True, generator=torch.Generator().manual_seed(0))
    assert b.frames is None and b.dataset.path == str(store) and b.dataset.split == "train"
    assert b.dataset.indices.tolist() == [3, 0] and b.labels.tolist() == [2, 4]
    assert (b.workers, b.pin_memory, b.shuffle, b.drop_last, b.batch_size) == (0, False, True, True, 2)
    b = Feed(str(store), None, workers=2, pin_memory=True).batches(sp, 2)
    assert (b.workers, b.pin_memory, b.generator) == (2, True, None) and len(b.dataset) == 5


def test_frame_dataset_items_and_pickling(store):
    sp = open_frame_store(store).split("train")
    everything = sp.load_all()
    ds = FrameDataset(store, "train")
    assert ds.indices.tolist() == [0, 1, 2, 3, 4] and len(ds) == 5 and ds.path == str(store)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [4, 0, 1, 2, 3]
    assert ds._sp is None                                     # opened lazily, where it is read
    x, y = ds[3]
    assert type(y) is int and y == 2 and torch.equal(x, torch.from_numpy(everything[3]))
    assert ds._sp is not None
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._sp is None and ds._sp is not None            # the copy opens its own
    x, y = copy[0]
    assert y == 4 and torch.equal(x, torch.from_numpy(everything[0]))
    assert FrameDataset(store, "test", np.array([2, 0], dtype=np.uint8)).indices.dtype == np.int64
    sub = FrameDataset(str(store), "test", [2, 0])
    assert sub.indices.dtype == np.int64 and len(sub) == 2 and sub.labels.tolist() == [2, 1]
    test = open_frame_store(store).split("test").load_all()
    assert torch.equal(sub[0][0], torch.from_numpy(test[2])) and sub[1][1] == 1


# ----------------------------------------------------------------------------- load_run_data

@pytest.fixture(scope="module")
def store13(tmp_path_factory):
    """13 train samples (labels 0..10, and 0 and 1 twice), 1 test sample."""
    path = tmp_path_factory.mktemp("s13") / "s.zarr"
    make_learnable_store(path, T=1, n_train=13, n_test=1)
    return path


def test_load_run_data_refusals_exact(store, store13, tmp_path):
    with pytest.raises(DataMismatchError) as e:
        load_run_data(store, T=1, batch_size=6, device=CPU)
    assert str(e.value) == (f"{store}: train split has 5 samples, fewer than one batch of 6 "
                            f"(batches drop the last partial one)")
    with pytest.raises(DataMismatchError) as e:
        load_run_data(store, T=1, batch_size=3, device=CPU, world_size=2)
    assert str(e.value) == (f"{store}: train split has 5 samples, fewer than one global batch of 6 (-b 3 x 2 "
                            f"processes) (batches drop the last partial one)")
    # 0.5 holds out one of each of the two classes with two samples: 11 remain
    with pytest.raises(DataMismatchError) as e:
        load_run_data(store13, T=1, batch_size=12, device=CPU, val_fraction=0.5)
    assert str(e.value) == (f"{store13}: after holding out 2 samples for validation, 11 train samples remain, "
                            f"fewer than one batch of 12")
    with pytest.raises(DataMismatchError) as e:
        load_run_data(store13, T=1, batch_size=6, device=CPU, val_fraction=0.5, world_size=2)
    assert str(e.value) == (f"{store13}: after holding out 2 samples for validation, 11 train samples remain, "
                            f"fewer than one global batch of 12 (-b 6 x 2 processes)")
    from train_fixtures import split_arrays
    from dvsprep.frames.store import write_frame_store_from_arrays
    empty = {k: v[:0] for k, v in split_arrays(1, 1, 5).items()}
    write_frame_store_from_arrays(tmp_path / "e.zarr", T=1, split_by="number", events_fingerprint="x",
                                  splits={"train": split_arrays(3, 1, 1), "test": empty})
    with pytest.raises(DataMismatchError) as e:
        load_run_data(tmp_path / "e.zarr", T=1, batch_size=1, device=CPU)
    assert str(e.value) == f"{tmp_path / 'e.zarr'}: test split is empty"


def test_load_run_data_at_the_batch_boundaries(store, store13, monkeypatch):
    gen0 = torch.Generator().manual_seed(0)
    data = load_run_data(store.parent, T=1, batch_size=5, device=CPU, preload="cpu", generator=gen0)
    assert data.train.n_samples == 5 and len(data.train) == 1 and data.val is None
    assert data.train.generator is gen0 and (data.train.rank, data.train.world_size) == (0, 1)
    shared = load_run_data(store, T=1, batch_size=2, device=CPU, preload="cpu", generator=gen0, rank=1, world_size=2)
    assert shared.val is None and shared.train.generator is gen0
    assert (shared.train.rank, shared.train.world_size, shared.test.rank, shared.test.world_size) == (1, 2, 1, 2)
    assert data.train.shuffle and data.train.drop_last and not data.test.shuffle
    assert data.test.n_samples == 3 and len(data.test) == 1 and data.store_T == 1
    assert data.preload_device == CPU and data.fingerprint == open_frame_store(store).fingerprint
    asked = []
    real = data_mod.resolve_preload
    monkeypatch.setattr(data_mod, "resolve_preload", lambda *a, **kw: asked.append(kw["cpu_copies"]) or real(*a, **kw))
    gen = torch.Generator().manual_seed(0)
    data = load_run_data(store13, T=1, batch_size=11, device=CPU, preload="none", val_fraction=0.5, seed=3,
                         generator=gen, local_world_size=3)
    tr, va = split_train_val(open_frame_store(store13).split("train").labels, 0.5, 3)
    assert asked == [3] and data.preload_device is None and data.train.frames is None
    assert data.train.dataset.indices.tolist() == tr.tolist() and data.val.dataset.indices.tolist() == va.tolist()
    assert data.train.generator is gen and data.val.generator is None and data.test.n_samples == 1
    assert (data.val.shuffle, data.val.drop_last) == (False, False)
    data = load_run_data(store13, T=1, batch_size=3, device=CPU, preload="cpu", val_fraction=0.5,
                         generator=gen, rank=1, world_size=2)
    assert (data.train.rank, data.val.rank, data.test.rank) == (1, 1, 1)
    assert (data.train.world_size, data.val.world_size, data.test.world_size) == (2, 2, 2)
    assert (len(data.train), len(data.val), len(data.test)) == (1, 1, 0)   # 11 // 6; val 2: one each; test 1: rank 0


def test_load_run_data_defaults_and_what_it_hands_on(store13, monkeypatch):
    from dvsprep.errors import StoreError

    fed = []
    real = data_mod.choose_feed
    monkeypatch.setattr(data_mod, "choose_feed", lambda path, splits, preload, device, **kw:
                        fed.append((preload, kw)) or real(path, splits, preload, device, **kw))
    seeds = []
    monkeypatch.setattr(data_mod, "split_train_val", lambda labels, fraction, seed: seeds.append((fraction, seed))
                        or split_train_val(labels, fraction, seed))
    data = load_run_data(store13, T=1, batch_size=5, device=CPU, val_fraction=0.5)
    assert fed == [("auto", {"workers": 0, "cpu_copies": 1})] and seeds == [(0.5, 0)]
    tr, va = split_train_val(open_frame_store(store13).split("train").labels, 0.5, 0)     # seed 0 by default
    assert torch.equal(data.val.frames, torch.from_numpy(open_frame_store(store13).split("train").load_all()[va]))
    load_run_data(store13, T=1, batch_size=5, device=CPU, preload="none", workers=3, local_world_size=2)
    assert fed[-1] == ("none", {"workers": 3, "cpu_copies": 2})
    fingerprint = open_frame_store(store13).fingerprint
    assert load_run_data(store13, T=1, batch_size=5, device=CPU, expected_fingerprint=fingerprint[:12]).fingerprint \
        == fingerprint
    other = ("0" if fingerprint[0] != "0" else "1") + fingerprint[1:12]
    with pytest.raises(StoreError):
        load_run_data(store13, T=1, batch_size=5, device=CPU, expected_fingerprint=other)


def test_resolve_store_path_names_a_frame_store_in_its_refusals(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(MissingFileError) as e:
        resolve_store_path(tmp_path / "missing", 8)
    assert str(e.value) == f"{tmp_path / 'missing'}: no such frame store"
    with pytest.raises(StoreError) as e:
        resolve_store_path(tmp_path / "f.txt", 8)
    assert str(e.value) == (f"{tmp_path / 'f.txt'}: neither a frame store (.zarr folder, .zip or http(s)/s3:// URL) "
                            f"nor a DATA_ROOT (a folder holding events.h5 or frames_T<T>_<split_by>.zarr)")


def test_open_store_passes_verify_and_the_expected_fingerprint_on(store, monkeypatch):
    seen = []
    real = data_mod.open_frame_store

    def spy(path, **kw):
        seen.append(kw)
        return real(path, **kw)

    monkeypatch.setattr(data_mod, "open_frame_store", spy)
    fp = open_frame_store(store).fingerprint
    open_store(store, 1, verify=True, expected_fingerprint=fp[:12])
    open_store(store)
    assert seen == [{"verify": True, "expected_fingerprint": fp[:12]}, {"verify": False, "expected_fingerprint": None}]
