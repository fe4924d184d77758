"""Hostile and unlucky inputs to the dvsprep commands (raw inputs, outputs, processes).

Every case builds its input, runs the command (click's CliRunner, or a subprocess where signals
or a real full disk are involved) and asserts: exit 1, exactly one stderr line naming the file
or URL, no traceback, nothing left behind (no temporaries, locks, half outputs, or an -o folder
the run created) and the inputs untouched.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

import dvsprep.resources as resources_mod
import dvsprep.raw.release as release_mod
import dvsprep.frames.remote as remote_mod
from dvsprep.atomic import output_lock
from dvsprep.cli import main
from dvsprep.frames.pack import pack_store
from http_fixtures import serving
from store_fixtures import make_multishard_store

from aedat_fixtures import random_events, small_release, write_release
from previous_output import lay_previous, tree

REPO = Path(__file__).resolve().parents[1]
_MAIN = "from dvsprep.cli import main; main(prog_name='dvsprep')"
EVENTS = "events.h5"


# ----------------------------------------------------------------------------- helpers


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _refused(code: int, stderr: str, *names: object) -> str:
    """Exit 1, one 'error: ...' line on stderr naming every one of `names`, no traceback."""
    assert code == 1, (code, stderr)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def _state(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself): inputs must not change."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def _hidden(folder: Path) -> list[str]:
    """Temporaries, locks or scratch folders left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


def _convert_over_previous(src: Path, out: Path, *names: object, extra: tuple = ()) -> str:
    """convert SRC -o OUT --force over a previous events.h5 in OUT: refused (one line naming
    `names`) and that file left byte for byte, nothing beside it."""
    before = lay_previous(out / EVENTS)
    r = _cli("convert", src, "-o", out, "--force", *extra)
    line = _refused(r.exit_code, r.stderr, *names)
    assert tree(out) == before
    return line


def _tgz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _release_tgz(tmp_path: Path) -> Path:
    rel = small_release(tmp_path / "raw")
    tgz = tmp_path / "DvsGesture.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(rel, arcname="DvsGesture")
    return tgz


def _bigger_release(root: Path, n_recordings: int = 6, n_events: int = 150_000) -> Path:
    recs = {}
    for i in range(n_recordings):
        t, x, y, p = random_events(n_events, seed=i, t0=0, span=3_000_000)
        recs[f"user{i + 1:02d}_lab"] = (t, x, y, p, [(1 + i % 11, 0, 1_500_000), (2, 1_500_000, 3_000_000)])
    names = list(recs)
    return write_release(root, recs, train=names[:-1], test=names[-1:])


# ----------------------------------------------------------------------------- convert: outputs


def test_second_convert_into_a_locked_data_root_refuses(tmp_path):
    small_release(tmp_path / "raw")
    out = tmp_path / "data"
    before = _state(tmp_path / "raw")
    with output_lock(out / EVENTS, "events.h5"):  # another convert is writing here
        r = _cli("convert", tmp_path / "raw", "-o", out, "-j", "1")
        line = _refused(r.exit_code, r.stderr, out / EVENTS)
        assert "being written by another process" in line and f"(pid {os.getpid()})" in line
        assert _hidden(out) == [f".{EVENTS}.lock"]  # only the holder's lock: nothing of ours
    assert not (out / EVENTS).exists() and _state(tmp_path / "raw") == before


def test_force_is_checked_again_when_publishing(tmp_path, monkeypatch):
    """An events.h5 that appears while convert runs (a writer that takes no lock) is never
    replaced without --force."""
    import dvsprep.events.convert as conv

    small_release(tmp_path / "raw")
    out = tmp_path / "data"
    real = conv.list_recordings

    def meanwhile(release):
        (out / EVENTS).write_bytes(b"someone else's file")
        return real(release)

    monkeypatch.setattr(conv, "list_recordings", meanwhile)
    r = _cli("convert", tmp_path / "raw", "-o", out, "-j", "1")
    _refused(r.exit_code, r.stderr, out / EVENTS, "already exists")
    assert (out / EVENTS).read_bytes() == b"someone else's file"
    assert _hidden(out) == []
    r = _cli("convert", tmp_path / "raw", "-o", out, "-j", "1", "--force")
    assert r.exit_code == 0, r.output
    assert (out / EVENTS).read_bytes()[:8] == b"\x89HDF\r\n\x1a\n" and _hidden(out) == []


