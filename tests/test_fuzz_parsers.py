"""Property-based tests of the raw-input parsers: the AEDAT decoder, the label csv and the trial
lists. Whatever the bytes, the outcome is a correct parse or a clean one-line refusal
(AedatFormatError / LabelFormatError, both DvsprepError) naming the file; never another exception.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dvsprep.raw.aedat import decode_buffer, header_bytes, polarity_packets, special_packet
from dvsprep.errors import AedatFormatError, DvsprepError, LabelFormatError
from dvsprep.raw.release import parse_labels, parse_trials

from aedat_fixtures import random_events
from fuzz_settings import fuzz

FUZZ = fuzz(60)
NAME = "fuzz.aedat"


def _small_file() -> bytes:
    t, x, y, p = random_events(40, seed=7, t0=10, span=5_000)
    valid = np.ones(40, bool)
    valid[[3, 17]] = False
    pk = list(polarity_packets(t, x, y, p, events_per_packet=7, valid=valid))
    pk.insert(2, special_packet(2, ts=20))
    return header_bytes() + b"".join(pk)


SMALL = _small_file()
HEADER = header_bytes()


def _packet_header_bytes() -> list[int]:
    """Offsets of every packet-header byte in SMALL (where a flip changes the file's structure)."""
    out, pos = [], len(HEADER)
    while pos < len(SMALL):
        _t, _s, esize, _o, _ovf, cap, _n, _v = struct.unpack_from("<hhiiiiii", SMALL, pos)
        out.extend(range(pos, pos + 28))
        pos += 28 + cap * esize
    return out


PACKET_HEADER_BYTES = _packet_header_bytes()


def _reference(buf: bytes) -> tuple[list[tuple[int, int, int, int]], int] | None:
    """An independent, event-at-a-time decoder with the same rules (DESIGN, raw data facts):
    (events (t, x, y, p), invalid dropped), or None where the file must be refused."""
    end = buf.find(b"#!END-HEADER")
    pos = buf.index(b"\n", end) + 1
    out, invalid = [], 0
    while pos < len(buf):
        if len(buf) - pos < 28:
            return None
        etype, _src, esize, _off, ovf, cap, num, _valid = struct.unpack_from("<hhiiiiii", buf, pos)
        if min(esize, cap, num, ovf) < 0 or cap < num or (etype == 1 and esize != 8):
            return None
        body = pos + 28
        if body + cap * esize > len(buf):
            return None
        if etype == 1:
            for k in range(num):
                data, ts = struct.unpack_from("<II", buf, body + 8 * k)
                if not data & 1:
                    invalid += 1
                    continue
                x, y = data >> 17, (data >> 2) & 0x7FFF
                if x >= 128 or y >= 128:
                    return None
                out.append(((ovf << 31) | ts, x, y, (data >> 1) & 1))
        pos = body + cap * esize
    return out, invalid


def _check(buf: bytes) -> None:
    """decode_buffer refuses exactly where the reference does, and otherwise agrees with it."""
    want = _reference(buf)
    try:
        ev = decode_buffer(np.frombuffer(buf, np.uint8), NAME)
    except AedatFormatError as exc:
        msg = str(exc)
        assert msg.startswith(f"{NAME}: ") and "\n" not in msg
        assert want is None, f"refused a file the reference decodes: {msg}"
        return
    assert want is not None, "decoded a file the reference refuses"
    events, invalid = want
    got = list(zip(ev.t.tolist(), ev.x.tolist(), ev.y.tolist(), ev.p.tolist()))
    assert got == events and ev.n_invalid == invalid


def test_the_reference_decodes_the_small_file():
    events, invalid = _reference(SMALL)
    assert len(events) == 38 and invalid == 2
    _check(SMALL)


@FUZZ
@given(body=st.binary(max_size=700))
def test_random_bytes_after_a_valid_header(body):
    _check(HEADER + body)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(len(HEADER), len(SMALL) - 1), st.integers(1, 255)),
                      min_size=1, max_size=6))
def test_byte_flips_of_a_valid_file(flips):
    buf = bytearray(SMALL)
    for i, v in flips:
        buf[i] ^= v
    _check(bytes(buf))


@FUZZ
@given(flips=st.lists(st.tuples(st.sampled_from(PACKET_HEADER_BYTES), st.sampled_from([1, 2, 4, 0x10, 0x80, 0xFF])),
                      min_size=1, max_size=2))
def test_byte_flips_in_packet_headers(flips):
    """Sizes, counts and the timestamp overflow of packets: the fields a decoder trusts."""
    buf = bytearray(SMALL)
    for i, v in flips:
        buf[i] ^= v
    _check(bytes(buf))


