"""Edges of frame-store verification (`dvsprep.frames.check`) that realistic mutants of its
checks survived: declared sizes exactly at one sample and one byte either side, every codec."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from dvsprep.errors import IntegrityError, StoreError
from dvsprep.frames.store import open_frame_store, write_frame_store_from_arrays
from dvsprep.verify import verify_path
from hostile_fixtures import resign
from store_fixtures import T, split_arrays

NO_CHUNK = np.iinfo(np.uint64).max
SAMPLE = T * 2 * 128 * 128   # bytes of one uint8 sample


def _store(path, codec):
    splits = {"train": split_arrays(10, 1), "test": split_arrays(3, 2)}
    write_frame_store_from_arrays(path, T=T, split_by="number", splits=splits, events_fingerprint="cd" * 32,
                                  codec=codec)
    return splits


def _chunks(shard_path, n_inner=8):
    """The encoded inner chunks of a shard file, in slot order (None for an absent slot)."""
    data = shard_path.read_bytes()
    index = np.frombuffer(data[-(16 * n_inner + 4):-4], "<u8").reshape(n_inner, 2)
    return [None if off == NO_CHUNK else data[int(off):int(off) + int(nb)] for off, nb in index.tolist()]


def _write_shard(shard_path, chunks):
    """A shard file from its inner chunks, back to back, then the index and its crc32c (zarr v3)."""
    import google_crc32c

    body, index, off = b"", [], 0
    for c in chunks:
        if c is None:
            index.append((NO_CHUNK, NO_CHUNK))
        else:
            index.append((off, len(c)))
            body += c
            off += len(c)
    raw = np.array(index, "<u8").tobytes()
    shard_path.write_bytes(body + raw + google_crc32c.value(raw).to_bytes(4, "little"))


def _gzip_store_with(tmp_path, slot: int, chunk: bytes):
    """A gzip store (level 1) whose train shard 1 holds `chunk` in `slot` (sample 8 + slot),
    re-signed: only the content checks can refuse it."""
    store = tmp_path / "s.zarr"
    _store(store, {"name": "gzip", "level": 1})
    shard = store / "train/frames/c/1/0/0/0/0"
    chunks = _chunks(shard)
    chunks[slot] = chunk
    _write_shard(shard, chunks)
    resign(store)
    return store


@pytest.mark.parametrize("payload, ok", [
    (SAMPLE - 1, False),   # one byte short: numcodecs would leave the last byte of `out` as it was
    (SAMPLE, True),        # exactly one sample (other values: the manifest, re-signed, vouches for them)
    (SAMPLE + 1, False),   # one byte too many
    (0, False),            # an empty stream
])
def test_a_gzip_sample_must_decode_to_exactly_one_sample(tmp_path, payload, ok):
    want = np.arange(payload, dtype=np.uint8) * 7 + 1
    # shard 1 holds samples 8, 9 (slots 2..7 absent: the split ends); 9 is the split's last
    store = _gzip_store_with(tmp_path, 1, gzip.compress(want.tobytes(), compresslevel=1))
    report = verify_path(store, decode=True)
    if ok:
        assert report.ok, report.problems
        sp = open_frame_store(store).split("train")
        np.testing.assert_array_equal(sp[9].reshape(-1), want)
        np.testing.assert_array_equal(sp[8], split_arrays(10, 1)["frames"][8])   # its neighbour as written
    else:
        assert [(p.kind, p.name, p.detail) for p in report.problems] == [
            ("invalid", "train/frames/c/1/0/0/0/0", "train/frames/c/1/0/0/0/0: sample 9 has the wrong decoded size")]
        with pytest.raises(IntegrityError, match=r"\(train/frames/c/1/0/0/0/0: sample 9 has the wrong decoded size\)"):
            open_frame_store(store)


def test_a_gzip_stream_shorter_than_its_header_and_trailer_is_refused(tmp_path):
    # 17 bytes (one less than gzip's 10-byte header and 8-byte trailer) whose last 4 read as one
    # sample's size: the size is not read from a stream that cannot hold a trailer
    store = _gzip_store_with(tmp_path, 0, b"\x1f\x8b\x08" + bytes(10) + SAMPLE.to_bytes(4, "little"))
    with pytest.raises(IntegrityError, match=r"\(train/frames/c/1/0/0/0/0: sample 8 has the wrong decoded size\)"):
        open_frame_store(store)


def test_a_gzip_trailer_that_lies_about_the_size_is_caught_by_gzip(tmp_path):
    short = gzip.compress(bytes(SAMPLE - 1), compresslevel=1)
    # declares one sample, holds one byte less
    store = _gzip_store_with(tmp_path, 1, short[:-4] + SAMPLE.to_bytes(4, "little"))
    with pytest.raises(IntegrityError, match=r"\(train/frames/c/1/0/0/0/0: cannot decode sample 9: .*length"):
        open_frame_store(store)


# ----------------------------------------------------------------------------- shard indexes
# Shard 1 of train holds samples 8 and 9 (slots 0, 1); slots 2..7 lie beyond the split's 10
# samples. Each case rewrites that shard's index (its chunks kept) and says what verification
# reports (`check_shard`, the shard's bytes in memory) and what reading a sample from a store
# opened before the change raises (`_ShardReader.read`, which names the shard's file in full).

SHARD1 = "train/frames/c/1/0/0/0/0"
INDEX = 16 * 8 + 4   # 8 slots of (offset, nbytes) and a crc32c


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    store = tmp_path_factory.mktemp("pristine") / "s.zarr"
    splits = _store(store, None)   # the default codec (blosc)
    return store, splits


def _copy(pristine, tmp_path):
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(pristine[0], store)
    return store


def _index(shard_path):
    data = shard_path.read_bytes()
    return [tuple(r) for r in np.frombuffer(data[-INDEX:-4], "<u8").reshape(8, 2).tolist()]


def _with_index(data: bytes, rows) -> bytes:
    """`data` (a shard's bytes) with its index replaced by `rows` and a right crc32c."""
    import google_crc32c

    raw = np.array(rows, "<u8").tobytes()
    return data[:-INDEX] + raw + google_crc32c.value(raw).to_bytes(4, "little")


def _problems(store):
    return [(p.kind, p.name, p.detail) for p in verify_path(store, decode=True).problems]


def _refused_both_ways(store, split, i: int, message: str) -> None:
    """verify reports shard 1 of train with `message`, and reading sample i raises it, the shard's
    path in front."""
    assert _problems(store) == [("invalid", SHARD1, f"{SHARD1}: {message}")]
    with pytest.raises(StoreError) as e:
        split[i]
    assert str(e.value) == f"{store}/{SHARD1}: {message}"


A = (NO_CHUNK, NO_CHUNK)


@pytest.mark.parametrize("change, verified, read", [
    # slot 1 (sample 9, the split's last) absent: not zeros, an error naming the sample
    (lambda r, end: [r[0], A, *r[2:]], "sample 9 is absent from its shard", (9, "sample 9 is absent from its shard")),
    # the offset alone marks a slot absent (zarr writes both as 2^64-1)
    (lambda r, end: [r[0], (NO_CHUNK, 0), *r[2:]], "sample 9 is absent from its shard",
     (9, "sample 9 is absent from its shard")),
    # slot 2 (sample 10, beyond the split) holds a chunk: refused, though every sample reads
    (lambda r, end: [r[0], r[1], r[1], *r[3:]], "holds chunks beyond the split's 10 samples", (9, None)),
    # ... an absent offset beyond the split is no chunk, whatever its nbytes
    (lambda r, end: [r[0], r[1], (NO_CHUNK, 0), *r[3:]], None, (9, None)),
    # sample 9's chunk ends exactly where the index begins (as written) / one byte past it
    (lambda r, end: [r[0], (r[1][0], end - r[1][0]), *r[2:]], None, (9, None)),
    (lambda r, end: [r[0], (r[1][0], end - r[1][0] + 1), *r[2:]], "shard index points past the end of the shard",
     (8, "shard index points past the end of the shard")),
    (lambda r, end: [r[0], (r[1][0] + 1, r[1][1]), *r[2:]], "shard index points past the end of the shard",
     (8, "shard index points past the end of the shard")),
    # a chunk past the end of what the split holds never hides behind an absent neighbour
    (lambda r, end: [r[0], r[1], A, A, A, A, A, (end - 1, 2)], "shard index points past the end of the shard",
     (8, "shard index points past the end of the shard")),
])
def test_shard_index_edges(pristine, tmp_path, change, verified, read):
    store = _copy(pristine, tmp_path)
    split = open_frame_store(store).split("train")   # verified as written; nothing read yet
    shard = store / SHARD1
    data = shard.read_bytes()
    rows = _index(shard)
    assert rows[2:] == [A] * 6 and rows[1][0] + rows[1][1] == len(data) - INDEX   # as dvsprep writes it
    shard.write_bytes(_with_index(data, change(rows, len(data) - INDEX)))
    resign(store)
    assert _problems(store) == ([] if verified is None else [("invalid", SHARD1, f"{SHARD1}: {verified}")])
    i, message = read
    if message is None:
        np.testing.assert_array_equal(split[i], pristine[1]["train"]["frames"][i])
    else:
        with pytest.raises(StoreError) as e:
            split[i]
        assert str(e.value) == f"{store}/{SHARD1}: {message}"


def _bad_crc(data):
    return data[:-4] + bytes([data[-4] ^ 1]) + data[-3:]


@pytest.mark.parametrize("make, message", [
    # nothing but an index, every slot absent: it is read (the shard is exactly its size) ...
    (lambda d: _with_index(bytes(INDEX), [A] * 8), "sample 8 is absent from its shard"),
    # ... one byte less cannot hold one
    (lambda d: _with_index(bytes(INDEX), [A] * 8)[1:], "corrupt shard index"),
    (lambda d: b"", "corrupt shard index"),
    (_bad_crc, "corrupt shard index"),
])
def test_a_shard_too_small_for_its_index_or_with_a_bad_crc(pristine, tmp_path, make, message):
    store = _copy(pristine, tmp_path)
    split = open_frame_store(store).split("train")
    shard = store / SHARD1
    shard.write_bytes(make(shard.read_bytes()))
    resign(store)
    _refused_both_ways(store, split, 8, message)


def test_a_shard_cut_short_after_its_index_was_read(pristine, tmp_path):
    store = _copy(pristine, tmp_path)
    split = open_frame_store(store).split("train")
    np.testing.assert_array_equal(split[8], pristine[1]["train"]["frames"][8])   # the index is read, kept
    shard = store / SHARD1
    start = _index(shard)[1][0]
    os.truncate(shard, start + 1)   # sample 9's chunk is now one byte long
    with pytest.raises(StoreError) as e:
        split[9]
    assert str(e.value) == f"{store}/{SHARD1}: truncated shard"


def test_a_packed_store_names_the_zip_and_its_member(pristine, tmp_path):
    from dvsprep.frames.pack import pack_store

    z = tmp_path / "s.zip"
    pack_store(pristine[0], z)
    split = open_frame_store(z).split("train")
    data = (pristine[0] / SHARD1).read_bytes()
    packed = z.read_bytes()
    at = packed.index(data)   # members are stored uncompressed
    assert packed.count(data) == 1
    z.write_bytes(packed[:at] + _with_index(data, [_index(pristine[0] / SHARD1)[0]] + [A] * 7) + packed[at + len(data):])
    np.testing.assert_array_equal(split[8], pristine[1]["train"]["frames"][8])
    with pytest.raises(StoreError) as e:
        split[9]
    assert str(e.value) == f"{z}: {SHARD1}: sample 9 is absent from its shard"


# ----------------------------------------------------------------------------- files, codecs

def test_verify_files_hashes_every_file_against_the_manifest_and_decodes_nothing(pristine, tmp_path):
    from dvsprep.frames import verify_files
    from dvsprep.frames.check import check_layout
    from dvsprep.frames.files import open_store_files
    from dvsprep.integrity import Problem

    store = _copy(pristine, tmp_path)
    chunks = _chunks(store / SHARD1)
    chunks[1] = b"not a blosc frame"   # re-signed: only decoding would tell
    _write_shard(store / SHARD1, chunks)
    resign(store)
    manifest = check_layout(open_store_files(store)).manifest
    flip_at = store / "test/frames/c/0/0/0/0/0"
    data = bytearray(flip_at.read_bytes())
    data[0] ^= 1
    flip_at.write_bytes(bytes(data))
    (store / "stray").write_bytes(b"x")
    report = verify_files(open_store_files(store), manifest, "as named")
    assert (report.path, report.kind, report.checked) == ("as named", "frames", len(manifest["files"]))
    assert report.problems == [Problem("corrupt", "test/frames/c/0/0/0/0/0", "sha256 differs from the manifest"),
                               Problem("extra", "stray", "not in the manifest")]


def test_every_shard_after_an_empty_split_is_decoded_from_the_bytes_hashed(tmp_path, monkeypatch):
    from dvsprep.frames import check as frames_check

    store = tmp_path / "s.zarr"
    write_frame_store_from_arrays(store, T=T, split_by="number", events_fingerprint="cd" * 32,
                                  splits={"train": {k: v[:0] for k, v in split_arrays(1, 1).items()},
                                          "test": split_arrays(3, 2)})
    monkeypatch.setattr(frames_check._ShardReader, "read", lambda *a: pytest.fail("a shard read a second time"))
    decoded = []
    real = frames_check._ShardReader.check_shard
    monkeypatch.setattr(frames_check._ShardReader, "check_shard",
                        lambda self, s, data, n: decoded.append((self.split, s, n)) or real(self, s, data, n))
    assert _problems(store) == []
    assert decoded == [("test", 0, 3)]


def _blosc_header(nbytes, cbytes, blocksize=1 << 16):
    return bytes([2, 1, 0x36, 1]) + nbytes.to_bytes(4, "little") + blocksize.to_bytes(4, "little") + \
        cbytes.to_bytes(4, "little")


@pytest.mark.parametrize("make, message", [
    (lambda c: c, None),                                                 # as written
    (lambda c: c + b"\0", "sample 9 has the wrong decoded size"),       # its header's cbytes is not its length
    (lambda c: c[:4] + (SAMPLE - 1).to_bytes(4, "little") + c[8:], "sample 9 has the wrong decoded size"),
    (lambda c: c[:4] + (SAMPLE + 1).to_bytes(4, "little") + c[8:], "sample 9 has the wrong decoded size"),
    (lambda c: c[:15], "sample 9 has the wrong decoded size"),          # shorter than a blosc header
    # exactly a header that declares one sample and its own length: blosc itself refuses it
    (lambda c: _blosc_header(SAMPLE, 16), "cannot decode sample 9: error during blosc decompression: -1"),
    (lambda c: _blosc_header(SAMPLE, 17) + b"\0", "cannot decode sample 9: error during blosc decompression: -1"),
    # the declared size is bytes 4..8 only (the blocksize follows)
    (lambda c: _blosc_header(SAMPLE, 16, blocksize=(1 << 16) + 1),
     "cannot decode sample 9: error during blosc decompression: -1"),
])
def test_a_blosc_sample_declares_one_sample_in_a_frame_of_its_own_length(pristine, tmp_path, make, message):
    store = _copy(pristine, tmp_path)
    split = open_frame_store(store).split("train")
    chunks = _chunks(store / SHARD1)
    assert int.from_bytes(chunks[1][12:16], "little") == len(chunks[1])
    assert int.from_bytes(chunks[1][4:8], "little") == SAMPLE
    chunks[1] = make(chunks[1])
    _write_shard(store / SHARD1, chunks)
    resign(store)
    if message is None:
        assert _problems(store) == []
        np.testing.assert_array_equal(split[9], pristine[1]["train"]["frames"][9])
        return
    _refused_both_ways(store, split, 9, message)


@pytest.fixture(scope="module")
def pristine_zstd(tmp_path_factory):
    store = tmp_path_factory.mktemp("pristine_zstd") / "s.zarr"
    return store, _store(store, {"name": "zstd", "level": 1})


def _zstd(payload: int) -> bytes:
    import numcodecs

    return numcodecs.Zstd(level=1).encode((np.arange(payload, dtype=np.uint8) * 7 + 1).tobytes())


@pytest.mark.parametrize("make, message", [
    (lambda c: _zstd(SAMPLE), None),                                   # another sample, one sample's size
    (lambda c: _zstd(SAMPLE - 1), "sample 9 has the wrong decoded size"),
    (lambda c: _zstd(SAMPLE + 1), "sample 9 has the wrong decoded size"),
    (lambda c: c[:5], "sample 9 has the wrong decoded size"),          # too short to declare a size
    (lambda c: _zstd(SAMPLE)[:-1], "cannot decode sample 9: Zstd decompression error: invalid input data"),
])
def test_a_zstd_sample_declares_one_sample_and_decodes_to_it(pristine_zstd, tmp_path, make, message):
    store = _copy(pristine_zstd, tmp_path)
    split = open_frame_store(store).split("train")
    chunks = _chunks(store / SHARD1)
    chunks[1] = make(chunks[1])
    _write_shard(store / SHARD1, chunks)
    resign(store)
    if message is None:
        assert _problems(store) == []
        np.testing.assert_array_equal(split[9].reshape(-1), np.arange(SAMPLE, dtype=np.uint8) * 7 + 1)
        np.testing.assert_array_equal(split[8], pristine_zstd[1]["train"]["frames"][8])
        return
    _refused_both_ways(store, split, 9, message)


def test_a_shard_removed_after_opening_is_an_error_naming_it(pristine, tmp_path):
    store = _copy(pristine, tmp_path)
    split = open_frame_store(store).split("train")
    (store / SHARD1).unlink()
    np.testing.assert_array_equal(split[7], pristine[1]["train"]["frames"][7])   # shard 0 is still there
    with pytest.raises(StoreError) as e:
        split[9]
    assert str(e.value) == f"{store}/{SHARD1}: shard missing (the store declares its samples)"


def test_full_report_decodes_each_shard_from_the_bytes_it_hashed_once(pristine, tmp_path, monkeypatch):
    from dvsprep.frames import check as frames_check
    from dvsprep.frames.files import open_store_files
    from dvsprep.integrity import Problem

    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "cache"))   # nothing decoded before
    store = _copy(pristine, tmp_path)
    chunks = _chunks(store / SHARD1)
    chunks[1] = b"not a blosc frame"   # re-signed: only decoding tells
    _write_shard(store / SHARD1, chunks)
    resign(store)
    files = open_store_files(store)
    layout = frames_check.check_layout(files)
    label = store / "test/label/c/0"   # changed after signing: not decoded, its split's metadata neither
    label.write_bytes(label.read_bytes()[:-1] + bytes([label.read_bytes()[-1] ^ 1]))
    monkeypatch.setattr(frames_check._ShardReader, "read", lambda *a: pytest.fail("a shard read a second time"))
    report = frames_check.full_report(files, layout, "the source")
    assert (report.path, report.kind, report.notes) == ("the source", "frames", [])
    assert report.problems == [Problem("corrupt", "test/label/c/0", "sha256 differs from the manifest"),
                               Problem("invalid", SHARD1, f"{SHARD1}: sample 9 has the wrong decoded size")]


