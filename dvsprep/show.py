"""`dvsprep show`: samples of a frame store or an events.h5 as PNG pictures and GIF animations.

Rendering is pure numpy (frames in, ``Picture`` out: an RGB uint8 array plus the text lines to
draw on it); only `save_png` / `save_gif` need Pillow, imported when called (the ``show``
extra), so the rest of dvsprep never depends on it.

Orientation: image row = sensor y, image column = sensor x, y = 0 at the top, exactly the
[.., y, x] layout of the frames; nothing is flipped.

Colours (Okabe-Ito, readable with the common colour-vision deficiencies):
  ON (p = 1, channel 1)  `ON_RGB`  = (230, 159, 0)  orange
  OFF (p = 0, channel 0) `OFF_RGB` = (86, 180, 233) sky blue
  no event: black; where both polarities fired the colours add (clipped at 255), so a pixel
  with both at full reads (255, 255, 233), near white.
Intensity rule, per pixel and polarity, for a count c and the sample's saturation count `sat`:
  level = #{L in 0..LEVELS-1 : L^2 * sat < LEVELS^2 * c}     (0 for c = 0, 1..LEVELS otherwise)
i.e. level = ceil(LEVELS * sqrt(min(c, sat) / sat)) computed in integers: any event is visible,
the square root lifts faint pixels, counts >= sat are full colour. Then
  rgb = min(255, (ON_RGB * level_on + OFF_RGB * level_off + LEVELS // 2) // LEVELS).
`sat` = max(1, ceil(99th percentile of the non-zero counts of the whole sample)), one value for
all of a sample's frames (its time-raster panels get their own). With LEVELS = 8 a picture holds
at most 81 data colours plus GAP_RGB, MARK_RGB and TEXT_RGB, so PNGs and GIFs are written with an
exact palette (no dithering: every pixel keeps its documented value).

Sizes, with tile = 128 * scale, GAP = 2 and LINE_H = 14 (one text line):
  grid of T frames, c = min(columns, T) columns, r = ceil(T / c) rows, n title lines:
    width  = c * tile + (c + 1) * GAP
    height = n * LINE_H + r * tile + (r + 1) * GAP
    frame k sits at x = GAP + (k % c) * (tile + GAP), y = n * LINE_H + GAP + (k // c) * (tile + GAP);
    gaps and grid cells past the last frame are GAP_RGB, title bands black.
  animation frame (GIF): a grid of one frame, n + 1 text lines (the last says "frame k/T").
  contact sheet of S samples with T frames each, h header lines:
    width  = T * tile + (T + 1) * GAP
    height = h * LINE_H + S * (LINE_H + tile + 2 * GAP)
  events picture: the grid, then two raster panels (x over time, y over time), each one text
    line plus a panel of (c * tile + (c - 1) * GAP) columns by tile rows inside a GAP border:
    height = grid height + 2 * (LINE_H + tile + 2 * GAP). Raster column i covers the time
    bin [t_start + i * D / w, t_start + (i + 1) * D / w) of the label window (D = t_end - t_start,
    w = columns); grey columns (MARK_RGB, drawn only on black) mark where frames 1..T-1 begin.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .constants import GESTURE_NAMES, N_CLASSES, N_POLARITIES, SENSOR_SIZE, SPLITS
from .atomic import check_output, publishing
from .errors import StoreError
from .inputs import FRAME_STORE, InputKind, kind_of

log = logging.getLogger(__name__)

ON_RGB = (230, 159, 0)
OFF_RGB = (86, 180, 233)
BLACK = (0, 0, 0)
TEXT_RGB = (255, 255, 255)
GAP_RGB = (64, 64, 64)
MARK_RGB = (110, 110, 110)
LEVELS = 8
SATURATION_PERCENTILE = 99
GAP = 2
LINE_H = 14        # Pillow's default bitmap font is 11 px tall (6 px per character)
TEXT_X = 4         # left margin of text lines
OUTPUT_SUFFIXES = (".png", ".gif")
MAX_SCALE = 16
MIN_FPS, MAX_FPS = 0.01, 50.0   # GIF frame durations are 1/100 s units (20 ms: what viewers show)
PILLOW_HINT = "dvsprep show needs Pillow: pip install 'dvsgesture-kit[show]'"
# Peak memory of rendering, per picture pixel (RGB, its stacked copy, palette keys, their sort,
# indices, the Pillow image) and per frame value held (int64 counts and what saturation() takes
# of them); measured: 13.5-15.8 B/pixel and 8.6 B/value (README, "dvsprep show").
PIXEL_BYTES = 16
FRAME_VALUE_BYTES = 10


@dataclass
class Picture:
    """rgb: [H, W, 3] uint8; texts: (x, y, line) for each text line, y = top of the line."""

    rgb: np.ndarray
    texts: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


# ----------------------------------------------------------------------------- colours


def saturation(counts: np.ndarray) -> int:
    """The count shown at full colour: max(1, ceil(99th percentile of the non-zero counts))."""
    nz = np.asarray(counts)[np.asarray(counts) > 0]
    if nz.size == 0:
        return 1
    return max(1, int(math.ceil(float(np.percentile(nz, SATURATION_PERCENTILE)))))


def intensity_levels(counts: np.ndarray, sat: int) -> np.ndarray:
    """Colour level 0..LEVELS of each count (same shape, uint8); see the module docstring."""
    if sat < 1:
        raise ValueError(f"saturation must be >= 1, got {sat}")
    thresholds = np.arange(LEVELS, dtype=np.int64) ** 2 * int(sat)
    scaled = np.asarray(counts, dtype=np.int64) * LEVELS**2
    return np.searchsorted(thresholds, scaled, side="left").astype(np.uint8)


def colourize(off: np.ndarray, on: np.ndarray, sat: int) -> np.ndarray:
    """Two count planes [...] (OFF, ON) -> RGB [..., 3] uint8."""
    lo = intensity_levels(off, sat).astype(np.int32)[..., None]
    hi = intensity_levels(on, sat).astype(np.int32)[..., None]
    rgb = (np.asarray(ON_RGB, np.int32) * hi + np.asarray(OFF_RGB, np.int32) * lo + LEVELS // 2) // LEVELS
    return np.minimum(rgb, 255).astype(np.uint8)


def frame_rgb(frame: np.ndarray, sat: int, scale: int = 1) -> np.ndarray:
    """One frame [2, H, W] (channel 0 OFF, 1 ON) -> [H*scale, W*scale, 3] uint8, nearest neighbour."""
    if frame.ndim != 3 or frame.shape[0] != N_POLARITIES:
        raise ValueError(f"frame shape {frame.shape}, expected [2, H, W]")
    return upscale(colourize(frame[0], frame[1], sat), scale)


def upscale(rgb: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of [H, W, 3] by an integer factor."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if scale == 1:
        return rgb
    return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


# ----------------------------------------------------------------------------- layout


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[1] != N_POLARITIES or frames.shape[0] < 1:
        raise ValueError(f"frames shape {frames.shape}, expected [T, 2, H, W] with T >= 1")
    return frames


def _fill(h: int, w: int, rgb: tuple[int, int, int]) -> np.ndarray:
    out = np.empty((h, w, 3), np.uint8)
    out[:] = rgb
    return out


def _band(lines: Sequence[str], width: int) -> Picture:
    pic = Picture(_fill(len(lines) * LINE_H, width, BLACK))
    pic.texts = [(TEXT_X, i * LINE_H + 2, line) for i, line in enumerate(lines)]
    return pic


def _block(tiles: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """Equal-sized tiles [h, w, 3] in rows of `columns`, GAP_RGB between and around them."""
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    out = _fill(rows * h + (rows + 1) * GAP, columns * w + (columns + 1) * GAP, GAP_RGB)
    for k, tile in enumerate(tiles):
        y = GAP + (k // columns) * (h + GAP)
        x = GAP + (k % columns) * (w + GAP)
        out[y : y + h, x : x + w] = tile
    return out


def _stack(parts: Sequence[Picture | np.ndarray]) -> Picture:
    """Stack pictures/arrays of equal width top to bottom, shifting their text positions."""
    arrays, texts, y = [], [], 0
    for part in parts:
        pic = part if isinstance(part, Picture) else Picture(part)
        arrays.append(pic.rgb)
        texts += [(tx, ty + y, s) for tx, ty, s in pic.texts]
        y += pic.rgb.shape[0]
    return Picture(np.concatenate(arrays, axis=0), texts)


def grid_picture(frames: np.ndarray, title: Sequence[str], *, scale: int = 2, columns: int = 4,
                 sat: int | None = None) -> Picture:
    """Frames [T, 2, H, W] as a grid (row-major in time) under `title` lines; sizes in the module
    docstring. `sat` defaults to `saturation(frames)`."""
    frames = _check_frames(frames)
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    sat = saturation(frames) if sat is None else sat
    c = min(columns, frames.shape[0])
    block = _block([frame_rgb(f, sat, scale) for f in frames], c)
    return _stack([_band(title, block.shape[1]), block])


def animation_pictures(frames: np.ndarray, title: Sequence[str], *, scale: int = 2,
                       sat: int | None = None) -> list[Picture]:
    """One picture per frame of [T, 2, H, W]: `title` lines, "frame k/T", the frame. One `sat`
    for all frames, so brightness is comparable over time."""
    frames = _check_frames(frames)
    sat = saturation(frames) if sat is None else sat
    T = frames.shape[0]
    return [grid_picture(f[None], [*title, f"frame {k + 1}/{T}"], scale=scale, columns=1, sat=sat)
            for k, f in enumerate(frames)]


def sheet_picture(rows: Sequence[tuple[np.ndarray, str]], header: Sequence[str], *,
                  scale: int = 1) -> Picture:
    """Contact sheet: one row per sample (frames [T, 2, H, W], one caption line), all T frames
    side by side, each sample with its own saturation; sizes in the module docstring."""
    if not rows:
        raise ValueError("a contact sheet needs at least one sample")
    blocks = []
    T = _check_frames(rows[0][0]).shape[0]
    for frames, caption in rows:
        frames = _check_frames(frames)
        if frames.shape[0] != T:
            raise ValueError(f"all samples of a sheet need the same T ({T}), got {frames.shape[0]}")
        sat = saturation(frames)
        block = _block([frame_rgb(f, sat, scale) for f in frames], T)
        blocks += [_band([caption], block.shape[1]), block]
    return _stack([_band(header, blocks[1].shape[1]), *blocks])


def raster(coord: np.ndarray, t: np.ndarray, p: np.ndarray, t_start: int, t_end: int, width: int,
           size: int) -> np.ndarray:
    """Event counts over time: [2, size, width] int64, [polarity, coordinate, time column].

    coord: [N] x or y of each event (0..size-1); t: [N] µs; p: [N] (0 OFF, else ON). Column i
    counts events with t_start + i*D/width <= t < t_start + (i+1)*D/width (D = t_end - t_start,
    at least 1); events outside [t_start, t_end) are clamped to the first/last column.
    """
    span = max(1, int(t_end) - int(t_start))
    col = ((np.asarray(t, np.int64) - int(t_start)) * width) // span
    np.clip(col, 0, width - 1, out=col)
    key = ((np.asarray(p) != 0).astype(np.int64) * size + np.asarray(coord, np.int64)) * width + col
    return np.bincount(key, minlength=2 * size * width).reshape(2, size, width)


def events_picture(events: dict[str, np.ndarray], frames: np.ndarray, title: Sequence[str], *,
                   t_start: int, t_end: int, frame_starts: np.ndarray, scale: int = 2,
                   columns: int = 4) -> Picture:
    """The frame grid of a sample plus x-over-time and y-over-time rasters of its events.

    events: t int64 [N], x, y, p [N]; frames [T, 2, H, W] integrated from them; frame_starts:
    times (µs) at which frames 1..T-1 begin, marked on the rasters.
    """
    grid = grid_picture(frames, title, scale=scale, columns=columns)
    c = min(columns, frames.shape[0])
    tile = SENSOR_SIZE[0] * scale
    w = c * tile + (c - 1) * GAP
    span = max(1, int(t_end) - int(t_start))
    marks = np.unique(np.clip(((np.asarray(frame_starts, np.int64) - int(t_start)) * w) // span, 0, w - 1))
    parts: list[Picture | np.ndarray] = [grid]
    seconds = (int(t_end) - int(t_start)) / 1e6
    for axis, size in (("x", SENSOR_SIZE[1]), ("y", SENSOR_SIZE[0])):
        counts = raster(events[axis], events["t"], events["p"], t_start, t_end, w, size)
        rgb = np.repeat(colourize(counts[0], counts[1], saturation(counts)), scale, axis=0)
        if marks.size:
            cols = rgb[:, marks]
            cols[(cols == 0).all(axis=-1)] = MARK_RGB
            rgb[:, marks] = cols
        parts += [_band([f"{axis} (0 at top) over time, 0 to {seconds:.3f} s; grey: frame starts"], grid.size[0]),
                  _block([rgb], 1)]
    return _stack(parts)


def grid_size(T: int, columns: int, scale: int, lines: int) -> tuple[int, int]:
    """(width, height) of `grid_picture` of T frames under `lines` title lines (module docstring)."""
    tile, c = SENSOR_SIZE[0] * scale, min(columns, T)
    r = -(-T // c)
    return c * tile + (c + 1) * GAP, lines * LINE_H + r * tile + (r + 1) * GAP


def render_bytes(pixels: int, frame_values: int) -> int:
    """Estimated peak memory of rendering `pixels` picture pixels from `frame_values` frame values."""
    return pixels * PIXEL_BYTES + frame_values * FRAME_VALUE_BYTES


def _check_memory(src: "_Source", size: tuple[int, int], pictures: int, samples: int, hint: str) -> None:
    """Refuse (one line, before allocating) a rendering that cannot fit the free memory:
    `pictures` pictures of `size` from `samples` samples of T frames."""
    from .resources import check_memory

    w, h = size
    values = samples * src.T * N_POLARITIES * SENSOR_SIZE[0] * SENSOR_SIZE[1]
    what = f"{pictures} pictures of {w}x{h} px" if pictures > 1 else f"a picture of {w}x{h} px"
    check_memory(src.where, f"{what} from T={src.T} frames", render_bytes(pictures * w * h, values), hint)


# ----------------------------------------------------------------------------- saving (Pillow)


def _pil() -> Any:
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise ImportError(PILLOW_HINT) from None
    return Image, ImageDraw, ImageFont


def _font(ImageFont: Any) -> Any:
    # The bitmap font: crisp, one colour (no anti-aliasing), identical on every machine.
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()


def _palette(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Exact palette of RGB arrays: (colours [K, 3] uint8 with TEXT_RGB included, one index
    array [H, W] uint8 per input). K <= 256 by the colour rule (see the module docstring)."""
    keys = [(a[..., 0].astype(np.uint32) << 16) | (a[..., 1].astype(np.uint32) << 8) | a[..., 2] for a in arrays]
    text_key = (TEXT_RGB[0] << 16) | (TEXT_RGB[1] << 8) | TEXT_RGB[2]
    uniq = np.unique(np.concatenate([k.ravel() for k in keys] + [np.array([text_key], np.uint32)]))
    if uniq.size > 256:
        raise ValueError(f"{uniq.size} colours do not fit a palette")
    colours = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=1).astype(np.uint8)
    return colours, [np.searchsorted(uniq, k).astype(np.uint8) for k in keys]


