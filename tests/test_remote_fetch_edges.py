"""The edges of frames/remote.py that the end-to-end download tests pass over: store names from
odd URLs, the cache entry's name and record, the hash of what a partial already holds, a file
already complete or longer than it should be, a resume without resume state (as `pull` does),
the free-space checks' schedule and arguments, write errors, the resume state on disk, the
mirror loop without a partial folder, and the tidying of other URLs' partials whatever order
the folder lists them in. Expected values are written out here (or come from hashlib, json and
the test server's own ETag), never from the function under test."""
from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import re
import zipfile
from pathlib import Path

import pytest

from dvsprep.errors import DiskSpaceError, IntegrityError, ResourceLimitError, StoreError
from dvsprep.frames import remote, transport
from dvsprep.frames.pack import pack_store
from dvsprep.frames.remote import cache_entry, download_file, fetch_first, fetch_store, split_source, store_name
from http_fixtures import range_server
from store_fixtures import make_multishard_store

NAME = "frames_T64_number.zarr"
OBJ = bytes(range(256)) * 12 + b"tail"          # a plain object of 3076 bytes, every byte value


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    """A folder served over HTTP: a store (folder and zip), another store's zip under other/
    (a wrong mirror) and a plain object obj.bin; returns (folder, fingerprint, other's fingerprint)."""
    root = tmp_path_factory.mktemp("www")
    fp, _ = make_multishard_store(root / NAME, n_train=2, n_test=1)
    pack_store(root / NAME, root / f"{NAME}.zip")
    (root / "other").mkdir()
    fp_other, _ = make_multishard_store(root / "other" / NAME, n_train=3, n_test=1)
    pack_store(root / "other" / NAME, root / "other" / f"{NAME}.zip")
    (root / "obj.bin").write_bytes(OBJ)
    return root, fp, fp_other


@pytest.fixture(scope="module")
def _httpd(www):
    with pytest.MonkeyPatch.context() as mp, range_server(www[0], mp) as httpd:
        yield httpd


@pytest.fixture()
def httpd(_httpd):
    """The module's server with this test's counters (requests, ranges, bytes sent) empty."""
    _httpd.sent.clear()
    _httpd.ranges.clear()
    _httpd.gets.clear()
    _httpd.cut.clear()
    _httpd.fail.clear()
    yield _httpd


def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'       # what RangeFiles sends as the ETag


# ------------------------------------------------------------------ names

@pytest.mark.parametrize("url, name", [
    ("http://h/a/b.zarr/", "b.zarr"),                   # a trailing slash, and only the last part
    ("http://h/a/storeX/", "storeX"),                   # only slashes are stripped from the end
    ("http://h", "store"),                              # no path at all
    ("http://h/", "store"),                             # an empty last part
    ("http://h/...", "store"),                          # nothing left once the leading dots go
    ("http://h/.hidden.zip", "hidden.zip"),             # leading dots go (no hidden entries) ...
    ("http://h/Xdata.zip", "Xdata.zip"),                # ... and only dots
    ("http://h/name.", "name."),                        # trailing dots stay
    ("http://h/my%20store.zip", "my_store.zip"),        # unquoted, then one _ per odd character
    ("http://h/" + "a" * 150 + ".zip", "a" * 100),      # at most 100 characters
    ("http://h/" + "n" * 100, "n" * 100),               # exactly 100 kept ...
    ("http://h/" + "n" * 101, "n" * 100),               # ... and one past cut
    ("http://h/a/b.zarr.zip?x=1", "b.zarr.zip"),        # no query
    ("http://h/x%20y%C3%A9.zip", "x_y_.zip"),           # a non-ASCII letter is odd too
    ("http://h/a/frames.zarr/", "frames.zarr"),
])
def test_store_names_from_odd_urls(url, name):
    assert store_name(url) == name


def test_the_cache_entry_is_16_hex_digits_of_the_url_and_its_name(tmp_path):
    url = "http://h/s/frames_T16_number.zarr.zip"
    digest = hashlib.sha256(url.encode()).hexdigest()
    assert cache_entry(f"{url}#fingerprint={'a' * 12}", tmp_path) == \
        tmp_path / "stores" / f"{digest[:16]}-frames_T16_number.zarr.zip"


# ------------------------------------------------------------------ the hash of what a file already holds

@pytest.mark.parametrize("n, covered", [(0, b""), (4, b"0123"), (9, b"012345678"), (10, b"0123456789"),
                                        (15, b"0123456789")])
