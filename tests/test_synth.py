from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dvsprep.raw import synth
from dvsprep.raw.aedat import PACKET_HEADER, read_aedat
from dvsprep.cli import main
from dvsprep.constants import GESTURE_NAMES, N_CLASSES
from dvsprep.errors import StoreExistsError
from dvsprep.events.store import EventsFile
from dvsprep.raw.release import cut_samples, load_published_manifest, parse_labels, parse_trials

from previous_output import lay_previous, tree

SEED = 7


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, synth.SynthSummary]:
    """The smallest release: users 01 and 02 (5 lightings each), user02 is the test user."""
    out = tmp_path_factory.mktemp("synth")
    summary = synth.write_release(out, users=2, seed=SEED, jobs=2)
    return out, summary


def _rows_ok(rec: synth.RecordingPlan) -> None:
    classes = [r.cls for r in rec.rows]
    assert len(classes) == 12 and sorted(set(classes)) == list(range(1, 12))
    assert rec.begin_us < rec.rows[0].start_us  # unlabeled lead-in
    for r in rec.rows:
        assert r.start_us < r.motion_start_us < r.motion_end_us < r.end_us
    for a, b in zip(rec.rows[:-1], rec.rows[1:]):
        assert a.start_us < b.start_us and a.motion_end_us < b.start_us
    assert rec.rows[-1].end_us < rec.end_us


def test_full_plan_is_the_real_release_shape():
    plan = synth.plan_release(scale="full")
    published = load_published_manifest()
    assert plan.names("train") == published["train"] and plan.names("test") == published["test"]
    assert (len(plan.names("train")), len(plan.names("test"))) == (98, 24)
    assert (plan.n_samples("train"), plan.n_samples("test")) == (1176, 288)
    for rec in plan.recordings:
        _rows_ok(rec)
    # Per class: one sample per recording plus the repeats of that class.
    for split in ("train", "test"):
        repeats = [0] * N_CLASSES
        for rec in plan.recordings:
            if rec.split == split:
                classes = [r.cls for r in rec.rows]
                repeats[max(set(classes), key=classes.count) - 1] += 1
        n_rec = len(plan.names(split))
        assert plan.class_counts(split) == tuple(n_rec + r for r in repeats)
        assert sum(plan.class_counts(split)) == 12 * n_rec
    overlapping = [
        (rec.name, a.cls, b.cls) for rec in plan.recordings
        for a, b in zip(rec.rows[:-1], rec.rows[1:]) if a.end_us > b.start_us
    ]
    assert overlapping == [("user22_led", 9, 10)]


def test_small_plan_defaults_and_determinism():
    plan = synth.plan_release()
    assert [r.name for r in plan.recordings if r.user == 3] == [
        "user03_fluorescent", "user03_fluorescent_led", "user03_led", "user03_natural"]
    assert {r.user for r in plan.recordings if r.split == "test"} == {5, 6}
    assert (plan.n_samples("train"), plan.n_samples("test")) == (216, 120)
    assert synth.plan_release() == plan
    assert synth.plan_release(seed=1) != plan
    # Users beyond the real release get all five lightings; the test users are the highest.
    big = synth.plan_release(users=31, test_users=3)
    assert [r.name for r in big.recordings if r.user == 31] == [f"user31_{x}" for x in
                                                                ("fluorescent", "fluorescent_led", "lab", "led", "natural")]
    assert {r.user for r in big.recordings if r.split == "test"} == {29, 30, 31}
    assert sum(a.end_us > b.start_us for rec in big.recordings for a, b in zip(rec.rows, rec.rows[1:])) == 1


@pytest.mark.parametrize("kw, msg", [
    (dict(users=1), "--users 1"),
    (dict(users=3, test_users=3), "--test-users 3"),
    (dict(scale="huge"), "--scale 'huge'"),
    (dict(seed=-1), "--seed -1"),
])
def test_bad_parameters(kw, msg):
    with pytest.raises(synth.SynthParameterError, match=msg):
        synth.plan_release(**kw)


