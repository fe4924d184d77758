"""AEDAT 3.1 polarity-event decoding (vectorised) and encoding (for synth and tests).

The decoder walks packets in Python (a few thousand per recording) and decodes events with
numpy over the whole file at once; it never loops over events.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..constants import (
    AEDAT_END_HEADER,
    AEDAT_VERSION_LINE,
    P_DTYPE,
    PACKET_HEADER_SIZE,
    POLARITY_EVENT,
    POLARITY_EVENT_SIZE,
    SENSOR_H,
    SENSOR_W,
    T_DTYPE,
    XY_DTYPE,
)
from ..atomic import atomic_write
from ..errors import AedatFormatError, MissingFileError

PACKET_HEADER = np.dtype(
    [
        ("type", "<i2"),
        ("source", "<i2"),
        ("size", "<i4"),
        ("ts_offset", "<i4"),
        ("ts_overflow", "<i4"),
        ("capacity", "<i4"),
        ("number", "<i4"),
        ("valid", "<i4"),
    ]
)
POLARITY_RECORD = np.dtype([("data", "<u4"), ("ts", "<u4")])
MAX_HEADER_BYTES = 1 << 20  # real headers are a few hundred bytes


@dataclass
class Events:
    """Decoded polarity events of one recording, in file order.

    t: int64 [N] µs, x: uint8 [N], y: uint8 [N], p: uint8 [N] (1 = ON).
    n_invalid: events dropped because their valid bit was 0.
    """

    t: np.ndarray
    x: np.ndarray
    y: np.ndarray
    p: np.ndarray
    n_invalid: int = 0

    def __len__(self) -> int:
        return int(self.t.shape[0])


def parse_header(buf: bytes | np.ndarray, path: str | os.PathLike = "<bytes>") -> int:
    """Validate the ASCII header of uint8 [nbytes] and return the byte offset where packets start."""
    data = bytes(buf[:MAX_HEADER_BYTES])
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            raise AedatFormatError(f"{path}: header has no '#!END-HEADER' line")
        line = data[pos:nl].rstrip(b"\r")
        if pos == 0:
            if not line.startswith(b"#!AER-DAT"):
                raise AedatFormatError(f"{path}: not an AEDAT file (first line is {line[:40]!r})")
            if line != AEDAT_VERSION_LINE:
                version = line[len(b"#!AER-DAT"):].decode("ascii", "replace")
                raise AedatFormatError(
                    f"{path}: unsupported AEDAT version {version} (only 3.1 is supported)"
                )
        elif not line.startswith(b"#"):
            raise AedatFormatError(
                f"{path}: byte {pos}: header line does not start with '#' (no '#!END-HEADER' before it)"
            )
        pos = nl + 1
        if line == AEDAT_END_HEADER:
            return pos


_PACKET_STRUCT = struct.Struct("<hhiiiiii")


def _walk_packets(buf: np.ndarray, start: int, path: str | os.PathLike) -> list[tuple[int, int, int]]:
    """Return [(body_offset, number, ts_overflow)] of the polarity packets that hold events."""
    size = buf.shape[0]
    mv = memoryview(buf)
    unpack = _PACKET_STRUCT.unpack_from
    pos = start
    polarity: list[tuple[int, int, int]] = []
    while pos < size:
        if size - pos < PACKET_HEADER_SIZE:
            raise AedatFormatError(
                f"{path}: byte {pos}: truncated packet header ({size - pos} of {PACKET_HEADER_SIZE} bytes)"
            )
        etype, _src, esize, _tsoff, ovf, cap, num, _valid = unpack(mv, pos)
        if esize < 0 or cap < 0 or num < 0 or ovf < 0:
            raise AedatFormatError(
                f"{path}: byte {pos}: negative field in packet header "
                f"(eventSize={esize}, eventCapacity={cap}, eventNumber={num}, eventTSOverflow={ovf})"
            )
        if cap < num:
            raise AedatFormatError(
                f"{path}: byte {pos}: eventCapacity {cap} is smaller than eventNumber {num}"
            )
        if etype == POLARITY_EVENT and esize != POLARITY_EVENT_SIZE:
            raise AedatFormatError(
                f"{path}: byte {pos}: polarity packet has eventSize {esize}, expected {POLARITY_EVENT_SIZE}"
            )
        body = pos + PACKET_HEADER_SIZE
        end = body + cap * esize
        if end > size:
            raise AedatFormatError(
                f"{path}: byte {pos}: truncated packet (type {etype}, needs {cap * esize} body bytes, "
                f"{size - body} left)"
            )
        if etype == POLARITY_EVENT and num > 0:
            polarity.append((body, num, ovf))
        pos = end
    return polarity


# Bits of the data word that must be zero for x < 128 and y < 128 (y: bits 9..16, x: 24..31).
_OUTSIDE_SENSOR_BITS = np.uint32(0xFF01FE00)
BLOCK_EVENTS = 1 << 15  # 256 KiB of records: every pass over a block stays in L2 cache


def decode_buffer(buf: np.ndarray, path: str | os.PathLike = "<bytes>") -> Events:
    """Decode AEDAT 3.1 bytes (uint8 [nbytes], e.g. a memmap) into polarity events.

    Returns Events with t int64 [N], x/y/p uint8 [N]; invalid events dropped and counted.
    Packets are gathered into cache-sized blocks and each block is decoded with a few numpy
    passes straight into the output arrays (byte views: x is byte 2 >> 1, y spans bytes 0-1).
    """
    start = parse_header(buf, path)
    packets = _walk_packets(buf, start, path)
    total = sum(n for _, n, _ in packets)
    out = Events(
        t=np.empty(total, dtype=T_DTYPE),
        x=np.empty(total, dtype=XY_DTYPE),
        y=np.empty(total, dtype=XY_DTYPE),
        p=np.empty(total, dtype=P_DTYPE),
    )
    block = np.empty(BLOCK_EVENTS, dtype=POLARITY_RECORD)
    block_u8 = block.view(np.uint8)
    pending: list[tuple[int, int, int]] = []  # (packet index, first event in block, count)
    filled = 0
    written = 0

    def flush() -> None:
        nonlocal filled, written, pending
        if filled:
            written = _decode_block(block[:filled], pending, packets, out, written, path)
        filled, pending = 0, []

    for k, (off, n, _) in enumerate(packets):
        done = 0
        while done < n:
            take = min(n - done, BLOCK_EVENTS - filled)
            a = off + done * POLARITY_EVENT_SIZE
            block_u8[filled * POLARITY_EVENT_SIZE : (filled + take) * POLARITY_EVENT_SIZE] = \
                buf[a : a + take * POLARITY_EVENT_SIZE]
            pending.append((k, filled, done))
            filled += take
            done += take
            if filled == BLOCK_EVENTS:
                flush()
    flush()
    out.n_invalid = total - written
    if written < total:
        out.t, out.x, out.y, out.p = out.t[:written], out.x[:written], out.y[:written], out.p[:written]
    return out


def _decode_block(
    rec: np.ndarray,
    pieces: list[tuple[int, int, int]],
    packets: list[tuple[int, int, int]],
    out: Events,
    w: int,
    path: str | os.PathLike,
) -> int:
    """Decode records [n] (pieces: packet index, start in block, start in packet) into `out`
    at position w; returns the new write position."""
    n = rec.shape[0]
    data = rec["data"]
    keep = None
    if not np.bitwise_and.reduce(data) & 1:
        keep = (data & 1).astype(bool)
    if np.bitwise_or.reduce(data if keep is None else data[keep]) & _OUTSIDE_SENSOR_BITS:
        bad = ((data & _OUTSIDE_SENSOR_BITS) != 0) & (True if keep is None else keep)
        i = int(np.argmax(bad))
        piece = max(j for j in range(len(pieces)) if pieces[j][1] <= i)
        k, b0, d0 = pieces[piece]
        offset = packets[k][0] + (d0 + i - b0) * POLARITY_EVENT_SIZE
        word = int(data[i])
        raise AedatFormatError(
            f"{path}: byte {offset}: event at x={word >> 17}, y={(word >> 2) & 0x7FFF} is outside the "
            f"{SENSOR_W}x{SENSOR_H} sensor"
        )
    b = rec.view(np.uint8).reshape(n, POLARITY_EVENT_SIZE)
    if keep is not None:
        b = b[keep]
    m = b.shape[0]
    seg = slice(w, w + m)
    # Range was checked above, so the shifted 16-bit halves fit in uint8.
    b16 = b.view(np.uint16)
    np.right_shift(b16[:, 1], 1, out=out.x[seg], casting="unsafe")
    np.right_shift(b16[:, 0], 2, out=out.y[seg], casting="unsafe")
    p = out.p[seg]
    np.right_shift(b[:, 0], 1, out=p)
    p &= 1
    t = out.t[seg]
    t[:] = rec["ts"] if keep is None else rec["ts"][keep]
    for j, (k, b0, _) in enumerate(pieces):
        ovf = packets[k][2]
        if ovf:
            b1 = pieces[j + 1][1] if j + 1 < len(pieces) else n
            if keep is None:
                t[b0:b1] |= ovf << 31
            else:
                kept_before = int(np.count_nonzero(keep[:b0]))
                t[kept_before : kept_before + int(np.count_nonzero(keep[b0:b1]))] |= ovf << 31
    return w + m


def map_file(path: str | os.PathLike) -> np.ndarray:
    """The bytes of an AEDAT file, memory-mapped read-only: uint8 [nbytes]."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    if size == 0:
        raise AedatFormatError(f"{path}: empty file")
    # A plain ndarray view of the map: slicing np.memmap subclasses costs per packet.
    return np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)


