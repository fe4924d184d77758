"""Event -> frame integration, equal to SpikingJelly's ``integrate_events_by_fixed_frames_number``.

A sample's events (t, x, y, p in file order) become T two-channel count frames
[T, 2, H, W]; channel 0 counts p == 0, channel 1 counts p != 0 (SpikingJelly's rule).

SpikingJelly assigns index ranges [j_l[i], j_r[i]) to the frames (see `frame_bounds`) and counts
each range. Frames are contiguous index ranges (for time-ordered events), so each frame is one
``np.bincount`` over the keys ``c*H*W + y*W + x`` of its events.

split_by "number": N events, di = N // T; frame i takes [i*di, (i+1)*di), the last takes
[(T-1)*di, N). N < T puts all events in the last frame; N = 0 gives zeros.

split_by "time": t0 = t[0], dt = (t[N-1] - t0) // T. SpikingJelly's frame i (i < T-1) is the
index range from the first to the last event with t0 + i*dt <= t < t0 + (i+1)*dt, the last frame
runs from the first event of its window to N. Where SpikingJelly raises (an empty window, which
includes dt = 0 and N = 0) we define:
  * an empty window i < T-1 is an empty frame;
  * the last frame starts at the first event with t >= t0 + (T-1)*dt (so with dt = 0 it takes
    every event) and is empty when there is none;
  * N = 0 gives zeros.
For timestamps in non-decreasing order (the AEDAT recordings) every frame is simply the events of
its time window, and the last frame also takes all later events. For out-of-order timestamps we
keep SpikingJelly's index-range semantics exactly (ranges may then overlap or skip events); that
path gathers the ranges first and is slower.
"""
from __future__ import annotations

import numpy as np

from ..constants import N_POLARITIES, SENSOR_SIZE, SPLIT_METHODS
from ..errors import StoreError


def check_params(T: object, split_by: object) -> tuple[int, str]:
    """Validate the framing parameters (StoreError with a one-line message); returns them."""
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or int(T) <= 0:
        raise StoreError(f"T must be a positive integer, got {T!r}")
    if split_by not in SPLIT_METHODS:
        raise StoreError(f"unknown split method {split_by!r}; expected one of {', '.join(SPLIT_METHODS)}")
    return int(T), str(split_by)


def frame_bounds(t: np.ndarray, T: int, split_by: str) -> tuple[np.ndarray, np.ndarray]:
    """Index ranges of the T frames: (j_l, j_r), each int64 [T]; frame i counts events
    j_l[i] <= j < j_r[i]. Equal to SpikingJelly's ``cal_fixed_frames_number_segment_index``
    wherever it does not raise; empty frames have j_l == j_r.

    t: [N] int timestamps in file order.
    """
    check_params(T, split_by)
    N = int(t.shape[0])
    j_l = np.zeros(T, dtype=np.int64)
    j_r = np.zeros(T, dtype=np.int64)
    if split_by == "number":
        di = N // T
        j_l[:] = np.arange(T, dtype=np.int64) * di
        j_r[:] = j_l + di
        j_r[-1] = N
        return j_l, j_r
    if N == 0:
        return j_l, j_r
    t0 = t[0]
    dt = (t[-1] - t0) // T
    if dt > 0:
        w = (t - t0) // dt  # window of each event; window i <=> t0 + i*dt <= t < t0 + (i+1)*dt
        inside = (w >= 0) & (w < T)
        idx = np.flatnonzero(inside)
        wi = w[idx]
        present, first = np.unique(wi, return_index=True)
        _, last_rev = np.unique(wi[::-1], return_index=True)
        last = idx.size - 1 - last_rev
        j_l[present] = idx[first]
        j_r[present] = idx[last] + 1
        if T - 1 not in present:
            later = np.flatnonzero(w >= T - 1)
            j_l[T - 1] = later[0] if later.size else N
    else:
        later = np.flatnonzero(t >= t0 + (T - 1) * dt)
        j_l[T - 1] = later[0] if later.size else N
    j_r[-1] = N
    return j_l, j_r