def test_label_and_mapping_bytes():
    rows = (synth.RowPlan(3, 1000, 2000, 1100, 1900), synth.RowPlan(8, 2500, 4000, 2600, 3900))
    rec = synth.RecordingPlan("user01_lab", 1, "lab", "train", 0, 5000, rows)
    assert synth.labels_csv(rec) == b"class,startTime_usec,endTime_usec\r\n3,1000,2000\r\n8,2500,4000\r\n"
    mapping = synth.gesture_mapping_csv().decode().split("\r\n")
    assert mapping[0] == "action,label" and mapping[1] == "hand_clapping,1"
    assert mapping[1:12] == [f"{n},{i}" for i, n in enumerate(GESTURE_NAMES, 1)] and mapping[12] == ""


def test_release_layout(release):
    out, summary = release
    rel = out / "DvsGesture"
    plan = synth.plan_release(users=2, seed=SEED)
    stems = [r.name for r in plan.recordings]
    expected = {f"{s}.aedat" for s in stems} | {f"{s}_labels.csv" for s in stems}
    expected |= {"trials_to_train.txt", "trials_to_test.txt", "gesture_mapping.csv", "README.txt", "SYNTHETIC.json"}
    assert {p.name for p in rel.iterdir()} == expected
    assert [p.name for p in out.iterdir()] == ["DvsGesture"]  # no temporary folder left
    assert parse_trials(rel / "trials_to_train.txt") == [f"user01_{x}.aedat" for x in
                                                         ("fluorescent", "fluorescent_led", "lab", "led", "natural")]
    assert (rel / "trials_to_test.txt").read_bytes().startswith(b"user02_fluorescent.aedat\r\n")
    assert b"SYNTHETIC DATA - this is NOT the IBM DVS128 Gesture dataset." in (rel / "README.txt").read_bytes()
    assert summary.recordings == {"train": 5, "test": 5} and summary.samples == {"train": 60, "test": 60}
    assert summary.per_class == {s: list(plan.class_counts(s)) for s in ("train", "test")}
    for rec in plan.recordings:
        rows = parse_labels(rel / f"{rec.name}_labels.csv")
        assert rows.label.tolist() == [r.cls - 1 for r in rec.rows]
        assert rows.start.tolist() == [r.start_us for r in rec.rows]
        assert rows.end.tolist() == [r.end_us for r in rec.rows]
        # SpikingJelly parses the label csv this way.
        sj = np.loadtxt(rel / f"{rec.name}_labels.csv", dtype=np.uint32, delimiter=",", skiprows=1)
        assert sj.tolist() == [[r.cls, r.start_us, r.end_us] for r in rec.rows]


def test_aedat_is_what_spikingjelly_reads(release):
    from spikingjelly.datasets.utils import load_aedat_v3

    out, _ = release
    path = min((out / "DvsGesture").glob("*.aedat"), key=lambda q: q.stat().st_size)  # SJ is slow
    data = path.read_bytes()
    assert data.startswith(b"#!AER-DAT3.1\r\n") and b"#!END-HEADER\r\n" in data
    ev = read_aedat(path)
    assert ev.n_invalid == 0
    sj = load_aedat_v3(path)
    for k in "txyp":
        np.testing.assert_array_equal(sj[k].astype(np.int64), getattr(ev, k).astype(np.int64), err_msg=k)
    # Many packets, each with capacity == number == valid (SpikingJelly decodes all of capacity).
    pos, n_packets = data.index(b"#!END-HEADER\r\n") + 14, 0
    while pos < len(data):
        h = np.frombuffer(data, PACKET_HEADER, 1, pos)[0]
        assert h["type"] == 1 and h["capacity"] == h["number"] == h["valid"] > 0
        pos += 28 + int(h["capacity"]) * int(h["size"])
        n_packets += 1
    assert pos == len(data) and n_packets > 100