def test_full_report_decodes_content_once_per_machine_unless_asked(pristine, tmp_path, monkeypatch):
    from dvsprep.frames import check as frames_check
    from dvsprep.frames.files import open_store_files

    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "cache"))
    files = open_store_files(pristine[0])
    layout = frames_check.check_layout(files)
    decoded = []
    real = frames_check._ShardReader.check_shard
    monkeypatch.setattr(frames_check._ShardReader, "check_shard",
                        lambda self, s, data, n: decoded.append((self.split, s)) or real(self, s, data, n))
    first = frames_check.full_report(files, layout, "src")
    assert (first.problems, first.notes, sorted(decoded)) == ([], [], [("test", 0), ("train", 0), ("train", 1)])
    decoded.clear()
    with monkeypatch.context() as m:
        m.setattr(frames_check._ShardReader, "read", lambda *a: pytest.fail("decoded, though decoded before"))
        again = frames_check.full_report(files, layout, "src")
    assert (again.problems, decoded) == ([], [])
    assert again.notes == ["samples not decoded: this content (same fingerprint) was decoded on this machine before, "
                           "and every file hashes as its manifest says (--decode decodes them again)"]
    forced = frames_check.full_report(files, layout, "src", decode=True)
    assert (forced.problems, forced.notes, sorted(decoded)) == ([], [], [("test", 0), ("train", 0), ("train", 1)])


