"""Frame stores over HTTP: a real http.server on 127.0.0.1, the download cache, pinning, locking."""
from __future__ import annotations

import functools
from pathlib import Path
import http.server
import json
import shutil
import threading
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from dvsprep.cli import main
from dvsprep.errors import IntegrityError, MissingFileError, StoreError, UntrustedStoreError
from dvsprep.frames.store import open_frame_store
from dvsprep.integrity.manifest import canonical_json
from dvsprep.frames.pack import pack_store
from dvsprep.cache import default_cache_dir
from dvsprep.frames.remote import cache_entry
from http_fixtures import serving
from store_fixtures import make_multishard_store


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        self.server.gets[self.path] += 1
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """(base URL, served folder, Counter of GET paths); the folder holds a store and its zip."""
    www = tmp_path / "www"
    www.mkdir()
    fp, splits = make_multishard_store(www / "frames_T64_number.zarr")
    pack_store(www / "frames_T64_number.zarr", www / "frames_T64_number.zarr.zip")
    with serving(functools.partial(_Handler, directory=str(www)), monkeypatch) as httpd:
        httpd.gets = Counter()
        yield httpd.url, www, httpd.gets, fp, splits


def _same_samples(store, splits):
    for name, sp_in in splits.items():
        sp = store.split(name)
        np.testing.assert_array_equal(sp.load_all(), sp_in["frames"])
        assert sp.labels.tolist() == sp_in["label"].tolist() and sp.ids == list(zip(sp_in["recording"],
                                                                                    sp_in["row"].tolist()))


def test_zip_url_downloads_once_into_the_cache(server, tmp_path):
    base, www, gets, fp, splits = server
    url = f"{base}/frames_T64_number.zarr.zip"
    cache = tmp_path / "cache"
    store = open_frame_store(url, cache_dir=cache, verify=True)
    assert store.fingerprint == fp and store.source == url and store.kind == "zip"
    assert store.path.is_relative_to(cache) and store.path.parent == cache_entry(url, cache)
    _same_samples(store, splits)
    assert gets == {"/frames_T64_number.zarr.zip": 1}
    again = open_frame_store(url, cache_dir=cache)  # from the cache: no request at all
    assert again.fingerprint == fp and sum(gets.values()) == 1
    _same_samples(again, splits)
    open_frame_store(f"{url}#fingerprint={fp[:12]}", cache_dir=cache)
    assert sum(gets.values()) == 1
    open_frame_store(url, cache_dir=cache, refresh=True)
    assert gets["/frames_T64_number.zarr.zip"] == 2
    assert sorted(p.name for p in cache_entry(url, cache).parent.iterdir()) == \
        [cache_entry(url, cache).name, cache_entry(url, cache).name + ".lock"]  # no temp folders left