def test_events_are_realistic(release):
    out, summary = release
    rel = out / "DvsGesture"
    total = 0
    for rec in synth.plan_release(users=2, seed=SEED).recordings:
        ev = read_aedat(rel / f"{rec.name}.aedat")
        total += len(ev)
        assert np.all(np.diff(ev.t) >= 0)
        assert rec.begin_us <= ev.t[0] < rec.rows[0].start_us and ev.t[-1] <= rec.end_us
        assert 0.35 < ev.p.mean() < 0.65
        rows = parse_labels(rel / f"{rec.name}_labels.csv")
        sizes = np.array([len(ev.t[s]) for s in cut_samples(ev.t, rows)])
        assert np.all((sizes > 8_000) & (sizes < 120_000)), sizes
        # The lead-in and the gaps hold only background: far fewer events per second.
        lead = np.searchsorted(ev.t, rec.rows[0].start_us) / ((rec.rows[0].start_us - ev.t[0]) / 1e6)
        inside = sizes.sum() / (sum(r.end_us - r.start_us for r in rec.rows) / 1e6)
        assert lead < inside / 3
    assert total == summary.events


def test_convert_reads_the_release(release, tmp_path):
    from dvsprep.events.convert import convert_release

    out, summary = release
    plan = synth.plan_release(users=2, seed=SEED)
    res = convert_release(out, tmp_path / "data", jobs=1)
    assert res.samples == summary.samples and res.invalid_dropped == 0 and res.events == summary.events
    with EventsFile(tmp_path / "data" / "events.h5") as ef:
        for split in ("train", "test"):
            sp = ef.split(split)
            recs = [r for r in plan.recordings if r.split == split]
            assert len(sp) == 12 * len(recs)
            assert sp.labels.tolist() == [row.cls - 1 for r in recs for row in r.rows]
            assert sp.recordings == [r.name for r in recs for _ in r.rows]
        # The overlapping windows of the train recording share their events.
        sp = ef.split("train")
        over = [i for i in range(len(sp) - 1)
                if sp.recordings[i] == sp.recordings[i + 1] and sp.t_end[i] > sp.t_start[i + 1]]
        assert len(over) == 1
        a, b = sp.sample(over[0]), sp.sample(over[0] + 1)
        shared = a["t"][a["t"] >= sp.t_start[over[0] + 1]]
        assert shared.size > 0 and np.array_equal(shared, b["t"][: shared.size])


def test_same_seed_same_bytes_whatever_jobs(release, tmp_path):
    out, _ = release
    before = _hashes(out / "DvsGesture")
    with pytest.raises(StoreExistsError, match="already exists"):
        synth.write_release(out, users=2, seed=SEED)
    synth.write_release(out, users=2, seed=SEED, jobs=1, force=True)  # replaces in place
    assert _hashes(out / "DvsGesture") == before
    assert [p.name for p in out.iterdir()] == ["DvsGesture"]
    rec = synth.plan_release(users=2, seed=SEED + 1).recordings[0]
    other = synth.generate_recording(rec, SEED + 1, "small")[0]
    assert other.shape != read_aedat(out / "DvsGesture" / f"{rec.name}.aedat").t.shape


def _style(direction_free_cycles: int = 3) -> synth.Style:
    return synth.Style(cx=64, cy=52, scale=1.0, tempo=1.0, duration=3.0, cycles=direction_free_cycles)


@pytest.mark.parametrize("cls", range(1, 12))
def test_gesture_shapes(cls):
    t = np.linspace(0, 3, 50)
    limbs = synth.GESTURES[cls - 1](t, _style())
    assert limbs
    for limb in limbs:
        for coord in limb[:4]:
            assert np.broadcast_to(coord, t.shape).shape == (50,)
            assert np.all(np.isfinite(coord))
        assert limb.radius > 0


