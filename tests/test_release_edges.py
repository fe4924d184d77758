"""Label csvs and sample windows at the edges of what they accept (dvsprep.raw.release
parse_labels, cut_samples): class 1 and 11 in, 0 and 12 out; times at 0, at int64's largest and
one past it; start == end and start one past end; fields and columns one too many or too few.
Every accepted file pins the rows it gives, every refused one its whole one-line message.

Already pinned elsewhere, so not repeated: classes 1, 8, 11 and a row (11, 5, 5) accepted with
CRLF and LF, `12,1,2`, `1,5,2`, `1,5`, `1,-5,20`, `+100`, `1_000`, Arabic-Indic digits and an
end of 2**63 refused (test_release.py, by message); end = 2**63 - 1 accepted
(test_largest_int64_is_accepted); sorted windows with shared events and a (0, 0) row
(test_cut_samples_sorted_overlap_and_empty).
"""
from __future__ import annotations

import numpy as np
import pytest

from dvsprep.errors import LabelFormatError
from dvsprep.raw.release import LabelRows, cut_samples, parse_labels

HEADER = "class,startTime_usec,endTime_usec"
I64 = 2**63 - 1


def _parse(tmp_path, text: str) -> LabelRows:
    f = tmp_path / "user01_lab_labels.csv"
    f.write_bytes(text.encode("utf-8"))
    return parse_labels(f)


def _rows(r: LabelRows) -> list[tuple[int, int, int]]:
    assert r.label.dtype == np.uint8 and r.start.dtype == np.int64 and r.end.dtype == np.int64
    return list(zip(r.label.tolist(), r.start.tolist(), r.end.tolist()))


@pytest.mark.parametrize("body, rows", [
    # class 1 -> label 0 and class 11 -> label 10; times at 0 and at int64's largest
    ("1,0,0\n11,0,9223372036854775807\n11,9223372036854775807,9223372036854775807\n",
     [(0, 0, 0), (10, 0, I64), (10, I64, I64)]),
    ("2,5,6\n", [(1, 5, 6)]),                                      # end one past start
    (" 01 , 007 ,0010 \r\n", [(0, 7, 10)]),                        # spaces stripped, leading zeros read
    ("1,0,00000000000000000001\n", [(0, 0, 1)]),                   # 20 digits, the value 1
    ("1,0," + "0" * 5000 + "9223372036854775807\n", [(0, 0, I64)]),  # leading zeros never count
    ("\n\n3,1,2\n\n\n4,2,3\n\n", [(2, 1, 2), (3, 2, 3)]),          # blank lines skipped
    ("", []),                                                      # the header alone: no samples
])
def test_accepted_rows_at_the_edges(tmp_path, body, rows):
    assert _rows(_parse(tmp_path, HEADER + "\n" + body)) == rows


def test_bom_and_spaces_in_the_header_are_accepted(tmp_path):
    assert _rows(_parse(tmp_path, "\ufeff class , startTime_usec,endTime_usec \r\n1,2,3\r\n")) == [(0, 2, 3)]


