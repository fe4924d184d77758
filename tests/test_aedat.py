from __future__ import annotations

import numpy as np
import pytest

from dvsprep.raw.aedat import (
    POLARITY_RECORD,
    encode_packet,
    encode_polarity_records,
    header_bytes,
    parse_header,
    polarity_packets,
    read_aedat,
    special_packet,
    write_aedat,
)
from dvsprep.errors import AedatFormatError, MissingFileError

from aedat_fixtures import random_events, write_recording


def _assert_events(ev, t, x, y, p):
    np.testing.assert_array_equal(ev.t, t)
    np.testing.assert_array_equal(ev.x, x)
    np.testing.assert_array_equal(ev.y, y)
    np.testing.assert_array_equal(ev.p, p)
    assert ev.t.dtype == np.int64 and ev.x.dtype == np.uint8 and ev.p.dtype == np.uint8


def test_roundtrip_many_packets_with_special_packet(tmp_path):
    t, x, y, p = random_events(1000)
    f = tmp_path / "a.aedat"
    write_recording(f, t, x, y, p, events_per_packet=64)
    ev = read_aedat(f)
    _assert_events(ev, t, x, y, p)
    assert ev.n_invalid == 0


def test_known_bits_decode(tmp_path):
    # data word: x=5 at bit 17, y=7 at bit 2, polarity ON at bit 1, valid bit 0.
    data = (5 << 17) | (7 << 2) | (1 << 1) | 1
    rec = np.array([(data, 123)], dtype=POLARITY_RECORD).tobytes()
    f = tmp_path / "k.aedat"
    write_aedat(f, [encode_packet(1, rec, event_size=8, capacity=1, number=1, ts_overflow=2)])
    ev = read_aedat(f)
    assert (ev.t.tolist(), ev.x.tolist(), ev.y.tolist(), ev.p.tolist()) == ([(2 << 31) | 123], [5], [7], [1])


def test_overflow_packets_extend_timestamps(tmp_path):
    t = np.array([10, 20, (1 << 31) + 5, (1 << 31) + 9, (3 << 31) + 1], dtype=np.int64)
    x = np.array([1, 2, 3, 4, 5], np.uint8)
    f = tmp_path / "o.aedat"
    pk = list(polarity_packets(t, x, x, x % 2, events_per_packet=100))
    assert len(pk) == 3  # one packet per overflow epoch
    write_aedat(f, pk)
    _assert_events(read_aedat(f), t, x, x, x % 2)


def test_invalid_events_dropped_and_counted(tmp_path):
    t, x, y, p = random_events(50, seed=4)
    valid = np.ones(50, bool)
    valid[[3, 17, 49]] = False
    f = tmp_path / "v.aedat"
    write_aedat(f, polarity_packets(t, x, y, p, events_per_packet=20, valid=valid))
    ev = read_aedat(f)
    assert ev.n_invalid == 3
    _assert_events(ev, t[valid], x[valid], y[valid], p[valid])


def test_invalid_event_may_hold_garbage_coordinates(tmp_path):
    rec = encode_polarity_records(np.array([1, 2]), np.array([300, 4]), np.array([1, 2]), np.array([0, 1]),
                                  valid=np.array([0, 1]))
    f = tmp_path / "g.aedat"
    write_aedat(f, [encode_packet(1, rec, event_size=8, capacity=2, number=2)])
    ev = read_aedat(f)
    assert ev.x.tolist() == [4] and ev.n_invalid == 1


def test_capacity_larger_than_number_decodes_only_number(tmp_path):
    t, x, y, p = random_events(10, seed=5)
    body = encode_polarity_records(t, x, y, p) + encode_polarity_records(t[:6], x[:6], y[:6], p[:6])
    f = tmp_path / "c.aedat"
    write_aedat(f, [encode_packet(1, body, event_size=8, capacity=16, number=10), special_packet()])
    _assert_events(read_aedat(f), t, x, y, p)


