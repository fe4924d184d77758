"""Seeded augmentations of integrated frames, on the batch's device, for the training step only.

Every transform is a pure function of a batch ``x`` [T, B, 2, H, W] (any float dtype, any
device) and, where labels matter, soft targets [B, 11] (float32), plus explicit parameters: the
transforms draw nothing. `augment_batch` draws the parameters of a whole `AugmentSpec` from one
`torch.Generator` on the batch's device, seeded by (seed, epoch, rank, step) in
`augment_generator`, so a resumed run draws exactly what an uninterrupted one would and DDP ranks
draw different augmentations. No transform leaves the device or loops over samples in Python.

The mirror is label-aware: a gesture seen in a mirror is another gesture for 6 of the 11 classes
(`dvsprep.constants.MIRROR_LABEL`), which flipping without relabelling silently corrupts.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from dvsprep.constants import MIRROR_LABEL, N_CLASSES

from .augment_spec import AugmentSpec, check_spec_T, parse_augment  # noqa: F401 (the switch, re-exported)

# --------------------------------------------------------------------------- the transforms


def mirror(x: Tensor, target: Tensor, flip: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror the samples where ``flip`` [B] (bool) is set: x -> W-1-x, and their targets [B, 11]
    permuted by MIRROR_LABEL (a right hand wave mirrored is a left hand wave)."""
    sel = flip.view(1, -1, 1, 1, 1)
    return torch.where(sel, x.flip(-1), x), mirror_target(target, flip)


def mirror_target(target: Tensor, flip: Tensor) -> Tensor:
    """Targets [B, 11] of the samples where ``flip`` [B] is set permuted by MIRROR_LABEL."""
    # columns picked one by one: an index tensor made from MIRROR_LABEL would be a host-to-device
    # copy, which waits for the GPU's queue on every step
    mirrored = torch.stack([target[:, j] for j in MIRROR_LABEL], 1)
    return torch.where(flip.view(-1, 1), mirrored, target)


def pixel_source(matrix: Tensor, shift: Tensor, H: int, W: int, *, flip: Tensor | None = None,
                 cut: tuple[Tensor, int] | None = None) -> Tensor:
    """Where each output pixel of an affine map reads: [B, H*W] int64, y*W + x of the input pixel,
    or H*W (read as 0) where that lies outside the image.

    matrix [B, 2, 2] acts on (x, y) pixel coordinates about the centre c = ((W-1)/2, (H-1)/2);
    shift [B, 2] (dx, dy) in pixels: an input pixel p lands at ``matrix @ (p - c) + c + shift``,
    so output pixel q reads the input pixel nearest to ``inverse(matrix) @ (q - c - shift) + c``
    (ties round up). The map is separable in x and y, so it costs O(B*H*W) with no matrix product
    per pixel, and the 2x2 inverse is written out (no linalg call, which would check for a
    singular matrix on the host). flip [B] (bool): those samples are mirrored (x -> W-1-x) BEFORE
    the map, as `mirror` then `affine` would; cut (corner [B, 2], size): the output square of
    `cutout` reads 0, as `cutout` after the map would. Both fold into the one read of
    `read_pixels`.
    """
    B, dev = matrix.shape[0], matrix.device
    m = matrix.to(torch.float32)
    a, b, c, d = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    det = a * d - b * c
    i00, i01, i10, i11 = (v.view(B, 1, 1) for v in (d / det, -b / det, -c / det, a / det))
    cx, cy = (W - 1) / 2, (H - 1) / 2
    shift = shift.to(torch.float32)
    u = torch.arange(W, device=dev, dtype=torch.float32).view(1, 1, W) - cx - shift[:, 0].view(B, 1, 1)
    v = torch.arange(H, device=dev, dtype=torch.float32).view(1, H, 1) - cy - shift[:, 1].view(B, 1, 1)
    sx = torch.floor(i00 * u + i01 * v + (cx + 0.5)).to(torch.int64)       # [B, H, W]
    sy = torch.floor(i10 * u + i11 * v + (cy + 0.5)).to(torch.int64)
    outside = (sx < 0) | (sx >= W) | (sy < 0) | (sy >= H)
    if flip is not None:
        sx = torch.where(flip.view(B, 1, 1), W - 1 - sx, sx)
    if cut is not None:
        outside |= _square(cut[0], cut[1], H, W)
    return torch.where(outside, H * W, sy * W + sx).view(B, H * W)


