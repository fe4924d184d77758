"""The ``--augment SPEC`` switch: what it may ask for and its text form, with no torch import (the
CLI parses it before any work begins); the transforms themselves are in `dvsg_train.augment`."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """What ``--augment`` asks for (0 / False = off); see `parse_augment` for the text form."""

    mirror: bool = False        # label-aware horizontal mirror of half the samples
    translate: int = 0          # max |dx|, |dy| in pixels, uniform integers
    rotate: float = 0.0         # max |angle| in degrees
    shear: float = 0.0          # max |shear angle| in degrees (along x)
    scale: float = 0.0          # zoom uniform in [1 - scale, 1 + scale]
    drop: float = 0.0           # probability of dropping each event (binomial thinning)
    cutout: int = 0             # side of a zeroed square per sample, pixels
    crop: int = 0               # keep a random window of this many time steps
    subsample: int = 0          # keep this many random time steps, in order
    mixup: float = 0.0          # probability per batch of mixup (lam ~ U(0, 1) per sample)
    cutmix: float = 0.0         # probability per batch of cutmix (mixup and cutmix exclude each other)
    smooth: float = 0.0         # label smoothing eps

    @property
    def active(self) -> bool:
        return self != AugmentSpec()

    def text(self) -> str:
        """The canonical text form (what parse_augment reads back; "" when nothing is on)."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool):
                parts += [f.name] if v else []
            elif v:
                parts.append(f"{f.name}={_number(v)}")
        return ",".join(parts)


def _number(v: float | int) -> str:
    """The shortest text that reads back as exactly ``v`` (15.0 -> "15", 0.1 -> "0.1")."""
    text = repr(v)
    return text[:-2] if text.endswith(".0") else text


# name -> (type, lowest, highest value accepted); 0 means off
_BOUNDS: dict[str, tuple[type, float, float]] = {
    "translate": (int, 0, 64), "rotate": (float, 0, 180), "shear": (float, 0, 60), "scale": (float, 0, 0.9),
    "drop": (float, 0, 0.99), "cutout": (int, 0, 128), "crop": (int, 0, 1 << 16), "subsample": (int, 0, 1 << 16),
    "mixup": (float, 0, 1), "cutmix": (float, 0, 1), "smooth": (float, 0, 1),
}


def parse_augment(text: str) -> AugmentSpec:
    """``mirror,translate=8,rotate=15,drop=0.1,mixup=0.5`` -> AugmentSpec; "" or "none" -> nothing.
    Raises ConfigError (one line) for an unknown name, a missing or malformed value, or one out of
    its range; values must be finite."""
    text = text.strip()
    if text in ("", "none"):
        return AugmentSpec()
    values: dict[str, Any] = {}
    for item in text.split(","):
        name, eq, raw = (s.strip() for s in item.partition("="))
        if name in values:
            raise ConfigError(f"--augment: {name!r} given twice")
        if name == "mirror":
            if eq:
                raise ConfigError("--augment: 'mirror' takes no value")
            values[name] = True
            continue
        if name not in _BOUNDS:
            known = ", ".join(["mirror", *_BOUNDS])
            raise ConfigError(f"--augment: unknown augmentation {name!r} (known: {known})")
        kind, low, high = _BOUNDS[name]
        if not eq or not raw:
            raise ConfigError(f"--augment: {name!r} needs a value ({name}=...)")
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"--augment: {name}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise ConfigError(f"--augment: {name}={raw} is outside {low:g}..{high:g}")
        values[name] = value
    spec = AugmentSpec(**values)
    if spec.mixup + spec.cutmix > 1:
        raise ConfigError(f"--augment: mixup={spec.mixup:g} and cutmix={spec.cutmix:g} add up to more than 1")
    if spec.crop and spec.subsample and spec.subsample > spec.crop:
        raise ConfigError(f"--augment: subsample={spec.subsample} keeps more time steps than crop={spec.crop}")
    return spec


def check_spec_T(spec: AugmentSpec, T: int) -> None:
    """The time-step options need at most T steps (the store's T)."""
    for name in ("crop", "subsample"):
        n = getattr(spec, name)
        if n > T:
            raise ConfigError(f"--augment: {name}={n} needs at least {n} time steps; the store has T={T}")