def test_hash_prefix_covers_the_first_n_bytes_or_all_there_is(tmp_path, n, covered):
    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    assert remote._hash_prefix(f, n).hexdigest() == hashlib.sha256(covered).hexdigest()


# ------------------------------------------------------------------ download_file

def test_a_file_already_complete_is_only_hashed(httpd, tmp_path):
    path = tmp_path / "obj.bin"
    path.write_bytes(OBJ)
    assert download_file(f"{httpd.url}/obj.bin", path, len(OBJ), size=len(OBJ)) == \
        (hashlib.sha256(OBJ).hexdigest(), len(OBJ))
    assert sum(httpd.gets.values()) == 0 and path.read_bytes() == OBJ


def test_a_file_longer_than_its_size_is_downloaded_again_from_the_start(httpd, tmp_path):
    path = tmp_path / "obj.bin"
    path.write_bytes(b"J" * (len(OBJ) + 3))             # another version's bytes, and too many
    assert download_file(f"{httpd.url}/obj.bin", path, len(OBJ), size=len(OBJ)) == \
        (hashlib.sha256(OBJ).hexdigest(), len(OBJ))
    assert path.read_bytes() == OBJ and httpd.ranges == [] and httpd.sent["/obj.bin"] == len(OBJ)


def test_a_resume_without_resume_state_asks_for_the_rest(httpd, tmp_path):
    """`pull` downloads without a partial folder: the bytes on disk are resumed all the same."""
    path = tmp_path / "obj.bin"
    path.write_bytes(OBJ[:1000])
    assert download_file(f"{httpd.url}/obj.bin", path, len(OBJ)) == (hashlib.sha256(OBJ).hexdigest(), len(OBJ))
    assert path.read_bytes() == OBJ and httpd.ranges == [("/obj.bin", "bytes=1000-")]
    assert httpd.sent["/obj.bin"] == len(OBJ) - 1000


def test_a_partial_longer_than_the_object_starts_over(httpd, tmp_path):
    """The server answers 416 to a range past its end: the file is emptied and fetched whole."""
    path = tmp_path / "obj.bin"
    path.write_bytes(b"J" * (len(OBJ) + 5))
    assert download_file(f"{httpd.url}/obj.bin", path, 1 << 20) == (hashlib.sha256(OBJ).hexdigest(), len(OBJ))
    assert path.read_bytes() == OBJ and httpd.gets["/obj.bin"] == 2
    # the one range asked for is the refused one; the second request had none
    assert httpd.ranges == [("/obj.bin", f"bytes={len(OBJ) + 5}-")] and httpd.sent["/obj.bin"] == len(OBJ)


def test_the_partial_remembers_the_validator_under_the_files_key(httpd, tmp_path):
    url = f"{httpd.url}/obj.bin"
    partial = remote._Partial(tmp_path / "p", url)
    download_file(url, tmp_path / "p" / "obj.bin", len(OBJ), partial=partial, key="train/obj.bin")
    assert json.loads((tmp_path / "p" / "partial.json").read_text()) == \
        {"url": url, "validators": {"train/obj.bin": _etag(OBJ)}}


def test_the_default_limit_name_is_the_manifests_size(httpd, tmp_path):
    url = f"{httpd.url}/obj.bin"
    with pytest.raises(ResourceLimitError) as e:
        download_file(url, tmp_path / "obj.bin", len(OBJ) - 1)
    assert str(e.value) == (f"{url}: declares {len(OBJ):,} bytes, more than the manifest's size "
                            f"({len(OBJ) - 1:,} bytes); not downloading it")


# ------------------------------------------------------------------ _stream: free space and write errors

def _reply(chunks: list[bytes], start: int, total: int | None, yielded: list[int]) -> transport.Reply:
    def gen():
        for c in chunks:
            yielded.append(len(yielded) + 1)
            yield c
    return transport.Reply(gen(), start, total, None, lambda: None)


def test_free_space_is_checked_for_the_rest_first_then_every_so_many_bytes(tmp_path, monkeypatch):
    """From 3 bytes already there, 6 chunks of 5 with a check every 10 bytes: the rest (30) is
    checked first, then 0 more at 13, 23 and 33 bytes, i.e. after the 2nd, 4th and 6th chunk."""
    yielded: list[int] = []
    checks = []
    monkeypatch.setattr(remote, "_SPACE_CHECK_EVERY", 10)
    monkeypatch.setattr(remote, "check_free_space",
                        lambda who, where, need: checks.append((who, where, need, len(yielded))))
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    chunks = [bytes([65 + i]) * 5 for i in range(6)]
    got = remote._stream("http://h/f", _reply(chunks, 3, 33, yielded), path, 3, 100, None, "k", "the limit")
    assert got == (hashlib.sha256(b"abc" + b"".join(chunks)).hexdigest(), 33)
    assert checks == [("http://h/f", tmp_path, 30, 0), ("http://h/f", tmp_path, 0, 2),
                      ("http://h/f", tmp_path, 0, 4), ("http://h/f", tmp_path, 0, 6)]


