"""Edges of frame-store verification (`dvsprep.frames.check`) that realistic mutants of its
checks survived: declared sizes exactly at one sample and one byte either side, every codec."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from dvsprep.errors import IntegrityError
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


@pytest.mark.parametrize("payload, ok", [
    (SAMPLE - 1, False),   # one byte short: numcodecs would leave the last byte of `out` as it was
    (SAMPLE, True),        # exactly one sample (other values: the manifest, re-signed, vouches for them)
    (SAMPLE + 1, False),   # one byte too many
    (0, False),            # an empty stream
])
def test_a_gzip_sample_must_decode_to_exactly_one_sample(tmp_path, payload, ok):
    store = tmp_path / "s.zarr"
    _store(store, {"name": "gzip", "level": 1})
    shard = store / "train/frames/c/1/0/0/0/0"   # samples 8, 9 (slots 2..7 absent: the split ends)
    chunks = _chunks(shard)
    want = np.arange(payload, dtype=np.uint8) * 7 + 1
    chunks[1] = gzip.compress(want.tobytes(), compresslevel=1)   # sample 9, the split's last
    _write_shard(shard, chunks)
    resign(store)
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
    store = tmp_path / "s.zarr"
    _store(store, {"name": "gzip", "level": 1})
    shard = store / "train/frames/c/1/0/0/0/0"
    chunks = _chunks(shard)
    # 17 bytes (one less than gzip's 10-byte header and 8-byte trailer) whose last 4 read as one
    # sample's size: the size is not read from a stream that cannot hold a trailer
    chunks[0] = b"\x1f\x8b\x08" + bytes(10) + SAMPLE.to_bytes(4, "little")
    _write_shard(shard, chunks)
    resign(store)
    with pytest.raises(IntegrityError, match=r"\(train/frames/c/1/0/0/0/0: sample 8 has the wrong decoded size\)"):
        open_frame_store(store)


def test_a_gzip_trailer_that_lies_about_the_size_is_caught_by_gzip(tmp_path):
    store = tmp_path / "s.zarr"
    _store(store, {"name": "gzip", "level": 1})
    shard = store / "train/frames/c/1/0/0/0/0"
    chunks = _chunks(shard)
    short = gzip.compress(bytes(SAMPLE - 1), compresslevel=1)
    chunks[1] = short[:-4] + SAMPLE.to_bytes(4, "little")   # declares one sample, holds one byte less
    _write_shard(shard, chunks)
    resign(store)
    with pytest.raises(IntegrityError, match=r"\(train/frames/c/1/0/0/0/0: cannot decode sample 9: .*length"):
        open_frame_store(store)
