"""dvsg_train.augment against hand-computed tensors (the transforms) and its spec parser."""
from __future__ import annotations

import math

import pytest
import torch

from dvsg_train import augment as augment_module
from dvsg_train.augment import (
    AugmentSpec,
    affine,
    augment_batch,
    augment_generator,
    check_spec_T,
    crop_index,
    cutmix,
    cutout,
    mirror,
    mixup,
    parse_augment,
    pixel_source,
    read_pixels,
    smooth,
    subsample_index,
    take_times,
    thin,
    translate,
)
from dvsg_train.errors import ConfigError
from dvsprep.constants import GESTURE_NAMES, MIRROR_LABEL

H = W = 128


def one_event(T=2, B=2, c=1, t=1, b=0, y=5, x=3, value=1.0, dtype=torch.float32):
    frames = torch.zeros(T, B, 2, H, W, dtype=dtype)
    frames[t, b, c, y, x] = value
    return frames


def where_nonzero(x):
    return [tuple(i) for i in torch.nonzero(x).tolist()]


def test_mirror_label_map_is_the_names_seen_in_a_mirror():
    """An independent spec: swap left<->right, and clockwise<->counter_clockwise where an arm turns."""
    def mirrored(name: str) -> str:
        name = name.replace("right", "@").replace("left", "right").replace("@", "left")
        if name.endswith("counter_clockwise"):
            return name[: -len("counter_clockwise")] + "clockwise"
        if name.endswith("clockwise"):
            return name[: -len("clockwise")] + "counter_clockwise"
        return name
    assert [GESTURE_NAMES[m] for m in MIRROR_LABEL] == [mirrored(n) for n in GESTURE_NAMES]
    assert MIRROR_LABEL == (0, 2, 1, 6, 5, 4, 3, 7, 8, 9, 10)


def test_mirror_moves_one_event_and_relabels_only_flipped_samples():
    x = one_event(b=0, x=3, y=5) + one_event(b=1, x=3, y=5)
    target = torch.nn.functional.one_hot(torch.tensor([3, 1]), 11).float()
    out, t = mirror(x, target, torch.tensor([True, False]))
    assert where_nonzero(out) == [(1, 0, 1, 5, 124), (1, 1, 1, 5, 3)]
    assert t.argmax(1).tolist() == [6, 1]
    # every label through the map
    all_t = torch.eye(11)
    _, t = mirror(torch.zeros(1, 11, 2, H, W), all_t, torch.ones(11, dtype=torch.bool))
    assert t.argmax(1).tolist() == [0, 2, 1, 6, 5, 4, 3, 7, 8, 9, 10]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_translate_moves_an_event_by_whole_pixels_in_any_float_dtype(dtype):
    x = one_event(b=0, x=10, y=20, value=7, dtype=dtype) + one_event(b=1, x=0, y=127, value=2, dtype=dtype)
    out = translate(x, torch.tensor([[3, -4], [-1, 0]]))
    assert out.dtype == dtype
    assert where_nonzero(out) == [(1, 0, 1, 16, 13)]     # sample 1's event left the image: zero fill
    assert out[1, 0, 1, 16, 13].item() == 7
    # at the border exactly: x=127 stays, x=128 leaves
    edge = translate(one_event(b=0, x=120, y=0) + one_event(b=1, x=120, y=0), torch.tensor([[7, 0], [8, 0]]))
    assert where_nonzero(edge) == [(1, 0, 1, 0, 127)]


def test_affine_rotates_about_the_centre_with_nearest_neighbour():
    # 90 degrees: (a, b) about c = (63.5, 63.5) goes to (-b, a); (70, 60) = c + (6.5, -3.5) -> c + (3.5, 6.5)
    rot = torch.tensor([[[0.0, -1.0], [1.0, 0.0]]])
    out = affine(one_event(B=1, b=0, x=70, y=60, value=3), rot, torch.zeros(1, 2))
    assert where_nonzero(out) == [(1, 0, 1, 70, 67)] and out.sum().item() == 3
    # identity is exact everywhere
    x = torch.randint(0, 5, (2, 2, 2, H, W)).float()
    assert torch.equal(affine(x, torch.eye(2).expand(2, 2, 2), torch.zeros(2, 2)), x)
    # x2 zoom: output pixel (u, v) reads input (c + (u - c) / 2); the pixel at (64, 64) reads
    # c + 0.25 = 63.75 -> 64, (62, 62) reads 62.75 -> 63 (rounding to nearest, ties up)
    zoom = affine(one_event(B=1, b=0, x=64, y=64), 2 * torch.eye(2)[None], torch.zeros(1, 2))
    assert where_nonzero(zoom) == [(1, 0, 1, 64, 64), (1, 0, 1, 64, 65), (1, 0, 1, 65, 64), (1, 0, 1, 65, 65)]
    # x0.5 zoom: output (u, v) reads c + 2 (u - c) = 2u - 63.5, a tie: (64, 64) reads 64.5 -> 65
    half = affine(one_event(B=1, b=0, x=65, y=65) + one_event(B=1, b=0, x=64, y=64, c=0),
                  0.5 * torch.eye(2)[None], torch.zeros(1, 2))
    assert where_nonzero(half) == [(1, 0, 1, 64, 64)]