class _Unwritable:
    """A file opened for appending whose writes fail with `exc` (everything else passes through)."""

    def __init__(self, f, exc: OSError):
        self._f, self._exc = f, exc

    def write(self, data):
        raise self._exc

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("exc, kind, said", [
    (OSError(errno.ENOSPC, "No space left on device"), DiskSpaceError,
     "{path}: No space left on device (downloading http://h/f)"),
    (OSError(errno.EIO, "Input/output error"), StoreError, "{path}: cannot write (Input/output error)"),
    (OSError("the disk went away"), StoreError, "{path}: cannot write (the disk went away)"),  # no strerror
])
def test_a_write_error_names_the_file(tmp_path, monkeypatch, exc, kind, said):
    import builtins

    path = tmp_path / "f"
    monkeypatch.setattr(remote, "open", lambda p, mode="r": _Unwritable(builtins.open(p, mode), exc)
                        if mode == "ab" else builtins.open(p, mode), raising=False)
    with pytest.raises(kind) as e:
        remote._stream("http://h/f", _reply([b"x" * 10], 0, None, []), path, 0, 100, None, "k", "the limit")
    assert type(e.value) is kind and str(e.value) == said.format(path=path)


# ------------------------------------------------------------------ fetch_first without a partial folder (pull)

def test_mirrors_without_a_partial_folder_clear_the_failed_copy(httpd, www, tmp_path, caplog):
    root, fp, fp_other = www
    wrong = f"{httpd.url}/other/{NAME}.zip"
    good = f"{httpd.url}/{NAME}.zip"
    dest = tmp_path / "out.zip"
    with caplog.at_level("WARNING", logger="dvsprep.frames.remote"):
        assert fetch_first([wrong, good], dest, None, 1 << 30, fp) == (good, fp)
    # the wrong copy was removed, not resumed: the good one came whole
    assert dest.read_bytes() == (root / f"{NAME}.zip").read_bytes() and httpd.ranges == []
    assert [r.getMessage() for r in caplog.records] == [
        f"{wrong}: fingerprint {fp_other[:16]}... differs from the expected {fp[:16]}...; trying the mirror {good}"]


def test_a_full_length_pin_is_shown_by_its_first_16_digits(httpd, www, tmp_path):
    _, fp, fp_other = www
    wrong = f"{httpd.url}/other/{NAME}.zip"
    with pytest.raises(IntegrityError) as e:
        fetch_first([wrong], tmp_path / "out.zip", None, 1 << 30, fp)
    assert str(e.value) == f"{wrong}: fingerprint {fp_other[:16]}... differs from the expected {fp[:16]}..."


# ------------------------------------------------------------------ fetch_store: the cache entry

@pytest.mark.parametrize("suffix, kind", [(".zip", "zip"), ("", "dir")])
def test_the_cache_entry_records_where_what_and_when(httpd, www, tmp_path, suffix, kind):
    _, fp, _ = www
    url = f"{httpd.url}/{NAME}{suffix}"
    local, _ = fetch_store(url, cache_dir=tmp_path)
    src = json.loads((cache_entry(url, tmp_path) / "source.json").read_text())
    fetched = src.pop("fetched")
    assert src == {"url": url, "name": f"{NAME}{suffix}", "fingerprint": fp, "kind": kind, "served_by": url}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", fetched)   # ISO 8601, local time with offset
    assert local == cache_entry(url, tmp_path) / f"{NAME}{suffix}"


def test_a_cache_hit_is_logged_with_its_path(httpd, tmp_path, caplog):
    url = f"{httpd.url}/{NAME}.zip"
    local, _ = fetch_store(url, cache_dir=tmp_path)
    with caplog.at_level("INFO", logger="dvsprep.frames.remote"):
        fetch_store(url, cache_dir=tmp_path)
    assert [r.getMessage() for r in caplog.records] == [f"using cached {url} ({local})"]


