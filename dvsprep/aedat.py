"""AEDAT 3.1 polarity-event decoding (vectorised) and encoding (for synth and tests).

The decoder walks packets in Python (a few thousand per recording) and decodes events with
numpy over the whole file at once; it never loops over events.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .constants import (
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
from .errors import AedatFormatError

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


def _walk_packets(
    mv: np.ndarray, start: int, path: str | os.PathLike
) -> tuple[list[tuple[int, int, int]], int]:
    """Return [(body_offset, number, ts_overflow)] of polarity packets, and the packet count."""
    size = mv.shape[0]
    pos = start
    polarity: list[tuple[int, int, int]] = []
    n_packets = 0
    while pos < size:
        if size - pos < PACKET_HEADER_SIZE:
            raise AedatFormatError(
                f"{path}: byte {pos}: truncated packet header ({size - pos} of {PACKET_HEADER_SIZE} bytes)"
            )
        h = mv[pos : pos + PACKET_HEADER_SIZE].view(PACKET_HEADER)[0]
        etype, esize, cap, num, ovf = (
            int(h["type"]), int(h["size"]), int(h["capacity"]), int(h["number"]), int(h["ts_overflow"])
        )
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
        n_packets += 1
        pos = end
    return polarity, n_packets


def decode_buffer(buf: np.ndarray, path: str | os.PathLike = "<bytes>") -> Events:
    """Decode AEDAT 3.1 bytes (uint8 [nbytes], e.g. a memmap) into polarity events.

    Returns Events with t int64 [N], x/y/p uint8 [N]; invalid events dropped and counted.
    """
    start = parse_header(buf, path)
    packets, _ = _walk_packets(buf, start, path)
    if not packets:
        empty = np.empty(0, dtype=XY_DTYPE)
        return Events(np.empty(0, dtype=T_DTYPE), empty, empty.copy(), np.empty(0, dtype=P_DTYPE), 0)
    counts = np.fromiter((n for _, n, _ in packets), dtype=np.int64, count=len(packets))
    # One copy of every event record into a contiguous array (views per packet, one concatenate).
    raw = np.concatenate(
        [buf[off : off + n * POLARITY_EVENT_SIZE] for off, n, _ in packets]
    ).view(POLARITY_RECORD)
    data = raw["data"]
    valid = (data & 1).astype(bool)
    n_total = data.shape[0]
    n_valid = int(np.count_nonzero(valid))
    all_valid = n_valid == n_total
    if not all_valid:
        data = data[valid]
    x = data >> 17
    y = (data >> 2) & 0x7FFF
    bad = (x >= SENSOR_W) | (y >= SENSOR_H)
    if bad.any():
        i = int(np.argmax(bad))
        global_i = int(np.flatnonzero(valid)[i]) if not all_valid else i
        pk = int(np.searchsorted(np.cumsum(counts), global_i, side="right"))
        within = global_i - int(counts[:pk].sum())
        offset = packets[pk][0] + within * POLARITY_EVENT_SIZE
        raise AedatFormatError(
            f"{path}: byte {offset}: event at x={int(x[i])}, y={int(y[i])} is outside the "
            f"{SENSOR_W}x{SENSOR_H} sensor"
        )
    overflow = np.fromiter((o for _, _, o in packets), dtype=np.int64, count=len(packets))
    ts = raw["ts"] if all_valid else raw["ts"][valid]
    t = ts.astype(T_DTYPE)
    if overflow.any():
        hi = np.repeat(overflow << 31, counts)
        t |= hi if all_valid else hi[valid]
    return Events(
        t=t,
        x=x.astype(XY_DTYPE),
        y=y.astype(XY_DTYPE),
        p=((data >> 1) & 1).astype(P_DTYPE),
        n_invalid=n_total - n_valid,
    )


def read_aedat(path: str | os.PathLike) -> Events:
    """Decode an AEDAT 3.1 file. Raises AedatFormatError naming file, byte offset and problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        from .errors import MissingFileError

        raise MissingFileError(f"{path}: no such file") from None
    if size == 0:
        raise AedatFormatError(f"{path}: empty file")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        return decode_buffer(buf, path)
    finally:
        del buf


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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header_bytes() if header is None else header)
            for pk in packets:
                f.write(pk)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