def _render(cls: int, seed: int) -> tuple[np.ndarray, ...]:
    style = _style()
    bg = synth.Background(0.0, 0.5, np.zeros((0, 2), np.int64), np.zeros(0), np.zeros(0))
    return synth.render_segment(np.random.default_rng(seed), 0.0, style.duration,
                                lambda t: synth.GESTURES[cls - 1](t, style), 2.0, bg)


def test_clockwise_and_counter_clockwise_differ_only_in_time():
    """Same pixels and polarities over the whole gesture; opposite order in time."""
    cw, ccw = _render(4, 0), _render(5, 1)
    maps = []
    for t, x, y, p in (cw, ccw):
        maps.append(np.bincount((p * 16 + y // 8) * 16 + x // 8, minlength=512).astype(float))
        # Polarity: ON at the leading edge, OFF at the trailing edge, equally often.
        assert 0.45 < p.mean() < 0.55
    # Time-summed 8x8-pooled count maps agree to within Poisson noise...
    diff = (maps[0] - maps[1]) / np.sqrt(maps[0] + maps[1] + 1)
    assert np.abs(diff).max() < 5 and np.corrcoef(maps[0], maps[1])[0, 1] > 0.98
    # ...but in the first sixth the hand of the clockwise circle goes left from the bottom
    # (y points down) and the counter-clockwise one goes right.
    first = [x[t < 0.15 * t.max()].mean() for t, x, _, _ in (cw, ccw)]
    assert first[0] < first[1] - 5


def test_edges_emit_on_ahead_and_off_behind():
    """Clapping hands start together and part: the image-left hand moves left, so its ON
    events lie left of its OFF events; while the hands close again it is the other way round."""
    t, x, y, p = _render(1, 2)
    style = _style()
    period = 1 / 1.7
    for (a, b), sign in (((0.05, 0.45), -1), ((0.55, 0.95), 1)):
        sel = (t > a * period) & (t < b * period) & (x < style.cx)
        assert sign * (x[sel & (p == 1)].mean() - x[sel & (p == 0)].mean()) > 3


def test_cli(tmp_path):
    runner = CliRunner()
    (tmp_path / "DvsGesture").mkdir()
    r = runner.invoke(main, ["synth", str(tmp_path), "--users", "2"])
    assert r.exit_code == 1 and r.output.strip() == f"error: {tmp_path / 'DvsGesture'}: already exists (use --force to replace it)"
    r = runner.invoke(main, ["synth", str(tmp_path / "x"), "--users", "3", "--test-users", "3"])
    assert r.exit_code == 1 and "--test-users 3: must be at least 1 and fewer than --users (3)" in r.output
    assert not (tmp_path / "x" / "DvsGesture").exists()
    before = lay_previous(tmp_path / "y" / "DvsGesture", "dir")     # one --force would replace: kept
    r = runner.invoke(main, ["synth", str(tmp_path / "y"), "--users", "3", "--test-users", "3", "--force"])
    assert r.exit_code == 1 and "--test-users 3: must be at least 1 and fewer than --users (3)" in r.output
    assert tree(tmp_path / "y") == before
    r = runner.invoke(main, ["synth", str(tmp_path / "x"), "--scale", "huge"])
    assert r.exit_code == 2


def test_a_second_writer_of_the_same_release_refuses(tmp_path):
    from dvsprep.atomic import output_lock
    from dvsprep.errors import OutputLockedError

    with output_lock(tmp_path / "DvsGesture"):
        with pytest.raises(OutputLockedError, match="DvsGesture: synthetic release is being written by another"):
            synth.write_release(tmp_path, users=2, test_users=1, jobs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    before = lay_previous(tmp_path / "DvsGesture", "dir")   # with force, over a previous release
    with output_lock(tmp_path / "DvsGesture"):
        with pytest.raises(OutputLockedError, match="DvsGesture: synthetic release is being written by another"):
            synth.write_release(tmp_path, users=2, test_users=1, jobs=1, force=True)
    assert tree(tmp_path) == before
