"""remote.py's edges, each against an oracle written here (the store's files by hand, the
messages spelled out, the log lines under a fake clock): a store directory's files land at the
names the manifest gives (spaces and odd names included, empty files too), resumes after one
byte and from a previous process's partial folder, the download limit and free space at their
bounds, download_bytes' bounds on stand-in replies, check_zip's problem list at 5 and 6
problems and its messages naming the URL, parse_size at 1 byte, the partial's validators."""
from __future__ import annotations

import hashlib
import json
import time
import types
import zipfile
from pathlib import Path

import pytest

from dvsprep.errors import DiskSpaceError, IntegrityError, MissingFileError, ResourceLimitError, StoreError
from dvsprep.frames import remote, transport
from dvsprep.frames.remote import cache_entry, check_zip, download_bytes, fetch_store, parse_size
from dvsprep.integrity.manifest import canonical_json
from http_fixtures import range_server

LOGGER = "dvsprep.frames.remote"
FMT = "dvsprep-manifest/1"


def _manifest(files: dict[str, bytes]) -> bytes:
    return canonical_json({"format": FMT, "kind": "frames", "files": {
        n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()}})


def _write_dir(folder: Path, files: dict[str, bytes]) -> bytes:
    """A store folder of exactly `files` (posix names) and its manifest; returns the manifest."""
    for name, data in files.items():
        p = folder.joinpath(*name.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    raw = _manifest(files)
    (folder / "manifest.json").write_bytes(raw)
    return raw


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _blob(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


# 50,000 bytes in all: 0.05 MB prints "0.1" and 50,000 / 1,000,001 would print "0.0".
SMALL = {"read me.txt": b"spaces stay", "aXX/XXb": b"xx", "one": b"1", "empty": b""}
# "a.blob" sorts first: a resume that loses its key cannot borrow an earlier file's ETag.
FILES = {**SMALL, "a.blob": _blob(50_000 - sum(len(d) for d in SMALL.values()))}


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """(RangeFiles server, URL of the folder store ``storeX`` (no trailing slash), its manifest)."""
    www = tmp_path / "www"
    raw = _write_dir(www / "storeX", FILES)
    with range_server(www, monkeypatch) as httpd:
        yield httpd, f"{httpd.url}/storeX", raw


def _clock(monkeypatch, *ticks: float) -> None:
    """remote.py's own clock reads `ticks` in turn and dates as "<format>" (the rest of time untouched)."""
    monkeypatch.setattr(remote, "time", types.SimpleNamespace(monotonic=iter(ticks).__next__,
                                                              strftime=lambda fmt: f"<{fmt}>"))


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def _partial_dir(url: str, cache: Path) -> Path:
    entry = cache_entry(url, cache)
    return entry.parent / f".{entry.name}.partial"


def test_a_directory_store_arrives_file_for_file(served, tmp_path, monkeypatch, caplog):
    httpd, url, raw = served
    cache = tmp_path / "c"
    _clock(monkeypatch, 100.0, 102.5, 200.0, 200.25)
    with caplog.at_level("INFO", logger=LOGGER):
        local, pin = fetch_store(url, cache_dir=cache)
    entry = cache / "stores" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-storeX"
    assert pin is None and local == entry / "storeX" and cache_entry(f"{url}#fingerprint={'0' * 12}", cache) == entry
    # every name where the manifest puts it (a space, "XX/XX"), the empty file made too
    assert _tree(local) == {**FILES, "manifest.json": raw}
    assert _messages(caplog) == [f"downloaded {url}: 5 files, 0.1 MB in 2.5 s"]
    assert httpd.gets == {"/storeX/manifest.json": 1, **{f"/storeX/{n}": 1 for n in FILES}}
    assert sorted(p.name for p in entry.iterdir()) == ["source.json", "storeX"]    # no partial.json
    assert json.loads((entry / "source.json").read_text()) == {
        "url": url, "name": "storeX", "fingerprint": hashlib.sha256(raw).hexdigest(), "kind": "dir",
        "served_by": url, "fetched": "<%Y-%m-%dT%H:%M:%S%z>"}
    caplog.clear()
    with caplog.at_level("INFO", logger=LOGGER):
        assert fetch_store(url, cache_dir=cache) == (local, None)
        (local / "manifest.json").write_bytes(b"{}")
        assert fetch_store(url, cache_dir=cache) == (local, None)
    assert _messages(caplog) == [f"using cached {url} ({local})",
                                 f"cached copy of {url} changed since it was downloaded; fetching it again",
                                 f"downloaded {url}: 5 files, 0.1 MB in 0.2 s"]
    assert _tree(local) == {**FILES, "manifest.json": raw}


def test_a_file_cut_after_one_byte_resumes_from_that_byte(served, tmp_path):
    httpd, url, raw = served
    httpd.cut["/storeX/a.blob"] = 1
    local, _ = fetch_store(url, cache_dir=tmp_path / "c")
    assert _tree(local) == {**FILES, "manifest.json": raw}
    # the byte already written is hashed with the rest (a resume checks the whole file)
    assert httpd.ranges == [("/storeX/a.blob", "bytes=1-")] and httpd.sent["/storeX/a.blob"] == len(FILES["a.blob"])


def test_a_directory_partial_of_another_process_is_resumed_file_by_file(served, tmp_path):
    """A killed process left the folder, one complete file and another version's first bytes:
    the complete file is only hashed, the other is fetched whole (If-Range with its old ETag)."""
    httpd, url, raw = served
    cache = tmp_path / "c"
    part = _partial_dir(url, cache)
    (part / "storeX").mkdir(parents=True)
    (part / "storeX" / "one").write_bytes(FILES["one"])
    (part / "storeX" / "a.blob").write_bytes(b"\xff" * 1000)
    (part / "storeX" / "read me.txt").write_bytes(FILES["read me.txt"] + b" and more")   # longer: cut to 0
    (part / "partial.json").write_text(json.dumps({"url": url, "validators": {"a.blob": '"old"'}}))
    local, _ = fetch_store(url, cache_dir=cache)
    assert _tree(local) == {**FILES, "manifest.json": raw}
    assert "/storeX/one" not in httpd.gets and httpd.gets["/storeX/a.blob"] == 1
    assert httpd.ranges == [] and httpd.sent["/storeX/a.blob"] == len(FILES["a.blob"])
    assert httpd.gets["/storeX/read me.txt"] == 1
    assert not part.exists()


def test_the_directory_limit_at_the_manifest_total_and_one_under(served, tmp_path):
    httpd, url, raw = served
    with pytest.raises(ResourceLimitError) as e:
        fetch_store(url, cache_dir=tmp_path / "a", max_bytes=49_999)
    assert str(e.value) == (f"{url}: its manifest lists 50,000 bytes, more than the download limit "
                            f"(49,999 bytes; --max-download or $DVSPREP_MAX_DOWNLOAD)")
    assert httpd.gets == {"/storeX/manifest.json": 1}
    local, _ = fetch_store(url, cache_dir=tmp_path / "b", max_bytes=50_000)
    assert _tree(local) == {**FILES, "manifest.json": raw}


def test_a_file_larger_on_the_server_than_in_the_manifest_is_refused_before_download(served, tmp_path):
    httpd, url, raw = served
    (httpd.root / "storeX" / "one").write_bytes(b"12")          # the manifest says 1 byte
    with pytest.raises(ResourceLimitError) as e:
        fetch_store(url, cache_dir=tmp_path / "c")
    assert str(e.value) == f"{url}/one: declares 2 bytes, more than the manifest's size (1 bytes); not downloading it"


def test_the_directory_free_space_check_names_the_url(served, tmp_path, monkeypatch):
    import collections

    from dvsprep import resources

    httpd, url, raw = served
    usage = collections.namedtuple("usage", "total used free")
    reserve = resources.FREE_SPACE_RESERVE
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda p: usage(1 << 40, 0, reserve + 49_999))
    cache = tmp_path / "c"
    with pytest.raises(ResourceLimitError) as e:
        fetch_store(url, cache_dir=cache)
    free_mb = (reserve + 49_999) / 1e6
    assert str(e.value) == (f"{url}: needs 0.1 MB in {_partial_dir(url, cache)} (plus 64 MB kept free), "
                            f"only {free_mb:,.1f} MB free")
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda p: usage(1 << 40, 0, reserve + 50_000))
    assert _tree(fetch_store(url, cache_dir=cache)[0]) == {**FILES, "manifest.json": raw}


