"""Trained networks out of (and into) the toolkit: NIR graphs and SpikingJelly state dicts.

- `network`: a trained network from a checkpoint, ours or the SpikingJelly tutorial's;
- `nir_graph`: the network in eval mode as an exact NIR graph (needs the optional ``nir``);
- `sj_state`: SpikingJelly ``DVSGestureNet`` state dicts, both ways;
- `export_checkpoint`: what ``dvsg-export`` does.
"""
from __future__ import annotations

from .network import TrainedNetwork, load_network
from .writer import FORMATS, export_checkpoint

__all__ = ["FORMATS", "TrainedNetwork", "export_checkpoint", "load_network"]
