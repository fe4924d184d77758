"""PLIF-paper SNN trainer for DVS128 Gesture frame stores.

The public face::

    import dvsg_train
    summary = dvsg_train.train(dvsg_train.TrainConfig(data="data", T=16, epochs=64))
    result = dvsg_train.evaluate_checkpoint("logs/RUN/checkpoint_max.pt", "data")
    ds = dvsg_train.FrameDataset("data/frames_T16_number.zarr", "train")   # a torch Dataset

The names are imported on first use (PEP 562), so `import dvsg_train` (which every submodule
import runs) does not import torch until one of them is used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dvsprep.lazy import lazy_face

__version__ = "0.1.0"

# public name -> (module, the name there)
_PUBLIC = {
    "FrameDataset": ("dvsg_train.data", "FrameDataset"),
    "TrainConfig": ("dvsg_train.config", "TrainConfig"),
    "train": ("dvsg_train.engine", "main"),
    "evaluate_checkpoint": ("dvsg_train.engine", "evaluate_checkpoint"),
}

__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_face(__name__, _PUBLIC)


if TYPE_CHECKING:  # for type checkers and editors; never run
    from .config import TrainConfig
    from .data import FrameDataset
    from .engine import evaluate_checkpoint
    from .engine import main as train