def test_a_directory_manifest_that_is_no_json_is_named_by_its_url(served, tmp_path):
    httpd, url, raw = served
    (httpd.root / "bad.zarr").mkdir()
    (httpd.root / "bad.zarr" / "manifest.json").write_bytes(b"not json")
    with pytest.raises(StoreError) as e:
        fetch_store(f"{httpd.url}/bad.zarr/", cache_dir=tmp_path / "c")
    assert str(e.value) == (f"{httpd.url}/bad.zarr/manifest.json: manifest.json is not valid JSON "
                            f"(Expecting value: line 1 column 1 (char 0))")


# ------------------------------------------------------------------ stand-in replies (no network)

class _Replies:
    """transport.open_range answering from a list of (chunks, start, total, validator) in turn;
    records each call and each close."""

    def __init__(self, *replies):
        self.replies, self.calls, self.closed = list(replies), [], 0

    def __call__(self, url, start=0, validator=None):
        self.calls.append((url, start, validator))
        chunks, first, total, etag = self.replies.pop(0)
        return transport.Reply(iter(chunks), first, total, etag, self._close)

    def _close(self):
        self.closed += 1


def _serve(monkeypatch, *replies) -> _Replies:
    fake = _Replies(*replies)
    monkeypatch.setattr(transport, "open_range", fake)
    return fake


