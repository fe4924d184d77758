"""`dvsprep convert` at the edges of a sample's window (DESIGN: a sample is the events with
startTime <= t < endTime, in file order, selected as a mask; SpikingJelly's rule): events exactly
at a window's start and end, at time 0 and at the recording's last event, windows past the end
and up to int64's largest, in time order and out of it, in-process (-j 1) and through the
workers' spill files (-j 2). Every sample's events are compared with the indices written here by
hand. And a label csv with a class one past either end stops the conversion in one line.
"""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from dvsprep.cli import main
from dvsprep.events.convert import convert_release
from dvsprep.events.store import EventsFile

from aedat_fixtures import write_release
from previous_output import lay_previous, tree

I64 = 2**63 - 1

# Each event has its own x, y, p, so a sample's events name themselves.
SORTED_T = [0, 0, 3, 7, 7, 9]
# rows (class, start, end) -> indices of the events they hold, by hand
SORTED_ROWS = [
    ((1, 0, 0), []),                     # empty window at the first event
    ((1, 0, 3), [0, 1]),                 # both events at t = 0; t == end (3) is out
    ((2, 3, 7), [2]),                    # t == start in, t == end out
    ((11, 7, 9), [3, 4]),                # ends exactly at the recording's last event: it is out
    ((3, 9, 10), [5]),                   # starts exactly at the last event: it alone
    ((4, 9, 9), []),
    ((5, 10, 11), []),                   # starts one past the last event
    ((6, 0, I64), [0, 1, 2, 3, 4, 5]),   # to int64's largest: everything
]
UNSORTED_T = [7, 0, 9, 3, 7, 0]
UNSORTED_ROWS = [
    ((1, 0, 3), [1, 5]),
    ((2, 3, 7), [3]),
    ((3, 7, 9), [0, 4]),
    ((11, 9, 10), [2]),
    ((4, 0, 0), []),
]


def _events(t: list[int], first_x: int):
    n = len(t)
    return (np.array(t, np.int64), np.arange(first_x, first_x + n, dtype=np.uint8),
            np.arange(100, 100 + n, dtype=np.uint8), (np.arange(n) % 2).astype(np.uint8))


def _release(root):
    recs = {"user01_lab": (*_events(SORTED_T, 1), [r for r, _ in SORTED_ROWS]),
            "user02_led": (*_events(UNSORTED_T, 20), [r for r, _ in UNSORTED_ROWS])}
    return write_release(root, recs, train=["user01_lab"], test=["user02_led"])


@pytest.mark.parametrize("jobs", [1, 2])
def test_samples_take_events_at_start_and_leave_those_at_end(tmp_path, jobs):
    _release(tmp_path / "raw")
    s = convert_release(tmp_path / "raw", tmp_path / "data", jobs=jobs)
    assert s.samples == {"train": 8, "test": 5}
    assert s.events == 12 and s.events_in_samples == 2 + 1 + 2 + 1 + 6 + 2 + 1 + 2 + 1
    with EventsFile(s.path) as ef:
        for split, t, first_x, rows in (("train", SORTED_T, 1, SORTED_ROWS), ("test", UNSORTED_T, 20, UNSORTED_ROWS)):
            ev = dict(zip("txyp", _events(t, first_x)))
            sp = ef.split(split)
            assert sp.labels.tolist() == [c - 1 for (c, _, _), _ in rows]
            assert sp.t_start.tolist() == [a for (_, a, _), _ in rows]
            assert sp.t_end.tolist() == [b for (_, _, b), _ in rows]
            for i, (_, idx) in enumerate(rows):
                got = sp.sample(i)
                for k in "txyp":
                    assert got[k].tolist() == ev[k][idx].tolist(), (split, i, k)


@pytest.mark.parametrize("cls", [0, 12])
def test_a_class_one_past_either_end_stops_the_conversion_in_one_line(tmp_path, cls):
    rel = _release(tmp_path / "raw")
    csv = rel / "user02_led_labels.csv"
    csv.write_text(f"class,startTime_usec,endTime_usec\n11,0,3\n{cls},3,7\n")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "raw"), "-o", str(tmp_path / "out"), "-j", "1"])
    assert r.exit_code == 1, r.output
    assert r.output == f"error: {csv}: line 3: class {cls} outside 1..11\n"
    assert not (tmp_path / "out").exists()
    # over an events.h5 that --force would replace: the same line, that file byte for byte
    before = lay_previous(tmp_path / "out" / "events.h5")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "raw"), "-o", str(tmp_path / "out"), "-j", "1", "--force"])
    assert r.exit_code == 1 and r.output == f"error: {csv}: line 3: class {cls} outside 1..11\n"
    assert tree(tmp_path / "out") == before
