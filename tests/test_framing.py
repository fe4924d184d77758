"""dvsprep.frames.integrate against SpikingJelly's integrate_events_by_fixed_frames_number (the oracle)."""
from __future__ import annotations

import numpy as np
import pytest
from spikingjelly.datasets import utils as sju

from dvsprep.errors import StoreError
from dvsprep.frames.integrate import count_frames, frame_bounds, integrate, narrowest_dtype

H = W = 128


def _events(rng, n, *, order="sorted", span=1_000_000, p_values=(0, 1)):
    if order == "sorted":
        t = np.sort(rng.integers(0, span, n))
    elif order == "ties":  # few distinct timestamps: many equal t, windows with dt = 0 or empty ones
        t = np.sort(rng.integers(0, 5, n)) * 1000
    elif order == "bursts":  # sorted, with long silent gaps -> empty time windows
        t = np.sort(np.concatenate([rng.integers(0, 10, n // 2), rng.integers(900_000, 900_010, n - n // 2)]))
    else:  # out of order
        t = rng.integers(0, span, n)
    return {
        "t": t.astype(np.int64),
        "x": rng.integers(0, W, n).astype(np.uint8),
        "y": rng.integers(0, H, n).astype(np.uint8),
        "p": rng.choice(np.array(p_values, dtype=np.uint8), n),
    }


def _ours(ev, T, split_by):
    return integrate(ev["t"], ev["x"], ev["y"], ev["p"], T, split_by)


SIZES = [0, 1, 2, 3, 7, 15, 16, 17, 31, 33, 100, 257, 1001, 4099]
TS = [1, 2, 3, 5, 16, 20]


@pytest.mark.parametrize("order", ["sorted", "ties", "bursts", "unsorted"])
def test_equals_spikingjelly_number_and_time(order):
    rng = np.random.default_rng(["sorted", "ties", "bursts", "unsorted"].index(order))
    compared = {"number": 0, "time": 0}
    sj_raised = 0
    for n in SIZES:
        for T in TS:
            ev = _events(rng, n, order=order)
            for split_by in ("number", "time"):
                ours = _ours(ev, T, split_by)
                assert ours.shape == (T, 2, H, W) and ours.dtype.kind == "i"
                try:
                    ref = sju.integrate_events_by_fixed_frames_number(ev, split_by, T, H, W)
                except IndexError:
                    # SpikingJelly fails on an empty time window (and N = 0); we must not.
                    assert split_by == "time"
                    sj_raised += 1
                    continue
                np.testing.assert_array_equal(ours, ref, err_msg=f"{order} N={n} T={T} {split_by}")
                compared[split_by] += 1
    assert compared["number"] == len(SIZES) * len(TS)
    assert compared["time"] > 20
    if order in ("ties", "bursts"):
        assert sj_raised > 0  # the empty-window cases were really exercised


def test_uneven_remainders_and_n_less_than_t_number():
    rng = np.random.default_rng(5)
    for n, T in [(10, 16), (16, 16), (17, 16), (47, 16), (5, 3)]:
        ev = _events(rng, n)
        ours = _ours(ev, T, "number")
        per_frame = ours.reshape(T, -1).sum(1)
        di = n // T
        expect = [di] * (T - 1) + [n - (T - 1) * di]
        assert per_frame.tolist() == expect
        np.testing.assert_array_equal(ours, sju.integrate_events_by_fixed_frames_number(ev, "number", T, H, W))


def test_zero_events_gives_zeros_for_both_methods():
    ev = _events(np.random.default_rng(0), 0)
    for split_by in ("number", "time"):
        out = _ours(ev, 16, split_by)
        assert out.shape == (16, 2, H, W) and not out.any()
    with pytest.raises(IndexError):
        sju.integrate_events_by_fixed_frames_number(ev, "time", 16, H, W)


def test_time_empty_windows_are_empty_frames_and_last_takes_the_rest():
    # t: 0, 0, 100 with T=2: dt = 50; window 1 [50, 100) is empty; the last frame takes t >= 50.
    ev = {"t": np.array([0, 0, 100], np.int64), "x": np.array([1, 2, 3], np.uint8),
          "y": np.array([4, 5, 6], np.uint8), "p": np.array([0, 1, 1], np.uint8)}
    with pytest.raises(IndexError):
        sju.integrate_events_by_fixed_frames_number(ev, "time", 3, H, W)
    out = _ours(ev, 3, "time")  # dt = 33: windows [0,33) [33,66) [66,...)
    assert out[0, 0, 4, 1] == 1 and out[0, 1, 5, 2] == 1 and out[0].sum() == 2
    assert out[1].sum() == 0
    assert out[2, 1, 6, 3] == 1 and out[2].sum() == 1
    # dt = 0 (all timestamps closer than T): every event goes to the last frame.
    ev2 = {"t": np.array([7, 7, 8], np.int64), "x": ev["x"], "y": ev["y"], "p": ev["p"]}
    out2 = _ours(ev2, 4, "time")
    assert out2[:3].sum() == 0 and out2[3].sum() == 3


def test_sorted_time_frames_are_the_time_windows():
    rng = np.random.default_rng(9)
    ev = _events(rng, 5000, order="bursts")
    T = 16
    out = _ours(ev, T, "time")
    t = ev["t"]
    dt = (t[-1] - t[0]) // T
    w = np.minimum((t - t[0]) // dt, T - 1)
    assert out.reshape(T, -1).sum(1).tolist() == np.bincount(w, minlength=T).tolist()


def test_frame_bounds_equal_spikingjelly_segment_index():
    rng = np.random.default_rng(11)
    checked = 0
    for order in ("sorted", "unsorted", "ties"):
        for n in (16, 100, 3000):
            ev = _events(rng, n, order=order)
            for split_by in ("number", "time"):
                try:
                    ref = sju.cal_fixed_frames_number_segment_index(ev["t"], split_by, 16)
                except IndexError:
                    continue
                got = frame_bounds(ev["t"], 16, split_by)
                np.testing.assert_array_equal(got[0], ref[0])
                np.testing.assert_array_equal(got[1], ref[1])
                checked += 1
    assert checked >= 10


def test_polarity_rule_is_nonzero_means_channel_1():
    rng = np.random.default_rng(3)
    ev = _events(rng, 500, p_values=(0, 1, 2, 255))
    for split_by in ("number", "time"):
        np.testing.assert_array_equal(_ours(ev, 4, split_by),
                                      sju.integrate_events_by_fixed_frames_number(ev, split_by, 4, H, W))


def test_counts_beyond_uint8_are_exact():
    n = 1000
    ev = {"t": np.arange(n, dtype=np.int64), "x": np.full(n, 5, np.uint8), "y": np.full(n, 6, np.uint8),
          "p": np.ones(n, np.uint8)}
    out = _ours(ev, 1, "number")
    assert out[0, 1, 6, 5] == n
    assert narrowest_dtype(int(out.max())) == np.uint16
    assert narrowest_dtype(255) == np.uint8 and narrowest_dtype(0) == np.uint8
    with pytest.raises(StoreError, match="uint16"):
        narrowest_dtype(70000)


@pytest.mark.parametrize("T, split_by, match", [(0, "number", "positive"), (-3, "time", "positive"),
                                                (2.5, "number", "positive"), (4, "exact", "unknown split method")])
def test_bad_parameters(T, split_by, match):
    ev = _events(np.random.default_rng(0), 10)
    with pytest.raises(StoreError, match=match):
        _ours(ev, T, split_by)


@pytest.mark.parametrize("order", ["sorted", "unsorted"])
def test_count_frames_into_uint8_equals_spikingjelly_and_stops_at_an_overflow(order):
    rng = np.random.default_rng(7)
    for n, T in ((0, 4), (5, 16), (4099, 16), (30_000, 3)):
        ev = _events(rng, n, order=order)
        for split_by in ("number", "time"):
            out = np.full((T, 2, H, W), 77, dtype=np.uint8)   # every frame must be overwritten
            top = count_frames(ev["t"], ev["x"], ev["y"], ev["p"], T, split_by, out)
            try:
                ref = sju.integrate_events_by_fixed_frames_number(ev, split_by, T, H, W)
            except IndexError:   # SpikingJelly fails on an empty time window (and N = 0)
                ref = integrate(ev["t"], ev["x"], ev["y"], ev["p"], T, split_by)
            np.testing.assert_array_equal(out, ref, err_msg=f"{order} N={n} T={T} {split_by}")
            assert top == int(ref.max())
    # 300 events on one pixel in frame 1 of 2: frame 0 is written, counting stops at frame 1
    # (returning its count) and leaves the rest of `out` as it was, never a wrapped 300 % 256.
    ev = {"t": np.arange(600, dtype=np.int64), "x": np.full(600, 3, np.uint8), "y": np.full(600, 4, np.uint8),
          "p": np.ones(600, np.uint8)}
    ev["x"][:300] = np.arange(300) % 128
    out = np.full((2, 2, H, W), 9, dtype=np.uint8)
    assert count_frames(ev["t"], ev["x"], ev["y"], ev["p"], 2, "number", out) == 300
    assert int(out[0].sum()) == 300 and (out[1] == 9).all()
    with pytest.raises(ValueError, match="C-contiguous"):
        count_frames(ev["t"], ev["x"], ev["y"], ev["p"], 2, "number", np.zeros((2, 2, H, 2 * W), np.uint8)[..., ::2])