@pytest.mark.parametrize("case", ["missing_input", "strict"])
def test_failing_convert_leaves_no_output_folder(tmp_path, case):
    out = tmp_path / "new" / "data"
    if case == "missing_input":
        r = _cli("convert", tmp_path / "nope", "-o", out)
        _refused(r.exit_code, r.stderr, tmp_path / "nope")
    else:
        rel = small_release(tmp_path / "raw")
        for f in rel.glob("user01_lab*"):  # a published name whose md5 cannot match
            f.rename(f.with_name(f.name.replace("user01_lab", "user01_natural")))
        txt = rel / "trials_to_train.txt"
        txt.write_text(txt.read_text().replace("user01_lab", "user01_natural"))
        r = _cli("convert", tmp_path / "raw", "-o", out, "--strict", "-j", "2")
        _refused(r.exit_code, r.stderr, "user01_natural.aedat: md5")
    assert not out.exists() and not out.parent.exists()
    # the same over an events.h5 that --force would replace
    if case == "missing_input":
        _convert_over_previous(tmp_path / "nope", out, tmp_path / "nope")
    else:
        _convert_over_previous(tmp_path / "raw", out, "user01_natural.aedat: md5", extra=("--strict", "-j", "2"))


def test_convert_into_its_own_release_folder_refuses(tmp_path):
    rel = small_release(tmp_path / "raw")
    before = _state(rel)
    r = _cli("convert", rel, "-o", rel / "data")
    _refused(r.exit_code, r.stderr, rel / "data", "inside the release")
    assert _state(rel) == before and not (rel / "data").exists()


def test_convert_on_a_full_disk_simulated(tmp_path, monkeypatch):
    """ENOSPC from an HDF5 write: one line naming the output, the temporary removed."""
    import h5py

    small_release(tmp_path / "raw")
    out = tmp_path / "data"
    out.mkdir()
    real = h5py.Dataset.__setitem__
    calls = []

    def full(self, key, value):
        calls.append(self.name)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    r = _cli("convert", tmp_path / "raw", "-o", out, "-j", "1")
    assert _refused(r.exit_code, r.stderr) == f"error: {out / EVENTS}: No space left on device"
    assert len(calls) == 4 and list(out.iterdir()) == []  # -o existed before: kept, empty


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True)
    return r.returncode == 0


