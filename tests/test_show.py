"""Rendering samples as pictures (dvsprep.show) and the `dvsprep show` command."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from dvsprep import show as S
from dvsprep.cli import main
from dvsprep.constants import GESTURE_NAMES
from dvsprep.events.convert import convert_release
from dvsprep.events.store import EventsFile
from dvsprep.frames.build import build_frame_store
from dvsprep.frames.store import write_frame_store_from_arrays
from dvsprep.frames.integrate import integrate

from aedat_fixtures import small_release
from previous_output import lay_previous, tree

Image = pytest.importorskip("PIL.Image")

T = 4
ON, OFF, BOTH = S.ON_RGB, S.OFF_RGB, (255, 255, 233)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _rgb(path, frame=0):
    with Image.open(path) as im:
        im.seek(frame)
        return np.asarray(im.convert("RGB"))


def _tile_origin(k, *, scale, columns, lines=3):
    tile = 128 * scale
    return (S.GAP + (k % columns) * (tile + S.GAP), lines * S.LINE_H + S.GAP + (k // columns) * (tile + S.GAP))


def _pixel_block(img, k, y, x, *, scale, columns, lines=3):
    """The scale x scale block showing sensor pixel (y, x) of frame k."""
    x0, y0 = _tile_origin(k, scale=scale, columns=columns, lines=lines)
    return img[y0 + y * scale : y0 + (y + 1) * scale, x0 + x * scale : x0 + (x + 1) * scale]


def _known_frames():
    """Test sample 0 of the tiny store: single events, so saturation is 1 and every event is full colour."""
    f = np.zeros((T, 2, 128, 128), np.uint8)
    f[0, 1, 0, 127] = 1     # ON, top-right corner of frame 0
    f[1, 0, 10, 20] = 1     # OFF
    f[2, 1, 127, 0] = 1     # ON, bottom-left corner
    f[2, 1, 64, 64] = 1     # ON and OFF on one pixel
    f[2, 0, 64, 64] = 1
    f[3, 1, 5, 6] = 1
    return f


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("show_store")
    frames = np.zeros((3, T, 2, 128, 128), np.uint8)
    frames[0] = _known_frames()
    frames[1, :, 1, 30, 40] = [1, 2, 4, 200]   # a busier sample of the same class
    frames[2, 3, 0, 100, 100] = 3
    test = {"frames": frames, "label": [2, 2, 7], "recording": ["user02_lab", "user02_lab", "user03_led"],
            "row": [0, 3, 1], "t_start": [0, 10, 20], "t_end": [5, 15, 25],
            "n_events": frames.reshape(3, -1).sum(1)}
    train = {k: v[:1] for k, v in test.items()}
    path = root / "frames_T4_number.zarr"
    write_frame_store_from_arrays(path, T=T, splits={"train": train, "test": test})
    return path


@pytest.fixture(scope="module")
def events_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("show_events")
    small_release(root / "raw")
    convert_release(root / "raw", root / "data", jobs=1)
    build_frame_store(root / "data" / "events.h5", root / "data" / "frames_T4_number.zarr", T=T,
                      split_by="number", jobs=1)
    return root / "data"


# ----------------------------------------------------------------------------- pure rendering


def test_intensity_levels_follow_the_documented_rule():
    for sat in (1, 2, 3, 7, 16, 99):
        counts = np.arange(0, 3 * sat + 2)
        got = S.intensity_levels(counts, sat)
        # level = ceil(LEVELS * sqrt(min(c, sat) / sat)), exactly, via integer square roots
        want = [0 if c == 0 else next(L for L in range(1, S.LEVELS + 1) if L * L * sat >= S.LEVELS**2 * min(c, sat))
                for c in counts]
        assert got.tolist() == want
    assert S.intensity_levels(np.array([0, 1, 4, 16, 17]), 16).tolist() == [0, 2, 4, 8, 8]
    assert math.ceil(S.LEVELS * math.sqrt(1 / 16)) == 2


def test_colours_and_mix():
    off = np.array([0, 1, 0, 1, 1])
    on = np.array([0, 0, 1, 1, 0])
    rgb = S.colourize(off, on, sat=1)
    assert rgb.dtype == np.uint8
    assert [tuple(v) for v in rgb] == [(0, 0, 0), OFF, ON, BOTH, OFF]
    half = S.colourize(np.array([0]), np.array([1]), sat=4)  # level 4 of 8: half of ON, rounded
    assert tuple(half[0]) == tuple((c * 4 + 4) // 8 for c in ON)


def test_saturation_rule():
    assert S.saturation(np.zeros((2, 3))) == 1
    assert S.saturation(np.array([0, 0, 5])) == 5
    vals = np.arange(1, 101)
    assert S.saturation(vals) == math.ceil(np.percentile(vals, 99)) == 100


def test_grid_size_positions_and_orientation():
    f = _known_frames()
    for scale, columns in ((1, 4), (3, 3)):
        pic = S.grid_picture(f, ["a", "b", "c"], scale=scale, columns=columns)
        c = min(columns, T)
        r = -(-T // c)
        tile = 128 * scale
        assert pic.size == (c * tile + (c + 1) * S.GAP, 3 * S.LINE_H + r * tile + (r + 1) * S.GAP)
        img = pic.rgb
        kw = dict(scale=scale, columns=c)
        assert (_pixel_block(img, 0, 0, 127, **kw) == ON).all()      # y = 0 is the top row
        assert (_pixel_block(img, 1, 10, 20, **kw) == OFF).all()
        assert (_pixel_block(img, 2, 127, 0, **kw) == ON).all()
        assert (_pixel_block(img, 2, 64, 64, **kw) == BOTH).all()
        assert (_pixel_block(img, 3, 5, 6, **kw) == ON).all()
        assert (_pixel_block(img, 0, 127, 0, **kw) == 0).all()       # no event: black
        x0, y0 = _tile_origin(0, **kw, lines=3)
        assert (img[y0 - 1, x0] == S.GAP_RGB).all() and (img[y0, x0 - 1] == S.GAP_RGB).all()
        # exactly the event pixels are coloured
        assert int((img[3 * S.LINE_H:] != 0).any(-1).sum() - (img[3 * S.LINE_H:] == S.GAP_RGB).all(-1).sum()) \
            == 5 * scale * scale
        assert [t[2] for t in pic.texts] == ["a", "b", "c"] and pic.texts[1][1] == S.LINE_H + 2


def test_animation_and_sheet_sizes():
    f = _known_frames()
    frames = S.animation_pictures(f, ["x"], scale=2)
    assert len(frames) == T and {p.size for p in frames} == {(256 + 2 * S.GAP, 2 * S.LINE_H + 256 + 2 * S.GAP)}
    assert frames[2].texts[-1][2] == "frame 3/4"
    sheet = S.sheet_picture([(f, "one"), (f, "two"), (f, "three")], ["h"], scale=1)
    assert sheet.size == (T * 128 + (T + 1) * S.GAP, S.LINE_H + 3 * (S.LINE_H + 128 + 2 * S.GAP))
    row1 = S.LINE_H + (S.LINE_H + 128 + 2 * S.GAP) + S.LINE_H + S.GAP  # top of sample two's tiles
    x0 = S.GAP + 2 * (128 + S.GAP)
    assert tuple(sheet.rgb[row1 + 64, x0 + 64]) == BOTH


def test_raster_bins_time_and_polarity():
    t = np.array([100, 100, 149, 150, 199])
    coord = np.array([0, 5, 127, 6, 7])
    p = np.array([1, 0, 1, 1, 0])
    r = S.raster(coord, t, p, t_start=100, t_end=200, width=10, size=128)
    assert r.shape == (2, 128, 10) and r.sum() == 5
    assert r[1, 0, 0] == 1 and r[0, 5, 0] == 1 and r[1, 127, 4] == 1 and r[1, 6, 5] == 1 and r[0, 7, 9] == 1


def test_show_does_not_import_pillow_until_saving():
    code = "import sys, dvsprep.show, dvsprep.cli; assert 'PIL' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- command line


def test_png_from_frame_store(store, tmp_path):
    out = tmp_path / "s.png"
    res = _cli("show", store, "--sample", "user02_lab:0", "--scale", "2", "--columns", "2", "-o", out)
    assert res.exit_code == 0, res.output
    assert f"wrote {out} (PNG, 518x560 px): user02_lab:0" in res.output
    img = _rgb(out)
    assert img.shape == (3 * S.LINE_H + 2 * 256 + 3 * S.GAP, 2 * 256 + 3 * S.GAP, 3) == (560, 518, 3)
    kw = dict(scale=2, columns=2)
    assert (_pixel_block(img, 0, 0, 127, **kw) == ON).all()
    assert (_pixel_block(img, 1, 10, 20, **kw) == OFF).all()
    assert (_pixel_block(img, 2, 64, 64, **kw) == BOTH).all()
    assert (_pixel_block(img, 3, 100, 100, **kw) == 0).all()
    assert (img[: 3 * S.LINE_H] == S.TEXT_RGB).all(-1).sum() > 200  # title drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]
    with Image.open(out) as im:
        assert im.mode == "P"  # exact palette, not dithered
    # the same sample by index gives the same picture
    assert _cli("show", store, "--sample", "0", "--columns", "2", "-o", tmp_path / "i.png").exit_code == 0
    assert (_rgb(tmp_path / "i.png") == img).all()


def test_gif_from_frame_store(store, tmp_path):
    out = tmp_path / "a.gif"
    res = _cli("show", store, "--sample", "0", "-o", out, "--fps", "10")
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        assert im.n_frames == T and im.size == (256 + 2 * S.GAP, 4 * S.LINE_H + 256 + 2 * S.GAP)
        assert im.info["duration"] == 100
    for k, (y, x, colour) in enumerate([(0, 127, ON), (10, 20, OFF), (64, 64, BOTH), (5, 6, ON)]):
        img = _rgb(out, k)
        assert (_pixel_block(img, 0, y, x, scale=2, columns=1, lines=4) == colour).all()
        assert (_pixel_block(img, 0, 100, 100, scale=2, columns=1, lines=4) == 0).all()


def test_contact_sheet_by_name_number_and_all(store, tmp_path):
    out = tmp_path / "sheet.png"
    res = _cli("show", store, "--label", GESTURE_NAMES[2], "--count", "5", "-o", out)
    assert res.exit_code == 0, res.output
    assert "user02_lab:0, user02_lab:3" in res.output   # both samples of class 2, in store order
    img = _rgb(out)
    assert img.shape == (S.LINE_H + 2 * (S.LINE_H + 128 + 2 * S.GAP), T * 128 + (T + 1) * S.GAP, 3)
    top = S.LINE_H + S.LINE_H + S.GAP
    assert tuple(img[top + 0, S.GAP + 127]) == ON
    assert _cli("show", store, "--label", "2", "--count", "5", "-o", tmp_path / "n.png").exit_code == 0
    assert (_rgb(tmp_path / "n.png") == img).all()
    res = _cli("show", store, "--label", "all", "-o", tmp_path / "all.png")
    assert res.exit_code == 0 and "user02_lab:0, user03_led:1" in res.output


def test_events_picture_matches_frame_store(events_root, tmp_path):
    ev_png, st_png = tmp_path / "ev.png", tmp_path / "st.png"
    r1 = _cli("show", events_root / "events.h5", "--split", "train", "--sample", "user01_lab:2", "-T", T,
              "--scale", "1", "-o", ev_png)
    r2 = _cli("show", events_root / "frames_T4_number.zarr", "--split", "train", "--sample", "user01_lab:2",
              "--scale", "1", "-o", st_png)
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    ev, st = _rgb(ev_png), _rgb(st_png)
    grid_h = st.shape[0]
    assert ev.shape == (grid_h + 2 * (S.LINE_H + 128 + 2 * S.GAP), st.shape[1], 3)
    band = 3 * S.LINE_H
    assert (ev[band:grid_h] == st[band:grid_h]).all()   # frames integrated from events == stored frames
    with EventsFile(events_root / "events.h5") as ef:
        sp = ef.split("train")
        i = next(k for k, (r, w) in enumerate(zip(sp.recordings, sp.rows)) if (r, w) == ("user01_lab", 2))
        e = sp.sample(i)
        t0, t1 = int(sp.t_start[i]), int(sp.t_end[i])
    f = integrate(e["t"], e["x"], e["y"], e["p"], T, "number")
    on_only = np.argwhere((f[:, 1] > 0) & (f[:, 0] == 0))[0]
    k, y, x = on_only
    px = _pixel_block(ev, k, y, x, scale=1, columns=4)[0, 0]
    assert px[0] > px[2] and px[1] > px[2] and px[2] == 0  # an ON-only pixel is a shade of orange
    # the x raster: the column of the first event shows something at row x
    w = st.shape[1] - 2 * S.GAP
    col = (int(e["t"][0]) - t0) * w // (t1 - t0)
    top = grid_h + S.LINE_H + S.GAP
    assert (ev[top + int(e["x"][0]), S.GAP + col] != 0).any()


@pytest.mark.parametrize("args, msg", [
    (["--sample", "user09_lab:0"], "no sample user09_lab:0"),
    (["--sample", "3"], "sample index 3 out of range (3 samples)"),
    (["--sample", "foo"], "neither an index nor RECORDING:ROW"),
    (["--label", "1"], "no samples of label 1 (right_hand_wave)"),
    (["--label", "2", "--sample", "0"], "not both"),
    (["--count", "2"], "count applies to a label"),
    (["-T", "8"], "-T/--split-by apply to events.h5 only"),
])
@pytest.mark.parametrize("previous", [False, True])
def test_bad_inputs_one_line_exit_1(store, tmp_path, args, msg, previous):
    """Nothing written; a picture that --force would replace stays byte for byte."""
    out = tmp_path / "x.png"
    before = lay_previous(out) if previous else {}
    res = _cli("show", store, *args, "-o", out, *(["--force"] if previous else []))
    assert res.exit_code == 1, res.output
    assert msg in res.stderr and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert tree(tmp_path) == before


def test_bad_outputs_and_missing_store(store, tmp_path):
    for out, msg in [(tmp_path / "x.jpg", "unsupported output format '.jpg'"),
                     (tmp_path / "x", "unsupported output format '(none)'"),
                     (tmp_path / "x.gif", None),
                     (tmp_path / "nodir" / "x.png", "output directory does not exist")]:
        extra = ["--label", "2"] if msg is None else []
        res = _cli("show", store, *extra, "-o", out)
        assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
        assert (msg or "contact sheets are written as .png") in res.stderr
    res = _cli("show", tmp_path / "nothing.zarr", "-o", tmp_path / "y.png")
    assert res.exit_code == 1 and "no such frame store or events file" in res.stderr
    assert list(tmp_path.iterdir()) == []
    # the same refusals over previous outputs that --force would replace: kept byte for byte
    for name in ("x.jpg", "x", "x.gif", "y.png"):
        lay_previous(tmp_path / name)
    before = tree(tmp_path)
    for name, extra in (("x.jpg", []), ("x", []), ("x.gif", ["--label", "2"])):
        res = _cli("show", store, *extra, "-o", tmp_path / name, "--force")
        assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
    res = _cli("show", tmp_path / "nothing.zarr", "-o", tmp_path / "y.png", "--force")
    assert res.exit_code == 1 and "no such frame store or events file" in res.stderr
    assert tree(tmp_path) == before


def test_failed_save_leaves_nothing(store, tmp_path, monkeypatch):
    def broken_save(self, fp, *a, **k):
        with open(fp, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    out = tmp_path / "x.png"
    out.write_bytes(b"old picture")
    res = _cli("show", store, "-o", out, "--force")   # without --force: refused, as it exists
    assert res.exit_code == 1 and "No space left on device" in res.stderr
    assert out.read_bytes() == b"old picture" and [p.name for p in tmp_path.iterdir()] == ["x.png"]


@pytest.mark.parametrize("previous", [False, True])
def test_missing_pillow_is_one_line(store, tmp_path, monkeypatch, previous):
    monkeypatch.setitem(sys.modules, "PIL", None)
    before = lay_previous(tmp_path / "x.png") if previous else {}
    res = _cli("show", store, "-o", tmp_path / "x.png", *(["--force"] if previous else []))
    assert res.exit_code == 1
    assert res.stderr == "error: dvsprep show needs Pillow: pip install 'dvsgesture-kit[show]'\n"
    assert tree(tmp_path) == before


def test_empty_sample_from_events(events_root, tmp_path):
    """user02_led row 2 has an empty label window: black tiles and rasters, no error."""
    for out in (tmp_path / "e.png", tmp_path / "e.gif"):
        res = _cli("show", events_root / "events.h5", "--split", "train", "--sample", "user02_led:2", "-o", out)
        assert res.exit_code == 0 and "user02_led:2" in res.output, res.output
    img = _rgb(tmp_path / "e.png")
    body = img[3 * S.LINE_H:]
    assert ((body == 0).all(-1) | (body == S.GAP_RGB).all(-1) | (body == S.TEXT_RGB).all(-1)).all()


def test_text_in_any_script_and_odd_fps(store, tmp_path):
    assert S.drawable("日本 ü€") == "?? ü?"
    named = tmp_path / "日本.zarr"
    import shutil

    shutil.copytree(store, named)
    res = _cli("show", named, "--label", "all", "-o", tmp_path / "ü€.png")
    assert res.exit_code == 0 and (tmp_path / "ü€.png").is_file(), res.output
    for fps in ("nan", "inf", "0", "1e-300"):
        res = _cli("show", store, "--fps", fps, "-o", tmp_path / "a.gif")
        assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "fps 0.01..50.0" in res.stderr, res.output
    assert not (tmp_path / "a.gif").exists()
    before = lay_previous(tmp_path / "a.gif")          # one --force would replace: kept whole
    for fps in ("nan", "0"):
        res = _cli("show", store, "--fps", fps, "-o", tmp_path / "a.gif", "--force")
        assert res.exit_code == 1 and "fps 0.01..50.0" in res.stderr, res.output
    assert tree(tmp_path) == before