def read_pixels(x: Tensor, source: Tensor) -> Tensor:
    """out[t, b, c, q] = x[t, b, c, source[b, q]] (0 where source is H*W), one gather over the
    whole batch: x [T, B, C, H, W], source [B, H*W] from `pixel_source` -> [T, B, C, H, W]."""
    T, B, C, H, W = x.shape
    none = (source == H * W).view(1, B, 1, H * W)
    index = source.clamp(max=H * W - 1).view(1, B, 1, H * W).expand(T, B, C, H * W)
    out = x.reshape(T, B, C, H * W).gather(3, index)
    return out.masked_fill_(none, 0).view(T, B, C, H, W)


def affine(x: Tensor, matrix: Tensor, shift: Tensor) -> Tensor:
    """Move every sample by its own affine map about the image centre, nearest neighbour, zero fill.

    x [T, B, C, H, W]; matrix [B, 2, 2] acts on (x, y) pixel coordinates; shift [B, 2] (dx, dy) in
    pixels. An input pixel p lands at ``matrix @ (p - c) + c + shift`` with c the centre
    ((W-1)/2, (H-1)/2): each output pixel takes the input pixel nearest to where it came from
    (ties round up), so counts stay counts; pixels that come from outside the image are 0.
    Identity matrix and integer shifts move counts exactly.
    """
    return read_pixels(x, pixel_source(matrix, shift, x.shape[3], x.shape[4]))


def translate(x: Tensor, shift: Tensor) -> Tensor:
    """Move each sample by integer pixels, shift [B, 2] (dx, dy), zero fill: x [T, B, C, H, W]."""
    eye = torch.eye(2, device=x.device).expand(x.shape[1], 2, 2)
    return affine(x, eye, shift)


def thin(x: Tensor, keep: float, generator: torch.Generator) -> Tensor:
    """Binomial thinning of event counts x [T, B, C, H, W]: each counted event is kept with
    probability ``keep`` independently, which is what dropping events before integration gives.

    torch.binomial is the fastest exact sampler measured (``bench_augment.py --thinning``): it
    returns 0 for a zero count without drawing and, for keep > 0.5, draws the dropped events
    (about drop * n + 1 uniforms for a count n), where torch.binomial on the nonzero pixels only
    and a Bernoulli per event cost more on the CPU."""
    counts = x.to(torch.float32)
    kept = torch.binomial(counts, counts.new_full((1,), keep).expand_as(counts), generator=generator)
    return kept.to(x.dtype)


def _square(corner: Tensor, size: int, H: int, W: int) -> Tensor:
    """[B, H, W] bool: x0 <= x < x0+size and y0 <= y < y0+size, corner [B, 2] (x0, y0)."""
    B = corner.shape[0]
    xs = torch.arange(W, device=corner.device).view(1, 1, W)
    ys = torch.arange(H, device=corner.device).view(1, H, 1)
    x0, y0 = corner[:, 0].view(B, 1, 1), corner[:, 1].view(B, 1, 1)
    return (xs >= x0) & (xs < x0 + size) & (ys >= y0) & (ys < y0 + size)


def cutout(x: Tensor, corner: Tensor, size: int) -> Tensor:
    """Zero a size x size square per sample at all time steps; corner [B, 2] (x0, y0), the square
    covering x0 <= x < x0+size, y0 <= y < y0+size (clipped at the border). x [T, B, C, H, W]."""
    T, B, C, H, W = x.shape
    return x.masked_fill(_square(corner, size, H, W).view(1, B, 1, H, W), 0)


def take_times(x: Tensor, index: Tensor) -> Tensor:
    """Frames chosen per sample: index [B, T'] (time indices) -> [T', B, C, H, W] from x [T, B, C, H, W]."""
    T, B, C, H, W = x.shape
    idx = index.t().reshape(-1, B, 1, 1, 1).expand(index.shape[1], B, C, H, W)
    return x.gather(0, idx)


def subsample_index(keys: Tensor, T_out: int) -> Tensor:
    """Random sorted subsampling: the T_out time steps with the smallest ``keys`` [B, T], in time
    order -> [B, T_out]."""
    return keys.argsort(dim=1)[:, :T_out].sort(dim=1).values