@pytest.fixture()
def tiny_disk(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _dvsprep(*args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", _MAIN, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120, **kw)


@pytest.mark.parametrize("jobs, previous", [("1", False), ("2", False), ("2", True)])
def test_convert_on_a_real_full_disk(tmp_path, tiny_disk, jobs, previous):
    """A 1 MB tmpfs: no segfault, no h5py 'Exception ignored' spam, one line, disk left empty (or
    as it was: an events.h5 that --force was replacing, byte for byte)."""
    _bigger_release(tmp_path / "raw", n_recordings=3, n_events=100_000)
    out = tiny_disk / "data"
    if previous:
        lay_previous(out / EVENTS)
    before = tree(tiny_disk)
    r = _dvsprep("convert", tmp_path / "raw", "-o", out, "-j", jobs, *(["--force"] if previous else []))
    assert _refused(r.returncode, r.stderr) == f"error: {out / EVENTS}: No space left on device"
    assert tree(tiny_disk) == before


# ----------------------------------------------------------------------------- label csv, trial lists


@pytest.mark.parametrize("field,what", [
    ("+100", "non-numeric field '+100'"),
    ("1_000", "non-numeric field '1_000'"),
    ("\u0661\u0660\u0660", "non-numeric field '\u0661\u0660\u0660'"),  # Arabic-Indic 100
    ("１００", "non-numeric field '１００'"),  # full-width digits
    (" 1 0", "non-numeric field '1 0'"),
    ("0x10", "non-numeric field '0x10'"),
    ("-5", "negative value '-5'"),
    ("99999999999999999999999", "value 99999999999999999999999... is above the int64 range"),
])
def test_label_csv_fields_other_than_plain_digits(tmp_path, field, what):
    rel = small_release(tmp_path / "raw")
    csv = rel / "user01_lab_labels.csv"
    csv.write_text(f"class,startTime_usec,endTime_usec\n1,{field},99999999\n", encoding="utf-8")
    before = _state(rel)
    r = _cli("convert", tmp_path / "raw", "-o", tmp_path / "out", "-j", "1")
    line = _refused(r.exit_code, r.stderr, csv, "line 2")
    assert what in line
    assert not (tmp_path / "out").exists() and _state(rel) == before


def test_non_utf8_trial_list(tmp_path):
    rel = small_release(tmp_path / "raw")
    lst = rel / "trials_to_test.txt"
    lst.write_bytes(b"user03_natural.aedat\r\nuser\xff\xfe.aedat\r\n")
    r = _cli("convert", tmp_path / "raw", "-o", tmp_path / "out")
    assert "not UTF-8 text" in _refused(r.exit_code, r.stderr, lst)
    assert not (tmp_path / "out").exists()
    assert "not UTF-8 text" in _convert_over_previous(tmp_path / "raw", tmp_path / "out", lst)


# ----------------------------------------------------------------------------- archives


@pytest.mark.parametrize("content", [b"not gzip at all", b"\x1f\x8b\x08\x00garbage" + bytes(600),
                                     os.urandom(4096)])
def test_an_archive_that_is_not_a_tar_gz(tmp_path, content):
    tgz = tmp_path / "DvsGesture.tar.gz"
    tgz.write_bytes(content)
    r = _cli("convert", tgz, "-o", tmp_path / "out")
    _refused(r.exit_code, r.stderr, tgz)
    assert tgz.read_bytes() == content and not (tmp_path / "out").exists()
    _convert_over_previous(tgz, tmp_path / "out", tgz)


def test_a_huge_declared_member_is_refused_before_extracting(tmp_path):
    """A member whose header declares 20 GB (the data is not even there): refused at its header."""
    tgz = tmp_path / "DvsGesture.tar.gz"
    with open(tgz, "wb") as raw:
        import gzip

        with gzip.GzipFile(fileobj=raw, mode="wb") as gz:
            gz.write(_file_info("DvsGesture/trials_to_train.txt", 0).tobuf())
            gz.write(_file_info("DvsGesture/user01_lab.aedat", 20_000_000_000).tobuf(tarfile.GNU_FORMAT))
            gz.write(bytes(2 << 20))  # 2 MB of the 20 GB it claims
    r = _cli("convert", tgz, "-o", tmp_path / "out")
    line = _refused(r.exit_code, r.stderr, tgz, "DvsGesture/user01_lab.aedat", "20,000,000,000 bytes")
    assert "536,870,912-byte bound" in line
    r = _cli("verify", tgz)  # verify streams the archive: bounded the same way
    assert "536,870,912-byte bound" in _refused(r.exit_code, r.stderr, tgz)
    assert not (tmp_path / "out").exists()
    assert "536,870,912-byte bound" in _convert_over_previous(tgz, tmp_path / "out", tgz, "DvsGesture/user01_lab.aedat")


def test_a_gnu_sparse_member_is_refused(tmp_path):
    """GNU tar -S of a 20 GB hole: a 200-byte tar.gz. Built with the real tar when present."""
    import shutil as sh

    if sh.which("tar") is None:
        pytest.skip("no tar binary")
    src = tmp_path / "src" / "DvsGesture"
    src.mkdir(parents=True)
    with open(src / "user01_lab.aedat", "wb") as f:
        f.truncate(20 << 30)
    tgz = tmp_path / "DvsGesture.tar.gz"
    subprocess.run(["tar", "-czSf", str(tgz), "-C", str(src.parent), "DvsGesture"], check=True)
    assert tgz.stat().st_size < 100_000
    r = _cli("convert", tgz, "-o", tmp_path / "out")
    line = _refused(r.exit_code, r.stderr, tgz, "user01_lab.aedat")
    assert "sparse" in line or "bound" in line
    assert not (tmp_path / "out").exists()
    assert _convert_over_previous(tgz, tmp_path / "out", tgz) == line


def test_total_and_member_count_bounds(tmp_path, monkeypatch):
    tgz = _release_tgz(tmp_path)
    monkeypatch.setattr(release_mod, "MAX_RELEASE_BYTES", 50_000)
    r = _cli("convert", tgz, "-o", tmp_path / "out")
    assert "bytes in all" in _refused(r.exit_code, r.stderr, tgz)
    monkeypatch.setattr(release_mod, "MAX_RELEASE_BYTES", 8 << 30)
    monkeypatch.setattr(release_mod, "MAX_MEMBERS", 5)
    r = _cli("convert", tgz, "-o", tmp_path / "out")
    assert "more than 5 members" in _refused(r.exit_code, r.stderr, tgz)
    assert not (tmp_path / "out").exists()
    assert "more than 5 members" in _convert_over_previous(tgz, tmp_path / "out", tgz)


@pytest.mark.parametrize("name", ["DvsGesture/sub/user01_lab.aedat", "other/user01_lab.aedat",
                                  "DvsGesture/extra/"])
def test_members_outside_the_release_layout(tmp_path, name):
    info = _file_info(name, 3)
    if name.endswith("/"):
        info.type, info.size = tarfile.DIRTYPE, 0
    tgz = _tgz(tmp_path / "DvsGesture.tar.gz", [(info, None if info.isdir() else b"abc")])
    r = _cli("convert", tgz, "-o", tmp_path / "out")
    assert "not part of the release" in _refused(r.exit_code, r.stderr, tgz, name.rstrip("/"))
    assert not (tmp_path / "out").exists()
    assert "not part of the release" in _convert_over_previous(tgz, tmp_path / "out", tgz, name.rstrip("/"))


@pytest.mark.parametrize("when", ["before", "per_member"])
def test_extraction_checks_free_space_first(tmp_path, monkeypatch, when):
    import collections

    tgz = _release_tgz(tmp_path)
    # "before": not even the archive's size is free; "per_member": that was, but no longer is when
    # the first member comes (another process filled the disk meanwhile)
    calls = []
    usage = collections.namedtuple("usage", "total used free")

    def disk_usage(path):
        calls.append(path)
        free = 1 << 40 if when == "per_member" and len(calls) == 1 else resources_mod.FREE_SPACE_RESERVE + 100
        return usage(1 << 40, 1 << 40, free)

    monkeypatch.setattr(resources_mod.shutil, "disk_usage", disk_usage)
    r = _cli("convert", tgz, "-o", tmp_path / "out")
    line = _refused(r.exit_code, r.stderr, tgz)
    need = tgz.stat().st_size if when == "before" else None
    assert "MB free" in line and (need is None or f"needs {need / 1e6:,.1f} MB" in line)
    assert (len(calls) >= 2 if when == "per_member" else len(calls) == 1) and not (tmp_path / "out").exists()
    calls.clear()
    assert "MB free" in _convert_over_previous(tgz, tmp_path / "out", tgz)


def test_library_messages_become_one_line(tmp_path, monkeypatch):
    import dvsprep.events as events_wing
    import dvsprep.events.convert as conv
    from dvsprep.errors import ReleaseError

    def multi_line(*a, **k):
        raise ReleaseError(f"{tmp_path}: first\n- second\n- third")

    for where in (events_wing, conv):   # the CLI calls it through the wing's face, dvsprep.events
        monkeypatch.setattr(where, "convert_release", multi_line)
    r = _cli("convert", tmp_path, "-o", tmp_path / "out")
    assert _refused(r.exit_code, r.stderr) == f"error: {tmp_path}: first - second - third"


def test_extract_scratch_is_pid_named_and_removed(tmp_path, monkeypatch):
    tgz = _release_tgz(tmp_path)
    seen = []
    real = release_mod.safe_extract

    def spy(archive, dest):
        seen.append(Path(dest))
        return real(archive, dest)

    monkeypatch.setattr(release_mod, "safe_extract", spy)
    r = _cli("convert", tgz, "-o", tmp_path / "out", "-j", "2")
    assert r.exit_code == 0, r.output
    assert seen[0].parent == tmp_path / "out" and seen[0].name.startswith(f".dvsprep-extract-{os.getpid()}-")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [EVENTS]


# ----------------------------------------------------------------------------- pack / unpack


@pytest.fixture()
def packed(tmp_path):
    store = tmp_path / "frames_T64_number.zarr"
    make_multishard_store(store, n_train=4, n_test=2)
    z = tmp_path / "s.zip"
    pack_store(store, z)
    return store, z


def test_unpack_onto_its_own_zip_refuses(packed, tmp_path):
    _, z = packed
    before = _state(z)
    r = _cli("unpack", z, "-o", z, "--force")
    _refused(r.exit_code, r.stderr, z, "own input")
    assert z.is_file() and _state(z) == before and _hidden(tmp_path) == []


def test_unpack_into_a_folder_holding_the_zip_refuses(packed, tmp_path):
    _, z = packed
    before = _state(z)
    r = _cli("unpack", z, "-o", tmp_path, "--force")
    _refused(r.exit_code, r.stderr, tmp_path, "destroy the input")
    assert _state(z) == before


def test_pack_onto_itself_inside_or_a_hard_link_refuses(packed, tmp_path):
    store, z = packed
    before, zip_before = _state(store), _state(z)
    r = _cli("pack", store, "-o", store / "inside.zip")
    _refused(r.exit_code, r.stderr, store / "inside.zip", "own input")
    assert _state(store) == before
    r = _cli("pack", z, "-o", z, "--force")
    _refused(r.exit_code, r.stderr, z, "own input")
    os.link(z, tmp_path / "same.zip")
    r = _cli("pack", z, "-o", tmp_path / "same.zip", "--force")
    _refused(r.exit_code, r.stderr, tmp_path / "same.zip", "own input")
    assert _state(z) == zip_before and _hidden(tmp_path) == []


def test_pack_and_unpack_outputs_are_locked(packed, tmp_path):
    store, z = packed
    with output_lock(tmp_path / "o.zip"):
        r = _cli("pack", store, "-o", tmp_path / "o.zip")
        _refused(r.exit_code, r.stderr, tmp_path / "o.zip", "being written by another process")
    with output_lock(tmp_path / "u.zarr"):
        r = _cli("unpack", z, "-o", tmp_path / "u.zarr")
        _refused(r.exit_code, r.stderr, tmp_path / "u.zarr", "being written by another process")
    assert not (tmp_path / "o.zip").exists() and not (tmp_path / "u.zarr").exists()
    assert _hidden(tmp_path) == []
    # over previous outputs, with --force: refused the same, both kept byte for byte
    lay_previous(tmp_path / "kept" / "o.zip")
    lay_previous(tmp_path / "kept" / "u.zarr", "dir")
    before = tree(tmp_path / "kept")
    for cmd, src, name in (("pack", store, "o.zip"), ("unpack", z, "u.zarr")):
        with output_lock(tmp_path / "kept" / name):
            r = _cli(cmd, src, "-o", tmp_path / "kept" / name, "--force")
            _refused(r.exit_code, r.stderr, tmp_path / "kept" / name, "being written by another process")
    assert tree(tmp_path / "kept") == before


# ----------------------------------------------------------------------------- downloads


_SLOW_GATE = threading.Event()


class _Hostile(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.startswith("/loop"):
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/huge.zip":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))  # 1 TiB
            self.end_headers()
            try:
                self.wfile.write(bytes(1 << 16))
            except OSError:
                pass
        elif self.path == "/slow.zip":
            _SLOW_GATE.wait(60)   # answers only once the test has seen the client give up
            try:
                self.send_response(200)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"PK\x03\x04")
            except OSError:   # the client is gone, as it should be
                pass
        elif self.path == "/endless.zip":  # no Content-Length: streams until the client stops
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(bytes(1 << 16))
            except OSError:
                pass
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture()
def hostile_server(monkeypatch):
    with serving(_Hostile, monkeypatch) as httpd:
        yield httpd.url


def _cache_leftovers(cache: Path) -> list[str]:
    stores = cache / "stores"
    return sorted(p.name for p in stores.iterdir() if not p.name.endswith(".lock")) if stores.exists() else []


def test_redirect_loop_is_one_line_naming_the_url(hostile_server, tmp_path):
    url = f"{hostile_server}/loop/s.zip"
    r = _cli("verify", url, "--cache-dir", tmp_path / "c")
    assert _refused(r.exit_code, r.stderr, url) == f"error: {url}: HTTP 302: redirect loop or too many redirects"
    assert _cache_leftovers(tmp_path / "c") == []


def test_timeout_names_the_url(hostile_server, tmp_path, monkeypatch):
    monkeypatch.setattr(remote_mod.transport, "TIMEOUT_S", 0.5)
    url = f"{hostile_server}/slow.zip"
    try:
        r = _cli("verify", url, "--cache-dir", tmp_path / "c")
    finally:
        _SLOW_GATE.set()
    assert "timed out" in _refused(r.exit_code, r.stderr, url)
    assert _cache_leftovers(tmp_path / "c") == []


def test_a_1_tib_content_length_is_refused_at_once(hostile_server, tmp_path):
    url = f"{hostile_server}/huge.zip"
    r = _cli("verify", url, "--cache-dir", tmp_path / "c")
    line = _refused(r.exit_code, r.stderr, url, f"{1 << 40:,} bytes")
    assert "download limit" in line and f"{8 << 30:,}" in line
    assert _cache_leftovers(tmp_path / "c") == []


def test_max_download_option_and_env(hostile_server, tmp_path, monkeypatch):
    url = f"{hostile_server}/endless.zip"
    r = _cli("verify", url, "--cache-dir", tmp_path / "c", "--max-download", "100K")
    assert f"more than the download limit (--max-download or $DVSPREP_MAX_DOWNLOAD) ({100 << 10:,} bytes)" \
        in _refused(r.exit_code, r.stderr, url)
    monkeypatch.setenv("DVSPREP_MAX_DOWNLOAD", "64K")
    r = _cli("verify", url, "--cache-dir", tmp_path / "c")
    assert f"({64 << 10:,} bytes)" in _refused(r.exit_code, r.stderr, url)
    assert _cache_leftovers(tmp_path / "c") == []
    r = _cli("verify", url, "--max-download", "lots")
    assert r.exit_code == 2 and "--max-download" in r.stderr


def test_download_free_space_check(hostile_server, tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(resources_mod.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1 << 20))
    url = f"{hostile_server}/endless.zip"  # no Content-Length: the check while streaming stops it
    monkeypatch.setattr(remote_mod, "_SPACE_CHECK_EVERY", 1 << 16)
    r = _cli("verify", url, "--cache-dir", tmp_path / "c")
    assert "MB free" in _refused(r.exit_code, r.stderr, url)
    assert _cache_leftovers(tmp_path / "c") == []


def test_download_onto_a_real_full_disk(hostile_server, tiny_disk, monkeypatch):
    monkeypatch.setattr(resources_mod, "FREE_SPACE_RESERVE", 0)  # let the writes reach ENOSPC
    url = f"{hostile_server}/endless.zip"  # 4 MB into a 1 MB disk
    r = _cli("verify", url, "--cache-dir", tiny_disk)
    line = _refused(r.exit_code, r.stderr, url, "No space left on device")
    assert str(tiny_disk / "stores") in line
    assert _cache_leftovers(tiny_disk) == []


def test_stale_partial_downloads_are_removed(hostile_server, tmp_path):
    from dvsprep.frames.remote import cache_entry

    url = f"{hostile_server}/loop/x.zip"
    entry = cache_entry(url, tmp_path / "c")
    entry.parent.mkdir(parents=True)
    dead = entry.parent / f".{entry.name}.tmp-999999999-abcdef12"  # a killed download's temp
    dead.mkdir()
    (dead / "x.zip").write_bytes(b"partial")
    r = _cli("verify", url, "--cache-dir", tmp_path / "c")
    _refused(r.exit_code, r.stderr, url)
    assert not dead.exists() and _cache_leftovers(tmp_path / "c") == []


def test_a_malformed_url_is_one_line(tmp_path):
    for cmd in ("info", "verify"):
        r = _cli(cmd, "http://[::1/x.zip")
        assert "not a valid URL" in _refused(r.exit_code, r.stderr, "http://[::1/x.zip")


# ----------------------------------------------------------------------------- CLI manners


def test_usage_errors_exit_2(tmp_path):
    r = _cli("verify", tmp_path, "--fingerprint", "6d9c")
    assert r.exit_code == 2 and "--fingerprint" in r.stderr and "12 to 64 hex digits" in r.stderr
    r = _cli("verify", tmp_path, "--fingerprint", "zz" * 8)
    assert r.exit_code == 2
    for t in ("0", "-3"):
        r = _cli("frames", "-T", t, "-d", tmp_path)
        assert r.exit_code == 2 and "-T" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_synth_help_states_the_measured_full_size():
    r = _cli("synth", "--help")
    assert r.exit_code == 0 and "~4.3 GB" in r.output and "~5 GB" not in r.output


def test_a_closed_stdout_is_quiet(tmp_path):
    """`dvsprep info STORE | head -1`: the reader is gone before dvsprep writes; no 'Broken pipe'."""
    store = tmp_path / "frames_T64_number.zarr"
    make_multishard_store(store, n_train=2, n_test=1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `head` after its first line
    try:
        r = subprocess.run([sys.executable, "-c", _MAIN, "info", str(store)], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, timeout=120)
    finally:
        os.close(write_end)
    assert r.stderr == "" and r.returncode in (1, 141)


# ----------------------------------------------------------------------------- signals


_AT_CALL = """
import os, signal
import dvsprep.{module} as m
real = m.{func}
def at_call(*a, **k):
    {action}
    return real(*a, **k)
m.{func} = at_call
from dvsprep.entry import dvsprep
dvsprep()
"""


def _dvsprep_signalled(module: str, func: str, action: str, *args) -> subprocess.Popen:
    """dvsprep in its own process group, running `action` (a signal) at each call of
    `module.func`: the moment is an event of the run, not a time (the code under test is the
    real one)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = _AT_CALL.format(module=module, func=func, action=action)
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


_GROUP_SIGINT = "os.killpg(0, signal.SIGINT)"   # what the terminal does on Ctrl-C


@pytest.mark.parametrize("at", ["process_recording", "_load_spill"])
def test_ctrl_c_on_convert_j2_prints_aborted_only(tmp_path, at):
    """Ctrl-C while a worker starts a recording, or while the parent takes one in."""
    _bigger_release(tmp_path / "raw", n_recordings=6, n_events=20_000)
    out = tmp_path / "out"
    before = _state(tmp_path / "raw")
    proc = _dvsprep_signalled("events.convert", at, _GROUP_SIGINT, "convert", tmp_path / "raw", "-o", out, "-j", "2")
    stdout, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stdout, stderr.strip()) == (1, "", "Aborted!"), stderr  # click: "\\nAborted!"
    assert not out.exists() and _state(tmp_path / "raw") == before


@pytest.mark.parametrize("previous", [False, True])
def test_ctrl_c_on_synth_j2_prints_aborted_only(tmp_path, previous):
    """... and leaves a release that --force was replacing byte for byte."""
    out = tmp_path / "syn"
    before = lay_previous(out / "DvsGesture", "dir") if previous else None
    proc = _dvsprep_signalled("raw.synth", "_write_task", _GROUP_SIGINT, "synth", out, "-j", "2", "--users", "2",
                              "--test-users", "1", *(["--force"] if previous else []))
    stdout, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stdout, stderr.strip()) == (1, "", "Aborted!"), stderr  # click: "\\nAborted!"
    assert tree(out) == before if previous else not out.exists()


@pytest.mark.parametrize("previous", [False, True])
def test_sigterm_on_convert_removes_its_temporaries(tmp_path, previous):
    """... and leaves an events.h5 that --force was replacing byte for byte."""
    tgz = _release_tgz(tmp_path)
    out = tmp_path / "out"
    before = lay_previous(out / EVENTS) if previous else None
    proc = _dvsprep_signalled("events.convert", "process_recording", "os.killpg(0, signal.SIGTERM)",
                              "convert", tgz, "-o", out, "-j", "2",   # e.g. `timeout` or a batch system
                              *(["--force"] if previous else []))
    stdout, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stdout, stderr) == (128 + signal.SIGTERM, "", ""), stderr
    assert tree(out) == before if previous else not out.exists()


def test_sigkill_mid_convert_then_rerun_leaves_nothing(tmp_path):
    tgz = _release_tgz(tmp_path)
    out = tmp_path / "out"
    # the parent killed as it takes in the first recording: the pool runs, events.h5 is begun
    proc = _dvsprep_signalled("events.convert", "_add_recording", "os.kill(os.getpid(), signal.SIGKILL)",
                              "convert", tgz, "-o", out, "-j", "2")
    proc.communicate(timeout=60)  # returns once no worker holds our pipes any more
    assert proc.returncode == -signal.SIGKILL
    left = _hidden(out)
    assert any(n.startswith(".dvsprep-extract-") for n in left) and any(n.startswith(f".{EVENTS}.tmp-")
                                                                         for n in left), left
    r = _cli("convert", tgz, "-o", out, "-j", "1")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [EVENTS]