def read_aedat(path: str | os.PathLike) -> Events:
    """Decode an AEDAT 3.1 file. Raises AedatFormatError naming file, byte offset and problem."""
    return decode_buffer(map_file(path), path)


# ----------------------------------------------------------------------------------------------
# Encoding: used by `dvsprep synth` and by tests to craft exact (and deliberately broken) files.


def header_bytes(extra_lines: Sequence[str] = ()) -> bytes:
    """The ASCII header with CRLF line ends, as the IBM release writes it."""
    lines = [AEDAT_VERSION_LINE.decode()]
    lines += ["#Format: RAW", "#Source 1: DVS128"]
    lines += [ln if ln.startswith("#") else "#" + ln for ln in extra_lines]
    lines.append(AEDAT_END_HEADER.decode())
    return "".join(ln + "\r\n" for ln in lines).encode("ascii")


def encode_packet(
    event_type: int,
    body: bytes,
    *,
    event_size: int,
    capacity: int,
    number: int,
    ts_overflow: int = 0,
    source: int = 1,
    ts_offset: int = 4,
    n_valid: int | None = None,
) -> bytes:
    """One packet: 28-byte header then body (body must be capacity*event_size bytes unless
    a test wants a broken file)."""
    hdr = np.zeros(1, dtype=PACKET_HEADER)
    hdr["type"], hdr["source"], hdr["size"] = event_type, source, event_size
    hdr["ts_offset"], hdr["ts_overflow"] = ts_offset, ts_overflow
    hdr["capacity"], hdr["number"] = capacity, number
    hdr["valid"] = number if n_valid is None else n_valid
    return hdr.tobytes() + body