def test_directory_url_fetches_exactly_the_manifest_files(server, tmp_path):
    base, www, gets, fp, splits = server
    url = f"{base}/frames_T64_number.zarr/"
    store = open_frame_store(url, cache_dir=tmp_path / "cache")
    assert store.fingerprint == fp and store.kind == "dir"
    _same_samples(store, splits)
    assert gets["/frames_T64_number.zarr/manifest.json"] == 1 and len(gets) == 34
    assert set(gets.values()) == {1}
    open_frame_store(url, cache_dir=tmp_path / "cache")
    assert sum(gets.values()) == 34
    # verify through the URL (CLI): intact, from the cache
    r = CliRunner().invoke(main, ["verify", url, "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0 and f"intact: 33 files match, fingerprint {fp}" in r.output
    r = CliRunner(env={"DVSPREP_CACHE": str(tmp_path / "cache")}).invoke(main, ["info", url, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["fingerprint"] == fp
    assert sum(gets.values()) == 34


def test_default_cache_dir_and_concurrent_opens_download_once(server, tmp_path, monkeypatch):
    base, www, gets, fp, _ = server
    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    url = f"{base}/frames_T64_number.zarr.zip"
    results, errors = [], []

    def worker():
        try:
            results.append(open_frame_store(url).fingerprint)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [fp] * 4
    assert gets == {"/frames_T64_number.zarr.zip": 1}  # the lock let one download, the others waited


def test_corrupt_truncated_pinned_and_missing(server, tmp_path):
    base, www, gets, fp, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError, match=f"fingerprint {fp[:16]}... differs from the expected 000000000000"):
        open_frame_store(f"{base}/frames_T64_number.zarr.zip#fingerprint=000000000000", cache_dir=cache)
    with pytest.raises(StoreError, match="#fingerprint=<12 to 64 hex digits>"):
        open_frame_store(f"{base}/frames_T64_number.zarr.zip#fingerprint=abc", cache_dir=cache)
    shard = www / "frames_T64_number.zarr/train/frames/c/1/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[99] ^= 0x04
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="train/frames/c/1/0/0/0/0: arrived with .* differs from the store's"):
        open_frame_store(f"{base}/frames_T64_number.zarr", cache_dir=cache)
    z = www / "frames_T64_number.zarr.zip"
    z.write_bytes(z.read_bytes()[:-100])
    with pytest.raises(StoreError, match="not a complete zip file"):
        open_frame_store(f"{base}/frames_T64_number.zarr.zip", cache_dir=cache, refresh=True)
    with pytest.raises(MissingFileError, match="HTTP 404"):
        open_frame_store(f"{base}/absent.zarr.zip", cache_dir=cache)
    r = CliRunner().invoke(main, ["verify", f"{base}/absent.zarr", "--cache-dir", str(cache)])
    assert r.exit_code == 1 and r.output == f"error: {base}/absent.zarr/manifest.json: HTTP 404 File not found\n"
    # nothing half-downloaded is left looking like a store
    entries = [p for p in (cache / "stores").iterdir() if not p.name.endswith(".lock")]
    assert [p.name for p in entries] == [cache_entry(f"{base}/frames_T64_number.zarr.zip", cache).name]


def test_a_hostile_manifest_cannot_write_outside_the_cache(server, tmp_path):
    base, www, gets, fp, _ = server
    evil = www / "evil.zarr"
    evil.mkdir()
    manifest = {"format": "dvsprep-manifest/1", "kind": "frames",
                "files": {"../../../outside.txt": {"sha256": "a" * 64, "size": 3}}}
    (evil / "manifest.json").write_bytes(canonical_json(manifest))
    with pytest.raises(UntrustedStoreError, match="'..' part"):
        open_frame_store(f"{base}/evil.zarr", cache_dir=tmp_path / "cache")
    assert not list(tmp_path.rglob("outside.txt")) and "/evil.zarr/../../../outside.txt" not in gets
    shutil.rmtree(evil)


def test_parse_size_and_the_download_limit(monkeypatch):
    from dvsprep.frames.remote import DEFAULT_MAX_DOWNLOAD, download_limit, max_download, parse_size

    assert [parse_size(x) for x in ("123", "1K", "512M", "8G", "1.5GiB", "2 t", "3kb")] == \
        [123, 1024, 512 << 20, 8 << 30, 3 << 29, 2 << 40, 3072]
    for bad in ("", "1X", "-5", "0", "1e9", "G"):
        with pytest.raises(ValueError):
            parse_size(bad)
    monkeypatch.delenv("DVSPREP_MAX_DOWNLOAD", raising=False)
    assert max_download() == DEFAULT_MAX_DOWNLOAD == 8 << 30
    monkeypatch.setenv("DVSPREP_MAX_DOWNLOAD", "2G")
    assert max_download() == 2 << 30
    with download_limit(5 << 20):  # the option wins over the environment
        assert max_download() == 5 << 20
    assert max_download() == 2 << 30
    monkeypatch.setenv("DVSPREP_MAX_DOWNLOAD", "lots")
    with pytest.raises(StoreError, match=r"\$DVSPREP_MAX_DOWNLOAD: 'lots' is not a size"):
        max_download()


@pytest.mark.parametrize("url", ["http://[::1/x.zip", "http:///x.zip", "http://host:99999/x.zip"])
def test_unusable_urls_are_store_errors(url, tmp_path):
    from dvsprep.frames.remote import fetch_store

    with pytest.raises(StoreError, match="not a valid URL"):
        fetch_store(url, cache_dir=tmp_path)


def test_a_zip_over_the_limit_is_refused_before_download(server, tmp_path):
    from dvsprep.frames.remote import fetch_store

    base, www, gets, fp, splits = server
    url = f"{base}/frames_T64_number.zarr.zip"
    size = (www / "frames_T64_number.zarr.zip").stat().st_size
    from dvsprep.errors import ResourceLimitError

    with pytest.raises(ResourceLimitError, match=rf"declares {size:,} bytes, more than the download limit"):
        fetch_store(url, cache_dir=tmp_path / "c", max_bytes=size - 1)
    assert fetch_store(url, cache_dir=tmp_path / "c", max_bytes=size)[0].stat().st_size == size
    with pytest.raises(ResourceLimitError, match="its manifest lists .* more than the download limit"):
        fetch_store(f"{base}/frames_T64_number.zarr/", cache_dir=tmp_path / "d", max_bytes=1000)


# ------------------------------------------------------------------ networks that fail: retries, resume, mirrors

@pytest.fixture()
def ranged(tmp_path, monkeypatch):
    """(server, base URL, zip bytes, fingerprint): a RangeFiles server of one store, folder and zip."""
    from http_fixtures import range_server

    www = tmp_path / "www"
    www.mkdir()
    fp, _ = make_multishard_store(www / "frames_T64_number.zarr")
    pack_store(www / "frames_T64_number.zarr", www / "frames_T64_number.zarr.zip")
    with range_server(www, monkeypatch) as httpd:
        yield httpd, httpd.url, (www / "frames_T64_number.zarr.zip").read_bytes(), fp


def test_a_cut_download_resumes_from_where_it_stopped(ranged, tmp_path):
    httpd, base, data, fp = ranged
    url = f"{base}/frames_T64_number.zarr.zip"
    httpd.cut["/frames_T64_number.zarr.zip"] = 100_000
    store = open_frame_store(url, cache_dir=tmp_path / "c")
    assert store.fingerprint == fp
    # the retry asked for the rest only: every byte crossed the network once
    assert httpd.ranges == [("/frames_T64_number.zarr.zip", "bytes=100000-")]
    assert httpd.sent["/frames_T64_number.zarr.zip"] == len(data)
    assert store.path.read_bytes() == data


def test_a_directory_download_resumes_the_cut_file(ranged, tmp_path):
    httpd, base, data, fp = ranged
    shard = "/frames_T64_number.zarr/train/frames/c/1/0/0/0/0"
    size = len((httpd.root / shard.lstrip("/")).read_bytes())
    httpd.cut[shard] = size // 2
    assert open_frame_store(f"{base}/frames_T64_number.zarr", cache_dir=tmp_path / "c").fingerprint == fp
    assert httpd.ranges == [(shard, f"bytes={size // 2}-")] and httpd.sent[shard] == size


def test_a_killed_download_is_resumed_by_the_next_process(ranged, tmp_path):
    """SIGKILL mid-download leaves .<entry>.partial/; the next fetch fetches only the rest."""
    import os
    import signal
    import subprocess
    import sys

    from waits import wait_for_tree

    httpd, base, data, fp = ranged
    url = f"{base}/frames_T64_number.zarr.zip"
    cache = tmp_path / "c"
    half = len(data) // 2
    httpd.stall["/frames_T64_number.zarr.zip"] = half
    code = "import sys; from dvsprep.frames.remote import fetch_store; fetch_store(sys.argv[1], cache_dir=sys.argv[2])"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code, url, str(cache)], env=env)
    try:
        assert httpd.stalled.wait(60)
        part = cache_entry(url, cache).parent / f".{cache_entry(url, cache).name}.partial" / "frames_T64_number.zarr.zip"
        # wait (on inotify, not a clock) for the event "the client wrote what it got"
        assert wait_for_tree(cache, lambda: part.exists() and part.stat().st_size == half, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        httpd.stall.clear()
        httpd.release.set()
    httpd.sent.clear()
    store = open_frame_store(url, cache_dir=cache)
    assert store.fingerprint == fp and store.path.read_bytes() == data
    assert httpd.sent["/frames_T64_number.zarr.zip"] == len(data) - half
    assert httpd.ranges == [("/frames_T64_number.zarr.zip", f"bytes={half}-")]
    assert not part.parent.exists()


def test_a_partial_of_an_object_that_changed_starts_over(ranged, tmp_path):
    from dvsprep.frames.remote import fetch_store

    httpd, base, data, fp = ranged
    url = f"{base}/frames_T64_number.zarr.zip"
    cache = tmp_path / "c"
    entry = cache_entry(url, cache)
    part = entry.parent / f".{entry.name}.partial"
    part.mkdir(parents=True)
    (part / "frames_T64_number.zarr.zip").write_bytes(b"x" * 1000)   # another version's first bytes
    (part / "partial.json").write_text(json.dumps({"url": url, "validators": {"frames_T64_number.zarr.zip": '"old"'}}))
    assert fetch_store(url, cache_dir=cache)[0].read_bytes() == data
    assert httpd.ranges == [] and httpd.sent["/frames_T64_number.zarr.zip"] == len(data)  # If-Range: whole


def test_transient_errors_are_retried_and_4xx_are_not(ranged, tmp_path, monkeypatch):
    from dvsprep.frames.remote import fetch_store

    httpd, base, data, fp = ranged
    url = f"{base}/frames_T64_number.zarr.zip"
    httpd.fail["/frames_T64_number.zarr.zip"] = [503, 500]
    monkeypatch.setenv("DVSPREP_RETRY_DELAYS", "0,0")
    assert fetch_store(url, cache_dir=tmp_path / "a")[0].read_bytes() == data
    assert httpd.fail["/frames_T64_number.zarr.zip"] == []          # both failures were met
    httpd.fail["/frames_T64_number.zarr.zip"] = [503, 503, 503, 200]
    with pytest.raises(StoreError) as e:
        fetch_store(url, cache_dir=tmp_path / "b")
    assert str(e.value) == f"{url}: HTTP 503 Service Unavailable (gave up after 3 tries)"
    assert httpd.fail["/frames_T64_number.zarr.zip"] == [200]
    httpd.fail["/frames_T64_number.zarr.zip"] = [403, 200]
    with pytest.raises(StoreError) as e:
        fetch_store(url, cache_dir=tmp_path / "b")
    assert str(e.value) == f"{url}: HTTP 403 Forbidden" and httpd.fail["/frames_T64_number.zarr.zip"] == [200]
    assert sorted(p.name for p in (tmp_path / "b" / "stores").iterdir()) == [cache_entry(url, tmp_path / "b").name + ".lock"]
    monkeypatch.setenv("DVSPREP_RETRY_DELAYS", "soon")
    with pytest.raises(StoreError, match=r"\$DVSPREP_RETRY_DELAYS: 'soon' is not a list of seconds"):
        fetch_store(url, cache_dir=tmp_path / "d")


def test_mirrors_are_tried_in_order_until_one_matches_the_pin(ranged, tmp_path, caplog):
    from dvsprep.frames.remote import fetch_store, split_source

    httpd, base, data, fp = ranged
    other = tmp_path / "www" / "other"
    other.mkdir()
    fp_other, _ = make_multishard_store(other / "frames_T64_number.zarr", n_train=2, n_test=1)
    pack_store(other / "frames_T64_number.zarr", other / "frames_T64_number.zarr.zip")
    dead = f"{base}/gone/frames_T64_number.zarr.zip"
    wrong = f"{base}/other/frames_T64_number.zarr.zip"            # serves another store
    good = f"{base}/frames_T64_number.zarr.zip"
    url = f"{dead}#fingerprint={fp[:16]}&mirror={wrong}&mirror={good}"
    assert split_source(url) == (dead, fp[:16], [wrong, good])
    with caplog.at_level("WARNING", logger="dvsprep.frames.remote"):
        store = open_frame_store(url, cache_dir=tmp_path / "c")
    assert store.fingerprint == fp and store.path.read_bytes() == data
    assert [r.getMessage() for r in caplog.records] == [
        f"{dead}: HTTP 404 Not Found; trying the mirror {wrong}",
        f"{wrong}: fingerprint {fp_other[:16]}... differs from the expected {fp[:16]}...; trying the mirror {good}"]
    src = json.loads((cache_entry(dead, tmp_path / "c") / "source.json").read_text())
    assert src["url"] == dead and src["served_by"] == good
    with pytest.raises(IntegrityError, match=f"^{wrong}: fingerprint"):  # the last failure is the error
        fetch_store(f"{dead}#fingerprint={fp[:16]}&mirror={wrong}", cache_dir=tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d" / "stores").iterdir()) == [cache_entry(dead, tmp_path / "d").name + ".lock"]
    with pytest.raises(StoreError, match="mirrors need #fingerprint=<hex> first"):
        split_source(f"{dead}#mirror={good}")
    with pytest.raises(StoreError, match="credentials inside a URL are refused"):
        split_source(f"{dead}#fingerprint={fp[:16]}&mirror=https://u:p@host/x.zip")


@pytest.mark.parametrize("where", ["free-space check", "write"])
def test_a_full_disk_stops_before_any_mirror(ranged, tmp_path, monkeypatch, where):
    """A full disk is full for every mirror: the first source's DiskSpaceError is the error, and
    no mirror is asked (a mirror's own failure, a 404 or another store, goes on to the next)."""
    import dvsprep.frames.remote as remote
    from dvsprep.errors import DiskSpaceError
    from dvsprep.frames.remote import fetch_store

    httpd, base, data, fp = ranged
    first, mirror = f"{base}/frames_T64_number.zarr.zip", f"{base}/copy/frames_T64_number.zarr.zip"
    if where == "free-space check":
        def full(who, where_, need):
            raise DiskSpaceError(f"{who}: needs {need} bytes, only 0 free")
        monkeypatch.setattr(remote, "check_free_space", full)
    else:
        real_open = open

        class FullFile:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *a):
                self.f.close()

            def write(self, b):
                raise OSError(28, "No space left on device")

        def full_open(path, mode="r", *a, **k):
            f = real_open(path, mode, *a, **k)
            return FullFile(f) if mode == "ab" else f
        monkeypatch.setattr(remote, "open", full_open, raising=False)
    with pytest.raises(DiskSpaceError):
        fetch_store(f"{first}#fingerprint={fp[:16]}&mirror={mirror}", cache_dir=tmp_path / "c")
    assert httpd.gets["/frames_T64_number.zarr.zip"] >= 1
    assert httpd.gets["/copy/frames_T64_number.zarr.zip"] == 0          # the mirror never asked


def test_a_fetch_of_any_url_removes_killed_downloads_of_others(ranged, tmp_path):
    """Issue 19: a killed download's temporary is removed by the next fetch of another URL too."""
    httpd, base, data, fp = ranged
    cache = tmp_path / "c"
    other = cache_entry(f"{base}/elsewhere.zarr.zip", cache)
    other.parent.mkdir(parents=True)
    dead_tmp = other.parent / f".{other.name}.tmp-999999999-abcdef12"
    dead_tmp.mkdir()
    partial = other.parent / f".{other.name}.partial"
    partial.mkdir()
    (partial / "elsewhere.zarr.zip").write_bytes(b"half")
    open_frame_store(f"{base}/frames_T64_number.zarr.zip", cache_dir=cache)
    assert not dead_tmp.exists() and not partial.exists()


def test_a_redirect_to_a_non_http_url_is_named(tmp_path, monkeypatch):
    from dvsprep.frames.remote import fetch_store

    class _Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd" if "file" in self.path else "data:,hello")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    with serving(_Redirect, monkeypatch) as httpd:
        for kind in ("file", "data"):
            url = f"{httpd.url}/{kind}/s.zip"
            with pytest.raises(StoreError) as e:
                fetch_store(url, cache_dir=tmp_path / "c")
            assert str(e.value) == f"{url}: redirect to a non-http(s) URL refused ({kind}:)"
