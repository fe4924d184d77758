"""The raw wing: AEDAT 3.1 recordings, the IBM release's layout (folder or tar.gz, label csvs,
trial lists, published md5s) and the synthetic release in the same layout. Imports no other wing."""
from .aedat import Events, decode_buffer, map_file, polarity_packets, read_aedat, write_aedat
from .release import (
    ARCHIVE_NAME,
    RELEASE_DIR,
    TRIAL_LISTS,
    LabelRows,
    Recording,
    check_member_size,
    cut_samples,
    find_release_dir,
    list_recordings,
    load_published_manifest,
    open_release,
    parse_labels,
    parse_trials,
    sj_sample_names,
)
from .synth import SYNTH_FORMAT, SYNTH_RECORD, SynthSummary, write_release

__all__ = [
    "ARCHIVE_NAME", "RELEASE_DIR", "SYNTH_FORMAT", "SYNTH_RECORD", "TRIAL_LISTS", "Events", "LabelRows",
    "Recording", "SynthSummary",
    "check_member_size", "cut_samples", "decode_buffer", "find_release_dir", "list_recordings",
    "load_published_manifest", "map_file", "open_release", "parse_labels", "parse_trials",
    "polarity_packets", "read_aedat", "sj_sample_names", "write_aedat", "write_release",
]
