"""The stored digest of an events dataset: what lets a full verification of events.h5 run at
hashing speed.

The manifest's ``sha256`` of an event dataset (t, x, y, p) hashes its decoded values; decoding t
and p (HDF5's scale-offset filter) runs at a fraction of sha256's speed. So the writer also
records ``stored``: the sha256 of the dataset as it lies in the file (its dtype, chunk size and
filter pipeline, each chunk's filter mask and size, then every chunk's bytes, in chunk order).
A verification hashes those bytes with large reads (no HDF5 in the loop, datasets spread over
threads) and, when they match, knows the values are the ones the manifest's ``sha256`` names
without decoding them. The value checks the readers rely on run on the stored bytes too: x and
y are stored unfiltered (their bytes are their values); for p and t the scale-offset header of
each chunk (bit width, minimum) bounds its values and must describe a chunk of exactly its size.
A chunk whose header does not settle it is decoded through HDF5 and checked value by value
(`fallback`). A dataset that is not stored as `EventsWriter` stores it has no stored digest and
is decoded in full, as are files written before stored digests existed.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import h5py
import numpy as np

from ..integrity import canonical_json

SCALEOFFSET = 6          # HDF5's filter id
_SO_HEADER = 21          # scale-offset chunk header: uint32 minbits, uint8 8, uint64 minimum, padding
_RUN_BYTES = 8 << 20     # coalesced reads: contiguous chunks read (and hashed) up to 8 MiB at once

Chunk = tuple[int, int, int]   # (filter mask, byte offset in the file, size)


def pipeline(ds: h5py.Dataset) -> list[list[Any]]:
    """The filter pipeline of `ds`: [[filter id, flags, [cd values]], ...]."""
    pl = ds.id.get_create_plist()
    out = []
    for i in range(pl.get_nfilters()):
        code, flags, cd, _name = pl.get_filter(i)
        out.append([int(code), int(flags), [int(c) for c in cd]])
    return out


def chunk_table(ds: h5py.Dataset) -> list[Chunk] | None:
    """Every chunk of a one-dimensional chunked dataset in chunk order, or None when the chunks
    are not exactly 0, C, 2C, ... covering its extent (then it has no stored digest)."""
    if ds.chunks is None or len(ds.chunks) != 1:
        return None
    infos: list[Any] = []
    ds.id.chunk_iter(infos.append)
    c, n = ds.chunks[0], ds.shape[0]
    infos.sort(key=lambda s: s.chunk_offset[0])
    if [s.chunk_offset[0] for s in infos] != list(range(0, n, c)):
        return None
    return [(int(s.filter_mask), int(s.byte_offset), int(s.size)) for s in infos]


def chunk_info(ds: h5py.Dataset, i: int) -> Chunk:
    """Chunk i of `ds` (the writer's way: by coordinate, as chunks become final)."""
    s = ds.id.get_chunk_info_by_coord((i * ds.chunks[0],))
    if s.byte_offset is None:
        raise OSError(f"{ds.name}: chunk {i} is not stored")
    return int(s.filter_mask), int(s.byte_offset), int(s.size)


class StoredDigest:
    """sha256 of a dataset as stored, fed chunk by chunk (`add`) in chunk order."""

    def __init__(self, ds: h5py.Dataset):
        head = {"dtype": ds.dtype.str, "chunk": int(ds.chunks[0]), "filters": pipeline(ds)}
        self._table = hashlib.sha256(canonical_json(head))
        self._bytes = hashlib.sha256()
        self.n_chunks = 0

    def add(self, fd: int, chunks: list[Chunk],
            check: Callable[[int, list[Chunk], memoryview], None] | None = None) -> None:
        """Read `chunks` (the next ones in chunk order) from `fd` in coalesced runs and hash
        them; ``check(index of the run's first chunk, its chunks, its bytes)`` sees each run."""
        self._table.update(np.asarray([(m, s) for m, _, s in chunks], dtype="<u8").tobytes())
        for first, run in _runs(chunks):
            start, end = run[0][1], run[-1][1] + run[-1][2]
            buf = os.pread(fd, end - start, start)
            if len(buf) != end - start:
                raise OSError(f"chunks at bytes {start}..{end} lie past the end of the file")
            self._bytes.update(buf)
            if check is not None:
                check(self.n_chunks + first, run, memoryview(buf))
        self.n_chunks += len(chunks)

    def hexdigest(self) -> str:
        t = self._table.copy()
        t.update(self._bytes.digest())
        return t.hexdigest()


def _runs(chunks: list[Chunk]) -> Iterable[tuple[int, list[Chunk]]]:
    """(index of the first chunk, chunks) of byte-contiguous runs of at most _RUN_BYTES."""
    first, run, size = 0, [], 0
    for i, ch in enumerate(chunks):
        if run and (ch[1] != run[-1][1] + run[-1][2] or size + ch[2] > _RUN_BYTES):
            yield first, run
            first, run, size = i, [], 0
        run.append(ch)
        size += ch[2]
    if run:
        yield first, run


# ----------------------------------------------------------------------------- value checks


@dataclass
class ValueCheck:
    """Checks the chunks of one event dataset as `StoredDigest.add` passes them: `top` gathers
    the largest value seen (when `limit` is set), `fallback` the chunks to decode instead."""

    n: int                 # the dataset's extent
    chunk: int
    itemsize: int
    filtered: bool         # one scale-offset filter (else: no filter)
    limit: int | None      # values must lie in 0..limit (None: no bound, t)
    fill_coded: bool = False   # scale-offset reserves its top code for the fill value
    top: int = 0
    fallback: list[int] = field(default_factory=list)

    def __call__(self, first: int, run: list[Chunk], data: memoryview) -> None:
        if self.filtered:
            start = run[0][1]
            for k, (mask, off, size) in enumerate(run):
                self._scaleoffset(first + k, mask, data[off - start: off - start + size])
        elif self.limit is not None:  # uint8 stored as is: the bytes are the values
            if any(size != self.chunk for _, _, size in run):
                self.fallback.extend(range(first, first + len(run)))
                return
            valid = min(len(data), self.n - first * self.chunk)  # the last chunk runs past the extent
            if valid > 0:
                self.top = max(self.top, int(np.frombuffer(data[:valid], dtype=np.uint8).max()))

    def _scaleoffset(self, i: int, mask: int, data: memoryview) -> None:
        minbits = None if mask else scaleoffset_width(data, self.chunk, 8 * self.itemsize)
        if minbits is None:
            self.fallback.append(i)
            return
        minval = int.from_bytes(data[5:13], "little")
        if self.limit is not None:
            # Values are minval + code; with a fill value defined (0 here), the top code stands
            # for it, so the others reach minval + 2**minbits - 2.
            bound = minval + (1 << minbits) - 1 - (1 if self.fill_coded and minbits else 0)
            if bound > self.limit:
                self.fallback.append(i)
            else:
                self.top = max(self.top, bound)


def scaleoffset_width(data: bytes | memoryview, n: int, max_bits: int) -> int | None:
    """The code width (minbits) of a scale-offset chunk of n values laid out as HDF5 writes it
    (a 21-byte header with an 8-byte minimum, the codes packed to minbits < `max_bits` bits,
    one byte), or None: a chunk at full width (no gain) or of any other size is left to HDF5."""
    if len(data) < _SO_HEADER or data[4] != 8:
        return None
    minbits = int.from_bytes(data[0:4], "little")
    if minbits >= max_bits or len(data) != _SO_HEADER + (n * minbits) // 8 + 1:
        return None
    return minbits


def value_check(ds: h5py.Dataset, limit: int | None) -> ValueCheck | None:
    """The check of an event dataset stored as `EventsWriter` stores it (uint8 unfiltered, or one
    scale-offset filter of integers with fill value 0), or None (decode it in full instead)."""
    pipe = pipeline(ds)
    if pipe == []:
        if ds.dtype != np.uint8 and limit is not None:
            return None
        return ValueCheck(ds.shape[0], ds.chunks[0], ds.dtype.itemsize, False, limit)
    fill = ds.fillvalue
    if len(pipe) != 1 or pipe[0][0] != SCALEOFFSET or pipe[0][2][:1] != [2] or fill != 0 \
            or ds.dtype.kind not in "ui" or ds.dtype.byteorder == ">":
        return None
    cd = pipe[0][2]
    return ValueCheck(ds.shape[0], ds.chunks[0], ds.dtype.itemsize, True, limit,
                      fill_coded=len(cd) > 7 and cd[7] == 1)


# ----------------------------------------------------------------------------- reading values


def scaleoffset_values(raw: bytes | memoryview, n: int, dtype: np.dtype, fill_coded: bool) -> np.ndarray | None:
    """The `n` values of one chunk stored by HDF5's scale-offset filter (integers, as
    `value_check` accepts them), decoded with numpy, several times faster than HDF5's own loop;
    None when the chunk is not laid out as this decoder knows (HDF5 then decodes it).

    raw: the chunk as stored: a 21-byte header (uint32 minbits w, uint8 8, the minimum as 8
    bytes), then n codes of w bits packed most significant bit first, then one byte. A value is
    minimum + code, except the all-ones code, which stands for the fill value (0) when one is
    defined. Returns [n] of `dtype`."""
    dtype = np.dtype(dtype)
    w = scaleoffset_width(raw, n, min(57, 8 * dtype.itemsize)) if dtype.kind in "ui" else None
    if w is None:
        return None
    minval = int.from_bytes(raw[5:13], "little", signed=dtype.kind == "i")
    if w == 0:
        return np.full(n, minval, dtype=dtype)
    codes = unpack_codes(np.frombuffer(raw, dtype=np.uint8, offset=_SO_HEADER), n, w)
    values = codes.astype(dtype)
    values += dtype.type(minval)   # a valid chunk's values all fit the dtype
    if fill_coded:
        values *= codes != (1 << w) - 1   # the fill value is 0 (a multiply: no masked write)
    return values


def unpack_codes(packed: np.ndarray, n: int, w: int) -> np.ndarray:
    """n codes of w bits (1 <= w <= 56), packed most significant bit first: [n] of uint8 (w = 1),
    uint32 (w <= 25) or uint64.

    Eight codes take exactly w bytes, so code j of every group of eight starts at the same byte
    ((j*w) // 8) and bit ((j*w) % 8) of its group: one strided big-endian read of 4 or 8 bytes
    per j (numpy reads unaligned views), a shift and a mask, over all groups at once."""
    if w == 1:   # p: one bit per event
        return np.unpackbits(packed, count=n)
    groups = -(-n // 8)
    buf = np.zeros(groups * w + 8, dtype=np.uint8)   # room for the last window's 8 bytes
    body = packed[: groups * w]
    buf[: body.shape[0]] = body
    window, kind = (4, np.uint32) if w <= 25 else (8, np.uint64)   # w + 7 bits must fit the window
    out = np.empty((8, groups), dtype=kind)
    for j in range(8):
        start, bit = divmod(j * w, 8)
        words = np.ndarray((groups,), dtype=f">u{window}", buffer=buf, offset=start, strides=(w,))
        np.right_shift(words, kind(8 * window - w - bit), out=out[j], casting="unsafe")
    out &= kind((1 << w) - 1)
    return out.T.reshape(-1)[:n]


def read_values(ds: h5py.Dataset, lo: int, hi: int) -> np.ndarray:
    """ds[lo:hi] of a one-dimensional event dataset: chunks stored with one scale-offset filter
    are read as stored and decoded by `scaleoffset_values`; anything else (another pipeline, a
    chunk this decoder does not know) through HDF5, chunk by chunk. Returns [hi - lo]."""
    check = value_check(ds, None) if ds.chunks is not None and len(ds.chunks) == 1 else None
    if check is None or not check.filtered:
        return ds[lo:hi]
    c = ds.chunks[0]
    out = np.empty(hi - lo, dtype=ds.dtype)
    for i in range(lo // c, -(-hi // c)):
        a, b = max(lo, i * c), min(hi, (i + 1) * c)
        mask, raw = ds.id.read_direct_chunk((i * c,))
        values = None if mask else scaleoffset_values(raw, c, ds.dtype, check.fill_coded)
        out[a - lo: b - lo] = ds[a:b] if values is None else values[a - i * c: b - i * c]
    return out