U = "http://h.invalid/m.json"


def test_download_bytes_takes_exactly_the_limit_in_pieces(monkeypatch):
    fake = _serve(monkeypatch, ([b"a" * 600, b"b" * 400, b"c" * 1], 0, 1001, None),
                  ([b"a" * 600, b"b" * 401], 0, None, None))
    assert download_bytes(U, 1001, "the cap") == b"a" * 600 + b"b" * 400 + b"c"      # declared: joined as is
    assert download_bytes(U, 1001, "the cap") == b"a" * 600 + b"b" * 401              # undeclared, at the limit
    assert fake.calls == [(U, 0, None)] * 2 and fake.closed == 2


def test_download_bytes_refuses_one_byte_over_the_limit(monkeypatch):
    fake = _serve(monkeypatch, ([b"x" * 1001], 0, 1001, None), ([b"a" * 600, b"b" * 401], 0, None, None))
    with pytest.raises(ResourceLimitError) as e:
        download_bytes(U, 1000, "the cap")
    assert str(e.value) == f"{U}: declares 1,001 bytes, more than the cap (1,000 bytes); not downloading it"
    with pytest.raises(ResourceLimitError) as e:      # no length declared: counted across the chunks
        download_bytes(U, 1000, "the cap")
    assert str(e.value) == f"{U}: more than the cap (1,000 bytes); download stopped"
    assert fake.closed == 2


def test_download_bytes_retries_a_short_body_then_names_it(monkeypatch):
    fake = _serve(monkeypatch, ([b"x" * 1000], 0, 1200, None), ([b"x" * 1100], 0, 1200, None))
    with pytest.raises(transport.TransientError) as e:
        download_bytes(U, 5000, "the cap")
    assert str(e.value) == f"{U}: download ended after 1,100 of 1,200 bytes (gave up after 2 tries)"
    assert len(fake.calls) == 2 and fake.closed == 2


def test_the_manifest_is_bounded_by_its_own_limit(monkeypatch, tmp_path):
    from dvsprep.frames.files import MAX_MANIFEST_BYTES

    _serve(monkeypatch, ([], 0, MAX_MANIFEST_BYTES + 1, None))
    with pytest.raises(ResourceLimitError) as e:
        fetch_store("http://h.invalid/s.zarr", cache_dir=tmp_path)
    assert str(e.value) == ("http://h.invalid/s.zarr/manifest.json: declares 16,777,217 bytes, more than "
                            "the manifest size limit (16,777,216 bytes); not downloading it")


# ------------------------------------------------------------------ packed stores

