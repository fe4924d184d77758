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