def test_matches_spikingjelly_load_aedat_v3(tmp_path):
    from spikingjelly.datasets.utils import load_aedat_v3

    t, x, y, p = random_events(3000, seed=6)
    t[2000:] += 1 << 31  # exercise eventTSOverflow
    f = tmp_path / "sj.aedat"
    write_recording(f, t, x, y, p, events_per_packet=211)
    ours, sj = read_aedat(f), load_aedat_v3(str(f))
    for k in "txyp":
        np.testing.assert_array_equal(getattr(ours, k), sj[k])


def test_lf_header_accepted(tmp_path):
    t, x, y, p = random_events(5)
    f = tmp_path / "lf.aedat"
    write_aedat(f, polarity_packets(t, x, y, p), header=b"#!AER-DAT3.1\n#x\n#!END-HEADER\n")
    _assert_events(read_aedat(f), t, x, y, p)


def test_empty_body_gives_no_events(tmp_path):
    f = tmp_path / "e.aedat"
    write_aedat(f, [])
    assert len(read_aedat(f)) == 0


@pytest.mark.parametrize("version", ["2.0", "3.0", "4.0"])
def test_wrong_version(tmp_path, version):
    f = tmp_path / "w.aedat"
    f.write_bytes(f"#!AER-DAT{version}\r\n#!END-HEADER\r\n".encode())
    with pytest.raises(AedatFormatError, match=rf"w\.aedat: unsupported AEDAT version {version}"):
        read_aedat(f)


def _bad(tmp_path, data: bytes, match: str):
    f = tmp_path / "bad.aedat"
    f.write_bytes(data)
    with pytest.raises(AedatFormatError, match=match) as ei:
        read_aedat(f)
    assert "bad.aedat" in str(ei.value) and "\n" not in str(ei.value)


def test_not_aedat(tmp_path):
    _bad(tmp_path, b"hello\nworld\n", "not an AEDAT file")


def test_no_end_header(tmp_path):
    _bad(tmp_path, b"#!AER-DAT3.1\r\n#Format: RAW\r\n", "no '#!END-HEADER'")


def test_truncated_packet(tmp_path):
    t, x, y, p = random_events(30)
    data = header_bytes() + b"".join(polarity_packets(t, x, y, p, events_per_packet=10))
    hlen = len(header_bytes())
    _bad(tmp_path, data[:-5], rf"byte {hlen + 2 * (28 + 80)}: truncated packet")
    _bad(tmp_path, data + b"\x01\x00\x08", "truncated packet header")


def test_polarity_event_size_12(tmp_path):
    _bad(tmp_path, header_bytes() + encode_packet(1, bytes(24), event_size=12, capacity=2, number=2),
         "eventSize 12, expected 8")


def test_x_outside_sensor(tmp_path):
    rec = encode_polarity_records(np.array([1, 2]), np.array([3, 200]), np.array([1, 2]), np.array([0, 1]))
    hlen = len(header_bytes())
    _bad(tmp_path, header_bytes() + encode_packet(1, rec, event_size=8, capacity=2, number=2),
         rf"byte {hlen + 28 + 8}: event at x=200, y=2 is outside")


def test_capacity_below_number(tmp_path):
    _bad(tmp_path, header_bytes() + encode_packet(1, bytes(16), event_size=8, capacity=2, number=3),
         "eventCapacity 2 is smaller than eventNumber 3")


def test_negative_size(tmp_path):
    _bad(tmp_path, header_bytes() + encode_packet(0, b"", event_size=-8, capacity=1, number=1),
         "negative field")


def test_header_offset_returned():
    h = header_bytes(["#Start-Time: 2017"])
    assert parse_header(np.frombuffer(h + b"rest", np.uint8)) == len(h)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(MissingFileError):
        read_aedat(tmp_path / "nope.aedat")
    (tmp_path / "z.aedat").write_bytes(b"")
    with pytest.raises(AedatFormatError, match="empty file"):
        read_aedat(tmp_path / "z.aedat")
