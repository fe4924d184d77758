"""dvsprep pack / unpack: one uncompressed zip that reads in place, checked both ways."""
from __future__ import annotations

import hashlib
import pickle
import zipfile

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from zarr.storage import ZipStore

from dvsprep.cli import main
from dvsprep.errors import IntegrityError, StoreError
from dvsprep.frames.store import open_frame_store
from dvsprep.frames.pack import pack_store
from store_fixtures import T, make_multishard_store


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture()
def store(tmp_path):
    path = tmp_path / "frames_T64_number.zarr"
    fp, splits = make_multishard_store(path)
    return path, fp, splits


def test_pack_reads_in_place_and_unpacks_to_the_same_store(store, tmp_path):
    path, fp, splits = store
    r = _run("pack", path)
    z = tmp_path / "frames_T64_number.zarr.zip"
    assert r.exit_code == 0 and f"fingerprint {fp}" in r.output
    assert r.output.startswith(f"{z}: 33 files match the manifest (34 zip members with manifest.json), ")
    with zipfile.ZipFile(z) as zf:
        infos = zf.infolist()
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    assert [i.filename for i in infos][-1] == "manifest.json" and len(infos) == 34
    # Same store, same bytes: the zip itself is reproducible.
    pack_store(path, tmp_path / "again.zip")
    assert hashlib.sha256(z.read_bytes()).digest() == hashlib.sha256((tmp_path / "again.zip").read_bytes()).digest()
    st = open_frame_store(z)
    assert st.fingerprint == fp and st.kind == "zip" and st.T == T
    for name, sp_in in splits.items():
        sp = st.split(name)
        assert sp._reader is not None  # shards are read by offset inside the zip
        np.testing.assert_array_equal(sp.load_all(), sp_in["frames"])
        assert sp.labels.tolist() == sp_in["label"].tolist() and sp.recordings == sp_in["recording"]
    # plain zarr reads the zip in place too
    g = zarr.open_group(ZipStore(z, mode="r"), mode="r", zarr_format=3)
    np.testing.assert_array_equal(g["train/frames"][9], splits["train"]["frames"][9])
    # a split pickles (DataLoader workers) and reopens the zip
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(st.split("train")))[17], splits["train"]["frames"][17])
    r = _run("unpack", z, "-o", tmp_path / "back.zarr")
    assert r.exit_code == 0, r.output
    assert open_frame_store(tmp_path / "back.zarr").fingerprint == fp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.zip", "back.zarr", path.name, z.name]


def test_refuses_overwrite_and_corrupt_sources(store, tmp_path):
    path, fp, _ = store
    out = tmp_path / "s.zip"
    out.write_bytes(b"keep me")
    r = _run("pack", path, "-o", out)
    assert r.exit_code == 1 and r.output == f"error: {out}: already exists (use --force to replace it)\n"
    assert out.read_bytes() == b"keep me"
    assert _run("pack", path, "-o", out, "--force").exit_code == 0
    assert open_frame_store(out).fingerprint == fp
    r = _run("unpack", out, "-o", path)
    assert r.exit_code == 1 and "already exists" in r.output
    # A flipped byte: nothing is packed.
    shard = path / "train/frames/c/2/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[7] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupt train/frames/c/2/0/0/0/0 .*differs from the manifest"):
        pack_store(path, tmp_path / "bad.zip")
    data[7] ^= 0x10
    shard.write_bytes(bytes(data))
    (path / "stray.txt").write_text("x")
    r = _run("pack", path, "-o", tmp_path / "bad.zip")
    assert r.exit_code == 1 and "extra stray.txt (not in the manifest)" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, "s.zip"]  # no temp files left
    with pytest.raises(StoreError, match="must end in .zip"):
        pack_store(path, tmp_path / "s.tar")


def test_unpack_refuses_a_corrupt_member(store, tmp_path):
    path, _, _ = store
    z = tmp_path / "s.zip"
    pack_store(path, z)
    from dvsprep.frames.files import ZipFiles

    span = ZipFiles(z).span("test/label/c/0")
    data = bytearray(z.read_bytes())
    data[span.offset + span.size - 1] ^= 0xFF
    z.write_bytes(bytes(data))
    r = _run("unpack", z)
    assert r.exit_code == 1
    # the store is verified when opened, before anything is written
    assert r.output == f"error: {z}: frame store NOT intact: 1 corrupt (of 33 files): corrupt test/label/c/0 " \
        "(sha256 differs from the manifest) (dvsprep verify lists them)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, "s.zip"]
