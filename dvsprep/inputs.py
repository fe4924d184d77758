"""What is this PATH? The one place where dvsprep's commands and dvsg_train tell their inputs apart.

`kind_of(path)` names what a command was given: an http(s) URL of a frame store, a frame store
folder or its .zip, an events.h5 file, a DATA_ROOT (the folder `convert`/`frames` write into), or
a raw release (a DvsGesture folder or its tar). A command passes the kinds it can use as `accept`
and gets either one of them or a one-line error that names the path, says what was expected and
what the path is instead. A new input form or suffix rule is added here, once.

The rules, decided once:

- URLs: `http://`, `https://` and `s3://` (any case) are frame stores fetched into the cache
  (`dvsprep.frames.remote`); any other `scheme://` (gs://, ftp://, file://) is refused in one
  line until a fetcher for it exists. A URL with credentials in it (user:password@) is refused:
  credentials come from the environment, never from text that lands in logs and config files.
- Suffixes are compared without regard to case: .zip (a packed store), .tar.gz/.tgz/.tar (a raw
  release archive), .h5/.hdf5 (events).
- A regular file is events.h5 when its name says so or its first bytes are HDF5's signature;
  .zip and tar suffixes are checked first, as `dvsprep verify` always did.
- A folder is a frame store when it holds zarr.json or manifest.json; a raw release when it or
  its DvsGesture/ holds trials_to_train.txt, or it holds DvsGesture.tar.gz; a DATA_ROOT when it
  holds events.h5 or a frames_T<T>_<split_by>.zarr folder. A store is only a store; a folder
  that is both a release and a DATA_ROOT (`convert raw -o raw`) is the one the caller accepts,
  the release first.
- A name with a NUL byte, one too long for the system, or a symlink loop is not a usable path;
  a path that does not exist is MissingFileError. Neither is ever a traceback.

Only constants and errors are imported, so every layer (raw included) may use this module.
"""
from __future__ import annotations

import enum
import errno
import os
import re
import stat
import urllib.parse
from pathlib import Path
from typing import AbstractSet

from .constants import ARCHIVE_NAME, EVENTS_NAME, FRAME_STORE_GLOB, MANIFEST_NAME, RELEASE_DIR, TRIAL_LISTS, ZARR_JSON
from .errors import DvsprepError, MissingFileError, StoreError

URL_SCHEMES = ("http", "https", "s3")      # http(s) through urllib, s3:// through the s3 extra
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
HDF5_SUFFIXES = (".h5", ".hdf5")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class InputKind(str, enum.Enum):
    URL = "url"                # http(s) or s3:// URL of a frame store folder or .zip
    STORE_DIR = "store_dir"    # frames_T<T>_<split_by>.zarr
    STORE_ZIP = "store_zip"    # what `dvsprep pack` writes
    EVENTS = "events"          # events.h5
    DATA_ROOT = "data_root"    # a folder holding events.h5 and/or frame stores
    RAW_DIR = "raw_dir"        # a folder holding DvsGesture/ (or DvsGesture.tar.gz), or DvsGesture/ itself
    RAW_TAR = "raw_tar"        # DvsGesture.tar.gz (or .tgz, .tar)

    def __str__(self) -> str:
        return self.value


FRAME_STORE: frozenset[InputKind] = frozenset({InputKind.URL, InputKind.STORE_DIR, InputKind.STORE_ZIP})
RAW_RELEASE: frozenset[InputKind] = frozenset({InputKind.RAW_DIR, InputKind.RAW_TAR})
# What a trainer's --data takes: a frame store, or the DATA_ROOT that holds frames_T<T>_number.zarr.
STORE_OR_DATA_ROOT: frozenset[InputKind] = FRAME_STORE | {InputKind.DATA_ROOT}
ALL_KINDS: frozenset[InputKind] = frozenset(InputKind)

# What a caller takes, in words, in the order a refusal lists them.
_EXPECTED = (
    (frozenset({InputKind.EVENTS}), "an events.h5 file"),
    (FRAME_STORE, "a frame store (.zarr folder, .zip or http(s)/s3:// URL)"),
    (frozenset({InputKind.DATA_ROOT}), "a DATA_ROOT (a folder holding events.h5 or frames_T<T>_<split_by>.zarr)"),
    (RAW_RELEASE, f"a DvsGesture release ({TRIAL_LISTS['train']} here or in {RELEASE_DIR}/, or a .tar.gz)"),
)
# What a path is, in words, when it is not what the caller takes.
_IS = {
    InputKind.URL: "a URL",
    InputKind.STORE_DIR: "a frame store folder",
    InputKind.STORE_ZIP: "a packed frame store (.zip)",
    InputKind.EVENTS: "an events.h5 file",
    InputKind.DATA_ROOT: "a DATA_ROOT",
    InputKind.RAW_DIR: "a DvsGesture release folder",
    InputKind.RAW_TAR: "a release archive",
}


def url_scheme(path: object) -> str | None:
    """The scheme (lower case) of a ``scheme://...`` string, else None (a local path)."""
    m = _SCHEME.match(path) if isinstance(path, str) else None
    return m.group(1).lower() if m else None


def is_url(path: object) -> bool:
    """Whether `path` is a URL dvsprep fetches (http://, https:// or s3://, any case)."""
    return url_scheme(path) in URL_SCHEMES


