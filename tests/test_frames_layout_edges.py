"""The frame-store checks below zarr (dvsprep.frames.check) at each boundary and one past it, with
their exact messages: the layout (`check_layout`: chunk counts, the manifest's kind, splits),
the metadata chunks decoded by us (`read_meta_arrays`: declared sizes, vlen-utf8 strings, chunks
cut to n), the content of every shard (`content_problems`: samples beyond the split, absent
samples, what `skip` and `checked` leave out), the files against their manifest (`scan_files`)
and the record of decoded content (`note_decoding`, `decoded_before`).

One small store (T=2, 4 samples per shard: train 6 samples in shards of 4 + 2, test 3 samples in
one shard of 4) is written once and copied for each test."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import pytest

import dvsprep.frames.check as check
from dvsprep.errors import MissingFileError, StoreError, UntrustedStoreError
from dvsprep.frames.check import (Layout, check_layout, content_problems, decoded_before, note_decoding,
                                  read_meta_arrays, scan_files)
from dvsprep.frames.files import open_store_files
from dvsprep.integrity import Problem, VerifyReport
from hostile_fixtures import resign, vlen, zstd

SHARD = 4
N_TRAIN, N_TEST = 6, 3
U64_MAX = (1 << 64) - 1


def _arrays(n: int, k: int) -> dict:
    frames = np.zeros((n, 2, 2, 128, 128), np.uint8)
    for i in range(n):
        frames[i, 0, 0, i, :i + 1] = i + 1
    return {"frames": frames, "label": (np.arange(n) * 3 + k) % 11,
            "recording": [f"user{i + 1:02d}_lab" for i in range(n)], "row": np.arange(n) % 2,
            "t_start": np.arange(n) * 1000, "t_end": np.arange(n) * 1000 + 500,
            "n_events": frames.reshape(n, -1).sum(1) if n else np.zeros(0, np.int64)}


def _write(path: Path, n_train: int, n_test: int | None) -> None:
    import dvsprep.frames.store as store_mod

    splits = {"train": _arrays(n_train, 0)}
    if n_test is not None:
        splits["test"] = _arrays(n_test, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_mod, "samples_per_shard", lambda T, dtype: SHARD)
        store_mod.write_frame_store_from_arrays(path, T=2, splits=splits, events_fingerprint="ab" * 32)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fbC") / "s.zarr"
    _write(path, N_TRAIN, N_TEST)
    return path


@pytest.fixture()
def store(pristine, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "cache"))   # decoded-records of this test only
    path = tmp_path / "s.zarr"
    shutil.copytree(pristine, path)
    return path


def _json(path: Path, name: str) -> dict:
    return json.loads((path / name).read_text())


def _put_json(path: Path, name: str, doc) -> None:
    (path / name).write_text(json.dumps(doc))


def _opened(path: Path):
    files = open_store_files(path)
    return files, check_layout(files)


def _rechunk(path: Path, split: str, field: str, chunk: int, chunks: list[bytes]) -> None:
    """Give a metadata array another chunk size and these (raw, uncompressed) chunks."""
    meta = _json(path, f"{split}/{field}/zarr.json")
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [chunk]
    _put_json(path, f"{split}/{field}/zarr.json", meta)
    for old in (path / split / field / "c").iterdir():
        old.unlink()
    for k, raw in enumerate(chunks):
        (path / split / field / "c" / str(k)).write_bytes(zstd(raw))


def _shard(path: Path, split: str, s: int) -> Path:
    return path / split / "frames" / "c" / str(s) / "0" / "0" / "0" / "0"


def _inner(shard: Path) -> int:
    """Inner chunks of a shard: 4, or the split's size when smaller (test: 3)."""
    return SHARD if "/train/" in str(shard) else N_TEST


def _index(shard: Path) -> np.ndarray:
    data, n = shard.read_bytes(), _inner(shard)
    return np.frombuffer(data[-(16 * n + 4):-4], "<u8").reshape(n, 2).copy()