def _write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _zip_of_size(path: Path, size: int) -> bytes:
    """A packed store of one blob, padded to exactly `size` bytes; returns its manifest."""
    n = size // 2
    for _ in range(3):
        raw = _manifest({"blob": _blob(n)})
        _write_zip(path, {"manifest.json": raw, "blob": _blob(n)})
        n += size - path.stat().st_size
    assert path.stat().st_size == size
    return raw


def test_a_zip_download_logs_its_size_and_time(tmp_path, monkeypatch, caplog):
    www = tmp_path / "www"
    www.mkdir()
    raw = _zip_of_size(www / "s.zarr.zip", 50_000)
    with range_server(www, monkeypatch) as httpd:
        url = f"{httpd.url}/s.zarr.zip"
        _clock(monkeypatch, 100.0, 102.5)
        with caplog.at_level("INFO", logger=LOGGER):
            local, _ = fetch_store(url, cache_dir=tmp_path / "c")
    assert local.read_bytes() == (www / "s.zarr.zip").read_bytes()
    assert _messages(caplog) == [f"downloaded {url}: 0.1 MB in 2.5 s"]
    assert json.loads((local.parent / "source.json").read_text()) == {
        "url": url, "name": "s.zarr.zip", "fingerprint": hashlib.sha256(raw).hexdigest(), "kind": "zip",
        "served_by": url, "fetched": "<%Y-%m-%dT%H:%M:%S%z>"}


@pytest.mark.parametrize("n, tail", [(5, ""), (6, " and 1 more")])
def test_check_zip_lists_five_problems_then_counts_the_rest(tmp_path, n, tail):
    names = "abcdef"[:n]
    _write_zip(tmp_path / "s.zip", {"manifest.json": _manifest({c: c.encode() for c in names})})
    with pytest.raises(IntegrityError) as e:
        check_zip(tmp_path / "s.zip", "http://h/s.zip")
    shown = "; ".join(f"missing {c}" for c in names[:5])
    assert str(e.value) == f"http://h/s.zip: {n} file(s) differ from the store's manifest: {shown}{tail}"


def test_check_zip_names_the_url_not_the_download(tmp_path):
    url = "http://h/s.zarr.zip"
    (tmp_path / "cut.zip").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(StoreError) as e:
        check_zip(tmp_path / "cut.zip", url)
    assert str(e.value) == f"{url}: not a complete zip file (truncated or not a zip: File is not a zip file)"
    _write_zip(tmp_path / "bare.zip", {"blob": b"x"})
    with pytest.raises(MissingFileError) as e:
        check_zip(tmp_path / "bare.zip", url)
    assert str(e.value) == f"{url}: no manifest.json in the store"
    _write_zip(tmp_path / "bad.zip", {"manifest.json": b"[1,"})
    with pytest.raises(StoreError) as e:
        check_zip(tmp_path / "bad.zip", url)
    assert str(e.value) == (f"{url}: manifest.json: manifest.json is not valid JSON "
                            f"(Expecting value: line 1 column 4 (char 3))")


# ------------------------------------------------------------------ small parts

def test_parse_size_one_byte_is_the_least():
    assert parse_size("1") == 1 and parse_size("1.9") == 1
    with pytest.raises(ValueError) as e:
        parse_size("0.9")
    assert str(e.value) == "'0.9': a size must be at least 1 byte"


def test_the_partial_remembers_each_validator_on_disk(tmp_path):
    folder = tmp_path / "p"
    p = remote._Partial(folder, "http://h/s")
    p.remember("a", '"e1"')
    p.remember("b", "Tue, 01 Dec 2026 10:00:00 GMT")
    state = {"url": "http://h/s", "validators": {"a": '"e1"', "b": "Tue, 01 Dec 2026 10:00:00 GMT"}}
    assert json.loads((folder / "partial.json").read_text()) == state
    p.remember("a", None)       # the server stopped naming a version: never If-Range with the old one
    again = remote._Partial(folder, "http://h/s")
    assert again.validator("a") is None and again.validator("b") == state["validators"]["b"]


FP12, FP64 = "0123456789ab", "0123456789abcdef" * 4