def test_closing_a_reader_closes_every_shard_it_opened(pristine):
    from dvsprep.frames import check as frames_check
    from dvsprep.frames.files import open_store_files

    files = open_store_files(pristine[0])
    meta = frames_check.check_layout(files).metas["train"]["frames"]
    reader = frames_check._ShardReader(files, "train", meta, frames_check._fast_codec(meta))
    for i in (9, 0, 8):
        np.testing.assert_array_equal(reader.read(i), pristine[1]["train"]["frames"][i])
    fds = [fd for fd, _, _ in reader._fds.values()]
    assert len(set(fds)) == 2   # one per shard, kept open between reads
    reader.close()
    assert reader._fds == {}
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_gzip_stream_of_exactly_a_header_and_trailer_reaches_gzip(tmp_path):
    # 18 bytes (gzip's 10-byte header and 8-byte trailer) declaring one sample: the size is read,
    # and gzip itself refuses the stream (no deflate data)
    store = _gzip_store_with(tmp_path, 0, b"\x1f\x8b\x08" + bytes(11) + SAMPLE.to_bytes(4, "little"))
    [(kind, name, detail)] = _problems(store)
    assert (kind, name) == ("invalid", SHARD1) and detail.startswith(f"{SHARD1}: cannot decode sample 8: "), detail
