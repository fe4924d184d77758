"""The frames wing: frame integration (exactly SpikingJelly's), the zarr v3 frame store (schema,
its files in a folder or an uncompressed zip, the checks that verify it, http(s)/s3:// stores fetched
into the cache, pushed to and pulled from object storage), building a store from events.h5, and pack/unpack."""
from . import remote
from .build import BuildSummary, build_frame_store
from .check import check_layout, content_problems, decoded_before, note_decoding, read_meta_arrays, scan_files, verify_files
from .files import MAX_MANIFEST_BYTES, StoreFiles, is_zip_path, open_store_files, parse_manifest
from .integrate import check_params, frame_bounds, integrate, narrowest_dtype
from .pack import PackSummary, pack_store, unpack_store
from .remote import download_limit, is_url, parse_size
from .share import ShareSummary, pull_store, push_store
from .store import (
    FrameSplit,
    FrameStore,
    check_fingerprint,
    describe_frame_store,
    frame_store_name,
    open_frame_store,
    write_frame_store_from_arrays,
)

__all__ = [
    "MAX_MANIFEST_BYTES", "BuildSummary", "FrameSplit", "FrameStore", "PackSummary", "StoreFiles",
    "build_frame_store", "check_fingerprint", "check_layout", "check_params", "content_problems", "decoded_before",
    "describe_frame_store", "download_limit", "frame_bounds", "frame_store_name", "integrate",
    "is_url", "is_zip_path", "narrowest_dtype", "note_decoding", "open_frame_store", "open_store_files", "pack_store",
    "parse_manifest", "parse_size", "pull_store", "push_store", "ShareSummary", "read_meta_arrays", "remote",
    "scan_files", "unpack_store", "verify_files",
    "write_frame_store_from_arrays",
]
