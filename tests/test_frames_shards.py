"""Shard boundaries of a built frame store (dvsprep.frames.build `_blocks`, `_Shards`,
store.write_frames_shard, check._ShardReader): splits of exactly a multiple of the shard size,
one more and one less, so the last sample of a shard, the first of the next and a partial last
shard are all read back and compared with frames counted here by the definition of split_by
"number", and the shard files and their indexes with zarr's sharding layout written out here.

T = 64 gives 8 samples a shard (16 MiB of uint8 frames; `samples_per_shard`) with no patching,
and quarter-shard pieces of 2 samples.
"""
from __future__ import annotations

import numpy as np
import pytest

from dvsprep.events.store import EventsWriter
from dvsprep.frames.build import build_frame_store
from dvsprep.frames.store import open_frame_store, samples_per_shard
from store_fixtures import spec_number

T = 64
SHARD = 8
H = W = 128
NO_CHUNK = 2**64 - 1


def test_the_shard_size_these_tests_assume():
    assert samples_per_shard(T, np.uint8) == SHARD
    assert samples_per_shard(T, np.uint16) == SHARD // 2   # the build keeps its uint8 shard size



def _write_events(path, sizes: tuple[int, int], hot: tuple[str, int] | None) -> dict:
    """events.h5 whose samples all differ (30 + 11 i events, random pixels): a sample read from
    its neighbour's place does not pass. `hot`: that sample's 20,000 events on one pixel (312 a
    frame: the store becomes uint16). Returns the events per split."""
    rng = np.random.default_rng(sum(sizes))
    w = EventsWriter(path)
    truth = {}
    for split, n in zip(("train", "test"), sizes):
        samples = []
        for i in range(n):
            m = 20_000 if (split, i) == hot else 30 + 11 * i
            ev = {"t": np.sort(rng.integers(0, 1_000_000, m)).astype(np.int64),
                  "x": rng.integers(0, W, m).astype(np.uint8), "y": rng.integers(0, H, m).astype(np.uint8),
                  "p": rng.integers(0, 2, m).astype(np.uint8)}
            if (split, i) == hot:
                ev["x"][:], ev["y"][:], ev["p"][:] = 9, 10, 1
            samples.append(ev)
        if n:
            w.append(split, {k: np.concatenate([s[k] for s in samples]) for k in "txyp"},
                     np.array([s["x"].size for s in samples]),
                     {"label": np.arange(n) % 11, "row": np.arange(n), "t_start": np.zeros(n), "t_end": np.ones(n),
                      "recording": ["user01_lab"] * n})
        truth[split] = samples
    w.finish({"recordings": {}, "n_invalid_dropped": 0})
    return truth


def _check_shard_files(store_path, split: str, n: int) -> None:
    """The shard files of a split of n samples: ceil(n / per) of them (per = SHARD, or n when
    the split is smaller), each the encoded samples back to back, then per inner chunk
    (offset, nbytes) as little-endian uint64 (both 2**64-1 past the split's end) and the
    crc32c of that index: zarr v3's sharding codec, index at the end."""
    import google_crc32c

    root = store_path / split / "frames" / "c"
    if n == 0:
        assert not root.exists()   # an empty split declares no shard
        return
    per = min(SHARD, n)
    expected = -(-n // per)
    assert sorted(int(p.name) for p in root.iterdir()) == list(range(expected))
    for s in range(expected):
        data = (root / str(s) / "0" / "0" / "0" / "0").read_bytes()
        raw = data[-(16 * per + 4):]
        assert google_crc32c.value(raw[:-4]) == int.from_bytes(raw[-4:], "little")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(per, 2)
        held = min(per, n - s * per)
        assert (index[held:] == NO_CHUNK).all()   # the slots past the split's end, a partial shard's
        sizes = index[:held, 1].astype(np.int64)
        assert (index[:held, 0] != NO_CHUNK).all() and (sizes > 0).all()
        assert index[:held, 0].tolist() == (np.cumsum(sizes) - sizes).tolist()   # back to back, in order
        assert int(sizes.sum()) == len(data) - len(raw)


@pytest.mark.parametrize("sizes, jobs, codec, hot", [
    ((16, 8), 1, None, None),            # exact multiples: 2 whole train shards, 1 whole test shard
    ((17, 9), 1, None, None),            # one more: a last shard of 1 sample in each split
    ((15, 7), 1, None, None),            # one less: a last train shard of 7; test smaller than a shard
    ((17, 9), 2, None, None),            # pieces return out of order from 2 workers
    ((17, 9), 2, {"name": "zstd", "level": 3}, None),   # workers write whole shards through zarr
    ((17, 9), 1, None, ("train", 16)),   # the lone sample of the last shard overflows uint8
    ((16, 8), 2, None, ("train", 8)),    # the first sample of the second shard overflows uint8
    ((1, 0), 1, None, None),             # a shard of one sample and an empty split
])
def test_every_sample_at_the_shard_boundaries_reads_back_exactly(tmp_path, sizes, jobs, codec, hot):
    truth = _write_events(tmp_path / "events.h5", sizes, hot)
    summary = build_frame_store(tmp_path / "events.h5", tmp_path / "f.zarr", T=T, jobs=jobs, codec=codec)
    store = open_frame_store(tmp_path / "f.zarr", verify=True)   # every file hashed; every sample read below
    want_dtype = np.uint16 if hot else np.uint8
    assert store.dtype == summary.dtype == want_dtype
    assert store.attrs["shard_samples"] == SHARD
    for split, samples in truth.items():
        n = len(samples)
        sp = store.split(split)
        assert len(sp) == n
        assert sp.n_events.tolist() == [s["x"].size for s in samples]
        assert sp.labels.tolist() == [i % 11 for i in range(n)] and sp.rows.tolist() == list(range(n))
        want = [spec_number(ev, T) for ev in samples]
        assert all(w.max() <= np.iinfo(want_dtype).max for w in want)
        via_zarr = np.asarray(sp.frames[:])   # zarr's own reading of the same shards
        for i in range(n):
            got = sp[i]
            assert got.dtype == want_dtype
            np.testing.assert_array_equal(got, want[i], err_msg=f"{split} sample {i}")
            np.testing.assert_array_equal(via_zarr[i], want[i], err_msg=f"{split} sample {i} (zarr)")
        _check_shard_files(tmp_path / "f.zarr", split, n)
        assert store.samples_per_shard(split) == min(SHARD, max(n, 1))
    if hot:
        # 20,000 events in 64 frames: 312 a frame, the last 20,000 - 63 * 312 = 344
        assert summary.max_count == 344 and store.split(hot[0])[hot[1]].max() == 344
