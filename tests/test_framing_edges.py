"""dvsprep.frames.integrate at its edges, against counts worked out by hand: events exactly at a
window boundary (in order: the tiling path; out of order: SpikingJelly's index ranges), the last
frame, dt = 0, fewer events than frames, channels and pixel placement, and the count dtype at
the integer limits (255/256, 65535/65536)."""
from __future__ import annotations

import numpy as np
import pytest

from dvsprep.errors import StoreError
from dvsprep.frames.integrate import check_params, frame_bounds, frame_starts, integrate, narrowest_dtype


def _per_frame(t, T, split_by, p=None):
    t = np.asarray(t, dtype=np.int64)
    n = len(t)
    x = np.arange(n, dtype=np.int64) % 128
    y = np.zeros(n, dtype=np.int64)
    p = np.zeros(n, dtype=np.int64) if p is None else np.asarray(p)
    return integrate(t, x, y, p, T, split_by).reshape(T, -1).sum(1).tolist()


@pytest.mark.parametrize("t,want", [
    # dt = 40 // 4 = 10: windows [0,10) [10,20) [20,30) and the last [30, ...) takes t = 40 too
    ([0, 10, 20, 30, 40], [1, 1, 1, 2]),
    # one below and at each boundary: 9 stays in window 0, 10 opens window 1
    ([0, 9, 10, 19, 20, 40], [2, 2, 1, 1]),
    # nothing in windows 1 and 2: empty frames, not an error
    ([0, 1, 35, 40], [2, 0, 0, 2]),
    # dt = 0 (all at one time): the last frame takes every event
    ([5, 5, 5], [0, 0, 0, 3]),
    ([7], [0, 0, 0, 1]),
    ([], [0, 0, 0, 0]),
])
def test_time_windows_by_hand(t, want):
    assert _per_frame(t, 4, "time") == want
    starts = frame_starts(np.asarray(t, dtype=np.int64), len(t), 4, "time")
    assert starts.tolist() == [sum(want[:i]) for i in range(5)]


def test_out_of_order_times_keep_spikingjellys_index_ranges():
    """t = [0, 10, 5, 20, 30, 40], T 4, dt 10: windows of the events 0 1 0 2 3 4. Frame i runs from
    the first to the last event of window i: [0, 3) (t = 10 of window 1 inside it), [1, 2),
    [3, 4), and the last from its first event to the end: [4, 6)."""
    t = np.array([0, 10, 5, 20, 30, 40], dtype=np.int64)
    assert frame_starts(t, 6, 4, "time") is None                   # not the tiling path
    j_l, j_r = frame_bounds(t, 4, "time")
    assert j_l.tolist() == [0, 1, 3, 4] and j_r.tolist() == [3, 2, 4, 6]
    assert _per_frame(t, 4, "time") == [3, 1, 1, 2]
    # the last window empty: the last frame starts at the first event at or after it
    t = np.array([0, 30, 1, 2, 40], dtype=np.int64)                  # dt 10, windows 0 3 0 0 4
    j_l, j_r = frame_bounds(t, 4, "time")
    assert j_l.tolist() == [0, 0, 0, 1] and j_r.tolist() == [4, 0, 0, 5]


@pytest.mark.parametrize("n,T,want", [(7, 3, [2, 2, 3]), (6, 3, [2, 2, 2]), (2, 3, [0, 0, 2]), (3, 3, [1, 1, 1]),
                                      (0, 3, [0, 0, 0])])
def test_number_split_by_hand(n, T, want):
    """di = N // T events a frame; the last frame takes the rest (all of them when N < T)."""
    assert _per_frame(np.zeros(n), T, "number") == want
    j_l, j_r = frame_bounds(np.zeros(n, dtype=np.int64), T, "number")
    assert (j_r - j_l).tolist() == want
    x = np.zeros(n, dtype=np.int64)
    assert integrate(None, x, x, x, T, "number").reshape(T, -1).sum(1).tolist() == want


def test_channels_and_pixels_land_where_spikingjelly_puts_them():
    t = np.array([0, 1, 2, 3], dtype=np.int64)
    x = np.array([127, 0, 5, 5])
    y = np.array([0, 127, 6, 6])
    p = np.array([0, 1, 2, 0])                 # p != 0 -> channel 1
    f = integrate(t, x, y, p, 1, "number")
    assert f.shape == (1, 2, 128, 128) and f.dtype == np.int64 and f.sum() == 4
    assert f[0, 0, 0, 127] == 1 and f[0, 1, 127, 0] == 1 and f[0, 1, 6, 5] == 1 and f[0, 0, 6, 5] == 1
    g = integrate(t, x[:2], y[:2], p[:2], 1, "number", sensor_size=(128, 200))
    assert g.shape == (1, 2, 128, 200) and g[0, 0, 0, 127] == 1 and g[0, 1, 127, 0] == 1