def _put_index(shard: Path, index: np.ndarray) -> None:
    data = shard.read_bytes()[:-(16 * _inner(shard) + 4)]
    raw = index.astype("<u8").tobytes()
    shard.write_bytes(data + raw + google_crc32c.value(raw).to_bytes(4, "little"))


def _break_sample(shard: Path, k: int) -> None:
    """Make inner chunk k of a shard declare (blosc header) another decoded size than one sample's."""
    off = int(_index(shard)[k, 0])
    data = bytearray(shard.read_bytes())
    data[off + 4:off + 8] = (1 << 20).to_bytes(4, "little")
    shard.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- check_layout


def test_the_store_as_written_has_this_layout(store):
    files, layout = _opened(store)
    raw = (store / "manifest.json").read_bytes()
    assert layout.fingerprint == hashlib.sha256(raw).hexdigest()
    assert layout.manifest == json.loads(raw)
    assert layout.attrs == _json(store, "zarr.json")["attributes"]
    assert list(layout.metas) == ["train", "test"]
    for split in ("train", "test"):
        assert list(layout.metas[split]) == ["frames", "label", "recording", "row", "t_start", "t_end", "n_events"]
        for field, meta in layout.metas[split].items():
            assert meta == _json(store, f"{split}/{field}/zarr.json")


def test_a_store_of_one_split_has_the_layout_of_that_split(tmp_path):
    _write(tmp_path / "train.zarr", 2, None)
    assert list(check_layout(open_store_files(tmp_path / "train.zarr")).metas) == ["train"]
    # only the second split: the first one is skipped, not the end of the loop
    _write(tmp_path / "test.zarr", 2, None)
    root = _json(tmp_path / "test.zarr", "zarr.json")
    root["attributes"]["splits"] = {"test": root["attributes"]["splits"].pop("train")}
    _put_json(tmp_path / "test.zarr", "zarr.json", root)
    (tmp_path / "test.zarr" / "train").rename(tmp_path / "test.zarr" / "test")
    resign(tmp_path / "test.zarr")
    layout = check_layout(open_store_files(tmp_path / "test.zarr"))
    assert list(layout.metas) == ["test"] and layout.metas["test"]["label"]["shape"] == [2]