def test_one_read_folds_mirror_before_and_cutout_after_the_map():
    rot = torch.tensor([[[0.0, -1.0], [1.0, 0.0]]])                      # 90 degrees, as above
    x = one_event(B=1, b=0, x=57, y=60, value=3)
    # mirrored first: x 57 -> 127 - 57 = 70, then (70, 60) -> (67, 70) as in the rotation test
    src = pixel_source(rot, torch.zeros(1, 2), H, W, flip=torch.tensor([True]))
    assert where_nonzero(read_pixels(x, src)) == [(1, 0, 1, 70, 67)]
    # not flipped: (57, 60) = c + (-6.5, -3.5) -> c + (3.5, -6.5) = (67, 57)
    src = pixel_source(rot, torch.zeros(1, 2), H, W, flip=torch.tensor([False]))
    assert where_nonzero(read_pixels(x, src)) == [(1, 0, 1, 57, 67)]
    # the cutout square lies in output coordinates: a 4 x 4 square at (66, 55) hides (67, 57) ...
    src = pixel_source(rot, torch.zeros(1, 2), H, W, cut=(torch.tensor([[66, 55]]), 4))
    assert where_nonzero(read_pixels(x, src)) == []
    # ... and one at (68, 57), just right of it, does not
    src = pixel_source(rot, torch.zeros(1, 2), H, W, cut=(torch.tensor([[68, 57]]), 4))
    assert where_nonzero(read_pixels(x, src)) == [(1, 0, 1, 57, 67)]
    assert (src.view(H, W)[57:61, 68:72] == H * W).all() and (src == H * W).sum() == 16


def test_augment_batch_equals_the_transforms_applied_in_turn():
    """The fused read (mirror, geometry, cutout) against mirror, affine and cutout one after the
    other, with the parameters drawn in the documented order from a second generator."""
    x, y = _batch()
    spec = parse_augment("mirror,translate=8,rotate=15,shear=10,scale=0.2,cutout=40")
    dev = torch.device("cpu")
    flips = []
    for step in range(3):
        got_x, got_t = augment_batch(spec, x, y, augment_generator(0, 0, 0, step, dev))
        g = augment_generator(0, 0, 0, step, dev)
        flip = torch.rand(4, generator=g) < 0.5
        matrix, shift = augment_module._geometry(spec, 4, g, dev)
        corner = torch.stack([torch.randint(-39, W, (4,), generator=g), torch.randint(-39, H, (4,), generator=g)], -1)
        want_x, want_t = mirror(x, torch.eye(11)[y], flip)
        want_x = cutout(affine(want_x, matrix, shift), corner, 40)
        assert torch.equal(got_x, want_x) and torch.equal(got_t, want_t)
        flips.append(flip)
    assert 0 < torch.cat(flips).sum() < 12          # some samples flipped, some not


@pytest.mark.parametrize("spec_text", ["mixup=0.5", "cutmix=0.5", "mixup=0.3,cutmix=0.4"])
def test_mixing_on_the_host_coin_equals_selecting_on_the_device(spec_text):
    """On the CPU only the outcome the coin drew is computed; on an accelerator both are and
    torch.where selects: the same batch either way, coin up or down."""
    x, y = _batch()
    x = x + torch.rand(x.shape, generator=torch.Generator().manual_seed(1))       # not just counts
    spec = parse_augment(spec_text)
    target = torch.eye(11)[y]
    outcomes = set()
    for step in range(12):
        host = augment_module._mix(spec, x, target, augment_generator(0, 0, 0, step, torch.device("cpu")))
        device = augment_module._mix(spec, x, target, augment_generator(0, 0, 0, step, torch.device("cpu")),
                                     on_host=False)
        assert torch.equal(host[0], device[0]) and torch.equal(host[1], device[1])
        outcomes.add("plain" if host[0] is x else "mixed")
    assert outcomes == {"plain", "mixed"}