def encode_polarity_records(
    ts: np.ndarray, x: np.ndarray, y: np.ndarray, p: np.ndarray, valid: np.ndarray | None = None
) -> bytes:
    """Event records [N] -> bytes; ts are the low 31 bits (the packet carries the overflow)."""
    n = len(ts)
    rec = np.empty(n, dtype=POLARITY_RECORD)
    v = np.ones(n, dtype=np.uint32) if valid is None else np.asarray(valid, dtype=np.uint32)
    rec["data"] = (
        (np.asarray(x, np.uint32) << 17)
        | (np.asarray(y, np.uint32) << 2)
        | (np.asarray(p, np.uint32) << 1)
        | v
    )
    rec["ts"] = np.asarray(ts, dtype=np.int64) & 0x7FFFFFFF
    return rec.tobytes()


def polarity_packets(
    t: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    *,
    events_per_packet: int = 4096,
    valid: np.ndarray | None = None,
) -> Iterable[bytes]:
    """Split events into polarity packets; a new packet starts wherever t >> 31 changes."""
    t = np.asarray(t, dtype=np.int64)
    epoch = t >> 31
    n = len(t)
    cuts = set(range(0, n, events_per_packet))
    cuts.update((np.flatnonzero(np.diff(epoch)) + 1).tolist())
    bounds = sorted(cuts) + [n]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        vb = None if valid is None else valid[a:b]
        body = encode_polarity_records(t[a:b], x[a:b], y[a:b], p[a:b], vb)
        nv = b - a if vb is None else int(np.count_nonzero(vb))
        yield encode_packet(
            POLARITY_EVENT, body, event_size=POLARITY_EVENT_SIZE, capacity=b - a, number=b - a,
            ts_overflow=int(epoch[a]), n_valid=nv,
        )


def special_packet(n: int = 2, ts: int = 0) -> bytes:
    """A special-event packet (type 0, 8-byte events) that decoders must skip."""
    rec = np.zeros(n, dtype=POLARITY_RECORD)
    rec["data"] = 1 | (2 << 1)  # valid, type code 2 (a timestamp-reset-like special event)
    rec["ts"] = ts
    return encode_packet(0, rec.tobytes(), event_size=8, capacity=n, number=n)


def write_aedat(path: str | os.PathLike, packets: Iterable[bytes], header: bytes | None = None) -> None:
    """Write header + packets to `path` atomically (temp file then rename)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header_bytes() if header is None else header)
            for pk in packets:
                f.write(pk)

    atomic_write(path, write)