@pytest.mark.parametrize("count,dtype", [(0, "u1"), (255, "u1"), (256, "u2"), (65535, "u2")])
def test_count_dtype_at_the_integer_limits(count, dtype):
    assert narrowest_dtype(count) == np.dtype(dtype)


def test_one_past_uint16_is_refused_never_clipped():
    with pytest.raises(StoreError) as e:
        narrowest_dtype(65536)
    assert str(e.value) == "a frame pixel counts 65536 events, more than uint16 holds"


def test_a_pixel_counts_past_255_exactly():
    n = 300
    z = np.zeros(n, dtype=np.int64)
    f = integrate(np.arange(n, dtype=np.int64), z, z, z, 1, "time")
    assert int(f.max()) == 300 and narrowest_dtype(int(f.max())) == np.dtype("u2")


@pytest.mark.parametrize("T", [0, -1, True, 2.0, "4", None])
def test_check_params_refuses(T):
    with pytest.raises(StoreError) as e:
        check_params(T, "number")
    assert str(e.value) == f"T must be a positive integer, got {T!r}"


def test_check_params_accepts_and_names_the_methods():
    assert check_params(np.int64(3), "time") == (3, "time") and type(check_params(np.int64(3), "time")[0]) is int
    assert check_params(1, "number") == (1, "number")
    with pytest.raises(StoreError) as e:
        check_params(4, "Time")
    assert str(e.value) == "unknown split method 'Time'; expected one of number, time"


@pytest.mark.parametrize("t,j_l,j_r", [
    # frame i: first to last event of window i ([0,10) [10,20) ...; dt = (t[-1] - t[0]) // 4),
    # empty windows (0, 0); the last frame from its window's first event (or the first later one) to N
    ([0, 10, 20, 30, 40], [0, 1, 2, 3], [1, 2, 3, 5]),
    ([0, 1, 2, 3, 4], [0, 1, 2, 3], [1, 2, 3, 5]),               # dt 1, the smallest window
    ([0, 9, 10, 19, 20, 40], [0, 2, 4, 5], [2, 4, 5, 6]),       # window 3 empty: the event at 40
    ([0, 1, 35, 40], [0, 0, 0, 2], [2, 0, 0, 4]),
    ([5, 5, 5], [0, 0, 0, 0], [0, 0, 0, 3]),                     # dt 0: everything in the last
    ([5, 3, 5], [0, 0, 0, 0], [0, 0, 0, 3]),                     # dt 0, out of order
    ([5, 3, 4], [0, 0, 0, 0], [0, 0, 0, 3]),                     # dt -1 (t ends below t0): t >= 2, all
    ([7], [0, 0, 0, 0], [0, 0, 0, 1]),
    ([], [0, 0, 0, 0], [0, 0, 0, 0]),
])
def test_frame_bounds_by_hand(t, j_l, j_r):
    got_l, got_r = frame_bounds(np.asarray(t, dtype=np.int64), 4, "time")
    assert (got_l.tolist(), got_r.tolist()) == (j_l, j_r)
    assert got_l.dtype == got_r.dtype == np.int64


def test_frame_starts_are_int64_in_every_path():
    for t, n, split_by in ((None, 7, "number"), (np.zeros(0, np.int64), 0, "time"),
                           (np.arange(5, dtype=np.int64), 5, "time")):
        assert frame_starts(t, n, 3, split_by).dtype == np.int64
    assert frame_starts(None, 7, 3, "number").tolist() == [0, 2, 4, 7]


def test_two_events_out_of_order_leave_the_tiling_path():
    """N = 2 is the smallest input that can be out of order (t = [5, 3]): SpikingJelly's ranges."""
    t = np.array([5, 3], dtype=np.int64)
    assert frame_starts(t, 2, 2, "time") is None
    assert frame_starts(np.array([3, 5], dtype=np.int64), 2, 2, "time").tolist() == [0, 1, 2]
    # dt = (3 - 5) // 2 = -1: the last frame takes t >= 5 - 1, from event 0: both events
    assert _per_frame(t, 2, "time") == [0, 2]
