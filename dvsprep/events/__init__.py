"""The events wing: DATA_ROOT/events.h5 (per-sample events of both splits) and `convert`, which
writes it from a raw release."""
from .convert import ConvertSummary, convert_release
from .store import EventsFile, EventsSplit, EventsWriter, open_events

__all__ = ["ConvertSummary", "EventsFile", "EventsSplit", "EventsWriter", "convert_release", "open_events"]