def drawable(line: str) -> str:
    """`line` in the characters the bitmap font has (Latin-1); others become '?' (names of
    stores, recordings or paths in any script must not stop a picture from being written)."""
    return line.encode("latin-1", "replace").decode("latin-1")


def to_images(pictures: Sequence[Picture]) -> list[Any]:
    """Pillow palette images ("P") of pictures sharing one exact palette, text drawn in TEXT_RGB."""
    Image, ImageDraw, ImageFont = _pil()
    font = _font(ImageFont)
    colours, indices = _palette([p.rgb for p in pictures])
    text_index = int(np.flatnonzero((colours == TEXT_RGB).all(axis=1))[0])
    flat = colours.ravel().tolist()
    images = []
    for pic, idx in zip(pictures, indices):
        im = Image.new("P", (idx.shape[1], idx.shape[0]))
        im.frombytes(np.ascontiguousarray(idx).tobytes())
        im.putpalette(flat)
        draw = ImageDraw.Draw(im)
        for x, y, line in pic.texts:
            draw.text((x, y), drawable(line), fill=text_index, font=font)
        images.append(im)
    return images


def _save(path: str | os.PathLike, write: Callable[[Path], object], force: bool,
          inputs: Sequence[str | os.PathLike]) -> None:
    """``write(tmp)`` through the output protocol: `path` appears complete or not at all."""
    with publishing(path, "picture", force=force, inputs=inputs) as tmp:
        write(tmp)