@FUZZ
@given(cut=st.integers(len(HEADER), len(SMALL) - 1))
def test_every_truncation_is_refused_or_a_packet_boundary(cut):
    _check(SMALL[:cut])


@FUZZ
@given(header=st.binary(max_size=300))
def test_random_headers(header):
    try:
        decode_buffer(np.frombuffer(header + SMALL[len(HEADER):], np.uint8), NAME)
    except AedatFormatError as exc:
        assert str(exc).startswith(f"{NAME}: ") and "\n" not in str(exc)


# ----------------------------------------------------------------------------- label csv

_ARABIC_INDIC = str.maketrans("0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669")
_FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
# Ways to write a number that must be refused (and " 12 " that is accepted: fields are stripped).
SPELLINGS = {
    "plain": (lambda s: s, True),
    "spaces": (lambda s: f" {s} ", True),
    "plus": (lambda s: "+" + s, False),
    "minus": (lambda s: "-" + s, False),
    "underscore": (lambda s: s[:1] + "_" + s[1:] if len(s) > 1 else s + "_0", False),
    "arabic_indic": (lambda s: s.translate(_ARABIC_INDIC), False),
    "full_width": (lambda s: s.translate(_FULL_WIDTH), False),
    "float": (lambda s: s + ".0", False),
    "hex": (lambda s: "0x" + s, False),
    "inner_space": (lambda s: s[:1] + " " + s[1:] if len(s) > 1 else s + " 0", False),
}


@st.composite
def label_rows(draw):
    """(csv lines, expected rows or None when parse_labels must refuse)."""
    lines, want = [], []
    for _ in range(draw(st.integers(0, 4))):
        cls = draw(st.integers(0, 12))
        start = draw(st.one_of(st.integers(0, 10 ** 9), st.integers(2 ** 63 - 2, 2 ** 64),
                               st.sampled_from([2 ** 63 - 1, 2 ** 63, 10 ** 19 - 1, 10 ** 19])))
        end = start + draw(st.integers(-2, 10 ** 6))
        values = [cls, start, max(end, 0)]
        spelled = []
        ok = 1 <= cls <= 11 and values[2] >= start and values[2] <= 2 ** 63 - 1
        for v in values:
            name = draw(st.sampled_from(sorted(SPELLINGS)))
            fn, accepted = SPELLINGS[name]
            spelled.append(fn(str(v)))
            ok = ok and accepted
        lines.append(",".join(spelled))
        want = None if (want is None or not ok) else want + [(cls - 1, start, values[2])]
    return lines, want
@pytest.fixture()
def csv_path(tmp_path):
    return tmp_path / "user01_lab_labels.csv"


@FUZZ
@given(case=label_rows(), crlf=st.booleans())
def test_label_rows(csv_path, case, crlf):
    lines, want = case
    nl = "\r\n" if crlf else "\n"
    csv_path.write_bytes(("class,startTime_usec,endTime_usec" + nl + "".join(ln + nl for ln in lines)).encode())
    try:
        got = parse_labels(csv_path)
    except LabelFormatError as exc:
        assert str(exc).startswith(f"{csv_path}: ") and "\n" not in str(exc)
        assert want is None, f"refused valid rows {lines}: {exc}"
        return
    assert want is not None, f"accepted rows that must be refused: {lines}"
    assert list(zip(got.label.tolist(), got.start.tolist(), got.end.tolist())) == want


@FUZZ
@given(data=st.binary(max_size=300))
def test_label_csv_random_bytes(csv_path, data):
    csv_path.write_bytes(data)
    try:
        rows = parse_labels(csv_path)
    except DvsprepError as exc:
        assert isinstance(exc, LabelFormatError) and "\n" not in str(exc)
        return
    assert rows.label.dtype == np.uint8 and (rows.label <= 10).all() and (rows.start <= rows.end).all()


@FUZZ
@given(data=st.one_of(st.binary(max_size=300),
                      st.lists(st.sampled_from(["user01_lab.aedat", "user02_led.aedat", "../x.aedat", "a\\b.aedat",
                                                "x.txt", "user\x00.aedat", " ", "user01_lab.aedat\r"]),
                               max_size=6).map(lambda xs: "\n".join(xs).encode())))
def test_trial_lists(tmp_path, data):
    path = tmp_path / "trials_to_train.txt"
    path.write_bytes(data)
    try:
        names = parse_trials(path)
    except DvsprepError as exc:
        assert isinstance(exc, LabelFormatError) and str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
        return
    assert len(set(names)) == len(names)
    for n in names:
        assert n.endswith(".aedat") and "/" not in n and "\\" not in n and n.isprintable() and n == n.strip()