def frame_starts(t: np.ndarray | None, N: int, T: int, split_by: str) -> np.ndarray | None:
    """First event index of each frame, int64 [T+1] (last entry N), when the frames tile the
    events in order (always for "number", for "time" when t is non-decreasing); else None."""
    check_params(T, split_by)
    if split_by == "number":
        starts = np.arange(T + 1, dtype=np.int64) * (N // T)
        starts[T] = N
        return starts
    if N == 0:
        return np.zeros(T + 1, dtype=np.int64)
    if N > 1 and not bool(np.all(t[1:] >= t[:-1])):
        return None
    t0 = int(t[0])
    dt = (int(t[-1]) - t0) // T
    # Window i holds t0 + i*dt <= t < t0 + (i+1)*dt; the last frame also takes every later event.
    starts = np.searchsorted(t, t0 + dt * np.arange(T, dtype=np.int64), side="left").astype(np.int64)
    return np.append(starts, N)


def integrate(
    t: np.ndarray | None,
    x: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    T: int,
    split_by: str,
    sensor_size: tuple[int, int] = SENSOR_SIZE,
) -> np.ndarray:
    """Count frames of one sample: [T, 2, H, W] int64 (exact counts, never clipped).

    t: [N] int64 (may be None for split_by "number", which only counts events); x, y: [N] ints
    within the sensor; p: [N] (0 = OFF -> channel 0, else channel 1).
    """
    T, split_by = check_params(T, split_by)
    H, W = sensor_size
    out = np.empty((T, N_POLARITIES, H, W), dtype=np.int64)
    count_frames(t, x, y, p, T, split_by, out)
    return out


def count_frames(
    t: np.ndarray | None,
    x: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    T: int,
    split_by: str,
    out: np.ndarray,
) -> int:
    """Count one sample's frames into `out` ([T, 2, H, W], any integer dtype; every frame is
    written) and return the largest count, as `integrate` does but with no int64 frames.

    A count that `out`'s dtype cannot hold is never written: counting stops at the first frame
    holding one and returns its largest count (> the dtype's maximum; `out` is then partial).
    """
    T, split_by = check_params(T, split_by)
    if out.ndim != 4 or out.shape[:2] != (T, N_POLARITIES) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous [T, {N_POLARITIES}, H, W] array, got {out.shape}")
    _, _, H, W = out.shape
    plane = H * W
    frame_size = N_POLARITIES * plane
    limit = int(np.iinfo(out.dtype).max)
    N = int(x.shape[0])
    starts = frame_starts(t, N, T, split_by)
    if starts is None:
        # Out-of-order timestamps: gather SpikingJelly's (possibly overlapping) index ranges.
        j_l, j_r = frame_bounds(t, T, split_by)
        lengths = np.maximum(j_r - j_l, 0)
        first = np.cumsum(lengths) - lengths
        idx = np.arange(int(lengths.sum()), dtype=np.intp) - np.repeat(first - j_l, lengths)
        x, y, p = x[idx], y[idx], p[idx]
        starts = np.append(first, lengths.sum())
    # key = c*H*W + y*W + x, in 2 bytes when a frame's 2*H*W cells allow (the DVS128 sensor):
    # a quarter of the memory traffic of intp keys. One bincount per frame keeps its counts
    # (2*H*W int64) in cache, where one bincount over T*2*H*W cells per sample did not.
    ktype = np.uint16 if frame_size <= 1 << 16 else np.intp
    key = np.asarray(y).astype(ktype)
    key *= ktype(W)
    np.add(key, x, out=key, casting="unsafe")
    key += (np.asarray(p) != 0).view(np.uint8) * ktype(plane)
    top = 0
    frames = out.reshape(T, frame_size)
    for i in range(T):
        lo, hi = int(starts[i]), int(starts[i + 1])
        if lo >= hi:
            frames[i] = 0
            continue
        counts = np.bincount(key[lo:hi], minlength=frame_size)
        m = int(counts.max())
        top = max(top, m)
        if m > limit:
            return top
        frames[i] = counts
    return top


def narrowest_dtype(max_count: int) -> np.dtype:
    """uint8 when counts fit, else uint16; larger counts are an error, never clipped."""
    if max_count <= np.iinfo(np.uint8).max:
        return np.dtype("u1")
    if max_count <= np.iinfo(np.uint16).max:
        return np.dtype("u2")
    raise StoreError(f"a frame pixel counts {max_count} events, more than uint16 holds")
