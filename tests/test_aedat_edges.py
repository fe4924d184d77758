"""The AEDAT decoder on bytes written by hand from the AEDAT 3.1 layout (not by the encoder under
test): data word bit 0 valid, bit 1 polarity, bits 2-16 y, bits 17-31 x; timestamp low 31 bits,
the packet header's eventTSOverflow above them. The cases the hypothesis fuzz tests used to
find only by luck are pinned here: invalid events between valid ones, the overflow of each
packet, pixels at the sensor's edge and one past it, and the cache-sized blocks cutting packets
anywhere (BLOCK_EVENTS shrunk to 1..4)."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from dvsprep.errors import AedatFormatError
from dvsprep.raw import aedat

HEADER = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#!END-HEADER\r\n"


def _word(x: int, y: int, p: int, valid: int) -> int:
    return (x << 17) | (y << 2) | (p << 1) | valid


def _packet(events: list[tuple[int, int, int, int, int]], overflow: int, etype: int = 1) -> bytes:
    """28-byte header (type, source, size, tsOffset, tsOverflow, capacity, number, valid), then
    (data, ts) little-endian uint32 pairs."""
    n = len(events)
    head = struct.pack("<hhiiiiii", etype, 1, 8, 4, overflow, n, n, sum(e[3] for e in events))
    return head + b"".join(struct.pack("<II", _word(x, y, p, v), ts) for x, y, p, v, ts in events)


# x, y, p, valid, ts
P1 = [(127, 0, 1, 1, 5), (0, 127, 0, 0, 6), (3, 4, 1, 1, 0x7FFFFFFF)]
P2 = [(1, 2, 0, 0, 1), (2, 3, 1, 1, 7), (127, 127, 0, 1, 8)]
SPECIAL = struct.pack("<hhiiiiii", 0, 1, 8, 4, 0, 1, 1, 1) + struct.pack("<II", 0xFFFFFFFF, 0)
WANT = {"t": [5, 0x7FFFFFFF, (1 << 31) | 7, (1 << 31) | 8], "x": [127, 3, 2, 127], "y": [0, 4, 3, 127],
        "p": [1, 1, 1, 0]}


@pytest.mark.parametrize("block", [1, 2, 3, 4, 1 << 15])
def test_hand_written_packets_decode_exactly_however_blocks_cut_them(block, monkeypatch):
    monkeypatch.setattr(aedat, "BLOCK_EVENTS", block)
    buf = np.frombuffer(HEADER + _packet(P1, 0) + SPECIAL + _packet(P2, 1), dtype=np.uint8)
    ev = aedat.decode_buffer(buf, "hand.aedat")
    got = {"t": ev.t.tolist(), "x": ev.x.tolist(), "y": ev.y.tolist(), "p": ev.p.tolist()}
    assert got == WANT and ev.n_invalid == 2
    assert (ev.t.dtype, ev.x.dtype, ev.y.dtype, ev.p.dtype) == (np.int64, np.uint8, np.uint8, np.uint8)


@pytest.mark.parametrize("block", [1, 2, 1 << 15])
def test_every_event_valid_and_each_packets_own_overflow(block, monkeypatch):
    monkeypatch.setattr(aedat, "BLOCK_EVENTS", block)
    p1 = [(5, 6, 1, 1, 10), (7, 8, 0, 1, 11)]
    p2 = [(9, 10, 1, 1, 3)]
    # overflows 1 then 2: a packet's overflow OR-ed into the next packet's events would give 3
    ev = aedat.decode_buffer(np.frombuffer(HEADER + _packet(p1, 1) + _packet(p2, 2), dtype=np.uint8))
    assert ev.t.tolist() == [(1 << 31) | 10, (1 << 31) | 11, (2 << 31) | 3] and ev.n_invalid == 0
    assert ev.x.tolist() == [5, 7, 9] and ev.y.tolist() == [6, 8, 10] and ev.p.tolist() == [1, 0, 1]


@pytest.mark.parametrize("x,y", [(128, 0), (0, 128), (255, 5), (5, 0x7FFF)])
def test_one_past_the_sensor_is_refused_naming_the_byte(x, y):
    events = [(1, 1, 1, 1, 1), (x, y, 1, 1, 2)]
    buf = np.frombuffer(HEADER + _packet(events, 0), dtype=np.uint8)
    offset = len(HEADER) + 28 + 8                      # the second record of the first packet
    with pytest.raises(AedatFormatError) as e:
        aedat.decode_buffer(buf, "edge.aedat")
    assert str(e.value) == f"edge.aedat: byte {offset}: event at x={x}, y={y} is outside the 128x128 sensor"


def test_an_invalid_event_outside_the_sensor_is_dropped_not_refused():
    events = [(200, 300, 1, 0, 1), (4, 5, 0, 1, 2)]
    ev = aedat.decode_buffer(np.frombuffer(HEADER + _packet(events, 0), dtype=np.uint8))
    assert (ev.x.tolist(), ev.y.tolist(), ev.t.tolist(), ev.n_invalid) == ([4], [5], [2], 1)


def test_negative_and_inconsistent_packet_headers_are_refused_with_the_field():
    at = len(HEADER)
    cases = [
        (struct.pack("<hhiiiiii", 1, 1, 8, 4, -1, 0, 0, 0), f"byte {at}: negative field in packet header "
         "(eventSize=8, eventCapacity=0, eventNumber=0, eventTSOverflow=-1)"),
        (struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 1, 2, 2) + bytes(16),
         f"byte {at}: eventCapacity 1 is smaller than eventNumber 2"),
        (struct.pack("<hhiiiiii", 1, 1, 4, 4, 0, 0, 0, 0), f"byte {at}: polarity packet has eventSize 4, expected 8"),
        (struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 2, 2, 2) + bytes(15),
         f"byte {at}: truncated packet (type 1, needs 16 body bytes, 15 left)"),
        (struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 0, 0, 0)[:27], f"byte {at}: truncated packet header (27 of 28 bytes)"),
    ]
    for body, message in cases:
        with pytest.raises(AedatFormatError) as e:
            aedat.decode_buffer(np.frombuffer(HEADER + body, dtype=np.uint8), "h.aedat")
        assert str(e.value) == f"h.aedat: {message}"


def test_capacity_beyond_number_is_skipped_and_number_zero_decodes_nothing():
    """Records past eventNumber (capacity slack) are not events; an empty packet is no packet."""
    head = struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 3, 1, 1)
    body = struct.pack("<II", _word(1, 2, 1, 1), 9) + struct.pack("<II", _word(3, 3, 1, 1), 10) * 2
    empty = struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 0, 0, 0)
    ev = aedat.decode_buffer(np.frombuffer(HEADER + empty + head + body, dtype=np.uint8))
    assert (ev.t.tolist(), ev.x.tolist(), ev.y.tolist(), ev.p.tolist(), ev.n_invalid) == ([9], [1], [2], [1], 0)


# --------------------------------------------------------------------------- the encoder (synth, tests)

def test_the_encoder_writes_the_layout_by_hand(tmp_path):
    assert aedat.encode_packet(1, b"", event_size=8, capacity=0, number=0) == \
        struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 0, 0, 0)                  # source 1, tsOffset 4
    body = aedat.encode_polarity_records(np.array([5, (1 << 31) | 7]), np.array([127, 2]), np.array([0, 3]),
                                         np.array([1, 0]), valid=np.array([1, 0]))
    assert body == struct.pack("<IIII", _word(127, 0, 1, 1), 5, _word(2, 3, 0, 0), 7)   # ts: low 31 bits
    # a new packet where t >> 31 changes; the header's valid count counts valid events only
    pks = list(aedat.polarity_packets(np.array([1, 2, (1 << 31) | 3]), np.array([1, 2, 3]), np.array([4, 5, 6]),
                                      np.array([1, 1, 0]), valid=np.array([1, 0, 1])))
    assert [struct.unpack_from("<hhiiiiii", pk) for pk in pks] == [(1, 1, 8, 4, 0, 2, 2, 1), (1, 1, 8, 4, 1, 1, 1, 1)]
    assert [struct.unpack_from("<hhiiiiii", pk)[7] for pk in aedat.polarity_packets(
        np.array([1, 2]), np.array([1, 2]), np.array([1, 2]), np.array([0, 1]))] == [2]
    # 4096 events a packet by default: 4097 make two
    z = np.zeros(4097, dtype=np.int64)
    assert [struct.unpack_from("<hhiiiiii", pk)[6] for pk in aedat.polarity_packets(z, z, z, z)] == [4096, 1]
    # a special packet: type 0, every record valid with type code 2 (data word 0b101)
    assert aedat.special_packet(2, ts=9) == struct.pack("<hhiiiiii", 0, 1, 8, 4, 0, 2, 2, 2) + \
        struct.pack("<IIII", 5, 9, 5, 9)
    aedat.write_aedat(tmp_path / "a.aedat", [b"P1", b"P2"], header=b"H")
    assert (tmp_path / "a.aedat").read_bytes() == b"HP1P2"
    aedat.write_aedat(tmp_path / "b.aedat", [])
    assert (tmp_path / "b.aedat").read_bytes() == HEADER.replace(b"RAW\r\n", b"RAW\r\n#Source 1: DVS128\r\n")


def test_invalid_events_are_dropped_when_every_event_is_on():
    """All polarities 1 (bit 1 set everywhere) and one event invalid: still dropped."""
    events = [(1, 1, 1, 1, 1), (2, 2, 1, 0, 2), (3, 3, 1, 1, 3)]
    ev = aedat.decode_buffer(np.frombuffer(HEADER + _packet(events, 0), dtype=np.uint8))
    assert (ev.x.tolist(), ev.t.tolist(), ev.n_invalid) == ([1, 3], [1, 3], 1)


def test_header_lines_and_the_read_only_map(tmp_path):
    assert aedat.header_bytes(["a: 1", "#b"]) == (b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n"
                                                  b"#a: 1\r\n#b\r\n#!END-HEADER\r\n")
    p = tmp_path / "r.aedat"
    p.write_bytes(HEADER)
    m = aedat.map_file(p)
    assert m.dtype == np.uint8 and not m.flags.writeable and m.tobytes() == HEADER
    with pytest.raises(aedat.MissingFileError) as e:
        aedat.map_file(tmp_path / "gone.aedat")
    assert str(e.value) == f"{tmp_path / 'gone.aedat'}: no such file"
    (tmp_path / "e.aedat").write_bytes(b"")
    with pytest.raises(AedatFormatError) as e:
        aedat.map_file(tmp_path / "e.aedat")
    assert str(e.value) == f"{tmp_path / 'e.aedat'}: empty file"


@pytest.mark.parametrize("block", [1, 1 << 15])
def test_the_refusal_names_the_first_valid_event_outside_the_sensor_and_its_byte(block, monkeypatch):
    """Blocks hold several packets: the byte offset is found through the right packet; an
    invalid event outside the sensor before it is not the one named."""
    monkeypatch.setattr(aedat, "BLOCK_EVENTS", block)
    ok = (1, 1, 1, 1, 1)
    body0 = len(HEADER) + 28
    body1 = body0 + 2 * 8 + 28
    cases = [([ok, ok], [(128, 3, 1, 1, 5), ok], body1, "x=128, y=3"),          # first of packet 2
             ([ok, (4, 128, 0, 1, 2)], [ok], body0 + 8, "x=4, y=128"),           # in packet 1, block of 3
             ([(300, 300, 1, 0, 1), ok], [ok, (129, 0, 1, 1, 9)], body1 + 8, "x=129, y=0")]
    for p0, p1, offset, where in cases:
        buf = np.frombuffer(HEADER + _packet(p0, 0) + _packet(p1, 0), dtype=np.uint8)
        with pytest.raises(AedatFormatError) as e:
            aedat.decode_buffer(buf, "b.aedat")
        assert str(e.value) == f"b.aedat: byte {offset}: event at {where} is outside the 128x128 sensor"


def test_packets_of_other_types_with_zero_sized_events_are_skipped():
    other = struct.pack("<hhiiiiii", 2, 1, 0, 4, 0, 5, 5, 5)          # eventSize 0: no body
    ev = aedat.decode_buffer(np.frombuffer(HEADER + other + _packet([(6, 7, 1, 1, 8)], 0), dtype=np.uint8))
    assert (ev.x.tolist(), ev.y.tolist(), ev.t.tolist()) == ([6], [7], [8])


def test_encoder_and_decoder_defaults():
    z = np.zeros(4097, dtype=np.int64)
    heads = [struct.unpack_from("<hhiiiiii", pk) for pk in aedat.polarity_packets(z, z, z, z)]
    assert [(h[6], h[7]) for h in heads] == [(4096, 4096), (1, 1)]          # number, valid count
    assert aedat.special_packet() == struct.pack("<hhiiiiii", 0, 1, 8, 4, 0, 2, 2, 2) + struct.pack("<IIII", 5, 0, 5, 0)
    with pytest.raises(AedatFormatError) as e:
        aedat.decode_buffer(np.frombuffer(b"#!AER-DAT2.0\r\n", dtype=np.uint8))
    assert str(e.value).startswith("<bytes>: ")


@pytest.mark.parametrize("raw,message", [
    (b"\n", "not an AEDAT file (first line is b'')"),
    (b"A" * 50 + b"\n", "not an AEDAT file (first line is " + repr(b"A" * 40) + ")"),
    (b"#!AER-DAT3.1 \r\n#!END-HEADER\r\n", "unsupported AEDAT version 3.1  (only 3.1 is supported)"),
    (b"#!AER-DAT3.1X\r\n#!END-HEADER\r\n", "unsupported AEDAT version 3.1X (only 3.1 is supported)"),
    (b"#!AER-DAT\xff\r\n", "unsupported AEDAT version \ufffd (only 3.1 is supported)"),
    (b"#!AER-DAT3.1\r\n#a\r\nb\r\n#!END-HEADER\r\n", "byte 18: header line does not start with '#' (no "
                                                    "'#!END-HEADER' before it)"),
    (b"#!AER-DAT3.1\r\n#a", "header has no '#!END-HEADER' line"),
])
def test_header_refusals_by_hand(raw, message):
    with pytest.raises(AedatFormatError) as e:
        aedat.parse_header(np.frombuffer(raw, dtype=np.uint8))
    assert str(e.value) == f"<bytes>: {message}"


def test_header_ends_after_its_end_line():
    assert aedat.parse_header(np.frombuffer(HEADER + b"\x01\x02", dtype=np.uint8)) == len(HEADER)