def test_split_source_reads_the_pin_and_the_mirrors():
    from dvsprep.frames.remote import split_pin, split_source

    u, m = "http://h/s.zip", "https://m/s.zip"
    assert split_source(u) == split_source(u + "#") == (u, None, [])
    assert split_source(f"{u}#fingerprint={FP12}") == (u, FP12, [])
    assert split_source(f"{u}#fingerprint= {FP64.upper()} ") == (u, FP64, [])
    assert split_source(f"{u}#mirror={m}&fingerprint={FP12}&mirror=s3%3A%2F%2Fb%2Fk.zip") == (
        u, FP12, [m, "s3://b/k.zip"])
    assert split_pin(f"{u}#fingerprint={FP12}&mirror={m}") == (u, FP12)
    bad = f": the URL fragment must be #fingerprint=<12 to 64 hex digits>[&mirror=URL...]"
    for frag in (f"fingerprint={FP12[:11]}", f"fingerprint={FP64}0", f"fingerprint={FP12}&fingerprint={FP12}",
                 f"fingerprint={FP12}&mirror=", f"fingerprint={FP12}&pin=1", "fingerprint"):
        with pytest.raises(StoreError) as e:
            split_source(f"{u}#{frag}")
        assert str(e.value) == f"{u}#{frag}{bad}"
    for mirror, shown in (("ftp://m/s.zip", "ftp://m/s.zip"), ("http://m/s.zip%23x", "http://m/s.zip#x")):
        with pytest.raises(StoreError) as e:
            split_source(f"{u}#fingerprint={FP12}&mirror={mirror}")
        assert str(e.value) == f"{u}: mirror {shown!r} is not an http(s) or s3:// URL without a fragment"
    with pytest.raises(StoreError) as e:
        split_source(f"{u}#mirror={m}")
    assert str(e.value) == f"{u}: mirrors need #fingerprint=<hex> first (each copy is checked against it)"


def test_max_download_from_the_environment(monkeypatch):
    from dvsprep.frames.remote import download_limit, max_download

    monkeypatch.setenv("DVSPREP_MAX_DOWNLOAD", "")
    assert max_download() == 8 << 30
    monkeypatch.setenv("DVSPREP_MAX_DOWNLOAD", "lots")
    with download_limit(None):
        with pytest.raises(StoreError) as e:
            max_download()
    assert str(e.value) == "$DVSPREP_MAX_DOWNLOAD: 'lots' is not a size (bytes, or a number with K, M, G or T)"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_download_keeps_its_partial_and_the_next_resumes_it(monkeypatch, tmp_path, stop):
    www = tmp_path / "www"
    www.mkdir()
    _zip_of_size(www / "s.zarr.zip", 5000)
    data = (www / "s.zarr.zip").read_bytes()
    url, cache = "http://h.invalid/s.zarr.zip", tmp_path / "c"

    def cut():
        yield data[:1000]
        raise stop()

    fake = _serve(monkeypatch, (cut(), 0, 5000, '"v1"'), ([data[1000:]], 1000, 5000, '"v1"'))
    with pytest.raises(stop):
        fetch_store(url, cache_dir=cache)
    part = _partial_dir(url, cache)
    assert _tree(part) == {"s.zarr.zip": data[:1000],
                           "partial.json": json.dumps({"url": url, "validators": {"s.zarr.zip": '"v1"'}}).encode()}
    local, _ = fetch_store(url, cache_dir=cache)
    assert fake.calls == [(url, 0, None), (url, 1000, '"v1"')] and fake.closed == 2
    assert local.read_bytes() == data and not part.exists()


@pytest.mark.parametrize("state", ['{"url": "http://elsewhere/s", "validators": {}}',
                                   '{"url": "URL", "validators": []}', '[1]', '{', None])
def test_a_partial_of_another_url_or_unreadable_starts_afresh(served, tmp_path, state):
    httpd, url, raw = served
    cache = tmp_path / "c"
    part = _partial_dir(url, cache)
    (part / "storeX").mkdir(parents=True)
    (part / "storeX" / "a.blob").write_bytes(b"\xff" * 1000)
    if state is not None:
        (part / "partial.json").write_text(state.replace("URL", url))
    local, _ = fetch_store(url, cache_dir=cache)
    assert _tree(local) == {**FILES, "manifest.json": raw} and httpd.ranges == []


@pytest.mark.parametrize("source", [{"url": "http://elsewhere/storeX", "name": "storeX", "fingerprint": "F"},
                                    {"url": "URL", "name": "gone", "fingerprint": "F"},
                                    {"url": "URL", "name": "storeX"}, ["URL"], None])
