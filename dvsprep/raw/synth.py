"""`dvsprep synth`: a synthetic DVS128 Gesture release in the exact raw IBM layout.

The release is written as the real one is laid out: `userNN_<lighting>.aedat` (AEDAT 3.1,
polarity packets, all events valid), `userNN_<lighting>_labels.csv` (CRLF), the two trial
lists, `gesture_mapping.csv` and a README that says the data is synthetic.

Events come from a small kinematic model of a person in front of the sensor: hands (discs)
and forearms/arms (capsules) move along per-gesture trajectories, and every moving edge emits
events at a rate proportional to the area it sweeps (ON where the edge advances, OFF where it
retreats). Candidate events are drawn as one inhomogeneous Poisson stream per time segment and
thinned by the edge's normal speed, so events come out in time order without sorting. A slowly
swaying torso and head, uniform background noise and a few hot pixels complete the scene.

Determinism: every recording draws from a generator seeded by (seed, recording name) through
`numpy.random.SeedSequence` and a sha256 of the name, so bytes do not depend on `jobs`.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

from .. import __version__
from .aedat import polarity_packets, write_aedat
from ..atomic import check_output, publishing
from ..constants import GESTURE_NAMES, LIGHTINGS, N_CLASSES, SENSOR_H, SENSOR_W, SPLITS, T_DTYPE, XY_DTYPE
from ..errors import DvsprepError
from ..integrity import md5_files
from .release import RELEASE_DIR, TRIAL_LISTS, load_published_manifest
from ..workers import process_pool, stop_pool, worker_deaths

log = logging.getLogger(__name__)

SCALE_NAMES = ("small", "full")
ROWS_PER_RECORDING = N_CLASSES + 1  # every class once, one class twice (as in the real release)
MAX_USERS = 99  # names are userNN


class SynthParameterError(DvsprepError, ValueError):
    """Parameters of `dvsprep synth` that cannot describe a release."""


@dataclass(frozen=True)
class ScaleSpec:
    """How big a synthetic release is.

    density: events per pixel^2 swept by a moving edge; noise_hz: background events per second
    over the whole sensor (times the lighting's factor); lead_in_s: unlabeled time before the first
    gesture; events_per_packet: AEDAT packet size.
    """

    users: int
    test_users: int
    density: float
    noise_hz: float
    lead_in_s: tuple[float, float]
    events_per_packet: int


SCALES = {
    # A few hundred samples of ~20-60 k events: seconds to write, minutes to train on a laptop.
    "small": ScaleSpec(users=6, test_users=2, density=0.55, noise_hz=400.0, lead_in_s=(2.0, 5.0),
                       events_per_packet=2048),
    # The real release's shape: 29 users, 122 recordings, millions of events per recording.
    "full": ScaleSpec(users=29, test_users=6, density=6.5, noise_hz=6000.0, lead_in_s=(20.0, 55.0),
                      events_per_packet=4096),
}

# Per lighting: background-noise factor and edge-contrast factor (flicker under fluorescent
# light raises the noise; daylight gives the strongest edges).
LIGHTING_NOISE = {"fluorescent": 1.6, "fluorescent_led": 1.3, "lab": 1.0, "led": 0.85, "natural": 0.6}
LIGHTING_CONTRAST = {"fluorescent": 0.9, "fluorescent_led": 0.95, "lab": 1.0, "led": 1.05, "natural": 1.15}

# The recording in which one label window ends after the next one starts (as in the real release).
REAL_OVERLAP_RECORDING = "user22_led"
OVERLAP_CLASS = 9  # air_drums ends after air_guitar starts in user22_led


# ----------------------------------------------------------------------------------------------
# The plan: names, splits and label rows, cheap to compute without generating any event.


@dataclass(frozen=True)
class RowPlan:
    """One label row: class 1..11, label window [start_us, end_us), and the motion inside it."""

    cls: int
    start_us: int
    end_us: int
    motion_start_us: int
    motion_end_us: int


@dataclass(frozen=True)
class RecordingPlan:
    """One recording: `name` is the stem (`user01_natural`), events span [begin_us, end_us)."""

    name: str
    user: int
    lighting: str
    split: str
    begin_us: int
    end_us: int
    rows: tuple[RowPlan, ...]


@dataclass(frozen=True)
class ReleasePlan:
    scale: str
    seed: int
    recordings: tuple[RecordingPlan, ...]

    def names(self, split: str) -> list[str]:
        """Recording file names of a split, in trial-list order."""
        return [f"{r.name}.aedat" for r in self.recordings if r.split == split]

    def n_samples(self, split: str) -> int:
        return sum(len(r.rows) for r in self.recordings if r.split == split)

    def class_counts(self, split: str) -> tuple[int, ...]:
        """Samples per label 0..10: recordings of the split plus the repeats of that class."""
        counts = [0] * N_CLASSES
        for r in self.recordings:
            if r.split == split:
                for row in r.rows:
                    counts[row.cls - 1] += 1
        return tuple(counts)


def _name_key(name: str) -> list[int]:
    """A stable integer key of a name (Python's hash() is salted per process)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def _rng(seed: int, name: str, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, purpose, *_name_key(name)]))


def _real_sessions() -> dict[int, list[str]]:
    """user number -> lighting tags recorded for that user in the IBM release."""
    published = load_published_manifest()
    sessions: dict[int, list[str]] = {}
    for name in published["train"] + published["test"]:
        stem = name[: -len(".aedat")]
        user, lighting = stem.split("_", 1)
        sessions.setdefault(int(user[len("user"):]), []).append(lighting)
    return sessions


def _plan_rows(rng: np.random.Generator, spec: ScaleSpec, overlap: bool) -> tuple[int, int, list[RowPlan]]:
    """Label rows of one recording (in µs) and the recording's [begin, end)."""
    order = list(range(1, N_CLASSES + 1))
    if rng.random() < 0.3:  # some real recordings have class 5 before class 4
        order[3], order[4] = order[4], order[3]
    # The repeated class: arm roll most often (as in the real release), else any class.
    repeat = 8 if rng.random() < 0.5 else int(rng.integers(1, N_CLASSES + 1))
    at = order.index(repeat)
    order.insert(at + 1, repeat)

    begin = rng.uniform(0.3, 2.5)
    t = begin + rng.uniform(*spec.lead_in_s)
    rows = []
    for cls in order:
        delay = rng.uniform(0.05, 0.4)
        motion = rng.uniform(5.0, 8.0)
        tail = rng.uniform(0.1, 0.6)
        start, m0 = t, t + delay
        m1 = m0 + motion
        end = m1 + tail
        rows.append([cls, start, end, m0, m1])
        t = end + rng.uniform(0.5, 4.0)
    if overlap:
        # The last window of OVERLAP_CLASS ends after the next row starts; its motion does not.
        j = max(i for i, r in enumerate(rows[:-1]) if r[0] == OVERLAP_CLASS)
        rows[j][2] = rows[j + 1][1] + rng.uniform(0.3, 1.5)
    end_rec = max(r[2] for r in rows) + rng.uniform(1.0, 4.0)
    us = lambda s: int(round(s * 1e6))  # noqa: E731
    plan = [RowPlan(c, us(a), us(b), us(m0), us(m1)) for c, a, b, m0, m1 in rows]
    return us(begin), us(end_rec), plan


def _check_counts(users: int, test_users: int) -> None:
    if not 2 <= users <= MAX_USERS:
        raise SynthParameterError(f"--users {users}: must be between 2 and {MAX_USERS}")
    if not 1 <= test_users < users:
        raise SynthParameterError(
            f"--test-users {test_users}: must be at least 1 and fewer than --users ({users})"
        )


def plan_release(
    *, users: int | None = None, test_users: int | None = None, seed: int = 0, scale: str = "small"
) -> ReleasePlan:
    """The recordings of a synthetic release, their splits and label rows (no events).

    Users are user01..userNN; each has the lighting conditions the real release has for that
    user number (all five beyond user29); the `test_users` highest-numbered users form the test
    split. With the full-scale defaults (29 users, 6 test) the names equal the real trial lists:
    98/24 recordings, 1176/288 samples. Exactly one train recording (user22_led when present,
    else the last train recording) has overlapping label windows.
    """
    if scale not in SCALES:
        raise SynthParameterError(f"--scale {scale!r}: must be one of {', '.join(SCALES)}")
    if seed < 0:
        raise SynthParameterError(f"--seed {seed}: must be a non-negative integer")
    spec = SCALES[scale]
    users = spec.users if users is None else users
    if test_users is None:  # the scale's share of test users (6 of 29 in the real release)
        test_users = max(1, round(users * spec.test_users / spec.users))
    _check_counts(users, test_users)
    sessions = _real_sessions()
    names = []
    for u in range(1, users + 1):
        split = "test" if u > users - test_users else "train"
        for lighting in sessions.get(u, list(LIGHTINGS)):
            names.append((f"user{u:02d}_{lighting}", u, lighting, split))
    train = [n for n, _, _, split in names if split == "train"]
    overlap = REAL_OVERLAP_RECORDING if REAL_OVERLAP_RECORDING in train else train[-1]
    recs = []
    for name, u, lighting, split in names:
        begin, end, rows = _plan_rows(_rng(seed, name, 0), spec, name == overlap)
        recs.append(RecordingPlan(name, u, lighting, split, begin, end, tuple(rows)))
    return ReleasePlan(scale, seed, tuple(recs))



# ----------------------------------------------------------------------------------------------
# Kinematics: pure functions from time to limb outlines. Image coordinates: x right, y down
# (0..127); the person faces the sensor, so their right hand appears on the image's left.


class Limb(NamedTuple):
    """A capsule from a to b (a disc when a == b). Coordinates are px, floats or arrays
    broadcastable to the time array [N] they were computed for; radius is px."""

    ax: np.ndarray | float
    ay: np.ndarray | float
    bx: np.ndarray | float
    by: np.ndarray | float
    radius: float


@dataclass(frozen=True)
class Style:
    """How one person performs one gesture.

    cx, cy: body centre (px); scale: body size factor; tempo: speed factor; duration: motion
    length (s); phase: start phase (rad; near 0 for arm circles, which start from the arm's rest
    position at the bottom of the circle); cycles: whole turns of an arm circle (so clockwise and
    counter-clockwise cover the same pixels equally often); direction: +1/-1 turning sense of an
    arm roll; hands: 1 or 2 for `other_gestures`; anchor: float [2, 2] hand centres relative to
    the body (px / scale); wander: float [2, 2, 3, 3] sinusoid terms per hand, axis and term as
    (amplitude px / scale, frequency Hz, phase rad).
    """

    cx: float
    cy: float
    scale: float
    tempo: float
    duration: float
    phase: float = 0.0
    cycles: int = 4
    direction: int = 1
    hands: int = 1
    anchor: np.ndarray = field(default_factory=lambda: np.zeros((2, 2)))
    wander: np.ndarray = field(default_factory=lambda: np.zeros((2, 2, 3, 3)))


HAND_RADIUS = 5.5   # px at scale 1
ARM_RADIUS = 3.0


def _hand(x: np.ndarray, y: np.ndarray, s: Style) -> Limb:
    return Limb(x, y, x, y, HAND_RADIUS * s.scale)


def _arm(ex: np.ndarray | float, ey: np.ndarray | float, hx: np.ndarray, hy: np.ndarray, s: Style) -> Limb:
    return Limb(ex, ey, hx, hy, ARM_RADIUS * s.scale)


def hand_clapping(t: np.ndarray, s: Style) -> list[Limb]:
    """Two hands meet at the body's centre line and part again (~1.7 Hz).
    t: float [N] seconds since the motion began -> 4 limbs (2 hands, 2 forearms) over [N]."""
    k = s.scale
    half_gap = k * (1.5 + 24.0 * (0.5 - 0.5 * np.cos(2 * np.pi * 1.7 * s.tempo * t + s.phase)))
    y = np.full_like(t, s.cy + 12 * k)
    limbs = []
    for side in (-1, 1):
        x = s.cx + side * (half_gap + HAND_RADIUS * k)
        limbs += [_hand(x, y, s), _arm(s.cx + side * 30 * k, s.cy + 30 * k, x, y, s)]
    return limbs


def _hand_wave(t: np.ndarray, s: Style, side: int) -> list[Limb]:
    """A raised forearm swings about the elbow (~2.2 Hz) on one side (-1: image left)."""
    k = s.scale
    ex, ey = s.cx + side * 30 * k, s.cy + 22 * k
    angle = side * 0.15 + 0.5 * np.sin(2 * np.pi * 2.2 * s.tempo * t + s.phase)
    hx, hy = ex + 28 * k * np.sin(angle), ey - 28 * k * np.cos(angle)
    return [_hand(hx, hy, s), _arm(ex, ey, hx, hy, s)]


def right_hand_wave(t: np.ndarray, s: Style) -> list[Limb]:
    """Person's right hand waves (image left). t: float [N] -> 2 limbs over [N]."""
    return _hand_wave(t, s, -1)


def left_hand_wave(t: np.ndarray, s: Style) -> list[Limb]:
    """Person's left hand waves (image right). t: float [N] -> 2 limbs over [N]."""
    return _hand_wave(t, s, 1)


def _arm_circle(t: np.ndarray, s: Style, side: int, direction: int) -> list[Limb]:
    """The hand turns `s.cycles` whole circles in `s.duration` s beside the body, starting at
    the bottom; direction +1 is clockwise on screen (y points down). Both senses cover exactly
    the same pixels the same number of times: only the order in time tells them apart."""
    k = s.scale
    cx, cy, r = s.cx + side * 28 * k, s.cy - 2 * k, 14 * k
    theta = np.pi / 2 + s.phase + direction * 2 * np.pi * s.cycles * t / s.duration
    hx, hy = cx + r * np.cos(theta), cy + r * np.sin(theta)
    return [_hand(hx, hy, s), _arm(s.cx + side * 12 * k, s.cy - 12 * k, hx, hy, s)]


def right_arm_clockwise(t: np.ndarray, s: Style) -> list[Limb]:
    """t: float [N] -> 2 limbs (hand, arm from the shoulder) over [N]; image left, clockwise."""
    return _arm_circle(t, s, -1, 1)


def right_arm_counter_clockwise(t: np.ndarray, s: Style) -> list[Limb]:
    """t: float [N] -> 2 limbs over [N]; image left, counter-clockwise."""
    return _arm_circle(t, s, -1, -1)


def left_arm_clockwise(t: np.ndarray, s: Style) -> list[Limb]:
    """t: float [N] -> 2 limbs over [N]; image right, clockwise."""
    return _arm_circle(t, s, 1, 1)


def left_arm_counter_clockwise(t: np.ndarray, s: Style) -> list[Limb]:
    """t: float [N] -> 2 limbs over [N]; image right, counter-clockwise."""
    return _arm_circle(t, s, 1, -1)


def arm_roll(t: np.ndarray, s: Style) -> list[Limb]:
    """Both hands roll around each other in small fast circles at the centre (~2.8 Hz).
    t: float [N] -> 4 limbs over [N]."""
    k = s.scale
    theta = s.phase + s.direction * 2 * np.pi * 2.8 * s.tempo * t
    dx, dy = 6.5 * k * np.cos(theta), 6.5 * k * np.sin(theta)
    cx, cy = s.cx, s.cy + 10 * k
    limbs = []
    for side, sign in ((-1, 1), (1, -1)):
        hx, hy = cx + sign * dx, cy + sign * dy
        limbs += [_hand(hx, hy, s), _arm(s.cx + side * 26 * k, s.cy + 16 * k, hx, hy, s)]
    return limbs


def air_drums(t: np.ndarray, s: Style) -> list[Limb]:
    """Alternating vertical strokes of the two hands (~2.3 Hz), quick on the way down.
    t: float [N] -> 4 limbs over [N]."""
    k = s.scale
    phi = 2 * np.pi * 2.3 * s.tempo * t + s.phase
    limbs = []
    for side, shift in ((-1, 0.0), (1, np.pi)):
        lift = 13 * k * (0.5 + 0.5 * np.cos(phi + shift)) ** 2
        hx = np.full_like(t, s.cx + side * 19 * k)
        hy = s.cy + 20 * k - lift
        limbs += [_hand(hx, hy, s), _arm(s.cx + side * 32 * k, s.cy + 24 * k, hx, hy, s)]
    return limbs


def air_guitar(t: np.ndarray, s: Style) -> list[Limb]:
    """One hand strums along a steep diagonal at the hip (~3.2 Hz); the other slides slowly
    on the neck. t: float [N] -> 4 limbs over [N]."""
    k = s.scale
    stroke = 11 * k * np.sin(2 * np.pi * 3.2 * s.tempo * t + s.phase)
    sx, sy = s.cx + 10 * k + 0.35 * stroke, s.cy + 24 * k + 0.94 * stroke
    slide = np.sin(2 * np.pi * 0.6 * t + s.phase)
    fx, fy = s.cx - 34 * k + 4 * k * slide, s.cy + 6 * k - 2 * k * slide
    return [
        _hand(sx, sy, s), _arm(s.cx + 32 * k, s.cy + 12 * k, sx, sy, s),
        _hand(fx, fy, s), _arm(s.cx - 14 * k, s.cy + 26 * k, fx, fy, s),
    ]


def other_gestures(t: np.ndarray, s: Style) -> list[Limb]:
    """One or two hands wander on smooth random paths (sums of three sinusoids per axis).
    t: float [N] -> 2 * s.hands limbs over [N]."""
    k = s.scale
    limbs = []
    for h in range(s.hands):
        xy = []
        for axis, centre in ((0, s.cx), (1, s.cy)):
            amp, freq, ph = s.wander[h, axis].T
            path = (amp[:, None] * np.sin(2 * np.pi * freq[:, None] * t + ph[:, None])).sum(0)
            xy.append(centre + k * (s.anchor[h, axis] + path))
        side = -1 if s.anchor[h, 0] < 0 else 1
        limbs += [_hand(xy[0], xy[1], s), _arm(xy[0] + side * 14 * k, xy[1] + 22 * k, xy[0], xy[1], s)]
    return limbs


GESTURES: tuple[Callable[[np.ndarray, Style], list[Limb]], ...] = (
    hand_clapping,
    right_hand_wave,
    left_hand_wave,
    right_arm_clockwise,
    right_arm_counter_clockwise,
    left_arm_clockwise,
    left_arm_counter_clockwise,
    arm_roll,
    air_drums,
    air_guitar,
    other_gestures,
)  # index = class - 1, in the order of GESTURE_NAMES
ARM_CIRCLES = (4, 5, 6, 7)  # classes whose pairs differ only in the sense of turning


@dataclass(frozen=True)
class Body:
    """A user's body: centre (px), size and tempo factors, edge contrast of their clothing,
    and the phases of the slow sway of torso and head (absolute time)."""

    cx: float
    cy: float
    scale: float
    tempo: float
    contrast: float
    sway_phase: tuple[float, float]


def body_sway(t: np.ndarray, b: Body) -> list[Limb]:
    """Torso and head, swaying by about a pixel. t: float [N] absolute seconds -> 2 limbs."""
    k = b.scale
    dx = 1.5 * np.sin(2 * np.pi * 0.23 * t + b.sway_phase[0])
    dy = 0.6 * np.sin(2 * np.pi * 0.31 * t + b.sway_phase[1])
    x, y = b.cx + dx, b.cy + dy
    return [Limb(x, y - 4 * k, x, y + 80 * k, 16 * k), Limb(x, y - 25 * k, x, y - 25 * k, 10 * k)]


def user_body(seed: int, user: int) -> Body:
    """The body of user `user`, the same in every lighting (seeded by seed and user)."""
    rng = _rng(seed, f"user{user:02d}", 2)
    return Body(
        cx=64 + rng.uniform(-6, 6), cy=52 + rng.uniform(-5, 5), scale=rng.uniform(0.85, 1.15),
        tempo=rng.uniform(0.8, 1.2), contrast=rng.uniform(0.85, 1.15),
        sway_phase=(rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)),
    )


def gesture_style(rng: np.random.Generator, body: Body, cls: int, duration: float) -> Style:
    """Per-sample variation of a user's gesture: position, tempo, phase, and class-specific
    parameters (whole cycles for arm circles, turning sense for arm roll, paths for `other`)."""
    tempo = body.tempo * rng.uniform(0.92, 1.08)
    jitter = rng.uniform(-0.4, 0.4)
    any_phase = rng.uniform(0, 2 * np.pi)
    anchor = np.column_stack([rng.uniform(-35, 35, 2), rng.uniform(-12, 28, 2)])
    wander = np.stack(
        [rng.uniform(2, 9, (2, 2, 3)), rng.uniform(0.3, 1.6, (2, 2, 3)), rng.uniform(0, 2 * np.pi, (2, 2, 3))],
        axis=-1,
    )
    return Style(
        cx=body.cx + rng.normal(0, 1.5), cy=body.cy + rng.normal(0, 1.5), scale=body.scale, tempo=tempo,
        duration=duration, phase=jitter if cls in ARM_CIRCLES else any_phase,
        cycles=max(2, int(round(duration * 0.9 * tempo))), direction=1 if rng.random() < 0.5 else -1,
        hands=1 + int(rng.random() < 0.5), anchor=anchor, wander=wander,
    )


# ----------------------------------------------------------------------------------------------
# Rendering: moving edges -> events.

_GRID_S = 0.02        # candidate rates are piecewise constant over 20 ms
_POSE_DT = 1e-3       # poses are sampled every 1 ms and interpolated linearly in between
_EDGE_JITTER = 0.4    # px, spreads an edge over neighbouring pixels
_POLARITY_FLIP = 0.03  # share of events with the "wrong" polarity (sensor noise)
_PIECE_S = 2.0       # longest stretch rendered in one call
_CAP_A, _CAP_B, _SIDES = 0, 1, 2  # the three parts of a limb's outline, sampled separately


@dataclass(frozen=True)
class Background:
    """Events that do not come from motion: uniform noise (events/s over the sensor, share of
    ON) and hot pixels (xy int [H, 2], rate Hz [H], share of ON [H])."""

    noise_hz: float
    on_share: float
    hot_xy: np.ndarray
    hot_hz: np.ndarray
    hot_on: np.ndarray


def _limb_arrays(limbs: Sequence[Limb], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Limbs -> endpoints float [K, 4, n] (ax, ay, bx, by) and radii float [K]."""
    ends = np.empty((len(limbs), 4, n))
    for i, limb in enumerate(limbs):
        for j in range(4):
            ends[i, j] = limb[j]
    return ends, np.array([limb.radius for limb in limbs], dtype=np.float64)


def render_segment(
    rng: np.random.Generator,
    t0: float,
    t1: float,
    pose: Callable[[np.ndarray], list[Limb]],
    density: float,
    bg: Background,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Events of [t0, t1) s: edges of `pose(t)` (limbs at absolute times t [N]) emit `density`
    events per px^2 they sweep, plus the background. Returns t float64 [M] s (sorted), x, y, p
    int64 [M].

    Each limb outline has three parts (the half cap at a, the half cap at b, the two sides);
    each part gets candidate events at a rate bounded by its fastest point per 20 ms, and a
    candidate survives with probability |normal speed| / bound (thinning)."""
    dur = t1 - t0
    empty = np.zeros(0, np.int64)
    if dur <= 0:
        return np.zeros(0), empty, empty, empty
    n_grid = max(1, int(np.ceil(dur / _GRID_S)))
    per = max(1, int(round(_GRID_S / _POSE_DT)))     # pose steps per rate interval
    n_fine = n_grid * per
    h = dur / n_fine
    grid, radii = _limb_arrays(pose(t0 + h * np.arange(n_fine + 1)), n_fine + 1)   # [K, 4, F+1]
    n_limbs = radii.shape[0]
    vel = np.diff(grid, axis=2) / h                                              # [K, 4, F]
    speed_a = np.hypot(vel[:, 0], vel[:, 1]).reshape(n_limbs, n_grid, per).max(axis=2)
    speed_b = np.hypot(vel[:, 2], vel[:, 3]).reshape(n_limbs, n_grid, per).max(axis=2)
    lmax = np.hypot(grid[:, 2] - grid[:, 0], grid[:, 3] - grid[:, 1]).max(axis=1) + 1e-6
    # Bound of |normal speed| x outline length per part: [3K, G], limb-major.
    bound = np.stack([speed_a, speed_b, np.maximum(speed_a, speed_b)], axis=1).reshape(3 * n_limbs, n_grid)
    length = np.stack([np.pi * radii, np.pi * radii, 2 * lmax], axis=1).reshape(3 * n_limbs)
    lam = density * length[:, None] * bound                       # candidates/s per part [3K, G]
    bg_hz = bg.noise_hz + float(bg.hot_hz.sum())
    rate = lam.sum(axis=0) + bg_hz                                 # [G]
    cum = np.concatenate([[0.0], np.cumsum(rate * (dur / n_grid))])

    # An inhomogeneous Poisson stream in time order: sorted uniforms in the cumulative rate
    # (cumulated exponentials), mapped back through the piecewise-linear cumulative.
    n = int(rng.poisson(cum[-1]))
    arrivals = rng.standard_exponential(n + 1).cumsum()
    arrivals = arrivals[:-1] * (cum[-1] / arrivals[-1])
    g = np.clip(np.searchsorted(cum, arrivals, side="right") - 1, 0, n_grid - 1)
    t = t0 + g * (dur / n_grid) + (arrivals - cum[g]) / rate[g]
    # Which part (0..3K-1, or 3K: background) a candidate belongs to: one search in the
    # per-interval cumulative shares, offset by the interval index so the table is sorted.
    share = np.cumsum(lam / rate, axis=0)                          # [3K, G]
    table = (share + np.arange(n_grid)).T.reshape(-1)
    comp = np.searchsorted(table, g + rng.random(n), side="right") - g * (3 * n_limbs)

    x = np.full(n, -1, np.int64)
    y = np.full(n, -1, np.int64)
    p = np.zeros(n, np.int64)

    mi = np.flatnonzero(comp < 3 * n_limbs)
    m = mi.shape[0]
    if m:
        part = comp[mi]
        limb, kind = part // 3, part % 3
        pos = (t[mi] - t0) / h
        i = np.clip(pos.astype(np.int64), 0, n_fine - 1)
        f = pos - i
        flat = grid.reshape(-1)
        base = limb * (4 * (n_fine + 1)) + i
        e0 = [flat[base + j * (n_fine + 1)] for j in range(4)]
        e1 = [flat[base + j * (n_fine + 1) + 1] for j in range(4)]
        ax, ay, bx, by = (a + f * (b - a) for a, b in zip(e0, e1))
        vax, vay, vbx, vby = ((b - a) / h for a, b in zip(e0, e1))
        r = radii[limb]
        u = rng.random(m)
        dx, dy = bx - ax, by - ay
        seg = np.hypot(dx, dy)
        ok = seg > 1e-6
        safe = np.where(ok, seg, 1.0)
        ux, uy = np.where(ok, dx / safe, 1.0), np.where(ok, dy / safe, 0.0)
        cap = kind != _SIDES
        # Caps: a half circle of normals turned away from the other end (a disc, a == b, gets
        # both halves around an arbitrary axis). Sides: either side, uniform along the segment.
        theta = np.pi * (u + 0.5) + np.pi * (kind == _CAP_B)
        ct, st = np.cos(theta), np.sin(theta)
        side = np.where(u < 0.5, 1.0, -1.0)
        ell = np.where(kind == _CAP_A, 0.0, np.where(kind == _CAP_B, seg, np.mod(2 * u, 1.0) * lmax[limb]))
        nx = np.where(cap, ux * ct - uy * st, -side * uy)
        ny = np.where(cap, ux * st + uy * ct, side * ux)
        w = np.where(ok, ell / safe, 0.0)
        vn = (vax + w * (vbx - vax)) * nx + (vay + w * (vby - vay)) * ny
        acc = np.flatnonzero((cap | (ell < seg)) & (rng.random(m) * bound[part, g[mi]] < np.abs(vn)))
        a = acc.shape[0]
        jitter = rng.normal(0.0, _EDGE_JITTER, (2, a))
        flip = rng.random(a) < _POLARITY_FLIP
        sel = mi[acc]
        ell, r = ell[acc], r[acc]
        x[sel] = np.floor(ax[acc] + ell * ux[acc] + r * nx[acc] + jitter[0]).astype(np.int64)
        y[sel] = np.floor(ay[acc] + ell * uy[acc] + r * ny[acc] + jitter[1]).astype(np.int64)
        # An edge advancing along its outward normal brightens the pixels it enters: ON.
        p[sel] = (vn[acc] > 0) ^ flip

    ni = np.flatnonzero(comp == 3 * n_limbs)
    k = ni.shape[0]
    if k:
        rates = np.concatenate([[bg.noise_hz], bg.hot_hz])
        which = np.searchsorted(np.cumsum(rates) / bg_hz, rng.random(k), side="right")
        which = np.minimum(which, rates.shape[0] - 1)
        ux_, uy_ = rng.integers(0, SENSOR_W, k), rng.integers(0, SENSOR_H, k)
        on_u = rng.random(k)
        hot = which > 0
        hot_i = np.maximum(which - 1, 0)
        hot_xy = bg.hot_xy.reshape(-1, 2) if bg.hot_xy.size else np.zeros((1, 2), np.int64)
        hot_on = bg.hot_on if bg.hot_on.size else np.zeros(1)
        x[ni] = np.where(hot, hot_xy[hot_i, 0], ux_)
        y[ni] = np.where(hot, hot_xy[hot_i, 1], uy_)
        p[ni] = on_u < np.where(hot, hot_on[hot_i], bg.on_share)

    keep = (x >= 0) & (x < SENSOR_W) & (y >= 0) & (y < SENSOR_H)
    return t[keep], x[keep], y[keep], p[keep]


def generate_recording(plan: RecordingPlan, seed: int, scale: str) -> tuple[np.ndarray, ...]:
    """All events of one planned recording, in time order.

    Returns t int64 [M] µs (non-decreasing, in [plan.begin_us, plan.end_us]), x, y, p uint8 [M].
    """
    spec = SCALES[scale]
    rng = _rng(seed, plan.name, 1)
    body = user_body(seed, plan.user)
    density = spec.density * LIGHTING_CONTRAST[plan.lighting] * body.contrast
    n_hot = int(rng.integers(2, 7))
    bg = Background(
        noise_hz=spec.noise_hz * LIGHTING_NOISE[plan.lighting] * rng.uniform(0.8, 1.25),
        on_share=rng.uniform(0.4, 0.6),
        hot_xy=rng.integers(0, [SENSOR_W, SENSOR_H], (n_hot, 2)),
        hot_hz=rng.uniform(3.0, 40.0, n_hot),
        hot_on=np.where(rng.random(n_hot) < 0.5, 0.1, 0.9),
    )

    def still(t: np.ndarray) -> list[Limb]:
        return body_sway(t, body)

    def moving(gesture: Callable, style: Style, m0: float) -> Callable[[np.ndarray], list[Limb]]:
        return lambda t: body_sway(t, body) + gesture(t - m0, style)

    segments: list[tuple[float, float, Callable[[np.ndarray], list[Limb]]]] = []
    cursor = plan.begin_us / 1e6
    for row in plan.rows:
        m0, m1 = row.motion_start_us / 1e6, row.motion_end_us / 1e6
        style = gesture_style(rng, body, row.cls, m1 - m0)
        segments.append((cursor, m0, still))
        segments.append((m0, m1, moving(GESTURES[row.cls - 1], style, m0)))
        cursor = m1
    segments.append((cursor, plan.end_us / 1e6, still))

    # Render at most _PIECE_S at a time: bounds the memory of a worker (~hundreds of MB at full scale).
    parts = []
    for a, b, pose in segments:
        cuts = np.linspace(a, b, max(1, int(np.ceil((b - a) / _PIECE_S))) + 1)
        parts += [render_segment(rng, c0, c1, pose, density, bg) for c0, c1 in zip(cuts[:-1], cuts[1:])]
    t = np.concatenate([q[0] for q in parts])
    t_us = np.floor(t * 1e6).astype(T_DTYPE)
    return (t_us, *(np.concatenate([q[i] for q in parts]).astype(XY_DTYPE) for i in (1, 2, 3)))


# ----------------------------------------------------------------------------------------------
# Writing the release.

LABEL_HEADER = "class,startTime_usec,endTime_usec"
CRLF = "\r\n"


def labels_csv(plan: RecordingPlan) -> bytes:
    """`<recording>_labels.csv` bytes: the header, then one `class,start,end` row per sample (CRLF)."""
    lines = [LABEL_HEADER] + [f"{r.cls},{r.start_us},{r.end_us}" for r in plan.rows]
    return (CRLF.join(lines) + CRLF).encode("ascii")


def gesture_mapping_csv() -> bytes:
    """`gesture_mapping.csv` bytes: `action,label` then each gesture name with its class 1..11."""
    lines = ["action,label"] + [f"{name},{i}" for i, name in enumerate(GESTURE_NAMES, start=1)]
    return (CRLF.join(lines) + CRLF).encode("ascii")


# The record of a synthetic release, written beside its files (see `synth_record`).
SYNTH_RECORD = "SYNTHETIC.json"
SYNTH_FORMAT = "dvsprep-synth/1"


def readme_txt(plan: ReleasePlan) -> bytes:
    """README.txt bytes: says plainly that the data is synthetic and how it was made."""
    users = sorted({r.user for r in plan.recordings})
    test = sorted({r.user for r in plan.recordings if r.split == "test"})
    lines = [
        "SYNTHETIC DATA - this is NOT the IBM DVS128 Gesture dataset.",
        "",
        f"Written by `dvsprep synth` (dvsgesture-kit {__version__}) with --scale {plan.scale} "
        f"--seed {plan.seed} --users {len(users)} --test-users {len(test)}.",
        "No sensor recorded these events: a kinematic model of hands and arms moving in front of",
        "a 128x128 event camera emitted them (ON events where an edge advances, OFF where it",
        "retreats, plus background noise and hot pixels). The same command and seed write the",
        "same bytes.",
        "",
        "The files follow the layout of the IBM release so that tools written for it run",
        "unchanged: userNN_<lighting>.aedat (AEDAT 3.1 polarity packets), userNN_<lighting>_labels.csv",
        "(class,startTime_usec,endTime_usec; one row per sample), trials_to_train.txt,",
        "trials_to_test.txt and gesture_mapping.csv. Test users are the highest-numbered users.",
        f"{SYNTH_RECORD} records these options and every file's md5: `dvsprep verify` checks",
        "the release against it.",
        "",
        f"Recordings: {len(plan.names('train'))} train, {len(plan.names('test'))} test. "
        f"Samples: {plan.n_samples('train')} train, {plan.n_samples('test')} test.",
        "",
        "Accuracy measured on this data says nothing about the real dataset. For the real",
        "DVS128 Gesture release (IBM, CC BY 4.0) see https://research.ibm.com/interactive/dvsgesture/",
    ]
    return (CRLF.join(lines) + CRLF).encode("ascii")


def write_recording(plan: RecordingPlan, seed: int, scale: str, folder: str | os.PathLike) -> tuple[str, int, int]:
    """Generate and write `<name>.aedat` and `<name>_labels.csv` into `folder`.
    Returns (name, events written, bytes written)."""
    folder = Path(folder)
    t, x, y, p = generate_recording(plan, seed, scale)
    aedat = folder / f"{plan.name}.aedat"
    write_aedat(aedat, polarity_packets(t, x, y, p, events_per_packet=SCALES[scale].events_per_packet))
    labels = folder / f"{plan.name}_labels.csv"
    labels.write_bytes(labels_csv(plan))
    return plan.name, int(t.shape[0]), aedat.stat().st_size + labels.stat().st_size


def _write_task(args: tuple[RecordingPlan, int, str, str]) -> tuple[str, int, int]:
    return write_recording(*args)


def _results(tasks: list[tuple[RecordingPlan, int, str, str]], jobs: int) -> Iterator[tuple[str, int, int]]:
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _write_task(task)
        return
    # Workers ignore SIGINT: on Ctrl-C the parent alone stops the pool and removes the
    # temporary release, and click prints "Aborted!" (no worker tracebacks).
    pool = process_pool(min(jobs, len(tasks)))
    try:
        with worker_deaths(Path(tasks[0][3]).parent / RELEASE_DIR):
            todo = iter(tasks)
            running = {pool.submit(_write_task, t) for t in itertools.islice(todo, 2 * jobs)}
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    nxt = next(todo, None)
                    if nxt is not None:
                        running.add(pool.submit(_write_task, nxt))
                    yield fut.result()
    except BaseException:   # an error, Ctrl-C, SIGTERM, or the consumer closing us early
        stop_pool(pool, kill=True)
        pool = None
        raise
    finally:
        stop_pool(pool)


@dataclass
class SynthSummary:
    """What `write_release` wrote. per_class: samples per label 0..10 and split."""

    path: Path
    scale: str
    seed: int
    recordings: dict[str, int]
    samples: dict[str, int]
    per_class: dict[str, list[int]]
    events: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"wrote {self.path} (synthetic, scale {self.scale}, seed {self.seed})",
            f"recordings: train {self.recordings['train']}, test {self.recordings['test']}; "
            f"samples: train {self.samples['train']}, test {self.samples['test']}",
        ]
        for s in SPLITS:
            out.append(f"  {s} per class: " + " ".join(str(c) for c in self.per_class[s]))
        out.append(f"events: {self.events:,}; bytes: {self.bytes:,}")
        out.append(f"seconds: {self.seconds:.2f}")
        return out


def _write_into(tmp: Path, plan: ReleasePlan, seed: int, scale: str, jobs: int, progress: bool,
                summary: SynthSummary) -> None:
    """Write every file of the release into the folder `tmp`, counting into `summary`."""
    tasks = [(rec, seed, scale, str(tmp)) for rec in plan.recordings]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), unit="rec", desc="synth")
    try:
        with contextlib.closing(_results(tasks, jobs)) as results:  # stop the pool at once on errors
            for name, n_events, n_bytes in results:
                log.info("%s: %d events", name, n_events)
                summary.events += n_events
                summary.bytes += n_bytes
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    texts = {
        TRIAL_LISTS["train"]: (CRLF.join(plan.names("train")) + CRLF).encode("ascii"),
        TRIAL_LISTS["test"]: (CRLF.join(plan.names("test")) + CRLF).encode("ascii"),
        "gesture_mapping.csv": gesture_mapping_csv(),
        "README.txt": readme_txt(plan),
    }
    for fname, data in texts.items():
        (tmp / fname).write_bytes(data)
        summary.bytes += len(data)
    record = synth_record(plan, md5_files(tmp, jobs))   # just written: read from the page cache
    (tmp / SYNTH_RECORD).write_bytes(record)    # last: a release without it was not finished
    summary.bytes += len(record)