def save_png(picture: Picture, path: str | os.PathLike, *, force: bool = False,
             inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Write a picture as a palette PNG (an existing `path` only with `force`; never onto or into
    one of `inputs`)."""
    (im,) = to_images([picture])
    _save(path, lambda tmp: im.save(tmp, format="PNG", optimize=True), force, inputs)


def save_gif(pictures: Sequence[Picture], path: str | os.PathLike, fps: float = 4.0, *, force: bool = False,
             inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Write pictures of equal size as a looping animated GIF at `fps` frames per second (an
    existing `path` only with `force`; never onto or into one of `inputs`)."""
    if not pictures:
        raise ValueError("an animation needs at least one picture")
    images = to_images(pictures)
    duration = max(20, int(round(1000 / fps)))
    _save(path, lambda tmp: images[0].save(
        tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0,
        optimize=False, disposal=1), force, inputs)


def parse_label(spec: str | int) -> int | None:
    """An integer 0..10 or a class name of `GESTURE_NAMES` -> label; "all" -> None (every class)."""
    text = str(spec).strip().lower()
    if text == "all":
        return None
    if re.fullmatch(r"\d+", text):
        k = int(text)
        if k < N_CLASSES:
            return k
    elif text.replace("-", "_") in GESTURE_NAMES:
        return GESTURE_NAMES.index(text.replace("-", "_"))
    import difflib

    close = difflib.get_close_matches(text.replace("-", "_"), GESTURE_NAMES, n=2, cutoff=0.6)
    if close:
        raise StoreError(f"label {spec!r}: no such class; did you mean {' or '.join(close)}? "
                         f"(0..{N_CLASSES - 1}, a class name or all)")
    raise StoreError(f"label {spec!r}: expected 0..{N_CLASSES - 1}, a class name "
                     f"({', '.join(GESTURE_NAMES)}) or all")


def find_sample(spec: str | int, recordings: Sequence[str], rows: Sequence[int], where: str) -> int:
    """Index of a sample given as an index (0..N-1) or as RECORDING:ROW (row in its label csv)."""
    text = str(spec).strip()
    n = len(recordings)
    if re.fullmatch(r"-?\d+", text):
        i = int(text)
        if not 0 <= i < n:
            raise StoreError(f"{where}: sample index {i} out of range ({n} samples)")
        return i
    m = re.fullmatch(r"(.+):(\d+)", text)
    if m is None:
        raise StoreError(f"{where}: sample {spec!r} is neither an index nor RECORDING:ROW")
    rec, row = m.group(1), int(m.group(2))
    for i, (r, w) in enumerate(zip(recordings, rows)):
        if r == rec and int(w) == row:
            return i
    raise StoreError(f"{where}: no sample {rec}:{row}")


class _Source:
    """One split of a frame store or of an events.h5, with frames per sample either read or
    integrated on the fly (T, split_by)."""

    def __init__(self, source: str, split: str, T: int | None, split_by: str | None):
        kind = kind_of(source, FRAME_STORE | {InputKind.EVENTS}, noun="frame store or events file")
        url = kind is InputKind.URL
        path = Path(source)
        if split not in SPLITS:
            raise StoreError(f"{source}: unknown split {split!r} (have {', '.join(SPLITS)})")
        self.split = split
        self.display_name = source.rstrip("/").rsplit("/", 1)[-1] if url else path.name
        self.where = f"{source} ({split})"
        self._events_file = None
        if kind in FRAME_STORE:
            from .frames import open_frame_store

            store = open_frame_store(source)
            if T is not None and T != store.T or split_by is not None and split_by != store.split_by:
                raise StoreError(f"{source}: -T/--split-by apply to events.h5 only; this store is "
                                 f"T={store.T} {store.split_by}")
            sp = store.split(split)
            self.kind, self.T, self.split_by = "frames", store.T, store.split_by
            self.recordings, self.rows, self.labels = sp.recordings, sp.rows, sp.labels
            self.n_events, self.t_start, self.t_end = sp.n_events, sp.t_start, sp.t_end
            self._frames = sp
        else:
            from .events import EventsFile
            from .frames import check_params

            self.T, self.split_by = check_params(8 if T is None else T, split_by or "number")
            self._events_file = EventsFile(path)
            try:
                sp = self._events_file.split(split)
            except BaseException:
                self._events_file.close()
                raise
            self.kind = "events"
            self.recordings, self.rows, self.labels = sp.recordings, sp.rows, sp.labels
            self.n_events = np.diff(sp.offsets)
            self.t_start, self.t_end = sp.t_start, sp.t_end
            self._events = sp

    def close(self) -> None:
        if self._events_file is not None:
            self._events_file.close()

    def __len__(self) -> int:
        return len(self.recordings)

    def events(self, i: int) -> dict[str, np.ndarray]:
        return self._events.sample(i)

    def frames(self, i: int) -> np.ndarray:
        """[T, 2, H, W] counts of sample i."""
        if self.kind == "frames":
            return self._frames[i]
        from .frames import integrate

        ev = self.events(i)
        return integrate(ev["t"], ev["x"], ev["y"], ev["p"], self.T, self.split_by)

    def name(self, i: int) -> str:
        return f"{self.recordings[i]}:{int(self.rows[i])}"

    def title(self, i: int, source: bool = True) -> list[str]:
        """Three title lines; `source` appends the store's name (left out where space is short)."""
        k = int(self.labels[i])
        return [f"{self.name(i)}  {self.split} #{i}",
                f"label {k} {GESTURE_NAMES[k]}",
                f"{int(self.n_events[i]):,} events  T={self.T} {self.split_by}"
                + (f"  {self.display_name}" if source else "")]


@dataclass
class ShowResult:
    """What `show` wrote."""

    path: Path
    size: tuple[int, int]
    n_frames: int
    samples: list[str]

    def lines(self) -> list[str]:
        kind = f"{self.n_frames}-frame GIF" if self.path.suffix.lower() == ".gif" else "PNG"
        names = ", ".join(self.samples) if len(self.samples) <= 4 else f"{len(self.samples)} samples"
        return [f"wrote {self.path} ({kind}, {self.size[0]}x{self.size[1]} px): {names}"]


def show(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    split: str = "test",
    sample: str | int | None = None,
    label: str | int | None = None,
    count: int | None = None,
    T: int | None = None,
    split_by: str | None = None,
    scale: int | None = None,
    columns: int = 4,
    fps: float = 4.0,
    force: bool = False,
) -> ShowResult:
    """Render one sample (`sample`: index or RECORDING:ROW, default 0) or a contact sheet of
    `count` samples of `label` ("all": `count` per class) to a PNG or GIF.

    From a frame store the stored frames are shown; from an events.h5 the sample is integrated
    into T frames (default 8, split_by "number") and a single-sample PNG adds time rasters.
    Default output: ``<split>_<recording>_<row>.png`` or ``<split>_label<K>.png`` here. An
    existing output is replaced only with `force`, and never written onto or into `path`.
    """
    if sample is not None and label is not None:
        raise StoreError("give a sample or a label, not both")
    if count is not None and label is None:
        raise StoreError("count applies to a label's contact sheet only")
    if count is not None and count < 1:
        raise StoreError(f"count must be >= 1, got {count}")
    if scale is not None and not 1 <= scale <= MAX_SCALE or columns < 1 or not MIN_FPS <= fps <= MAX_FPS:
        raise StoreError(f"scale must be 1..{MAX_SCALE}, columns >= 1 and fps {MIN_FPS}..{MAX_FPS} "
                         f"(got scale {scale}, columns {columns}, fps {fps})")
    if out is not None:
        suffix = Path(out).suffix.lower()
        if suffix not in OUTPUT_SUFFIXES:
            raise StoreError(f"{out}: unsupported output format {suffix or '(none)'!r}; use .png or .gif")
        if label is not None and suffix == ".gif":
            raise StoreError(f"{out}: contact sheets are written as .png")
        check_output(out, "picture", force=force, inputs=[path])   # before the rendering
    k = parse_label(label) if label is not None else None
    src = _Source(str(path), split, T, split_by)
    save = {"force": force, "inputs": [path]}
    try:
        if label is not None:
            return _sheet(src, k, count, scale or 1, out, save)
        return _single(src, find_sample(0 if sample is None else sample, src.recordings, src.rows, src.where),
                       scale or 2, columns, fps, out, save)
    finally:
        src.close()


def _single(src: _Source, i: int, scale: int, columns: int, fps: float, out: Any,
            save: dict[str, Any]) -> ShowResult:
    out = Path(out) if out is not None else Path(f"{src.split}_{src.recordings[i]}_{int(src.rows[i])}.png")
    T, gif = src.T, out.suffix.lower() == ".gif"
    hint = "use a smaller -T or --scale" if src.kind == "events" else "use a smaller --scale"
    if gif:
        _check_memory(src, grid_size(1, 1, scale, 4), T, 1, hint)
    else:
        w, h = grid_size(T, columns, scale, 3)
        rasters = 2 * (LINE_H + SENSOR_SIZE[0] * scale + 2 * GAP) if src.kind == "events" else 0
        _check_memory(src, (w, h + rasters), 1, 1, hint)
    frames = src.frames(i)
    if gif:
        pictures = animation_pictures(frames, src.title(i, source=False), scale=scale)
        save_gif(pictures, out, fps=fps, **save)
        return ShowResult(out, pictures[0].size, len(pictures), [src.name(i)])
    if src.kind == "events":
        from .frames import frame_bounds

        ev = src.events(i)
        j_l, j_r = frame_bounds(ev["t"], src.T, src.split_by)
        starts = ev["t"][j_l[1:][j_r[1:] > j_l[1:]]]
        pic = events_picture(ev, frames, src.title(i), t_start=int(src.t_start[i]), t_end=int(src.t_end[i]),
                             frame_starts=starts, scale=scale, columns=columns)
    else:
        pic = grid_picture(frames, src.title(i), scale=scale, columns=columns)
    save_png(pic, out, **save)
    return ShowResult(out, pic.size, 1, [src.name(i)])


def _sheet(src: _Source, k: int | None, count: int | None, scale: int, out: Any,
           save: dict[str, Any]) -> ShowResult:
    classes = range(N_CLASSES) if k is None else [k]
    count = count or (1 if k is None else 4)
    picked: list[tuple[int, int]] = []  # (label, index)
    missing = []
    for c in classes:
        idx = np.flatnonzero(src.labels == c)
        if idx.size == 0 and k is not None:
            raise StoreError(f"{src.where}: no samples of label {c} ({GESTURE_NAMES[c]})")
        if idx.size == 0:
            missing.append(c)
        picked += [(c, int(i)) for i in idx[:count]]
    if not picked:
        raise StoreError(f"{src.where}: no samples")
    tile = SENSOR_SIZE[0] * scale
    _check_memory(src, (src.T * tile + (src.T + 1) * GAP, LINE_H + len(picked) * (LINE_H + tile + 2 * GAP)), 1,
                  len(picked), f"use a smaller {'-T, ' if src.kind == 'events' else ''}--count or --scale")
    for c in missing:   # after the refusals: an error stays one line
        log.warning("%s: no samples of label %d (%s)", src.where, c, GESTURE_NAMES[c])
    rows = []
    for c, i in picked:
        cap = f"{src.name(i)} #{i}, {int(src.n_events[i]):,} events"
        rows.append((src.frames(i), f"{c} {GESTURE_NAMES[c]}: {cap}" if k is None else cap))
    what = "every class" if k is None else f"label {k} {GESTURE_NAMES[k]}"
    header = [f"{src.display_name} {src.split}: {what}, {len(picked)} samples, T={src.T} {src.split_by}, "
              f"time left to right; ON orange, OFF blue"]
    pic = sheet_picture(rows, header, scale=scale)
    if out is None:
        out = Path(f"{src.split}_{'all_labels' if k is None else f'label{k}'}.png")
    save_png(pic, out, **save)
    return ShowResult(Path(out), pic.size, 1, [src.name(i) for _, i in picked])
