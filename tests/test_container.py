"""Untrusted zips and store directories: member names, links, compression, truncation."""
from __future__ import annotations

import os
import stat
import zipfile

import pytest

from dvsprep.frames.files import ZipFiles, check_member_name, parse_manifest
from dvsprep.errors import StoreError, UntrustedStoreError
from dvsprep.frames.store import open_frame_store
from dvsprep.integrity.manifest import canonical_json
from store_fixtures import make_multishard_store


@pytest.fixture()
def store(tmp_path):
    path = tmp_path / "s.zarr"
    make_multishard_store(path, n_train=3, n_test=1)
    return path


def _zip(store, out, extra=None, compression=zipfile.ZIP_STORED):
    """The store as a zip, plus `extra(zf)` members."""
    with zipfile.ZipFile(out, "w", compression) as zf:
        for p in sorted(store.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(store).as_posix())
        if extra:
            extra(zf)
    return out


@pytest.mark.parametrize("name", ["/etc/zarr.json", "../zarr.json", "train/../../x", "a\\b", "C:/x", "a//b", "./a"])
def test_bad_member_names_are_refused(store, tmp_path, name):
    z = _zip(store, tmp_path / "s.zip", lambda zf: zf.writestr(zipfile.ZipInfo(name), b"x"))
    if zipfile.ZipFile(z).namelist()[-1] != name:  # zipfile normalises some names itself
        pytest.skip("zipfile rewrote the name")
    with pytest.raises(UntrustedStoreError, match="refusing it"):
        open_frame_store(z)


def test_names_rejected_directly():
    for name in ["/abs", "../up", "a/../b", "a\\b", "", "a//b", "C:x"]:
        with pytest.raises(UntrustedStoreError):
            check_member_name(name, "here")
    assert check_member_name("train/frames/c/0/0/0/0/0", "here") == "train/frames/c/0/0/0/0/0"


def test_links_compression_duplicates_and_truncation(store, tmp_path):
    def link(zf):
        zi = zipfile.ZipInfo("train/link")
        zi.create_system = 3
        zi.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(zi, "/etc/passwd")

    with pytest.raises(UntrustedStoreError, match="'train/link' is a symbolic link"):
        open_frame_store(_zip(store, tmp_path / "link.zip", link))
    with pytest.raises(UntrustedStoreError, match="is compressed; stores travel as uncompressed zips"):
        open_frame_store(_zip(store, tmp_path / "deflated.zip", compression=zipfile.ZIP_DEFLATED))

    def dup(zf):
        with pytest.warns(UserWarning):
            zf.writestr("zarr.json", b"{}")

    with pytest.raises(UntrustedStoreError, match="'zarr.json' appears twice"):
        open_frame_store(_zip(store, tmp_path / "dup.zip", dup))
    good = _zip(store, tmp_path / "good.zip")
    assert open_frame_store(good).split("train").labels.tolist() == [1, 8, 4]
    data = good.read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[:-10])
    with pytest.raises(StoreError, match="not a complete zip file"):
        open_frame_store(tmp_path / "cut.zip")
    # Central directory intact but a member's data cut away: refused before reading it.
    zf = ZipFiles(good)
    last = max(zf._spans.values(), key=lambda s: s.offset)
    cd_start = data.index(b"PK\x01\x02")
    (tmp_path / "hole.zip").write_bytes(data[:last.offset] + data[cd_start:])
    with pytest.raises(StoreError, match="truncated or corrupt zip|past the end"):
        open_frame_store(tmp_path / "hole.zip")


def test_symlinks_in_a_store_directory_are_refused(store, tmp_path):
    (tmp_path / "secret").write_text("x")
    target = store / "train/frames/c/0/0/0/0/0"
    target.unlink()
    os.symlink(tmp_path / "secret", target)
    with pytest.raises(UntrustedStoreError, match="is a link or special file"):
        open_frame_store(store).split("train")[0]


@pytest.mark.parametrize("linked", ["train", "train/frames", "train/frames/c/0/0/0/0"])  # first, second, last
def test_a_file_reached_through_a_linked_folder_is_refused(store, tmp_path, linked):
    """span's own check, for a folder turned into a link after the store was listed: the file
    it names is a plain file, but reached through a folder outside the store."""
    from dvsprep.frames.files import DirFiles

    files = DirFiles(store)
    assert set(files.names())                      # listed while every folder was a folder
    outside = tmp_path / "outside"
    (store / linked).rename(outside)
    os.symlink(outside, store / linked)
    name = "train/frames/c/0/0/0/0/0"
    assert (store / name).is_file()
    with pytest.raises(UntrustedStoreError, match=f"{name} is a link or special file"):
        files.span(name)
    with pytest.raises(UntrustedStoreError, match=f"{name} is a link or special file"):
        DirFiles(store).span(name)                 # and without listing first