def test_a_cache_entry_that_is_not_this_urls_copy_is_fetched_again(served, tmp_path, source):
    httpd, url, raw = served
    cache = tmp_path / "c"
    local, _ = fetch_store(url, cache_dir=cache)
    text = "not json" if source is None else json.dumps(source).replace("URL", url)
    (local.parent / "source.json").write_text(text.replace('"F"', json.dumps(hashlib.sha256(raw).hexdigest())))
    assert fetch_store(url, cache_dir=cache)[0] == local
    assert httpd.gets["/storeX/manifest.json"] == 2 and _tree(local) == {**FILES, "manifest.json": raw}


def test_a_zip_partial_longer_than_the_object_starts_over(tmp_path, monkeypatch):
    www = tmp_path / "www"
    www.mkdir()
    _zip_of_size(www / "s.zarr.zip", 5000)
    data = (www / "s.zarr.zip").read_bytes()
    with range_server(www, monkeypatch) as httpd:
        url, cache = f"{httpd.url}/s.zarr.zip", tmp_path / "c"
        part = _partial_dir(url, cache)
        part.mkdir(parents=True)
        (part / "s.zarr.zip").write_bytes(data + b"12345")
        (part / "partial.json").write_text(json.dumps({"url": url, "validators": {}}))
        local, _ = fetch_store(url, cache_dir=cache)
    assert local.read_bytes() == data
    # the range past the end is answered 416: the partial is dropped and the object fetched whole
    assert httpd.ranges == [("/s.zarr.zip", "bytes=5005-")] and httpd.sent["/s.zarr.zip"] == 5000


def test_a_partial_of_a_url_being_downloaded_elsewhere_is_left_alone(served, tmp_path):
    import fcntl

    httpd, url, raw = served
    cache = tmp_path / "c"
    other = cache_entry(f"{httpd.url}/other.zarr.zip", cache)
    other.parent.mkdir(parents=True)
    mine = _partial_dir(f"{httpd.url}/other.zarr.zip", cache)
    mine.mkdir()
    with open(other.parent / f"{other.name}.lock", "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)       # another process downloading that URL
        fetch_store(url, cache_dir=cache)
        assert mine.is_dir()
    fetch_store(url, cache_dir=cache)                   # nobody holds it now: removed
    assert not mine.exists()


def test_fetch_first_without_a_partial_folder_clears_a_failed_source(served, tmp_path, caplog):
    """share.py's use: no resume state, the destination itself is cleared between sources."""
    from dvsprep.frames.remote import fetch_first

    httpd, url, raw = served
    _write_dir(httpd.root / "wrong", {**FILES, "extra": b"not in the right store"})
    wrong = f"{httpd.url}/wrong"
    fp = hashlib.sha256(raw).hexdigest()
    dest = tmp_path / "dest"
    httpd.cut["/storeX/a.blob"] = 1000          # resumed within the call, without a partial's ETag
    with caplog.at_level("WARNING", logger=LOGGER):
        assert fetch_first([wrong, url], dest, None, 1 << 20, fp[:12]) == (url, fp)
    assert _tree(dest) == {**FILES, "manifest.json": raw} and httpd.ranges == [("/storeX/a.blob", "bytes=1000-")]
    wfp = hashlib.sha256((httpd.root / "wrong" / "manifest.json").read_bytes()).hexdigest()
    assert _messages(caplog) == [f"{wrong}: fingerprint {wfp[:16]}... differs from the expected {fp[:12]}...; "
                                 f"trying the mirror {url}"]


def test_a_full_device_is_a_disk_space_error_naming_the_file(monkeypatch, tmp_path):
    """A real ENOSPC (/dev/full); the other write errors: test_remote_fetch_edges."""
    from dvsprep.frames.remote import download_file

    _serve(monkeypatch, ([b"x" * 65536], 0, None, None))
    with pytest.raises(DiskSpaceError) as e:
        download_file(U, Path("/dev/full"), 1 << 20)
    assert type(e.value) is DiskSpaceError
    assert str(e.value) == f"/dev/full: No space left on device (downloading {U})"
