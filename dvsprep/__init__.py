"""DVS128 Gesture preprocessing: the raw release -> events.h5 -> frame stores, verifiable.

The public face (everything else is reached through the wings, `dvsprep.frames`,
`dvsprep.events`, ...)::

    import dvsprep
    store = dvsprep.open_frame_store("data/frames_T16_number.zarr")   # folder, .zip or http(s) URL
    with dvsprep.open_events("data/events.h5") as ev: ...
    dvsprep.convert_release("DvsGesture.tar.gz", "data")
    dvsprep.build_frame_store("data/events.h5", "data/frames_T16_number.zarr", T=16)
    dvsprep.verify_path("data/frames_T16_number.zarr").ok
    dvsprep.pack_store("data/frames_T16_number.zarr")

The names are imported on first use (PEP 562): `import dvsprep` runs for every submodule import,
the CLI's included, and must stay cheap (no numpy, h5py or zarr until something needs them).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_face

__version__ = "0.1.0"

# public name -> (the module that defines it: a wing's face or a command, its name there)
_PUBLIC = {
    "open_frame_store": ("dvsprep.frames", "open_frame_store"),
    "build_frame_store": ("dvsprep.frames", "build_frame_store"),
    "pack_store": ("dvsprep.frames", "pack_store"),
    "open_events": ("dvsprep.events", "open_events"),
    "convert_release": ("dvsprep.events", "convert_release"),
    "verify_path": ("dvsprep.verify", "verify_path"),
}

__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_face(__name__, _PUBLIC)


if TYPE_CHECKING:  # for type checkers and editors; never run
    from .events import convert_release, open_events
    from .frames import build_frame_store, open_frame_store, pack_store
    from .verify import verify_path
