"""Crafted frame stores whose manifests are consistent but whose contents dvsprep never writes:
each is refused when opened (and by verify), before zarr reads or allocates anything."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dvsprep.cli import main
from dvsprep.errors import StoreError, UntrustedStoreError
from dvsprep.frames.schema import zstd_content_size
from dvsprep.frames.store import open_frame_store
from dvsprep.integrity.manifest import dir_manifest, write_dir_manifest
from store_fixtures import make_multishard_store


@pytest.fixture()
def store(tmp_path):
    path = tmp_path / "s.zarr"
    make_multishard_store(path, n_train=10, n_test=2)
    return path


def _edit_json(path, name, change):
    meta = json.loads((path / name).read_text())
    change(meta)
    (path / name).write_text(json.dumps(meta))
    write_dir_manifest(path, dir_manifest(path, kind="frames"))  # consistent: verify sees no corruption


def _frames_codecs(meta):
    return meta["codecs"][0]["configuration"]["codecs"]


CASES = [
    ("pickle codec", "train/frames/zarr.json",
     lambda m: _frames_codecs(m).__setitem__(1, {"name": "numcodecs.pickle", "configuration": {}}),
     "codec 'numcodecs.pickle' (allowed: blosc, zstd, gzip)"),
    ("object dtype", "train/label/zarr.json", lambda m: m.update(data_type="object"), "data type 'object'"),
    ("float frames", "train/frames/zarr.json", lambda m: m.update(data_type="float64"), "data type 'float64'"),
    ("extra codec", "train/row/zarr.json", lambda m: m["codecs"].insert(1, {"name": "transpose"}), "3 codecs"),
    ("wrong shape", "test/frames/zarr.json", lambda m: m.update(shape=[2, 64, 2, 128, 129]), "shape"),
    ("huge shard", "train/frames/zarr.json",
     lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[10**9, 64, 2, 128, 128]), "shard shape"),
    ("inner chunk", "train/frames/zarr.json",
     lambda m: m["codecs"][0]["configuration"].update(chunk_shape=[2, 64, 2, 128, 128]), "inner chunk"),
    ("transformer", "train/t_end/zarr.json", lambda m: m.update(storage_transformers=[{"name": "x"}]),
     "storage transformers"),
    ("huge n", "zarr.json", lambda m: m["attributes"]["splits"]["train"].update(n_samples=10**12),
     "declares 1000000000000 samples"),
    ("huge T", "zarr.json", lambda m: m["attributes"].update(T=10**9), "T=1000000000 outside"),
    ("bad sensor", "zarr.json", lambda m: m["attributes"].update(sensor_size=[4096, 4096]), "sensor size"),
    ("unknown split", "zarr.json", lambda m: m["attributes"]["splits"].update(val={"n_samples": 1}), "splits"),
    ("group attrs", "train/zarr.json", lambda m: m.update(consolidated_metadata={"x": 1}), "plain zarr v3 group"),
    ("root consolidated", "zarr.json", lambda m: m.update(consolidated_metadata={"kind": "inline", "metadata": {}}),
     "plain zarr v3 group"),
    ("zstd level 10**30", "train/label/zarr.json",
     lambda m: m["codecs"][1].update(configuration={"level": 10**30, "checksum": False}), "zstd configuration"),
    ("zstd level true", "train/row/zarr.json",
     lambda m: m["codecs"][1].update(configuration={"level": True, "checksum": False}), "zstd configuration"),
    ("blosc clevel 100", "train/frames/zarr.json",
     lambda m: _frames_codecs(m)[1]["configuration"].update(clevel=100), "blosc configuration"),
    ("blosc typesize 0", "train/frames/zarr.json",
     lambda m: _frames_codecs(m)[1]["configuration"].update(typesize=0), "blosc configuration"),
    # zarr refuses a compressor without a configuration object: so must the schema
    ("blosc no configuration", "train/frames/zarr.json",
     lambda m: _frames_codecs(m)[1].pop("configuration"), "blosc configuration None"),
    ("zstd null configuration", "train/label/zarr.json",
     lambda m: m["codecs"][1].update(configuration=None), "zstd configuration None"),
    ("zstd list configuration", "train/row/zarr.json",
     lambda m: m["codecs"][1].update(configuration=[]), "zstd configuration []"),
]


@pytest.mark.parametrize("what,name,change,msg", CASES, ids=[c[0] for c in CASES])
def test_crafted_metadata_is_refused(store, what, name, change, msg):
    _edit_json(store, name, change)
    with pytest.raises(StoreError) as exc:
        open_frame_store(store)
    assert msg in str(exc.value) and str(exc.value).count("\n") == 0
    r = CliRunner().invoke(main, ["verify", str(store)])
    assert r.exit_code == 1 and "invalid  layout: " in r.output


def test_unexpected_array_listed_in_the_manifest_is_refused(store):
    (store / "train" / "evil").mkdir()
    (store / "train" / "evil" / "zarr.json").write_text((store / "train/label/zarr.json").read_text())
    write_dir_manifest(store, dir_manifest(store, kind="frames"))
    with pytest.raises(UntrustedStoreError, match="unexpected file.*train/evil/zarr.json"):
        open_frame_store(store)


def test_decompression_bomb_in_a_metadata_chunk_is_refused(store):
    import numcodecs

    bomb = numcodecs.Zstd(level=19).encode(np.zeros(1 << 24, np.uint8))  # 16 MiB into a few hundred bytes
    assert zstd_content_size(bomb) == 1 << 24 and len(bomb) < 4096
    (store / "train/label/c/0").write_bytes(bomb)
    write_dir_manifest(store, dir_manifest(store, kind="frames"))
    with pytest.raises(StoreError, match=r"train/label/c/0 declares 16777216 decoded bytes \(10 expected\)"):
        open_frame_store(store)


def test_label_out_of_range_is_refused(store):
    import zarr
    from zarr.storage import LocalStore

    zarr.open_group(LocalStore(store), mode="r+", zarr_format=3)["test/label"][1] = 200
    write_dir_manifest(store, dir_manifest(store, kind="frames"))
    with pytest.raises(StoreError, match="test/label holds 200, outside 0..10"):
        open_frame_store(store).split("test")


def test_shard_index_and_sample_sizes_are_bounded(store):
    import google_crc32c

    shard = store / "train/frames/c/1/0/0/0/0"
    data = bytearray(shard.read_bytes())
    n_inner = 8
    index = np.frombuffer(bytes(data[-(16 * n_inner + 4):-4]), "<u8").reshape(n_inner, 2).copy()
    good = bytes(data)
    index[0, 1] = 1 << 62                                  # a sample claiming 4 EiB
    data[-(16 * n_inner + 4):] = index.tobytes() + google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    write_dir_manifest(store, dir_manifest(store, kind="frames"))
    with pytest.raises(StoreError, match="shard index points past the end of the shard"):
        open_frame_store(store).split("train")[8]
    # A blosc chunk whose header declares another decoded size than one sample's.
    data = bytearray(good)
    off = int(np.frombuffer(good[-(16 * n_inner + 4):-4], "<u8")[0])
    data[off + 4:off + 8] = (1 << 31).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    write_dir_manifest(store, dir_manifest(store, kind="frames"))
    with pytest.raises(StoreError, match="sample 8 has the wrong decoded size"):
        open_frame_store(store).split("train")[8]


def test_manifest_kind_and_nested_json_are_refused_like_verify_says(store):
    from dvsprep.verify import verify_store

    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "kind": "events"}))
    with pytest.raises(StoreError, match="manifest is for a 'events' store, not a frame store"):
        open_frame_store(store)
    rep = verify_store(store)
    assert not rep.ok and [(p.kind, p.name) for p in rep.problems] == [("invalid", "layout")]
    (store / "train/label/zarr.json").write_text("[" * 100_000 + "]" * 100_000)
    write_dir_manifest(store, dir_manifest(store, kind="frames"))
    with pytest.raises(StoreError, match="train/label/zarr.json is not valid JSON"):
        open_frame_store(store)
    assert not verify_store(store).ok
