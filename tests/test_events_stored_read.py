"""Reading event values from their stored chunks (`dvsprep.events.stored.read_values`): HDF5's
scale-offset chunks decoded by numpy, compared with HDF5's own decoding (h5py, an independent
implementation) over widths 0..56, signed and unsigned, values equal to the fill value, ranges
across chunk boundaries and into the last, partial chunk; hand-packed codes for the bit layout."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dvsprep.events import stored
from fuzz_settings import fuzz


def _dataset(path, values: np.ndarray, chunk: int, **kw) -> h5py.Dataset:
    f = h5py.File(path, "w")
    return f.create_dataset("v", data=values, chunks=(chunk,), maxshape=(None,), **kw)


def test_unpack_codes_by_hand():
    # w = 3: 5, 0, 7, 1, 2, 6, 3, 4 | 7 -> bits 101 000 111 001 010 110 011 100 | 111 (then padding)
    bits = "101000111001010110011100" + "111" + "0" * 5
    packed = np.frombuffer(int(bits, 2).to_bytes(len(bits) // 8, "big"), dtype=np.uint8)
    codes = stored.unpack_codes(packed, 9, 3)
    assert codes.tolist() == [5, 0, 7, 1, 2, 6, 3, 4, 7] and codes.dtype == np.uint32
    # w = 1 (p): one bit per code, most significant first
    codes = stored.unpack_codes(np.array([0b10110000], np.uint8), 4, 1)
    assert codes.tolist() == [1, 0, 1, 1] and codes.dtype == np.uint8
    # the window's edges: w = 25 is the widest read through 4 bytes, w = 26 needs 8
    for w in (25, 26, 56):
        want = [(1 << w) - 1, 0, 1, (1 << (w - 1)), 12345 % (1 << w), 0, (1 << w) - 2, 1]
        packed = int("".join(format(c, f"0{w}b") for c in want), 2).to_bytes(w, "big")
        codes = stored.unpack_codes(np.frombuffer(packed, np.uint8), 8, w)
        assert codes.tolist() == want and codes.dtype == (np.uint32 if w <= 25 else np.uint64)


def _header(w: int, minval: int, n: int, marker: int = 8) -> bytes:
    return w.to_bytes(4, "little") + bytes([marker]) + minval.to_bytes(8, "little", signed=minval < 0) + bytes(8)


@pytest.mark.parametrize("raw, dtype, why", [
    (_header(3, 0, 8)[:20], "u1", "header cut short"),
    (_header(3, 0, 8, marker=4) + bytes(3 + 1), "u1", "minimum not 8 bytes"),
    (_header(3, 0, 8) + bytes(3), "u1", "one byte short of 8 codes of 3 bits + 1"),
    (_header(3, 0, 8) + bytes(5), "u1", "one byte too many"),
    (_header(8, 0, 8) + bytes(8 + 1), "u1", "full width: HDF5 stores such a chunk otherwise"),
    (_header(57, 0, 8) + bytes(57 + 1), "<i8", "wider than the 8-byte window"),
    (_header(3, 0, 8) + bytes(3 + 1), "<f4", "not integers"),
])
def test_chunks_this_decoder_does_not_know_are_left_to_hdf5(raw, dtype, why):
    assert stored.scaleoffset_values(raw, 8, np.dtype(dtype), True) is None, why


def test_scaleoffset_values_by_hand():
    # 8 codes of 2 bits: 0 1 2 3 3 2 1 0 -> 00011011 11100100, minimum 10
    raw = _header(2, 10, 8) + bytes([0b00011011, 0b11100100]) + b"\0"
    assert stored.scaleoffset_values(raw, 8, np.dtype("<i8"), False).tolist() == [10, 11, 12, 13, 13, 12, 11, 10]
    # with a fill value, the all-ones code (3) stands for it (0)
    assert stored.scaleoffset_values(raw, 8, np.dtype("<i8"), True).tolist() == [10, 11, 12, 0, 0, 12, 11, 10]
    # a negative minimum of a signed type; width 0: every value is the minimum
    raw = _header(2, -5, 8) + bytes([0b00011011, 0b11100100]) + b"\0"
    assert stored.scaleoffset_values(raw, 8, np.dtype("<i8"), False).tolist() == [-5, -4, -3, -2, -2, -3, -4, -5]
    assert stored.scaleoffset_values(_header(0, 7, 8) + b"\0", 8, np.dtype("u1"), True).tolist() == [7] * 8


@pytest.mark.parametrize("dtype", ["u1", "<i8"])
def test_event_datasets_as_the_writer_stores_them(tmp_path, dtype):
    """p (uint8: values 0 and 1, the 0s stored as the fill code) and t (int64, sorted, wide)."""
    rng = np.random.default_rng(1)
    n, chunk = 3 * 4096 + 5, 4096
    values = rng.integers(0, 2, n).astype(dtype) if dtype == "u1" else \
        np.sort(rng.integers(10**9, 10**9 + 6_000_000, n)).astype(dtype)
    ds = _dataset(tmp_path / "e.h5", values, chunk, scaleoffset=0)
    assert np.array_equal(stored.read_values(ds, 0, n), values)
    for lo, hi in [(0, 1), (chunk - 1, chunk + 1), (chunk, 2 * chunk), (3 * chunk, n), (n - 1, n), (5, 5)]:
        got = stored.read_values(ds, lo, hi)
        assert got.dtype == values.dtype and np.array_equal(got, values[lo:hi]), (lo, hi)


@given(data=st.data(), width=st.integers(0, 62), signed=st.booleans(), chunk=st.sampled_from([1, 7, 8, 9, 64, 1000]),
       n=st.integers(1, 2500), zeros=st.booleans())
@example(data=None, width=56, signed=True, chunk=64, n=300, zeros=True)
@example(data=None, width=57, signed=False, chunk=64, n=300, zeros=False)   # HDF5 decodes these
@fuzz(60)
def test_read_values_equals_hdf5(tmp_path_factory, data, width, signed, chunk, n, zeros):
    rng = np.random.default_rng(width * 1000 + n)
    dtype = np.dtype("<i8" if signed else "<u8")
    base = -(1 << 40) if signed else 1 << 20
    values = (rng.integers(0, 1 << width, n, dtype=np.uint64, endpoint=False).astype(dtype) + dtype.type(base)
              if width else np.full(n, base, dtype))
    if zeros:   # the fill value itself, stored as the all-ones code
        values[rng.random(n) < 0.1] = 0
    ds = _dataset(tmp_path_factory.mktemp("so") / "v.h5", values, chunk, scaleoffset=0)
    lo = data.draw(st.integers(0, n)) if data is not None else 3
    hi = data.draw(st.integers(lo, n)) if data is not None else n
    got = stored.read_values(ds, lo, hi)
    assert got.dtype == dtype and np.array_equal(got, ds[lo:hi])
    ds.file.close()


class _FilterSkipped:
    """A dataset whose every chunk reports the filter as skipped (mask 1), with the bytes of a
    valid scale-offset chunk of other values: only HDF5's own read gives the right ones."""

    def __init__(self, ds: h5py.Dataset, other: h5py.Dataset):
        self._ds, self._other, self.calls = ds, other, []
        outer = self

        class _Id:
            def __getattr__(self, name):
                return getattr(ds.id, name)

            def read_direct_chunk(self, offset):
                outer.calls.append(offset)
                return 1, other.id.read_direct_chunk(offset)[1]
        self.id = _Id()

    def __getattr__(self, name):
        return getattr(self._ds, name)

    def __getitem__(self, key):
        return self._ds[key]


