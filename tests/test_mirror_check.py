"""scripts/mirror_check.py's label logic (the script itself trains a network: minutes, not a test)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("mirror_check", ROOT / "scripts" / "mirror_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mirror_frames_moves_an_event_to_the_other_side():
    frames = np.zeros((1, 2, 2, 4, 5), dtype=np.uint8)
    frames[0, 1, 0, 3, 1] = 7
    out = _script().mirror_frames(frames)
    assert out[0, 1, 0, 3, 3] == 7 and out.sum() == 7 and out.flags.c_contiguous


def test_mirror_scores_counts_against_the_mirrored_and_the_unmirrored_labels():
    # labels: clapping (0, its own mirror image), right hand wave (1), right arm clockwise (3),
    # left arm counter-clockwise (6)
    labels = [0, 1, 3, 6]
    plain = [0, 1, 3, 0]            # 3 of 4 right; of the 3 swapped-class samples, 2 right
    mirrored = [0, 2, 3, 3]         # 0 -> 0 right; 1 -> 2 right; 3 -> 3 is the UNmirrored label
    #                                 (mirror: 6); 6 -> 3 right
    r = _script().mirror_scores(np.array(plain), np.array(mirrored), np.array(labels))
    assert r == {"plain": 0.75, "mirrored_vs_mirror_label": 0.75, "swapped_plain": 2 / 3,
                 "swapped_vs_mirror_label": 2 / 3, "swapped_vs_label": 1 / 3, "swapped_n": 3}
    assert _script().SWAPPED == (1, 2, 3, 4, 5, 6)
