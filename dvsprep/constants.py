"""The one place that fixes sensor size, axis order, dtypes and format versions."""
from __future__ import annotations

import numpy as np

SENSOR_H = 128
SENSOR_W = 128
SENSOR_SIZE = (SENSOR_H, SENSOR_W)
N_CLASSES = 11
N_POLARITIES = 2

# Event arrays as decoded from AEDAT and stored in events.h5.
T_DTYPE = np.dtype("<i8")       # microseconds, (overflow << 31) | timestamp
XY_DTYPE = np.dtype("u1")       # 0..127
P_DTYPE = np.dtype("u1")        # 0 = OFF, 1 = ON
OFFSET_DTYPE = np.dtype("<i8")
LABEL_DTYPE = np.dtype("u1")    # 0..10 (csv class 1..11 minus one)
ROW_DTYPE = np.dtype("<i4")

# Frames are [T, C, H, W] per sample, stores hold [N, T, C, H, W]; channel 0 counts p == 0.
FRAME_AXES = ("sample", "time", "polarity", "y", "x")
SPLITS = ("train", "test")
SPLIT_METHODS = ("number", "time")

EVENTS_FORMAT = "dvsprep-events/1"
EVENTS_NAME = "events.h5"      # DATA_ROOT/events.h5, written by convert, read by frames
FRAMES_FORMAT = "dvsprep-frames/1"
FRAME_STORE_GLOB = "frames_T*_*.zarr"   # DATA_ROOT/frames_T<T>_<split_by>.zarr, written by frames
ZARR_JSON = "zarr.json"        # a zarr v3 group's (or array's) metadata document
MANIFEST_NAME = "manifest.json"          # a frame store's sha256 manifest, at its root

# The IBM release's layout: RAW/DvsGesture/ holds the recordings and the trial lists.
RELEASE_DIR = "DvsGesture"
ARCHIVE_NAME = "DvsGesture.tar.gz"
TRIAL_LISTS = {"train": "trials_to_train.txt", "test": "trials_to_test.txt"}

AEDAT_VERSION_LINE = b"#!AER-DAT3.1"
AEDAT_END_HEADER = b"#!END-HEADER"
POLARITY_EVENT = 1
POLARITY_EVENT_SIZE = 8
PACKET_HEADER_SIZE = 28

GESTURE_NAMES = (
    "hand_clapping",
    "right_hand_wave",
    "left_hand_wave",
    "right_arm_clockwise",
    "right_arm_counter_clockwise",
    "left_arm_clockwise",
    "left_arm_counter_clockwise",
    "arm_roll",
    "air_drums",
    "air_guitar",
    "other_gestures",
)
# The label of a gesture seen in a mirror (x -> W-1-x): a right hand wave mirrored IS a left hand
# wave, a right arm turning clockwise mirrored IS a left arm turning counter-clockwise; the other
# gestures are their own mirror images. MIRROR_LABEL[label] is the mirrored label (an involution).
MIRROR_LABEL = (0, 2, 1, 6, 5, 4, 3, 7, 8, 9, 10)
LIGHTINGS = ("fluorescent", "fluorescent_led", "lab", "led", "natural")


def recording_name_ok(name: object) -> bool:
    """A recording stem as the release names them: printable, no path separator, not '.'/'..'."""
    return (isinstance(name, str) and 0 < len(name.encode("utf-8", "surrogatepass")) <= 255
            and name.isprintable() and "/" not in name and "\\" not in name and name not in (".", ".."))