def test_datasets_without_scaleoffset_and_chunks_hdf5_skipped_the_filter_on(tmp_path):
    values = np.arange(1000, dtype=np.uint8)
    ds = _dataset(tmp_path / "x.h5", values, 64)          # x and y: no filter
    assert np.array_equal(stored.read_values(ds, 10, 990), values[10:990])
    ds = _dataset(tmp_path / "m.h5", np.arange(1000, dtype="<i8"), 64, scaleoffset=0)
    other = _dataset(tmp_path / "o.h5", np.arange(1000, dtype="<i8") + 7, 64, scaleoffset=0)
    skipped = _FilterSkipped(ds, other)
    assert np.array_equal(stored.read_values(skipped, 0, 1000), np.arange(1000))
    assert skipped.calls == [(i * 64,) for i in range(16)]
    assert np.array_equal(stored.read_values(other, 0, 1000), np.arange(1000) + 7)


def test_value_check_leaves_a_chunk_whose_filter_was_skipped_to_hdf5():
    """A chunk whose filter mask is set holds raw values, whatever its first bytes look like:
    its header is not read as scale-offset's (bound, or decoded by HDF5 instead)."""
    chunk = _header(1, 0, 8) + bytes([0b10110000]) + b"\0"       # a valid-looking 1-bit chunk of 8
    check = stored.ValueCheck(n=8, chunk=8, itemsize=1, filtered=True, limit=1, fill_coded=False)
    check(0, [(0, 0, len(chunk))], memoryview(chunk))
    assert (check.fallback, check.top) == ([], 1)                   # read as scale-offset: bound 1
    check = stored.ValueCheck(n=8, chunk=8, itemsize=1, filtered=True, limit=1, fill_coded=False)
    check(0, [(1, 0, len(chunk))], memoryview(chunk))
    assert (check.fallback, check.top) == ([0], 0)