def test_a_changed_cached_copy_is_named_in_a_warning(httpd, tmp_path, caplog):
    url = f"{httpd.url}/{NAME}"
    local, _ = fetch_store(url, cache_dir=tmp_path)
    (local / "manifest.json").write_bytes(b"{}")
    with caplog.at_level("WARNING", logger="dvsprep.frames.remote"):
        fetch_store(url, cache_dir=tmp_path)
    assert [r.getMessage() for r in caplog.records] == \
        [f"cached copy of {url} changed since it was downloaded; fetching it again"]


def test_an_entry_recorded_for_another_url_is_not_used_even_when_intact(httpd, tmp_path):
    url = f"{httpd.url}/{NAME}.zip"
    fetch_store(url, cache_dir=tmp_path)
    record = cache_entry(url, tmp_path) / "source.json"
    src = json.loads(record.read_text())
    record.write_text(json.dumps({**src, "url": f"{httpd.url}/elsewhere/{NAME}.zip"}))
    fetch_store(url, cache_dir=tmp_path)
    assert httpd.gets[f"/{NAME}.zip"] == 2 and json.loads(record.read_text())["url"] == url


def test_a_full_disk_while_publishing_names_the_entry(httpd, tmp_path, monkeypatch):
    url = f"{httpd.url}/{NAME}.zip"
    entry = cache_entry(url, tmp_path)

    def full(tmp, final):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(remote, "publish_dir", full)
    with pytest.raises(DiskSpaceError) as e:
        fetch_store(url, cache_dir=tmp_path)
    assert str(e.value) == f"{entry}: No space left on device (downloading {url})"
    assert sorted(p.name for p in entry.parent.iterdir()) == [f"{entry.name}.lock"]


def test_an_interrupted_fetch_leaves_the_resume_state_of_its_url(httpd, www, tmp_path, monkeypatch):
    root, _, _ = www
    url = f"{httpd.url}/{NAME}.zip"
    entry = cache_entry(url, tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(remote, "check_zip", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_store(url, cache_dir=tmp_path)
    state = entry.parent / f".{entry.name}.partial" / "partial.json"
    assert json.loads(state.read_text()) == \
        {"url": url, "validators": {f"{NAME}.zip": _etag((root / f"{NAME}.zip").read_bytes())}}


# ------------------------------------------------------------------ other URLs' partials

class _Listed(type(Path())):
    """A folder whose glob lists in a given order (a directory's order is the file system's)."""

    order: list[str] = []

    def glob(self, pattern):
        return iter(self / n for n in self.order)


@pytest.mark.parametrize("order", [[".mine.partial", ".a.partial", ".b.partial"],
                                   [".a.partial", ".mine.partial", ".b.partial"],
                                   [".a.partial", ".b.partial", ".mine.partial"]])
def test_other_partials_go_whatever_the_listing_order(tmp_path, monkeypatch, order):
    for n in order:
        (tmp_path / n).mkdir()
        (tmp_path / n / "f").write_bytes(b"half")
    monkeypatch.setattr(_Listed, "order", order)
    remote._drop_other_partials(_Listed(tmp_path), "mine")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == [".mine.partial"]


def test_a_partial_being_downloaded_is_skipped_and_the_next_still_goes(tmp_path, monkeypatch):
    for n in (".busy.partial", ".dead.partial"):
        (tmp_path / n).mkdir()
    monkeypatch.setattr(_Listed, "order", [".busy.partial", ".dead.partial"])
    with open(tmp_path / "busy.lock", "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)           # another download holds busy's lock
        remote._drop_other_partials(_Listed(tmp_path), "mine")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == [".busy.partial"]


# ------------------------------------------------------------------ split_source: mirrors

def test_a_mirror_may_carry_a_query_with_an_equals_sign():
    assert split_source("http://h/s.zip#fingerprint=abcdef012345&mirror=http://m/s.zip?v=2") == \
        ("http://h/s.zip", "abcdef012345", ["http://m/s.zip?v=2"])


@pytest.mark.parametrize("mirror, shown", [("ftp://m/s.zip", "ftp://m/s.zip"),
                                           ("http://m/s.zip%23part", "http://m/s.zip#part")])
def test_a_mirror_that_is_no_usable_url_is_named(mirror, shown):
    with pytest.raises(StoreError) as e:
        split_source(f"http://h/s.zip#fingerprint=abcdef012345&mirror={mirror}")
    assert str(e.value) == f"http://h/s.zip: mirror {shown!r} is not an http(s) or s3:// URL without a fragment"
