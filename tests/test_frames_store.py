"""Frame store writing, opening and reading (dvsprep.frames.store)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from dvsprep.constants import FRAMES_FORMAT
from dvsprep.errors import IntegrityError, MissingFileError, StoreError, StoreExistsError
from dvsprep.frames.store import (
    frame_store_name,
    open_frame_store,
    samples_per_shard,
    write_frame_store_from_arrays,
)
from dvsprep.integrity.manifest import dir_manifest, sha256_file, write_dir_manifest

from previous_output import lay_previous, tree

T = 4


def _split(rng, n, dtype=np.uint8, hi=5):
    frames = rng.integers(0, hi, (n, T, 2, 128, 128)).astype(dtype)
    if n > 2:
        frames[1] = 0  # an all-zero sample is not stored as a chunk; it must read back as zeros
    return {
        "frames": frames,
        "label": (np.arange(n) * 7) % 11,
        "recording": [f"user{i // 3 + 1:02d}_lab" for i in range(n)],
        "row": np.arange(n) % 3,
        "t_start": np.arange(n) * 1000,
        "t_end": np.arange(n) * 1000 + 500,
        "n_events": frames.reshape(n, -1).sum(1) if n else np.zeros(0, int),
    }


def test_roundtrip_api_attrs_and_fingerprint(tmp_path):
    rng = np.random.default_rng(0)
    shard = samples_per_shard(T, np.uint8)
    splits = {"train": _split(rng, shard + 5), "test": _split(rng, 3)}
    path = tmp_path / frame_store_name(T, "time")
    fp = write_frame_store_from_arrays(path, T=T, split_by="time", splits=splits, events_fingerprint="ab" * 32)
    assert path.name == "frames_T4_time.zarr"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp directory left
    store = open_frame_store(path)
    assert store.fingerprint == fp == sha256_file(path / "manifest.json")
    assert (store.T, store.split_by, store.dtype) == (T, "time", np.dtype("u1"))
    a = store.attrs
    assert a["format"] == FRAMES_FORMAT and a["sensor_size"] == [128, 128] and a["dtype"] == "uint8"
    assert a["events_fingerprint"] == "ab" * 32 and store.events_fingerprint == "ab" * 32
    assert a["splits"]["test"] == {"n_samples": 3, "per_class": [1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]}
    assert sum(a["splits"]["train"]["per_class"]) == shard + 5
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "frames" and "train/frames/zarr.json" in manifest["files"]
    # one file per shard: the train split spans two shards
    shard_files = [k for k in manifest["files"] if k.startswith("train/frames/c/")]
    assert len(shard_files) == 2
    for name, sp_in in splits.items():
        sp = store.split(name)
        n = len(sp_in["label"])
        assert len(sp) == n
        assert sp._reader is not None  # the direct shard reader is in use for local stores
        for i in range(n):
            got = sp[i]
            assert got.dtype == np.uint8 and got.shape == (T, 2, 128, 128)
            np.testing.assert_array_equal(got, sp_in["frames"][i])
        np.testing.assert_array_equal(sp[-1], sp_in["frames"][-1])
        np.testing.assert_array_equal(sp.load_all(), sp_in["frames"])
        np.testing.assert_array_equal(np.asarray(sp.frames[:]), sp_in["frames"])  # plain zarr agrees
        assert sp.labels.dtype == np.int64 and sp.labels.tolist() == sp_in["label"].tolist()
        assert sp.recordings == sp_in["recording"]
        assert sp.rows.tolist() == sp_in["row"].tolist()
        assert sp.t_start.tolist() == sp_in["t_start"].tolist() and sp.t_end.tolist() == sp_in["t_end"].tolist()
        assert sp.n_events.tolist() == sp_in["n_events"].tolist()
        assert sp.ids[0] == (sp_in["recording"][0], 0)
        with pytest.raises(IndexError):
            sp[n]
    # the reader pickles (DataLoader workers) and reopens by path
    sp2 = pickle.loads(pickle.dumps(store.split("train")))
    np.testing.assert_array_equal(sp2[4], splits["train"]["frames"][4])
    # recording names use zarr v3's variable-length UTF-8 string type
    meta = json.loads((path / "train" / "recording" / "zarr.json").read_text())
    assert meta["data_type"] == "string" and meta["codecs"][0]["name"] == "vlen-utf8"


def test_uint16_and_empty_split(tmp_path):
    rng = np.random.default_rng(1)
    train = _split(rng, 3, dtype=np.uint16, hi=1000)
    test = _split(rng, 0)
    fp = write_frame_store_from_arrays(tmp_path / "s.zarr", T=T, splits={"train": train, "test": test})
    store = open_frame_store(tmp_path / "s.zarr")
    assert store.dtype == np.uint16 and store.fingerprint == fp
    np.testing.assert_array_equal(store.split("train").load_all(), train["frames"])
    assert store.split("train")[2].max() > 255
    assert len(store.split("test")) == 0 and store.split("test").load_all().shape == (0, T, 2, 128, 128)


def test_zarr_fallback_reader_agrees(tmp_path):
    rng = np.random.default_rng(2)
    train = _split(rng, 5)
    write_frame_store_from_arrays(tmp_path / "s.zarr", T=T, splits={"train": train},
                                  codec={"name": "zstd", "level": 3})
    sp = open_frame_store(tmp_path / "s.zarr").split("train")
    sp._reader = None  # what a zip / remote store uses
    for i in range(5):
        np.testing.assert_array_equal(sp[i], train["frames"][i])
    np.testing.assert_array_equal(sp.load_all(), train["frames"])


def test_refuses_overwrite_then_force_replaces(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "s.zarr"
    fp1 = write_frame_store_from_arrays(path, T=T, splits={"train": _split(rng, 2)})
    with pytest.raises(StoreExistsError, match="already exists"):
        write_frame_store_from_arrays(path, T=T, splits={"train": _split(rng, 3)})
    assert open_frame_store(path).fingerprint == fp1
    fp2 = write_frame_store_from_arrays(path, T=T, splits={"train": _split(rng, 3)}, force=True)
    assert fp2 != fp1 and len(open_frame_store(path).split("train")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


@pytest.mark.parametrize("previous", [False, True])
def test_bad_arrays_leave_nothing(tmp_path, previous):
    """Nothing written; with force, a store there before stays byte for byte."""
    rng = np.random.default_rng(4)
    before = lay_previous(tmp_path / "s.zarr", "dir") if previous else {}
    bad = _split(rng, 2)
    bad["label"] = bad["label"][:1]
    with pytest.raises(StoreError, match="label"):
        write_frame_store_from_arrays(tmp_path / "s.zarr", T=T, splits={"train": bad}, force=previous)
    wrong_t = _split(rng, 2)
    with pytest.raises(StoreError, match="shape"):
        write_frame_store_from_arrays(tmp_path / "s.zarr", T=T + 1, splits={"train": wrong_t}, force=previous)
    as_float = _split(rng, 2)
    as_float["frames"] = as_float["frames"].astype(np.float32)
    with pytest.raises(StoreError, match="dtype"):
        write_frame_store_from_arrays(tmp_path / "s.zarr", T=T, splits={"train": as_float}, force=previous)
    with pytest.raises(StoreError, match="positive"):
        write_frame_store_from_arrays(tmp_path / "s.zarr", T=0, splits={"train": as_float}, force=previous)
    assert tree(tmp_path) == before


def test_open_errors(tmp_path):
    with pytest.raises(MissingFileError, match="no such frame store"):
        open_frame_store(tmp_path / "absent.zarr")
    rng = np.random.default_rng(5)
    path = tmp_path / "s.zarr"
    write_frame_store_from_arrays(path, T=T, splits={"train": _split(rng, 2)})
    (path / "manifest.json").unlink()
    with pytest.raises(StoreError, match="incomplete"):
        open_frame_store(path)
    (path / "manifest.json").write_text("{}")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format"] = "something-else"
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="not a dvsprep frame store"):
        open_frame_store(path)
    (path / "zarr.json").write_text("not json")
    with pytest.raises(StoreError, match="zarr"):
        open_frame_store(path)
    with pytest.raises(StoreError, match="not a frame store"):
        open_frame_store(tmp_path / "s.zarr" / "manifest.json")


def test_corrupt_shard_is_a_store_error(tmp_path):
    rng = np.random.default_rng(6)
    path = tmp_path / "s.zarr"
    write_frame_store_from_arrays(path, T=T, splits={"train": _split(rng, 3)})
    shard = path / "train" / "frames" / "c" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[10:40] = b"\xff" * 30
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="s.zarr: frame store NOT intact: 1 corrupt"):
        open_frame_store(path)
    # re-signed (manifest made to match): the readers' own checks refuse it
    write_dir_manifest(path, dir_manifest(path, kind="frames"))
    with pytest.raises(IntegrityError, match=r"invalid train/frames/c/0/0/0/0/0 \(.*sample 0"):
        open_frame_store(path)
    data[-3] ^= 0xFF  # break the shard index checksum
    shard.write_bytes(bytes(data))
    write_dir_manifest(path, dir_manifest(path, kind="frames"))
    with pytest.raises(IntegrityError, match="corrupt shard index"):
        open_frame_store(path)


@pytest.mark.parametrize("n", [0, 1, 5, 300])
def test_metadata_arrays_are_zarrs_bytes(tmp_path, n):
    """create_meta_arrays and write_metadata write each metadata array's zarr.json and chunk
    without zarr; the files must be exactly those zarr writes for the same array."""
    import zarr

    from dvsprep.frames import schema
    from dvsprep.frames.store import create_frames_layout, create_meta_arrays, write_metadata

    rng = np.random.default_rng(n)
    meta = {"label": rng.integers(0, 11, n), "row": rng.integers(0, 40, n),
            "t_start": rng.integers(0, 10**7, n), "t_end": rng.integers(10**7, 2 * 10**7, n),
            "n_events": rng.integers(0, 10**6, n), "recording": [f"user{i % 29 + 1:02d}_lab{'é' * (i % 3)}" for i in range(n)]}
    ours = tmp_path / "ours"
    group = create_frames_layout(ours, T=2, sizes={"train": n}, dtype=np.dtype("u1"),
                                 codec={"name": "blosc"}, shard_samples=4)
    create_meta_arrays(group, {"train": n})
    write_metadata(group, "train", meta)
    theirs = zarr.open_group(zarr.storage.LocalStore(tmp_path / "theirs"), mode="w", zarr_format=3)
    g = theirs.create_group("train")
    for field in schema.META_FIELDS:
        text = field == "recording"
        arr = g.create_array(field, shape=(n,), chunks=(max(1, n),), dtype=str if text else schema.META_DTYPES[field],
                             fill_value="" if text else 0, compressors=zarr.codecs.ZstdCodec(level=3))
        if n:
            arr[:] = np.array(meta[field], dtype=np.dtypes.StringDType()) if text else \
                np.asarray(meta[field]).astype(schema.META_DTYPES[field])
    for field in schema.META_FIELDS:
        mine = sorted(p.relative_to(ours) for p in (ours / "train" / field).rglob("*") if p.is_file())
        want = sorted(p.relative_to(tmp_path / "theirs") for p in (tmp_path / "theirs" / "train" / field).rglob("*")
                      if p.is_file())
        assert mine == want == sorted([Path("train", field, "zarr.json")] + ([Path("train", field, "c", "0")] if n else []))
        for rel in mine:
            assert (ours / rel).read_bytes() == (tmp_path / "theirs" / rel).read_bytes(), rel
    back = zarr.open_group(zarr.storage.LocalStore(ours), mode="r")
    assert back["train"]["recording"][:].tolist() == meta["recording"]
    assert back["train"]["t_end"][:].tolist() == list(meta["t_end"])