def crop_index(start: Tensor, T_out: int) -> Tensor:
    """A window of T_out consecutive time steps from start [B] -> [B, T_out]."""
    return start.view(-1, 1) + torch.arange(T_out, device=start.device).view(1, -1)


def mixup(x: Tensor, target: Tensor, lam: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample b becomes lam[b] * itself + (1 - lam[b]) * sample perm[b], targets alike.
    x [T, B, C, H, W], target [B, 11], lam [B] in [0, 1], perm [B] (a permutation of the batch)."""
    lx = lam.to(x.dtype).view(1, -1, 1, 1, 1)
    lt = lam.to(target.dtype).view(-1, 1)
    # one copy and one pass: lerp from the partner to the sample (exactly the sample at lam 1)
    return x[:, perm].lerp_(x, lx), target * lt + target[perm] * (1 - lt)


def cutmix(x: Tensor, target: Tensor, box: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    """Paste, into each sample b, the box [B, 4] (x0, y0, x1, y1; half-open) of sample perm[b] at all
    time steps; its target mixes in perm[b]'s by the box's share of the image."""
    T, B, C, H, W = x.shape
    xs = torch.arange(W, device=x.device).view(1, 1, W)
    ys = torch.arange(H, device=x.device).view(1, H, 1)
    inside = ((xs >= box[:, 0].view(B, 1, 1)) & (xs < box[:, 2].view(B, 1, 1))
              & (ys >= box[:, 1].view(B, 1, 1)) & (ys < box[:, 3].view(B, 1, 1)))
    x = torch.where(inside.view(1, B, 1, H, W), x[:, perm], x)
    share = inside.view(B, -1).sum(1).to(target.dtype).view(-1, 1) / (H * W)
    return x, target * (1 - share) + target[perm] * share


def smooth(target: Tensor, eps: float) -> Tensor:
    """Label smoothing of targets [B, 11]: (1 - eps) * target + eps / 11."""
    return target * (1 - eps) + eps / N_CLASSES


# --------------------------------------------------------------------------- the draws


def augment_generator(seed: int, epoch: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of one training step's augmentations: a function of (seed, epoch, rank, step)
    only, so resuming reproduces it and ranks differ."""
    digest = hashlib.sha256(f"dvsg-augment/{seed}/{epoch}/{rank}/{step}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def _uniform(g: torch.Generator, n: int, low: float, high: float, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def _randint(g: torch.Generator, n: int, low: int, high: int, device: torch.device) -> Tensor:
    """Uniform integers low..high inclusive, [n] int64."""
    return torch.randint(low, high + 1, (n,), generator=g, device=device)


def _geometry(spec: AugmentSpec, B: int, g: torch.Generator, dev: torch.device) -> tuple[Tensor, Tensor]:
    """Per-sample affine matrices [B, 2, 2] and integer shifts [B, 2] for rotate/shear/scale/translate."""
    rad = math.pi / 180
    angle = _uniform(g, B, -spec.rotate, spec.rotate, dev) * rad
    shear = torch.tan(_uniform(g, B, -spec.shear, spec.shear, dev) * rad)
    zoom = _uniform(g, B, 1 - spec.scale, 1 + spec.scale, dev)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    sh = torch.zeros(B, 2, 2, device=dev)
    sh[:, 0, 0] = 1
    sh[:, 1, 1] = 1
    sh[:, 0, 1] = shear
    matrix = zoom.view(B, 1, 1) * (rot @ sh)
    return matrix, _shift(spec, B, g, dev)


def _shift(spec: AugmentSpec, B: int, g: torch.Generator, dev: torch.device) -> Tensor:
    """Integer shifts [B, 2] (dx, dy), each uniform in -translate..translate."""
    return torch.stack([_randint(g, B, -spec.translate, spec.translate, dev),
                        _randint(g, B, -spec.translate, spec.translate, dev)], -1)


def augment_batch(spec: AugmentSpec, x: Tensor, labels: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Apply ``spec`` to a training batch: x [T, B, 2, H, W], labels [B] (int64) -> (x' [T', B, 2, H, W],
    soft targets [B, 11] float32). Parameters are drawn from ``g`` in a fixed order (so the same
    generator state gives the same batch); an option that is off draws nothing.

    Mirror, rotate/shear/scale/translate and cutout are one read of the batch when a geometric
    option is on (`pixel_source` folds them into one source map): the same result as applying
    `mirror`, `affine` and `cutout` in turn, at the cost of one gather."""
    T, B, C, H, W = x.shape
    dev = x.device
    target = torch.nn.functional.one_hot(labels, N_CLASSES).to(torch.float32)
    if spec.crop:
        x = take_times(x, crop_index(_randint(g, B, 0, T - spec.crop, dev), spec.crop))
    if spec.subsample:
        x = take_times(x, subsample_index(torch.rand(B, x.shape[0], generator=g, device=dev), spec.subsample))
    if spec.drop:
        x = thin(x, 1 - spec.drop, g)
    flip = torch.rand(B, generator=g, device=dev) < 0.5 if spec.mirror else None
    geometry = None
    if spec.rotate or spec.shear or spec.scale:
        geometry = _geometry(spec, B, g, dev)
    elif spec.translate:
        geometry = (torch.eye(2, device=dev).expand(B, 2, 2), _shift(spec, B, g, dev))
    cut = None
    if spec.cutout:
        cut = (torch.stack([_randint(g, B, -spec.cutout + 1, W - 1, dev),
                            _randint(g, B, -spec.cutout + 1, H - 1, dev)], -1), spec.cutout)
    if geometry is not None:
        x = read_pixels(x, pixel_source(*geometry, H, W, flip=flip, cut=cut))
        target = mirror_target(target, flip) if flip is not None else target
    else:
        if flip is not None:
            x, target = mirror(x, target, flip)
        if cut is not None:
            x = cutout(x, *cut)
    if spec.mixup or spec.cutmix:
        x, target = _mix(spec, x, target, g)
    if spec.smooth:
        target = smooth(target, spec.smooth)
    return x, target


def _mix(spec: AugmentSpec, x: Tensor, target: Tensor, g: torch.Generator,
         on_host: bool | None = None) -> tuple[Tensor, Tensor]:
    """Mixup with probability spec.mixup, else cutmix with probability spec.cutmix, per batch.
    Every parameter is drawn whatever the coin says (the stream does not depend on it). On the CPU
    (``on_host`` None: the batch's device decides) reading the coin costs nothing, so only the
    outcome drawn is computed; on an accelerator the coin stays on the device (no host sync): the
    outcomes not drawn run as exact identities. The batch is the same either way."""
    T, B, C, H, W = x.shape
    dev = x.device
    u = torch.rand((), generator=g, device=dev)
    perm = torch.randperm(B, generator=g, device=dev)
    lam = torch.rand(B, generator=g, device=dev) if spec.mixup else None
    box = _cutmix_box(B, H, W, g, dev) if spec.cutmix else None
    use_mix = u < spec.mixup
    use_cut = (u >= spec.mixup) & (u < spec.mixup + spec.cutmix)
    if on_host if on_host is not None else dev.type == "cpu":
        if lam is not None and use_mix:
            return mixup(x, target, lam, perm)
        if box is not None and use_cut:
            return cutmix(x, target, box, perm)
        return x, target
    # the outcome not drawn becomes the identity, exactly: mixup with lam 1 (lerp returns its end)
    # and cutmix with an empty box; mixup and cutmix exclude each other, so they chain
    if lam is not None:
        x, target = mixup(x, target, torch.where(use_mix, lam, 1.0), perm)
    if box is not None:
        x, target = cutmix(x, target, torch.where(use_cut, box, 0), perm)
    return x, target


def _cutmix_box(B: int, H: int, W: int, g: torch.Generator, dev: torch.device) -> Tensor:
    """Boxes [B, 4] (x0, y0, x1, y1): side sqrt(1 - lam) of the image with lam ~ U(0, 1), centred
    anywhere, clipped at the border."""
    side = torch.sqrt(torch.rand(B, generator=g, device=dev))
    cx, cy = torch.rand(B, generator=g, device=dev) * W, torch.rand(B, generator=g, device=dev) * H
    half_w, half_h = side * W / 2, side * H / 2
    return torch.stack([(cx - half_w).clamp(0, W), (cy - half_h).clamp(0, H),
                        (cx + half_w).clamp(0, W), (cy + half_h).clamp(0, H)], -1).round().to(torch.int64)
