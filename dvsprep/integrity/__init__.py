"""The integrity wing: sha256 manifests and fingerprints, the verified-markers of this machine
(`trust`) and the report a verification prints. Imports no other wing."""
from . import trust
from .manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    canonical_json,
    dir_manifest,
    fingerprint,
    md5_file,
    md5_files,
    md5_stream,
    sha256_bytes,
    sha256_file,
    write_dir_manifest,
)
from .report import Problem, VerifyReport
from .trust import stamp, stamp_path

__all__ = [
    "MANIFEST_FORMAT", "MANIFEST_NAME", "Problem", "VerifyReport", "canonical_json", "dir_manifest",
    "fingerprint", "md5_file", "md5_files", "md5_stream", "sha256_bytes", "sha256_file", "stamp", "stamp_path", "trust", "write_dir_manifest",
]
