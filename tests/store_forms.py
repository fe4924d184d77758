"""One frame store directory, opened in every form a store travels in, so a hostile-store case
runs against each of them (as zarr runs one store test suite against every store class):

* "dir": the directory itself;
* "zip": the same files in an uncompressed zip laid out as `dvsprep pack` writes it
  (`zip_like_pack`), but copied as they are, unchecked: links become link members and other
  special files keep their mode, so the zip reader's own checks are what meets them;
* "http": the directory served from 127.0.0.1 (`http_fixtures.serving`), opened by URL;
* "http-zip": that zip served the same way, opened by URL.

The http forms download into the cache of the test (``$DVSPREP_CACHE``, set per test by the
`store_forms` fixture in conftest), so each test starts with an empty cache.
"""
from __future__ import annotations

import http.server
import itertools
import os
import stat
import zipfile
from pathlib import Path

FORMS = ("dir", "zip", "http", "http-zip")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)     # as dvsprep pack writes it


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files, and nothing on stderr: no log lines, no traceback when the client hangs up
    (a download refused after its headers), which would land in the output of the command
    under test (the server thread prints to sys.stderr, captured by click's CliRunner)."""

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args) -> None:
        pass


def zip_like_pack(src: Path, out: Path) -> Path:
    """The files under the store directory `src` as an uncompressed zip at `out`, as `dvsprep pack`
    lays it out (members in name order, manifest.json last, fixed time, unix mode 0644), but
    copied as they are: a symbolic link becomes a link member (its target as data), a FIFO or
    other special file a member with that mode and no data, an empty directory a directory entry."""
    members = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        if here != src and not dirnames and not filenames:
            members.append((here.relative_to(src).as_posix() + "/", here, os.lstat(here)))
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            members.append(((here / name).relative_to(src).as_posix(), here / name, os.lstat(here / name)))
    members.sort(key=lambda m: (m[0] == "manifest.json", m[0]))
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, path, st in members:
            zi = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            zi.create_system = 3
            if stat.S_ISREG(st.st_mode):
                zi.external_attr = 0o100644 << 16
                data = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                zi.external_attr = (stat.S_IFLNK | 0o777) << 16
                data = os.readlink(path).encode()
            elif stat.S_ISDIR(st.st_mode):
                zi.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
                data = b""
            else:
                zi.external_attr = st.st_mode << 16
                data = b""
            zf.writestr(zi, data)
    return out


class StoreForms:
    """Where a test builds its store for each form, and what it opens then."""

    def __init__(self, base_url: str, served: Path, tmp_path: Path):
        self.base_url = base_url
        self.served = served                  # the folder the loopback server serves (for the module)
        self.local = tmp_path / "stores"      # the test's own folder for the local forms
        self.cache = tmp_path / "cache"       # the test's download cache ($DVSPREP_CACHE)
        self._tag = tmp_path.name             # unique per test: names its folders on the server
        self._n = itertools.count()

    def place(self, form: str, name: str = "s.zarr") -> Path:
        """A fresh path to build the store directory at: in the served folder for the http forms
        (a new subfolder per call, so no URL is ever reused), else in the test's folder."""
        assert form in FORMS, form
        root = self.served if form.startswith("http") else self.local
        folder = root / f"{self._tag}-{next(self._n)}"
        folder.mkdir(parents=True)
        return folder / name

    def target(self, form: str, store: Path) -> str:
        """What to open the store built at `store` (by `place(form)`) as: a path or a URL."""
        if form in ("zip", "http-zip"):
            store = zip_like_pack(store, store.with_name(store.name + ".zip"))
        if form.startswith("http"):
            return f"{self.base_url}/{store.relative_to(self.served).as_posix()}"
        return str(store)

    def source(self, form: str, store: Path) -> Path:
        """The file or directory behind `target(form, store)` (the zip, or the served directory)."""
        return store.with_name(store.name + ".zip") if form in ("zip", "http-zip") else store

    def downloaded(self) -> list[str]:
        """What the download cache holds, lock files left out: one entry per complete copy (a
        leftover temporary would show as `.<entry>.tmp-<pid>-<hex>`)."""
        stores = self.cache / "stores"
        return sorted(p.name for p in stores.iterdir() if not p.name.endswith(".lock")) if stores.exists() else []