def test_thin_keeps_each_event_with_probability_keep():
    g = torch.Generator().manual_seed(0)
    x = torch.full((4, 2, 2, H, W), 20.0)
    assert torch.equal(thin(x, 1.0, g), x)
    assert torch.equal(thin(x, 0.0, g), torch.zeros_like(x))
    kept = thin(x, 0.3, g)
    assert torch.equal(kept, kept.round()) and kept.min() >= 0 and kept.max() <= 20
    n = kept.numel()                     # 262,144 binomial(20, 0.3) draws: mean 6, variance 4.2
    se_mean = math.sqrt(4.2 / n)         # 0.004; variance's standard error ~ 4.2 * sqrt(2 / n) ~ 0.012
    assert abs(kept.mean().item() - 6.0) < 5 * se_mean
    assert abs(kept.var().item() - 4.2) < 5 * 4.2 * math.sqrt(2 / n) * 1.2
    half = thin(torch.ones(1, 1, 2, H, W, dtype=torch.float16), 0.5, g)
    assert half.dtype == torch.float16 and set(half.unique().tolist()) == {0.0, 1.0}


def test_cutout_zeroes_exactly_its_square():
    x = torch.ones(2, 2, 2, H, W)
    out = cutout(x, torch.tensor([[2, 3], [-2, 126]]), 4)
    zero0 = torch.nonzero(out[0, 0, 0] == 0).tolist()
    assert zero0 == [[y, x] for y in range(3, 7) for x in range(2, 6)]
    zero1 = torch.nonzero(out[0, 1, 0] == 0).tolist()      # clipped at the left and bottom borders
    assert zero1 == [[y, x] for y in (126, 127) for x in (0, 1)]
    assert torch.equal(out[1], out[0]) and out.sum().item() == x.sum().item() - 2 * 2 * (16 + 4)


def test_time_steps_crop_and_subsample():
    x = torch.arange(6).float().view(6, 1, 1, 1, 1).expand(6, 2, 2, H, W).contiguous()
    idx = crop_index(torch.tensor([0, 2]), 4)
    assert idx.tolist() == [[0, 1, 2, 3], [2, 3, 4, 5]]
    out = take_times(x, idx)
    assert out.shape == (4, 2, 2, H, W)
    assert out[:, 0, 0, 0, 0].tolist() == [0, 1, 2, 3] and out[:, 1, 1, 9, 9].tolist() == [2, 3, 4, 5]
    keys = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    assert subsample_index(keys, 3).tolist() == [[1, 3, 5], [0, 1, 2]]


def test_mixup_and_cutmix_weights():
    x = torch.stack([torch.full((2, 2, H, W), 4.0), torch.full((2, 2, H, W), 8.0)], 1)   # [T=2, B=2, ...]
    target = torch.eye(11)[[2, 7]]
    mx, mt = mixup(x, target, torch.tensor([0.25, 1.0]), torch.tensor([1, 0]))
    assert mx[:, 0].unique().tolist() == [0.25 * 4 + 0.75 * 8] and mx[:, 1].unique().tolist() == [8.0]
    assert mt[0, 2].item() == 0.25 and mt[0, 7].item() == 0.75 and torch.equal(mt[1], target[1])
    # lam 1 is the sample and lam 0 its partner, exactly, for any values (not just counts)
    frac = torch.stack([torch.full((2, 2, H, W), 0.1), torch.full((2, 2, H, W), 0.7)], 1)
    mx, _ = mixup(frac, target, torch.tensor([1.0, 0.0]), torch.tensor([1, 0]))
    assert torch.equal(mx[:, 0], frac[:, 0]) and torch.equal(mx[:, 1], frac[:, 0])
    cx, ct = cutmix(x, target, torch.tensor([[0, 0, 64, 128], [0, 0, 0, 0]]), torch.tensor([1, 0]))
    assert cx[:, 0, :, :, :64].unique().tolist() == [8.0] and cx[:, 0, :, :, 64:].unique().tolist() == [4.0]
    assert torch.equal(cx[:, 1], x[:, 1])
    assert ct[0, 2].item() == 0.5 and ct[0, 7].item() == 0.5 and torch.equal(ct[1], target[1])