@pytest.mark.parametrize("text, line, message", [
    # class one past each end, and far past it
    (f"{HEADER}\n0,1,2\n", 2, "class 0 outside 1..11"),
    (f"{HEADER}\n12,1,2\n", 2, "class 12 outside 1..11"),
    (f"{HEADER}\n9223372036854775807,1,2\n", 2, "class 9223372036854775807 outside 1..11"),
    (f"{HEADER}\n9223372036854775808,1,2\n", 2, "value 9223372036854775808... is above the int64 range"),
    (f"{HEADER}\n-1,1,2\n", 2, "negative value '-1' (expected digits 0-9 only)"),
    # start one past end, at 0 and at int64's largest
    (f"{HEADER}\n1,1,0\n", 2, "bad time window [1, 0)"),
    (f"{HEADER}\n1,9223372036854775807,9223372036854775806\n", 2,
     "bad time window [9223372036854775807, 9223372036854775806)"),
    # negative times, -0 included; the first bad field is the one named
    (f"{HEADER}\n1,0,-1\n", 2, "negative value '-1' (expected digits 0-9 only)"),
    (f"{HEADER}\n1,-0,0\n", 2, "negative value '-0' (expected digits 0-9 only)"),
    (f"{HEADER}\n1,-9223372036854775808,0\n", 2, "negative value '-9223372036854775808' (expected digits 0-9 only)"),
    # one past int64 (a start too), 19 digits over it, and leading zeros before one past it
    (f"{HEADER}\n1,9223372036854775808,9223372036854775808\n", 2,
     "value 9223372036854775808... is above the int64 range"),
    (f"{HEADER}\n1,0,9999999999999999999\n", 2, "value 9999999999999999999... is above the int64 range"),
    (f"{HEADER}\n1,0,09223372036854775808\n", 2, "value 09223372036854775808... is above the int64 range"),
    # fields: one too many (a trailing comma too), too few, empty, another separator
    (f"{HEADER}\n1,2,3,4\n", 2, "expected 3 fields, found 4"),
    (f"{HEADER}\n1,2,3,\n", 2, "expected 3 fields, found 4"),
    (f"{HEADER}\n1,2\n", 2, "expected 3 fields, found 2"),
    (f"{HEADER}\n1\n", 2, "expected 3 fields, found 1"),
    (f"{HEADER}\n1,,3\n", 2, "non-numeric field '' (expected digits 0-9 only)"),
    # a bad field is shown up to 32 characters: at 32 whole, at 33 the first 32 and "..."
    (f"{HEADER}\n1,{'a' * 31}b,3\n", 2, f"non-numeric field '{'a' * 31}b' (expected digits 0-9 only)"),
    (f"{HEADER}\n1,{'a' * 31}bc,3\n", 2, f"non-numeric field '{'a' * 31}b...' (expected digits 0-9 only)"),
    (f"{HEADER}\n1,0,-{'1' * 40}\n", 2, f"negative value '-{'1' * 31}...' (expected digits 0-9 only)"),
    (f"{HEADER}\n1;2;3\n", 2, "expected 3 fields, found 1"),
    # line numbers count the blank lines
    (f"\n{HEADER}\n\n1,2,3\n\n0,1,2\n", 6, "class 0 outside 1..11"),
    # columns: one too many, one too few, the release's order only
    (f"{HEADER},extra\n1,2,3,4\n", 1,
     "header is 'class,startTime_usec,endTime_usec,extra', expected 'class,startTime_usec,endTime_usec'"),
    ("class,startTime_usec\n1,2\n", 1,
     "header is 'class,startTime_usec', expected 'class,startTime_usec,endTime_usec'"),
    ("class,endTime_usec,startTime_usec\n1,2,3\n", 1,
     "header is 'class,endTime_usec,startTime_usec', expected 'class,startTime_usec,endTime_usec'"),
    ("1,2,3\n", 1, "header is '1,2,3', expected 'class,startTime_usec,endTime_usec'"),
])
def test_refused_rows_are_one_exact_line(tmp_path, text, line, message):
    with pytest.raises(LabelFormatError) as ei:
        _parse(tmp_path, text)
    assert str(ei.value) == f"{tmp_path / 'user01_lab_labels.csv'}: line {line}: {message}"


def _windows(*w: tuple[int, int]) -> LabelRows:
    a = np.array(w, dtype=np.int64).reshape(-1, 2)
    return LabelRows(np.zeros(len(w), np.uint8), a[:, 0].copy(), a[:, 1].copy())


# (start, end) -> the indices of the events with start <= t < end, by hand
_SORTED_T = [0, 0, 3, 7, 7, 9]          # first event at 0, last at 9
_SORTED = [
    ((0, 0), []),                        # empty window at the first event
    ((0, 1), [0, 1]),                    # both events at 0
    ((0, 3), [0, 1]),                    # t == end is out
    ((3, 7), [2]),                       # t == start is in, t == end out
    ((3, 8), [2, 3, 4]),
    ((7, 9), [3, 4]),                    # ends exactly at the last event: it is out
    ((9, 10), [5]),                      # starts exactly at the last event: it alone
    ((9, 9), []),
    ((10, 11), []),                      # starts one past the last event
    ((0, I64), [0, 1, 2, 3, 4, 5]),
    ((I64, I64), []),
]
_UNSORTED_T = [7, 0, 9, 3, 7, 0]        # file order kept; selected as a mask
_UNSORTED = [
    ((0, 0), []),
    ((0, 3), [1, 5]),
    ((0, 7), [1, 3, 5]),
    ((3, 4), [3]),
    ((3, 3), []),
    ((7, 9), [0, 4]),
    ((9, 10), [2]),
    ((10, 11), []),
    ((0, I64), [0, 1, 2, 3, 4, 5]),
]


# unsorted although no event comes before the first: still a mask
_FIRST_SMALLEST_T = [0, 5, 3]
_FIRST_SMALLEST = [((0, 4), [0, 2]), ((3, 6), [1, 2]), ((4, 5), []), ((5, 6), [1])]


@pytest.mark.parametrize("t, cases", [(_SORTED_T, _SORTED), (_UNSORTED_T, _UNSORTED),
                                      (_FIRST_SMALLEST_T, _FIRST_SMALLEST)],
                         ids=["sorted", "unsorted", "first-smallest"])
def test_windows_take_start_and_leave_end(t, cases):
    t = np.array(t, np.int64)
    parts = cut_samples(t, _windows(*(w for w, _ in cases)))
    sorted_t = bool(np.all(t[1:] >= t[:-1]))
    assert all(isinstance(p, slice) == sorted_t for p in parts)   # a slice only when t is sorted
    got = [np.arange(t.size)[p].tolist() for p in parts]
    assert got == [idx for _, idx in cases]


def test_no_events_give_empty_samples():
    parts = cut_samples(np.zeros(0, np.int64), _windows((0, 0), (0, I64)))
    assert [np.arange(0)[p].tolist() for p in parts] == [[], []]
