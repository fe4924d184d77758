"""Named training recipes for ``dvsg-train --preset NAME``.

A preset is a set of TrainConfig values. Options given on the command line override it; the run's
config.json records the resolved values and the preset's name. ``cupy: None`` means "the CUDA neuron
kernels when the run is on a CUDA device with CuPy installed, else the torch neurons": the kernels
give the same spikes as the torch neurons (gradients within rounding), so a preset also runs on a
CPU-only machine instead of failing; --cupy / --no-cupy decide it explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    source: str
    values: dict[str, Any]


# The seed tutorial's run: `seed`, and the base that `seed-augment` adds its augmentations to.
_SEED: dict[str, Any] = dict(T=16, batch_size=16, epochs=256, channels=128, net="multistep", neuron="lif",
                             tau=2.0, opt="adam", lr=1e-3, lr_scheduler="cosalr", T_max=64, amp=True,
                             cupy=None, val_fraction=0.0)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="seed",
        summary="SpikingJelly's DVS128 Gesture tutorial (classify_dvsg) as the seed runs it",
        source="the seed tutorial, SpikingJelly classify_dvsg: -T 16 -b 16 -amp -cupy -opt adam -lr 0.001, "
               "256 epochs with CosineAnnealingLR T_max 64 (issue 13; the network of Fang et al. 2021 with LIF)",
        values=_SEED,
    ),
    Preset(
        name="seed-augment",
        summary="the seed's network, optimiser and schedule plus the published DVS128 Gesture augmentations, "
                "with the label-aware mirror",
        source="the seed preset plus: QKFormer's dvs128-gesture train.py (Zhou et al., NeurIPS 2024): random "
               "horizontal flip, SNNAugmentWide (TrivialAugment-style: translate up to 5 px, rotate up to 30 "
               "degrees, shear up to 0.3 rad = 17 degrees, nearest neighbour), mixup with probability 0.5, "
               "label smoothing 0.1; EventDrop (Gu et al., IJCAI 2021): random event drop (0.1 here). The "
               "flip relabels the 3 pairs of left/right gestures (MIRROR_LABEL), which the published code does not",
        values=dict(_SEED, augment="mirror,translate=5,rotate=30,shear=17,drop=0.1,mixup=0.5,smooth=0.1"),
    ),
    Preset(
        name="plif",
        summary="the PLIF paper's DVS128 Gesture run (Fang et al., ICCV 2021), accuracy-A protocol",
        source="Fang et al., 'Incorporating Learnable Membrane Time Constant to Enhance Learning of Spiking "
               "Neural Networks', ICCV 2021; their code (github.com/fangwei123456/Parametric-Leaky-Integrate-"
               "and-Fire-Spiking-Neuron, codes/train.py and its README): -init_tau 2.0 -use_plif -use_max_pool "
               "-detach_reset -T 20 -channels 128 -number_layer 5 -split_by number -max_epoch 1024, "
               "batch 16, Adam lr 0.001, CosineAnnealingLR T_max 64, seed 2020, no AMP",
        values=dict(T=20, batch_size=16, epochs=1024, channels=128, net="multistep", neuron="plif", tau=2.0,
                    opt="adam", lr=1e-3, lr_scheduler="cosalr", T_max=64, amp=False, cupy=None,
                    val_fraction=0.0, seed=2020),
    ),
)}


def preset_values(name: str) -> dict[str, Any]:
    """The TrainConfig values of preset ``name`` (a copy). KeyError names the known presets."""
    try:
        return dict(PRESETS[name].values)
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def apply_preset(name: str | None, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig values: ``defaults`` < the preset's values < ``given`` (explicit options).

    given: the options the user typed (field name -> value); defaults: every other option's
    default. The result names the preset (``preset``) when one was applied."""
    values = dict(defaults)
    if name is not None:
        values.update(preset_values(name))
        values["preset"] = name
    values.update(given)
    return values