def test_smooth():
    t = smooth(torch.eye(11)[[4]], 0.1)
    assert t[0, 4].item() == pytest.approx(0.9 + 0.1 / 11, abs=1e-7)
    assert t[0, 0].item() == pytest.approx(0.1 / 11, abs=1e-7)
    assert t.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_parse_augment_round_trips_and_bounds():
    spec = parse_augment("mirror, translate=8,rotate=15,drop=0.1,mixup=0.5,smooth=0.1")
    assert spec == AugmentSpec(mirror=True, translate=8, rotate=15.0, drop=0.1, mixup=0.5, smooth=0.1)
    assert spec.text() == "mirror,translate=8,rotate=15,drop=0.1,mixup=0.5,smooth=0.1"
    assert parse_augment(spec.text()) == spec
    assert parse_augment("") == parse_augment("none") == AugmentSpec() and not AugmentSpec().active
    assert parse_augment("translate=64").translate == 64 and parse_augment("drop=0.99").drop == 0.99


@pytest.mark.parametrize("text, message", [
    ("flip", "unknown augmentation 'flip'"),
    ("translate", "'translate' needs a value"),
    ("translate=", "'translate' needs a value"),
    ("translate=1.5", "translate='1.5' is not an integer"),
    ("rotate=x", "rotate='x' is not a number"),
    ("translate=65", "translate=65 is outside 0..64"),
    ("drop=1", "drop=1 is outside 0..0.99"),
    ("drop=nan", "drop=nan is outside"),
    ("rotate=inf", "rotate=inf is outside"),
    ("mirror=1", "'mirror' takes no value"),
    ("mirror,mirror", "'mirror' given twice"),
    ("mixup=0.6,cutmix=0.5", "add up to more than 1"),
    ("crop=4,subsample=5", "subsample=5 keeps more time steps than crop=4"),
])
def test_parse_augment_refuses_in_one_line(text, message):
    with pytest.raises(ConfigError) as err:
        parse_augment(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_time_options_need_the_store_T():
    check_spec_T(parse_augment("crop=16"), 16)
    with pytest.raises(ConfigError, match="crop=17 needs at least 17 time steps; the store has T=16"):
        check_spec_T(parse_augment("crop=17"), 16)


RECIPE = parse_augment("mirror,translate=8,rotate=15,shear=10,scale=0.1,drop=0.1,cutout=16,"
                       "crop=6,subsample=4,mixup=0.5,cutmix=0.5,smooth=0.1")


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 4, (8, 4, 2, H, W), generator=g).float(), torch.tensor([0, 1, 3, 10])


def test_augment_batch_is_a_function_of_seed_epoch_rank_step():
    x, y = _batch()
    dev = torch.device("cpu")
    a = augment_batch(RECIPE, x, y, augment_generator(0, 2, 0, 5, dev))
    b = augment_batch(RECIPE, x, y, augment_generator(0, 2, 0, 5, dev))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (4, 4, 2, H, W) and a[1].shape == (4, 11)
    assert torch.allclose(a[1].sum(1), torch.ones(4))
    for other in [(1, 2, 0, 5), (0, 3, 0, 5), (0, 2, 1, 5), (0, 2, 0, 6)]:
        c = augment_batch(RECIPE, x, y, augment_generator(*other, dev))
        assert not torch.equal(a[0], c[0])


def test_augment_batch_off_is_the_identity():
    x, y = _batch()
    out, target = augment_batch(AugmentSpec(), x, y, augment_generator(0, 0, 0, 0, torch.device("cpu")))
    assert out is x and torch.equal(target, torch.eye(11)[y])


@pytest.mark.cuda
def test_cuda_augment_batch_never_syncs_the_host():
    """Every augmentation, drawn and applied on the GPU, with no host sync (no .item(), no
    host-to-device copy, no nonzero): the training step's queue keeps running."""
    import warnings

    dev = torch.device("cuda")
    x, y = _batch()
    x, y = x.to(dev), y.to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(4):      # mixup, cutmix or neither, by the coin
                out, target = augment_batch(RECIPE, x, y, augment_generator(0, 0, 0, step, dev))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [str(w.message) for w in caught if "synchroniz" in str(w.message)] == []
    assert out.device.type == "cuda" and out.shape == (4, 4, 2, H, W) and target.shape == (4, 11)