def test_without_manifest_or_root_document_the_store_is_refused_by_name(store):
    (store / "zarr.json").unlink()
    with pytest.raises(StoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: not a zarr v3 group (no zarr.json)"
    (store / "manifest.json").unlink()
    with pytest.raises(StoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: incomplete frame store (no manifest.json)"


def test_the_root_document_is_checked_without_its_attributes(store):
    root = _json(store, "zarr.json")
    _put_json(store, "zarr.json", [root])
    with pytest.raises(UntrustedStoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: zarr.json: not a plain zarr v3 group"
    _put_json(store, "zarr.json", {**root, "node_type": "array"})
    with pytest.raises(UntrustedStoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: zarr.json: not a plain zarr v3 group"


def test_root_attributes_and_manifest_are_refused_naming_the_store(store):
    root = _json(store, "zarr.json")
    root["attributes"]["T"] = 0
    _put_json(store, "zarr.json", root)
    with pytest.raises(UntrustedStoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: T=0 outside 1..4096"
    root["attributes"]["T"] = 2
    _put_json(store, "zarr.json", root)
    _put_json(store, "manifest.json", {**_json(store, "manifest.json"), "format": "other"})
    with pytest.raises(StoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: manifest.json is not a dvsprep manifest (format 'other')"


@pytest.mark.parametrize("kind,shown", [(None, "'None'"), ("events", "'events'"), ("k" * 41, repr("k" * 40))])
def test_a_manifest_of_another_kind_is_refused(store, kind, shown):
    manifest = _json(store, "manifest.json")
    if kind is None:
        del manifest["kind"]
    else:
        manifest["kind"] = kind
    _put_json(store, "manifest.json", manifest)
    with pytest.raises(StoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: manifest is for a {shown} store, not a frame store"


def test_a_split_group_document_is_checked_by_name(store):
    _put_json(store, "test/zarr.json", {**_json(store, "test/zarr.json"), "node_type": "array"})
    with pytest.raises(UntrustedStoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: test/zarr.json: not a plain zarr v3 group"


def test_a_missing_split_group_or_array_document_is_refused_by_name(store):
    (store / "test/row/zarr.json").unlink()
    with pytest.raises(StoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: split 'test' has no row array"
    (store / "test/zarr.json").unlink()
    with pytest.raises(MissingFileError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: no test/zarr.json in the store"


def test_array_documents_are_checked_with_the_split_size_T_and_dtype(store):
    meta = _json(store, "test/label/zarr.json")
    _put_json(store, "test/label/zarr.json", {**meta, "shape": [N_TRAIN]})
    with pytest.raises(UntrustedStoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: test/label/zarr.json: shape [6], expected [3]"
    _put_json(store, "test/label/zarr.json", meta)
    frames = _json(store, "train/frames/zarr.json")
    _put_json(store, "train/frames/zarr.json", {**frames, "data_type": "uint16"})
    with pytest.raises(UntrustedStoreError, match=r"train/frames/zarr.json: data type 'uint16' \(expected uint8\)"):
        check_layout(open_store_files(store))
    _put_json(store, "train/frames/zarr.json", {**frames, "shape": [N_TRAIN, 3, 2, 128, 128]})
    with pytest.raises(UntrustedStoreError, match=r"shape \[6, 3, 2, 128, 128\], expected \[6, 2, 2, 128, 128\]"):
        check_layout(open_store_files(store))


def _listing(store: Path, keep: int) -> None:
    """Cut the manifest's file list to its first `keep` names (in the order it lists them)."""
    resign(store)
    manifest = _json(store, "manifest.json")
    manifest["files"] = dict(list(manifest["files"].items())[:keep])
    _put_json(store, "manifest.json", manifest)


def test_a_store_declaring_more_chunks_than_its_manifest_lists_files_is_refused_early(store):
    # declared, in order: train frames 2 shards, then 1 chunk per metadata array (6 -> 8),
    # test frames 1 shard (9), 1 chunk per metadata array (10 -> 15)
    _listing(store, 14)
    with pytest.raises(StoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == (f"{store}: declares more chunks (15 and counting, for 3 test samples) than its "
                            f"manifest lists files (14)")
    _listing(store, 15)                      # as many files as chunks: counted, then the names
    with pytest.raises(StoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value).startswith(f"{store}: manifest does not list ")


def test_chunks_are_counted_rounding_up(store):
    _rechunk(store, "train", "label", 4, [bytes([0, 3, 6, 9]), bytes([1, 4, 0, 0])])
    _listing(store, 3)  # train frames: 2 shards (6 samples by 4), label: 2 chunks (6 by 4)
    with pytest.raises(StoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == (f"{store}: declares more chunks (4 and counting, for 6 train samples) than its "
                            f"manifest lists files (3)")


def test_the_manifest_must_list_every_chunk_and_nothing_else(store):
    _rechunk(store, "train", "label", 4, [bytes([0, 3, 6, 9]), bytes([1, 4, 0, 0])])
    resign(store)
    assert check_layout(open_store_files(store)).metas["train"]["label"]["chunk_grid"]["configuration"] == \
        {"chunk_shape": [4]}
    (store / "train/label/c/1").unlink()
    resign(store)
    with pytest.raises(StoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: manifest does not list train/label/c/1"
    (store / "train/label/c/1").write_bytes(zstd(bytes(4)))
    (store / "train/label/c/2").write_bytes(zstd(bytes(4)))
    resign(store)
    with pytest.raises(UntrustedStoreError) as e:
        check_layout(open_store_files(store))
    assert str(e.value) == f"{store}: manifest lists unexpected file(s) train/label/c/2"


# ----------------------------------------------------------------------------- read_meta_arrays


def test_metadata_arrays_read_back_as_written(store):
    files, layout = _opened(store)
    want = _arrays(N_TRAIN, 0)
    meta = read_meta_arrays(files, "train", layout.metas["train"], N_TRAIN)
    assert list(meta) == ["label", "recording", "row", "t_start", "t_end", "n_events"]
    assert meta["recording"] == want["recording"]
    for field in ("label", "row", "t_start", "t_end", "n_events"):
        assert meta[field].dtype == check.schema.META_DTYPES[field] and meta[field].tolist() == want[field].tolist()
    only = read_meta_arrays(files, "test", layout.metas["test"], N_TEST, fields=("row",))
    assert list(only) == ["row"] and only["row"].tolist() == [0, 1, 0]


def test_an_empty_split_has_empty_metadata_arrays_of_the_store_dtypes(store):
    files, layout = _opened(store)
    meta = read_meta_arrays(files, "test", layout.metas["test"], 0)
    assert meta["recording"] == []
    for field in ("label", "row", "t_start", "t_end", "n_events"):
        assert meta[field].shape == (0,) and meta[field].dtype == check.schema.META_DTYPES[field]


def test_metadata_of_several_chunks_is_joined_and_cut_to_the_split(store):
    _rechunk(store, "train", "label", 4, [bytes([0, 3, 6, 9]), bytes([1, 4, 7, 10])])
    _rechunk(store, "train", "row", 4, [np.array([0, 1, 0, 1], "<i4").tobytes(), np.array([0, 1, 5, 5], "<i4").tobytes()])
    names = [f"user{i + 1:02d}_lab".encode() for i in range(N_TRAIN)]
    _rechunk(store, "train", "recording", 4, [vlen(names[:4]), vlen(names[4:] + [b"pad1", b"pad2"])])
    resign(store)
    files, layout = _opened(store)
    meta = read_meta_arrays(files, "train", layout.metas["train"], N_TRAIN)
    assert meta["label"].tolist() == [0, 3, 6, 9, 1, 4]
    assert meta["row"].tolist() == [0, 1, 0, 1, 0, 1]
    assert meta["recording"] == [n.decode() for n in names]


def _recording(store: Path, raw: bytes, *, compress=True):
    """read_meta_arrays of train/recording (one chunk of 6 names) holding `raw`."""
    (store / "train/recording/c/0").write_bytes(zstd(raw) if compress else raw)
    files, layout = _opened(store)
    return read_meta_arrays(files, "train", layout.metas["train"], N_TRAIN, fields=("recording",))["recording"]


def _refused(store: Path, raw: bytes, exc=StoreError, **kw) -> str:
    with pytest.raises(exc) as e:
        _recording(store, raw, **kw)
    prefix = f"{store}: train/recording/c/0"
    assert str(e.value).startswith(prefix)
    return str(e.value)[len(prefix):]


def test_recording_names_at_their_bounds_are_read(store):
    assert _recording(store, vlen([b"a" * 1024] * 6)) == ["a" * 1024] * 6      # the largest chunk
    assert _recording(store, vlen([b""] * 6)) == [""] * 6                     # the smallest
    assert _recording(store, vlen([b"x", "é".encode()] * 3)) == ["x", "é"] * 3


def test_a_recording_chunk_past_its_bounds_is_refused_in_one_line(store):
    bound = 4 + 6 * (4 + 1024)
    assert _refused(store, vlen([b"a" * 1024] * 6) + b"!", UntrustedStoreError) == \
        f" declares {bound + 1} decoded bytes (at most {bound} expected)"
    assert _refused(store, vlen([b"a" * 1025] + [b""] * 5)) == ": string of 1025 bytes (at most 1024, within the chunk)"
    assert _refused(store, b"\x06\x00\x00") == ": string chunk does not hold 6 items"
    assert _refused(store, vlen([b"a"] * 5)) == ": string chunk does not hold 6 items"
    assert _refused(store, (6).to_bytes(4, "little")) == ": string chunk is cut short"
    cut = vlen([b"a"] * 6)
    assert _refused(store, cut[:-1]) == ": string of 1 bytes (at most 1024, within the chunk)"
    assert _refused(store, cut[:-2]) == ": string chunk is cut short"   # 3 of the last length's 4 bytes
    assert _refused(store, cut + b"zz") == ": 2 bytes after the last string"
    assert _refused(store, vlen([b"\xff"] + [b"a"] * 5)) == ": a recording name is not valid UTF-8"


def test_a_metadata_chunk_must_declare_exactly_its_decoded_size(store):
    files, layout = _opened(store)

    def label(data: bytes):
        (store / "train/label/c/0").write_bytes(data)
        return read_meta_arrays(files, "train", layout.metas["train"], N_TRAIN, fields=("label",))["label"]

    where = f"{store}: train/label/c/0"
    assert label(zstd(bytes(range(6)))).tolist() == [0, 1, 2, 3, 4, 5]
    for data, declared in ((zstd(bytes(7)), "7"), (zstd(bytes(5)), "5"), (b"\x00" * 40, "no")):
        with pytest.raises(UntrustedStoreError) as e:
            label(data)
        assert str(e.value) == f"{where} declares {declared} decoded bytes (6 expected)"
    with pytest.raises(StoreError) as e:     # two frames: the header declares the first one's size
        label(zstd(bytes(6)) + zstd(bytes(2)))
    assert str(e.value) == f"{where} decompresses to 8 bytes, its header says 6"
    with pytest.raises(StoreError) as e:     # a frame cut short: its header still declares 6 bytes
        label(zstd(bytes(range(6)))[:-1])
    assert str(e.value).startswith(f"{where}: cannot decompress (") and "\n" not in str(e.value)
    (store / "train/label/c/0").unlink()
    with pytest.raises(StoreError) as e:
        read_meta_arrays(files, "train", layout.metas["train"], N_TRAIN, fields=("label",))
    assert str(e.value) == f"{where} is missing (the store declares it)"


@pytest.mark.parametrize("field,bound", [("label", 6), ("recording", 4 + 6 * (4 + 1024))])
def test_a_metadata_chunk_file_is_read_up_to_its_bound_and_zstd_overhead(store, field, bound):
    files, layout = _opened(store)
    limit = bound + (bound >> 7) + 1024
    name = f"train/{field}/c/0"
    want = "6" if field == "label" else f"at most {bound}"
    (store / name).write_bytes(b"\x00" * limit)
    with pytest.raises(UntrustedStoreError) as e:
        read_meta_arrays(files, "train", layout.metas["train"], N_TRAIN, fields=(field,))
    assert str(e.value) == f"{store}: {name} declares no decoded bytes ({want} expected)"
    (store / name).write_bytes(b"\x00" * (limit + 1))
    files = open_store_files(store)
    with pytest.raises(UntrustedStoreError) as e:
        read_meta_arrays(files, "train", layout.metas["train"], N_TRAIN, fields=(field,))
    assert str(e.value) == f"{store}: {name} is {limit + 1} bytes, more than the {limit} allowed"


# ----------------------------------------------------------------------------- check_meta_content


def test_per_class_counts_cover_all_eleven_classes_even_when_high_labels_are_absent():
    meta = {"label": np.array([0, 3, 3], np.uint8), "recording": ["a", "b", "c"], "row": np.zeros(3, np.int32),
            "t_start": np.zeros(3, np.int64), "t_end": np.zeros(3, np.int64), "n_events": np.zeros(3, np.int64)}
    check.check_meta_content("s", "train", meta, [1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])


# ----------------------------------------------------------------------------- content_problems


def test_a_store_as_written_has_no_content_problem(store):
    files, layout = _opened(store)
    assert content_problems(files, layout) == []


def test_a_chunk_past_the_split_in_its_last_shard_is_a_problem(store):
    shard = _shard(store, "train", 1)          # samples 4 and 5: inner chunks 2 and 3 must be absent
    index = _index(shard)
    assert index[2:, 0].tolist() == [U64_MAX, U64_MAX]
    index[2] = index[0]
    _put_index(shard, index)
    files, layout = _opened(store)
    assert content_problems(files, layout) == [
        ("invalid", "train/frames/c/1/0/0/0/0", "train/frames/c/1/0/0/0/0: holds chunks beyond the split's 6 samples")]
    # an entry whose offset is the empty marker holds no chunk, whatever its length says
    index[2] = (U64_MAX, 0)
    _put_index(shard, index)
    assert content_problems(files, layout) == []


@pytest.mark.parametrize("s,k,sample", [(1, 1, 5), (1, 0, 4), (0, 3, 3), (0, 0, 0)])
def test_an_absent_sample_is_a_problem_of_its_shard(store, s, k, sample):
    shard = _shard(store, "train", s)
    index = _index(shard)
    index[k] = U64_MAX
    _put_index(shard, index)
    files, layout = _opened(store)
    name = f"train/frames/c/{s}/0/0/0/0"
    assert content_problems(files, layout) == [("invalid", name, f"{name}: sample {sample} is absent from its shard")]


def test_every_sample_of_every_shard_is_decoded(store):
    for split, s, k in (("train", 0, 3), ("train", 1, 0), ("test", 0, 2)):
        _break_sample(_shard(store, split, s), k)
    files, layout = _opened(store)
    assert content_problems(files, layout) == [
        ("invalid", "train/frames/c/0/0/0/0/0", "train/frames/c/0/0/0/0/0: sample 3 has the wrong decoded size"),
        ("invalid", "train/frames/c/1/0/0/0/0", "train/frames/c/1/0/0/0/0: sample 4 has the wrong decoded size"),
        ("invalid", "test/frames/c/0/0/0/0/0", "test/frames/c/0/0/0/0/0: sample 2 has the wrong decoded size")]
    # without frames: only the metadata
    assert content_problems(files, layout, frames=False) == []


def test_shards_in_skip_or_checked_are_not_decoded_again(store):
    for s in (0, 1):
        _break_sample(_shard(store, "train", s), 0)
    _break_sample(_shard(store, "test", 0), 0)
    files, layout = _opened(store)
    t0, t1, e0 = "train/frames/c/0/0/0/0/0", "train/frames/c/1/0/0/0/0", "test/frames/c/0/0/0/0/0"
    assert content_problems(files, layout, skip={t0, e0}, checked={t1: ""}) == []
    assert content_problems(files, layout, skip={t0}, checked={t1: "", e0: "found while hashed"}) == [
        ("invalid", e0, "found while hashed")]
    assert content_problems(files, layout, checked={t0: "", e0: ""}) == [
        ("invalid", t1, f"{t1}: sample 4 has the wrong decoded size")]


def _bad_label(store: Path) -> None:
    (store / "train/label/c/0").write_bytes(zstd(bytes([0, 3, 6, 9, 1, 11])))


def test_metadata_problems_are_reported_once_per_split_without_the_store_path(store):
    _bad_label(store)
    (store / "test/t_end/c/0").write_bytes(zstd(np.array([500, 1500, 1999], "<i8").tobytes()))
    files, layout = _opened(store)
    assert content_problems(files, layout) == [
        ("invalid", "train metadata", "train/label holds 11, outside 0..10"),
        ("invalid", "test metadata", "test sample 2 ends (t_end) before it starts (t_start)")]
    assert content_problems(files, layout, frames=False) == content_problems(files, layout)   # every split
    (store / "train/label/c/0").write_bytes(zstd(bytes(3)))
    assert content_problems(files, layout, frames=False)[0] == \
        ("invalid", "train metadata", "train/label/c/0 declares 3 decoded bytes (6 expected)")


def test_the_metadata_of_a_split_with_a_file_in_skip_is_not_read(store):
    _bad_label(store)
    files, layout = _opened(store)
    bad = [("invalid", "train metadata", "train/label holds 11, outside 0..10")]
    assert content_problems(files, layout, skip={"train/label/c/0"}) == []
    assert content_problems(files, layout, skip={"train/row/zarr.json"}) == []
    # a frames shard of the split, or a file of the other split, does not keep it from being read
    assert content_problems(files, layout, skip={"train/frames/c/0/0/0/0/0"}) == bad
    assert content_problems(files, layout, skip={"test/label/c/0"}) == bad


def test_the_metadata_is_checked_against_the_per_class_counts_when_the_store_has_them(store):
    files, layout = _opened(store)
    counts = layout.attrs["splits"]["train"]["per_class"]
    layout.attrs["splits"]["train"]["per_class"] = [0] * 11
    assert content_problems(files, layout, frames=False) == [
        ("invalid", "train metadata",
         f"the store's attributes count {[0] * 11!r} samples per class in train, its labels {counts}")]
    del layout.attrs["splits"]["train"]["per_class"]
    assert content_problems(files, layout, frames=False) == []


def test_a_split_without_samples_has_no_shard_to_read(tmp_path):
    _write(tmp_path / "s.zarr", 2, 0)
    files = open_store_files(tmp_path / "s.zarr")
    layout = check_layout(files)
    assert layout.attrs["splits"]["test"]["n_samples"] == 0
    assert content_problems(files, layout) == []


# ----------------------------------------------------------------------------- scan_files

SHARDS = ("test/frames/c/0/0/0/0/0", "train/frames/c/0/0/0/0/0", "train/frames/c/1/0/0/0/0")


@pytest.mark.parametrize("jobs", [1, 3, None])
def test_scan_files_hashes_every_file_and_decodes_the_shards_from_the_same_bytes(store, jobs):
    files, layout = _opened(store)
    raw = (store / "manifest.json").read_bytes()
    report, checked = scan_files(files, layout.manifest, "the source", layout, jobs)
    assert (report.path, report.kind, report.checked, report.fingerprint, report.problems, report.notes) == \
        ("the source", "frames", 32, hashlib.sha256(raw).hexdigest(), [], [])
    assert checked == {name: "" for name in SHARDS}
    assert scan_files(files, layout.manifest, "the source", None, jobs)[1] == {}     # hashed only


def test_a_shard_that_hashes_right_but_does_not_decode_is_a_content_problem_not_a_file_problem(store):
    _break_sample(_shard(store, "train", 1), 1)
    resign(store)
    files, layout = _opened(store)
    report, checked = scan_files(files, layout.manifest, "src", layout, 1)
    assert report.problems == []
    assert checked == {SHARDS[0]: "", SHARDS[1]: "", SHARDS[2]: f"{SHARDS[2]}: sample 5 has the wrong decoded size"}


def test_files_that_differ_from_the_manifest_are_problems_in_name_order(store):
    files, layout = _opened(store)
    _break_sample(_shard(store, "train", 1), 1)                  # not re-signed: corrupt, not decoded
    (store / "train/row/c/0").write_bytes(b"x")
    (store / "test/label/c/0").unlink()
    (store / "train/zz").write_bytes(b"")
    (store / "test/aa").write_bytes(b"")
    files = open_store_files(store)
    report, checked = scan_files(files, layout.manifest, "src", layout, 2)
    assert [(p.kind, p.name, p.detail) for p in report.problems] == [
        ("missing", "test/label/c/0", "listed in the manifest, not in the store"),
        ("corrupt", "train/frames/c/1/0/0/0/0", "sha256 differs from the manifest"),
        ("corrupt", "train/row/c/0", f"1 bytes, manifest says {layout.manifest['files']['train/row/c/0']['size']}"),
        ("extra", "test/aa", "not in the manifest"),
        ("extra", "train/zz", "not in the manifest")]
    assert checked == {SHARDS[0]: "", SHARDS[1]: ""}


def test_a_shard_is_decoded_while_hashed_only_up_to_the_in_memory_size(store, monkeypatch):
    files, layout = _opened(store)
    sizes = {name: layout.manifest["files"][name]["size"] for name in SHARDS}
    assert len(set(sizes.values())) == 3
    for limit in sorted(sizes.values()):
        for at in (limit - 1, limit):
            monkeypatch.setattr(check, "_IN_MEMORY", at)
            assert scan_files(files, layout.manifest, "src", layout, 1)[1] == \
                {name: "" for name, size in sizes.items() if size <= at}


@pytest.mark.parametrize("jobs,cpus,pooled", [(1, 4, False), (2, 1, True), (3, 8, True), (None, 4, True),
                                               (None, 1, False), (None, None, False)])
def test_files_are_checked_on_jobs_threads_or_in_the_calling_thread_when_one(store, monkeypatch, jobs, cpus, pooled):
    """jobs threads (default: the CPUs, 1 when unknown); with one, no pool: every file is
    checked in the calling thread."""
    import threading

    files, layout = _opened(store)
    seen = []
    real = check.check_file

    def recording(*args, **kw):
        seen.append(threading.get_ident())
        return real(*args, **kw)

    monkeypatch.setattr(check, "check_file", recording)
    monkeypatch.setattr(check.os, "cpu_count", lambda: cpus)
    report, checked = scan_files(files, layout.manifest, "src", layout, jobs)
    assert report.problems == [] and checked == {name: "" for name in SHARDS} and len(seen) == 32
    if pooled:
        assert threading.get_ident() not in seen and len(set(seen)) <= (jobs or cpus)
    else:
        assert set(seen) == {threading.get_ident()}


@pytest.mark.parametrize("error", [OSError("disk gone"), StoreError("disk gone")])
def test_a_store_whose_files_cannot_be_read_is_one_problem(store, monkeypatch, error):
    files, layout = _opened(store)
    real = check.check_file

    def failing(files, name, *args, **kw):
        if name == "train/label/c/0":
            raise error
        return real(files, name, *args, **kw)

    monkeypatch.setattr(check, "check_file", failing)
    (store / "train/zz").write_bytes(b"")
    report, _ = scan_files(open_store_files(store), layout.manifest, "src", layout, 1)
    assert [(p.kind, p.name, p.detail) for p in report.problems] == [
        ("invalid", "files", "cannot read the store's files (disk gone)")]


# ----------------------------------------------------------------------------- decoded content


def _layout(tag: str) -> Layout:
    return Layout(attrs={}, manifest={}, fingerprint=hashlib.sha256(tag.encode()).hexdigest(), metas={})


def test_content_is_decoded_before_only_when_recorded_as_frames_content(tmp_path, monkeypatch):
    from dvsprep.integrity import trust

    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "cache"))
    layout = _layout("a")
    assert decoded_before(layout) is False
    trust.record_decoded("events", layout.fingerprint)
    assert decoded_before(layout) is False
    trust.record_decoded("frames", layout.fingerprint)
    assert decoded_before(layout) is True and decoded_before(_layout("b")) is False


def test_note_decoding_records_what_decoded_cleanly_and_forgets_what_did_not(tmp_path, monkeypatch):
    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "cache"))
    layout = _layout("c")
    report = VerifyReport(path="p", kind="frames", checked=1)
    note_decoding(report, layout, False)                     # not decoded: nothing recorded, a note
    assert report.notes == ["samples not decoded: this content (same fingerprint) was decoded on this machine "
                            "before, and every file hashes as its manifest says (--decode decodes them again)"]
    assert decoded_before(layout) is False
    report = VerifyReport(path="p", kind="frames", checked=1)
    note_decoding(report, layout, True)
    assert report.notes == [] and decoded_before(layout) is True
    # problems that say nothing about decoding the samples keep the record
    for problem in (Problem("corrupt", "train/frames/c/0/0/0/0/0", "sha256 differs"),
                    Problem("invalid", "train metadata", "train/label holds 11"),
                    Problem("missing", "train/frames/c/1/0/0/0/0", "listed")):
        note_decoding(VerifyReport(path="p", kind="frames", checked=1, problems=[problem]), layout, True)
        assert decoded_before(layout) is True
    note_decoding(VerifyReport(path="p", kind="frames", checked=1, problems=[
        Problem("invalid", "train metadata", "x"), Problem("invalid", "test/frames/c/0/0/0/0/0", "sample 1")]),
        layout, True)
    assert decoded_before(layout) is False
    # a failure found while the samples were not decoded does not forget the record either
    note_decoding(VerifyReport(path="p", kind="frames", checked=1), layout, True)
    note_decoding(VerifyReport(path="p", kind="frames", checked=1, problems=[
        Problem("invalid", "test/frames/c/0/0/0/0/0", "x")]), layout, False)
    assert decoded_before(layout) is True
