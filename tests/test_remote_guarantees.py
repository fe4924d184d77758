"""fetch_store's own guarantees, checked on fetch_store alone (no later open re-verifies here):
a cached copy is used only while it matches the URL's pin and its own recorded fingerprint, a zip
is checked member by member against its manifest before it enters the cache, and a response
shorter than its declared length or longer than the limit is refused. Public behaviour only:
fetch_store(url, cache_dir, refresh, max_bytes) -> (local path, pin), its errors, the requests
the server sees and what the cache folder holds."""
from __future__ import annotations

import functools
import hashlib
import http.server
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from dvsprep.errors import IntegrityError, ResourceLimitError, StoreError
from dvsprep.frames.pack import pack_store
from dvsprep.frames.remote import fetch_store
from http_fixtures import serving
from store_fixtures import make_multishard_store

NAME = "frames_T64_number.zarr"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files, counting GETs; /short/<f> declares 10 bytes more than it sends and
    /undeclared/<f> sends no Content-Length at all (the body ends when the connection closes)."""

    def do_GET(self):
        self.server.gets[self.path] += 1
        for prefix, extra in (("/short/", 10), ("/undeclared/", None)):
            if self.path.startswith(prefix):
                body = (Path(self.directory) / self.path[len(prefix):]).read_bytes()
                self.send_response(200)
                if extra is not None:
                    self.send_header("Content-Length", str(len(body) + extra))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True
                return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    www = tmp_path_factory.mktemp("www")
    fp, _ = make_multishard_store(www / NAME, n_train=4, n_test=2)
    pack_store(www / NAME, www / f"{NAME}.zip")
    # a zip whose manifest no longer matches one member (a chunk changed, the manifest not)
    with zipfile.ZipFile(www / f"{NAME}.zip") as src, \
            zipfile.ZipFile(www / "tampered.zarr.zip", "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "train/label/c/0":
                data = bytes([data[0] ^ 1]) + data[1:]
            dst.writestr(info, data)
    return www, fp


@pytest.fixture(scope="module")
def _httpd(served):
    """One server for the module (stopping one takes its 0.5 s poll interval)."""
    www, _ = served
    with pytest.MonkeyPatch.context() as mp, serving(functools.partial(_Handler, directory=str(www)), mp) as httpd:
        yield httpd


@pytest.fixture()
def server(served, _httpd):
    www, fp = served
    _httpd.gets = Counter()                             # the requests of this test only
    yield _httpd.url, www, _httpd.gets, fp


def _cache_names(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "stores").iterdir())


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode() if path.is_dir() else b"")
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("suffix", [".zip", ""])
def test_a_cached_copy_is_used_only_under_a_matching_pin(server, tmp_path, suffix):
    base, www, gets, fp = server
    url = f"{base}/{NAME}{suffix}"
    cache = tmp_path / "cache"
    local, pin = fetch_store(url, cache_dir=cache)
    n = sum(gets.values())
    assert pin is None and _tree_digest(local) == _tree_digest(www / f"{NAME}{suffix}")
    assert fetch_store(f"{url}#fingerprint={fp[:12]}", cache_dir=cache) == (local, fp[:12])
    assert fetch_store(f"{url}#fingerprint={fp.upper()}", cache_dir=cache)[0] == local
    assert sum(gets.values()) == n                                  # both from the cache
    # a pin the cached copy does not match: fetched again, never trusted from the cache
    assert fetch_store(f"{url}#fingerprint={'0' * 12}", cache_dir=cache) == (local, "0" * 12)
    assert sum(gets.values()) == 2 * n


@pytest.mark.parametrize("suffix", [".zip", ""])
def test_a_cached_copy_whose_manifest_changed_is_fetched_again(server, tmp_path, suffix):
    base, www, gets, fp = server
    url = f"{base}/{NAME}{suffix}"
    cache = tmp_path / "cache"
    local, _ = fetch_store(url, cache_dir=cache)
    n = sum(gets.values())
    if suffix:
        with zipfile.ZipFile(local, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
            z.writestr("manifest.json", b"{}")            # a second manifest.json, read last
    else:
        (local / "manifest.json").write_bytes(b"{}")
    assert fetch_store(url, cache_dir=cache)[0] == local
    assert sum(gets.values()) == 2 * n                  # downloaded again
    assert _tree_digest(local) == _tree_digest(www / f"{NAME}{suffix}")


def test_a_zip_that_differs_from_its_manifest_never_enters_the_cache(server, tmp_path):
    base, _, gets, _ = server
    cache = tmp_path / "cache"
    url = f"{base}/tampered.zarr.zip"
    with pytest.raises(IntegrityError) as e:
        fetch_store(url, cache_dir=cache)
    assert str(e.value) == f"{url}: 1 file(s) differ from the store's manifest: corrupt train/label/c/0"
    assert [n for n in _cache_names(cache) if not n.endswith(".lock")] == []
    assert gets == {"/tampered.zarr.zip": 1}


def test_a_response_shorter_than_it_declared_is_refused(server, tmp_path):
    base, www, _, _ = server
    cache = tmp_path / "cache"
    url = f"{base}/short/{NAME}.zip"
    size = (www / f"{NAME}.zip").stat().st_size
    with pytest.raises(StoreError) as e:
        fetch_store(url, cache_dir=cache)
    # a cut stream is transient: retried once (the tests' $DVSPREP_RETRY_DELAYS), then refused
    assert str(e.value) == f"{url}: download ended after {size:,} of {size + 10:,} bytes (gave up after 2 tries)"
    assert [n for n in _cache_names(cache) if not n.endswith(".lock")] == []


def test_the_declared_length_over_the_limit_is_refused_before_a_byte_is_read(server, tmp_path):
    base, www, _, _ = server
    size = (www / f"{NAME}.zip").stat().st_size
    url = f"{base}/{NAME}.zip"
    with pytest.raises(ResourceLimitError) as e:
        fetch_store(url, cache_dir=tmp_path / "cache", max_bytes=size - 1)
    assert str(e.value) == (f"{url}: declares {size:,} bytes, more than the download limit (--max-download or "
                            f"$DVSPREP_MAX_DOWNLOAD) ({size - 1:,} bytes); not downloading it")
    local, _ = fetch_store(url, cache_dir=tmp_path / "cache", max_bytes=size)     # exactly the limit: fine
    assert local.stat().st_size == size


def test_an_undeclared_length_is_cut_one_byte_past_the_limit(server, tmp_path):
    base, www, _, _ = server
    size = (www / f"{NAME}.zip").stat().st_size
    url = f"{base}/undeclared/{NAME}.zip"
    with pytest.raises(ResourceLimitError) as e:
        fetch_store(url, cache_dir=tmp_path / "cache", max_bytes=size - 1)
    assert str(e.value) == (f"{url}: more than the download limit (--max-download or $DVSPREP_MAX_DOWNLOAD) "
                            f"({size - 1:,} bytes); download stopped")
    assert [n for n in _cache_names(tmp_path / "cache") if not n.endswith(".lock")] == []
    local, _ = fetch_store(url, cache_dir=tmp_path / "cache", max_bytes=size)
    assert local.read_bytes() == (www / f"{NAME}.zip").read_bytes()