def check_url(url: str) -> None:
    """StoreError (one line naming it) for a URL dvsprep cannot use: malformed, without a host
    (an s3:// URL without a bucket or key), or with credentials inside it (the message never
    repeats them)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise StoreError(f"{url}: not a valid URL ({exc})") from None
    _refuse_credentials(url)
    if not host:
        raise StoreError(f"{url}: not a valid URL (no {'bucket' if url_scheme(url) == 's3' else 'host'})")
    if url_scheme(url) == "s3" and not parts.path.strip("/"):
        raise StoreError(f"{url}: not a valid URL (no key after the bucket)")


def _refuse_credentials(url: str) -> None:
    """StoreError for ``scheme://user:password@host/...``, without repeating the credentials."""
    head, sep, rest = url.partition("://")
    netloc = rest.split("/", 1)[0].split("#", 1)[0].split("?", 1)[0]
    if sep and "@" in netloc:
        path = rest[len(netloc):].split("#", 1)[0]
        raise StoreError(f"{head}://***@{netloc.rpartition('@')[2]}{path}: credentials inside a URL are refused "
                         f"(set them in the environment, e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")


def is_zip_path(path: str | os.PathLike) -> bool:
    """A packed store's name: ends in .zip, any case (the name only; nothing is opened)."""
    return str(path).lower().endswith(ZIP_SUFFIXES)


def is_tar_path(path: str | os.PathLike) -> bool:
    """A release archive's name: .tar.gz, .tgz or .tar, any case."""
    return str(path).lower().endswith(TAR_SUFFIXES)


def release_folder(path: str | os.PathLike) -> Path | None:
    """The DvsGesture folder of a folder RAW (RAW/DvsGesture or RAW itself), or None."""
    p = Path(path)
    for cand in (p / RELEASE_DIR, p):
        if (cand / TRIAL_LISTS["train"]).is_file():
            return cand
    return None


def _shown(text: str) -> str:
    """A path as a refusal names it: repr (NUL and control characters visible), cut when huge."""
    return repr(text) if len(text) <= 256 else f"{text[:120]!r}... ({len(text)} characters)"


def _stat(text: str) -> os.stat_result | None:
    """os.stat of a local path; None when absent; StoreError for a name no system call takes."""
    if "\x00" in text:
        raise StoreError(f"{_shown(text)}: not a usable path (it holds a NUL byte)")
    try:
        return os.stat(text)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):
            raise StoreError(f"{_shown(text)}: not a usable path ({exc.strerror})") from None
        raise  # permissions and the like: the OSError names the path in one line


def _is_hdf5(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE


def _candidates(p: Path, st: os.stat_result) -> tuple[InputKind, ...]:
    """What an existing local path can be, first the likeliest; () when nothing."""
    if stat.S_ISDIR(st.st_mode):
        if (p / ZARR_JSON).exists() or (p / MANIFEST_NAME).exists():
            return (InputKind.STORE_DIR,)
        found = []
        if release_folder(p) is not None or (p / ARCHIVE_NAME).is_file():
            found.append(InputKind.RAW_DIR)
        if (p / EVENTS_NAME).is_file() or any(q.is_dir() for q in p.glob(FRAME_STORE_GLOB)):
            found.append(InputKind.DATA_ROOT)
        return tuple(found)
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device: never read it to find out
        return ()
    if is_zip_path(p.name):
        return (InputKind.STORE_ZIP,)
    if is_tar_path(p.name):
        return (InputKind.RAW_TAR,)
    if p.name.lower().endswith(HDF5_SUFFIXES) or _is_hdf5(p):
        return (InputKind.EVENTS,)
    return ()


def expected_words(accept: AbstractSet[InputKind]) -> str:
    """'not X', 'neither X nor Y' or 'not X, Y or Z' for the kinds a caller takes."""
    words = [w for kinds, w in _EXPECTED if kinds & accept]
    if len(words) == 1:
        return f"not {words[0]}"
    if len(words) == 2:
        return f"neither {words[0]} nor {words[1]}"
    return f"not {', '.join(words[:-1])} or {words[-1]}"


def kind_of(path: str | os.PathLike, accept: AbstractSet[InputKind] | None = None, *,
            noun: str = "file or directory", error: type[DvsprepError] = StoreError) -> InputKind:
    """What `path` is, among the kinds in `accept` (default: every kind).

    Raises MissingFileError ``<path>: no such <noun>`` when nothing is there; StoreError for an
    unusable name, an unsupported URL scheme or a malformed http(s) URL; `error` (StoreError
    unless given) ``<path>: not <what accept takes>[; it is <what it is>]`` for anything else.
    Nothing is downloaded: a URL is checked for its form only."""
    accept = ALL_KINDS if accept is None else frozenset(accept)
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    scheme = url_scheme(text)
    if scheme is not None:
        _refuse_credentials(text)
        if scheme not in URL_SCHEMES:
            raise StoreError(f"{text}: {scheme}:// URLs are not supported (use an http://, https:// or s3:// URL)")
        if InputKind.URL not in accept:
            raise error(f"{text}: {expected_words(accept)}; it is {_IS[InputKind.URL]}")
        check_url(text)
        return InputKind.URL
    p = Path(text)
    st = _stat(text)
    if st is None:
        raise MissingFileError(f"{p}: no such {noun}")
    found = _candidates(p, st)
    for kind in found:
        if kind in accept:
            return kind
    what = f"; it is {_IS[found[0]]}" if found else ""
    raise error(f"{p}: {expected_words(accept)}{what}")