def test_files_are_hashed_across_reads_and_zip_crcs_checked(tmp_path, monkeypatch):
    """A file longer than the hashing buffer (several preads into the thread's buffer), one
    shorter, one empty; sha256 and the zip's CRC-32 against hashlib and zlib over the whole."""
    import hashlib
    import zlib

    from dvsprep.frames import files as files_mod

    monkeypatch.setattr(files_mod, "_HASH_BUF", 1000)
    monkeypatch.setattr(files_mod, "_buffers", __import__("threading").local())
    folder = tmp_path / "d"
    folder.mkdir()
    data = {"a": os.urandom(2 * 1000 + 17), "b": os.urandom(999), "c": b""}
    for name, body in data.items():
        (folder / name).write_bytes(body)
    with zipfile.ZipFile(tmp_path / "d.zip", "w", zipfile.ZIP_STORED) as zf:
        for name, body in data.items():
            zf.writestr(name, body)
    dir_files, zip_files = files_mod.DirFiles(folder), ZipFiles(tmp_path / "d.zip")
    for name, body in data.items():
        want = (hashlib.sha256(body).hexdigest(), len(body))
        assert dir_files.sha256(name) == want and zip_files.sha256(name) == want
        assert not zip_files.crc_differs(name) and zlib.crc32(body) == zip_files._crcs[name]
    # a member whose bytes no longer match its CRC, and a file cut short after it was listed
    raw = bytearray((tmp_path / "d.zip").read_bytes())
    at = raw.index(data["a"][1500:1510])
    raw[at] ^= 0xFF
    (tmp_path / "d.zip").write_bytes(bytes(raw))
    zip_files = ZipFiles(tmp_path / "d.zip")
    assert zip_files.sha256("a")[0] != hashlib.sha256(data["a"]).hexdigest() and zip_files.crc_differs("a")
    (folder / "a").write_bytes(data["a"][:1500])
    assert dir_files.sha256("a") == (hashlib.sha256(data["a"][:1500]).hexdigest(), 1500)


def test_manifest_entries_are_checked():
    good = {"format": "dvsprep-manifest/1", "kind": "frames", "files": {"zarr.json": {"sha256": "a" * 64, "size": 3}}}
    assert parse_manifest(canonical_json(good), "m") == good
    for files, msg in [({"../x": {"sha256": "a" * 64, "size": 1}}, "'..'"),
                       ({"/x": {"sha256": "a" * 64, "size": 1}}, "absolute"),
                       ({"x": {"sha256": "zz", "size": 1}}, "not {sha256, size}"),
                       ({"x": {"sha256": "a" * 64, "size": -1}}, "not {sha256, size}"),
                       ({"x": {"sha256": "a" * 64, "size": 1 << 50}}, "not {sha256, size}"),
                       ({"manifest.json": {"sha256": "a" * 64, "size": 1}}, "lists itself")]:
        with pytest.raises(StoreError, match=msg):
            parse_manifest(canonical_json({**good, "files": files}), "m")
    with pytest.raises(StoreError, match="not a dvsprep manifest"):
        parse_manifest(b"[]", "m")
    with pytest.raises(StoreError, match="not valid JSON"):
        parse_manifest(b"{", "m")


def test_zip_members_that_zipfile_would_refuse_are_found(store, tmp_path):
    """Bytes no manifest hash covers, but that zip readers (zarr's ZipStore) check: found by
    the fuzz tests."""
    from click.testing import CliRunner

    from dvsprep.cli import main

    good = _zip(store, tmp_path / "good.zip")
    data = good.read_bytes()
    info = zipfile.ZipFile(good).getinfo("train/label/c/0")
    # the name in the local header differs from the central directory's
    renamed = bytearray(data)
    renamed[info.header_offset + 30 + len("train/label")] = ord(".")
    (tmp_path / "renamed.zip").write_bytes(bytes(renamed))
    with pytest.raises(StoreError, match="'train/label/c/0' has another name in its local header"):
        open_frame_store(tmp_path / "renamed.zip")
    # a CRC-32 in the central directory that does not match the member's bytes
    bad_crc = bytearray(data)
    cd = data.index(b"PK\x01\x02")                          # the central directory
    at = data.index(b"train/label/c/0", cd) - 46 + 16       # central header: CRC at offset 16
    bad_crc[at] ^= 0xFF
    (tmp_path / "crc.zip").write_bytes(bytes(bad_crc))
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "crc.zip")])
    assert res.exit_code == 1
    assert "corrupt  train/label/c/0: the zip's CRC-32 of this member does not match its bytes" in res.output
    with pytest.raises(StoreError, match="CRC-32"):
        open_frame_store(tmp_path / "crc.zip")


def test_a_store_nested_deeper_than_the_recursion_limit_is_listed(store):
    """A crafted store directory with one folder inside another 1100 times (past Python's
    recursion limit of 1000): its file is listed after the others and then refused as a file
    the manifest does not list, as one problem, not a RecursionError."""
    import sys

    from dvsprep.frames.files import DirFiles
    from dvsprep.verify import verify_path

    depth = 1100
    assert depth > sys.getrecursionlimit()
    before = list(DirFiles(store).names())
    deep = store / "train"
    try:
        for _ in range(depth):
            deep = deep / "d"
            os.mkdir(deep)
        (deep / "x").write_bytes(b"x")
        deep_name = "train/" + "d/" * depth + "x"
        names = list(DirFiles(store).names())
        # os.walk's order: train's own subfolders in name order, "d" before "frames"
        assert sorted(names) == sorted(before + [deep_name])
        assert names.index(deep_name) < names.index("train/frames/zarr.json")
        report = verify_path(store)
        assert [(p.kind, p.name) for p in report.problems] == [("extra", deep_name)]
    finally:   # pytest's clean-up (shutil.rmtree) recurses too: take the tower down here
        (deep / "x").unlink(missing_ok=True)
        while deep != store / "train":
            deep.rmdir()
            deep = deep.parent
