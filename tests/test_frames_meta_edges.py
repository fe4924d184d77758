"""check_meta_content (what every reader of a frame store relies on) at each boundary and one
past it: labels 0 and 10 / -1 and 11, rows 0 / -1, n_events 0 / -1, t_start == t_end / one past,
recording names at 255 bytes / 256, per-class counts, lengths; exact one-line messages."""
from __future__ import annotations

import numpy as np
import pytest

from dvsprep.errors import StoreError
from dvsprep.frames.check import check_meta_content


def _meta(**change):
    meta = {"label": np.array([0, 10], np.int16), "recording": ["user01_lab", "u" * 255],
            "row": np.array([0, 7], np.int32), "t_start": np.array([5, 9], np.int64),
            "t_end": np.array([5, 10], np.int64), "n_events": np.array([0, 3], np.int64)}
    meta.update(change)
    return meta


def test_every_field_at_its_edge_is_accepted():
    per_class = [1] + [0] * 9 + [1]
    check_meta_content("s.zarr", "train", _meta(), per_class)
    check_meta_content("s.zarr", "test", {k: v[:0] for k, v in _meta().items()}, [0] * 11)   # empty split


@pytest.mark.parametrize("change,message", [
    ({"label": np.array([0, 11], np.int16)}, "train/label holds 11, outside 0..10"),
    ({"label": np.array([-1, 10], np.int16)}, "train/label holds -1, outside 0..10"),
    ({"row": np.array([0, -1], np.int32)}, "train/row holds -1, a negative row"),
    ({"n_events": np.array([-1, 3], np.int64)}, "train/n_events holds a negative count"),
    ({"t_start": np.array([5, 11], np.int64)}, "train sample 1 ends (t_end) before it starts (t_start)"),
    ({"recording": ["user01_lab", "u" * 256]}, "train/recording 1 is " + repr("u" * 40) + ", not a recording name"),
    ({"recording": ["..", "x"]}, "train/recording 0 is '..', not a recording name"),
    ({"recording": ["a/b", "x"]}, "train/recording 0 is 'a/b', not a recording name"),
    ({"row": np.array([0], np.int32)}, "train/row has 1 entries, label has 2"),
])
def test_one_past_each_edge_is_refused_in_one_line(change, message):
    with pytest.raises(StoreError) as e:
        check_meta_content("s.zarr", "train", _meta(**change))
    assert str(e.value) == f"s.zarr: {message}"


def test_per_class_counts_must_match_the_labels():
    wrong = [2] + [0] * 10
    with pytest.raises(StoreError) as e:
        check_meta_content("s.zarr", "train", _meta(), wrong)
    assert str(e.value) == (f"s.zarr: the store's attributes count {wrong!r} samples per class in train, "
                            f"its labels {[1] + [0] * 9 + [1]}")
    check_meta_content("s.zarr", "train", _meta(), None)      # not given: not checked