def synth_record(plan: ReleasePlan, md5s: dict[str, str]) -> bytes:
    """SYNTH_RECORD's bytes: what `dvsprep synth` wrote (its options and every file's md5), so that
    `dvsprep verify` checks a synthetic release against it instead of the published md5s."""
    users = sorted({r.user for r in plan.recordings})
    test = sorted({r.user for r in plan.recordings if r.split == "test"})
    record = {"format": SYNTH_FORMAT, "tool": "dvsprep synth", "version": __version__, "seed": plan.seed,
              "scale": plan.scale, "users": len(users), "test_users": len(test), "md5": md5s}
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("ascii")


def write_release(
    out_dir: str | os.PathLike,
    *,
    users: int | None = None,
    test_users: int | None = None,
    seed: int = 0,
    scale: str = "small",
    jobs: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> SynthSummary:
    """Write a synthetic release to `out_dir/DvsGesture/` (see `plan_release` for what it holds).

    The release is assembled in a temporary folder beside it and renamed into place, so an
    interrupted run leaves nothing that looks like a release. An existing `DvsGesture/` is an
    error unless `force`. `jobs` worker processes (default: number of CPUs) write recordings in
    parallel; the bytes do not depend on `jobs`.
    """
    t_start = time.perf_counter()
    plan = plan_release(users=users, test_users=test_users, seed=seed, scale=scale)
    out_dir = Path(out_dir)
    target = out_dir / RELEASE_DIR
    check_output(target, "synthetic release", force=force, kind="dir", parent=False)
    summary = SynthSummary(
        path=target, scale=scale, seed=seed,
        recordings={s: len(plan.names(s)) for s in SPLITS},
        samples={s: plan.n_samples(s) for s in SPLITS},
        per_class={s: list(plan.class_counts(s)) for s in SPLITS},
    )
    with publishing(target, "synthetic release", force=force, kind="dir", parent=False) as tmp:
        tmp.mkdir()
        _write_into(tmp, plan, seed, scale, jobs or os.cpu_count() or 1, progress, summary)
    summary.seconds = time.perf_counter() - t_start
    return summary
