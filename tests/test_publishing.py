"""dvsprep.atomic's output protocol in-process, case by case, with exact messages and the previous
output checked byte for byte after every failure (a deleted target would pass a check that only
looks for leftovers). Fast unit tests: test_output_protocol runs the real writers through it."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from dvsprep import atomic
from dvsprep.atomic import (
    atomic_write,
    clean_stale_temps,
    lock_path,
    output_lock,
    pid_alive,
    publishing,
    remove_path,
    same_or_inside,
    temp_owner,
    temp_sibling,
)
from dvsprep.errors import (
    InputOutputClashError,
    MissingFileError,
    OutputLockedError,
    ResourceLimitError,
    StoreError,
    StoreExistsError,
)

from previous_output import lay_previous, tree


def _old_dir(out: Path) -> dict[str, bytes | None]:
    (out / "sub").mkdir(parents=True)
    (out / "a.bin").write_bytes(b"old a")
    (out / "sub" / "b.bin").write_bytes(b"old b")
    return tree(out.parent)


def _no_renameat2(monkeypatch) -> None:
    monkeypatch.setattr(atomic, "_renameat2", None)


@pytest.fixture(params=["renameat2", "fallback"])
def rename_mode(request, monkeypatch):
    """Every case with renameat2 and with the fallbacks of a libc or filesystem without it."""
    if request.param == "fallback":
        _no_renameat2(monkeypatch)
    return request.param


def test_a_new_file_is_published_from_a_hidden_sibling(tmp_path, rename_mode):
    out = tmp_path / "pic.png"
    with publishing(out, "picture", force=False) as tmp:
        assert tmp.parent == tmp_path
        assert re.fullmatch(rf"\.pic\.png\.tmp-{os.getpid()}-[0-9a-f]{{8}}", tmp.name)
        assert lock_path(out).read_text() == str(os.getpid())          # locked by us meanwhile
        tmp.write_bytes(b"new")
        assert not out.exists()
    assert tree(tmp_path) == {"pic.png": b"new"}                         # lock and temporary gone


def test_an_existing_file_is_refused_without_force_before_any_work(tmp_path, rename_mode):
    out = tmp_path / "pic.png"
    out.write_bytes(b"previous")
    body = []
    with pytest.raises(StoreExistsError) as e:
        with publishing(out, "picture", force=False):
            body.append(1)
    assert str(e.value) == f"{out}: already exists (use --force to replace it)"
    assert body == [] and tree(tmp_path) == {"pic.png": b"previous"}


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_force_replaces_a_file_or_a_folder_whole(tmp_path, rename_mode, kind):
    out = tmp_path / "out"
    if kind == "dir":
        _old_dir(out)
    else:
        out.write_bytes(b"previous")
    with publishing(out, "thing", force=True, kind=kind) as tmp:
        if kind == "dir":
            tmp.mkdir()
            (tmp / "c.bin").write_bytes(b"new c")
        else:
            tmp.write_bytes(b"new")
    want = {"out": None, "out/c.bin": b"new c"} if kind == "dir" else {"out": b"new"}
    assert tree(tmp_path) == want                                      # nothing old, no .old- left


@pytest.mark.parametrize("kind", ["file", "dir"])
@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_a_failed_write_leaves_the_previous_output_byte_for_byte(tmp_path, rename_mode, kind, error):
    out = tmp_path / "out"
    if kind == "dir":
        before = _old_dir(out)
    else:
        out.write_bytes(b"previous")
        before = tree(tmp_path)
    with pytest.raises(type(error)):
        with publishing(out, "thing", force=True, kind=kind) as tmp:
            if kind == "dir":
                tmp.mkdir()
                (tmp / "a.bin").write_bytes(b"half")
            else:
                tmp.write_bytes(b"half")
            raise error
    assert tree(tmp_path) == before
    with output_lock(out):                                             # the lock was released
        pass


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_error_naming_the_output_and_the_previous_survives(tmp_path, rename_mode, err):
    out = tmp_path / "store.zarr"
    before = _old_dir(out)
    with pytest.raises(ResourceLimitError) as e:
        with publishing(out, "frame store", force=True, kind="dir") as tmp:
            tmp.mkdir()
            raise OSError(err, os.strerror(err), str(tmp / "chunk"))
    assert str(e.value) == f"{out}: No space left on device"
    assert tree(tmp_path) == before


def test_a_full_disk_while_renaming_is_the_same_error(tmp_path, monkeypatch):
    out = tmp_path / "pic.png"
    out.write_bytes(b"previous")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ResourceLimitError, match=re.escape(f"{out}: No space left on device")):
        with publishing(out, "picture", force=True) as tmp:
            tmp.write_bytes(b"new")
            monkeypatch.setattr(atomic.os, "replace", full)
    monkeypatch.undo()
    assert tree(tmp_path) == {"pic.png": b"previous"}


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_an_output_that_appears_meanwhile_is_kept_without_force(tmp_path, rename_mode, kind):
    """--force is checked again at the rename: another writer's output is never replaced."""
    out = tmp_path / "out"
    with pytest.raises(StoreExistsError) as e:
        with publishing(out, "thing", force=False, kind=kind) as tmp:
            if kind == "dir":
                tmp.mkdir()
                (tmp / "mine").write_bytes(b"mine")
                out.mkdir()
                (out / "theirs").write_bytes(b"theirs")
            else:
                tmp.write_bytes(b"mine")
                out.write_bytes(b"theirs")
    assert str(e.value) == f"{out}: already exists (use --force to replace it)"
    want = {"out": None, "out/theirs": b"theirs"} if kind == "dir" else {"out": b"theirs"}
    assert tree(tmp_path) == want


def test_a_file_output_where_a_folder_is_refused_even_with_force(tmp_path):
    out = tmp_path / "pic.png"
    out.mkdir()
    (out / "keep").write_bytes(b"keep")
    for force in (False, True):
        with pytest.raises(StoreError) as e:
            with publishing(out, "picture", force=force):
                pass
        assert str(e.value) == f"{out}: is a directory, not a file to write"
    assert tree(tmp_path) == {"pic.png": None, "pic.png/keep": b"keep"}


def test_a_missing_folder_is_refused_unless_the_writer_creates_it(tmp_path):
    out = tmp_path / "nowhere" / "pic.png"
    with pytest.raises(MissingFileError) as e:
        with publishing(out, "picture", force=False):
            pass
    assert str(e.value) == f"{tmp_path / 'nowhere'}: output directory does not exist"
    assert list(tmp_path.iterdir()) == []
    with publishing(out, "picture", force=False, parent=False) as tmp:
        tmp.write_bytes(b"x")
    assert tree(tmp_path) == {"nowhere": None, "nowhere/pic.png": b"x"}


def test_outputs_on_their_own_inputs_are_refused_with_the_input_intact(tmp_path):
    src = tmp_path / "in"
    (src / "deep").mkdir(parents=True)
    (src / "deep" / "f").write_bytes(b"input")
    before = tree(tmp_path)
    cases = [(src, f"{src}: is the input {src}; the store would overwrite its own input"),
             (src / "deep" / "x", f"{src / 'deep' / 'x'}: lies inside the input {src}; the store would be "
                                  f"written into its own input"),
             (tmp_path, f"{tmp_path}: holds the input {src}; replacing it would destroy the input")]
    for out, message in cases:
        with pytest.raises(InputOutputClashError) as e:
            with publishing(out, "store", force=True, inputs=[src], kind="dir"):
                pass
        assert str(e.value) == message
    (tmp_path / "link").symlink_to(src)                                # through a link, too
    with pytest.raises(InputOutputClashError, match="is the input"):
        with publishing(tmp_path / "link", "store", force=True, inputs=[src], kind="dir"):
            pass
    (tmp_path / "link").unlink()
    assert tree(tmp_path) == before
    # a URL input is no path here: not compared
    with publishing(tmp_path / "o", "store", force=False, inputs=["http://h/in", None], kind="dir") as tmp:
        tmp.mkdir()
    assert (tmp_path / "o").is_dir()


def test_a_second_writer_of_the_same_output_is_refused_at_once(tmp_path):
    out = tmp_path / "pic.png"
    with publishing(out, "picture", force=False) as tmp:
        with pytest.raises(OutputLockedError) as e:
            with publishing(out, "picture", force=False):
                pass
        assert str(e.value) == (f"{out}: picture is being written by another process (pid {os.getpid()}); "
                                f"wait for it to finish")
        tmp.write_bytes(b"first")
    assert tree(tmp_path) == {"pic.png": b"first"}


def test_on_published_runs_in_place_under_the_lock_and_its_errors_are_swallowed(tmp_path):
    out = tmp_path / "pic.png"
    seen = []

    def marker():
        seen.append((out.read_bytes(), lock_path(out).exists()))
        with pytest.raises(OutputLockedError):
            with output_lock(out):
                pass

    def broken():
        raise ValueError("marker could not be written")
    with publishing(out, "picture", force=False) as tmp:
        pub_tmp = tmp
        tmp.write_bytes(b"new")
    p = atomic.Publication(out, "picture", force=True)
    p.on_published(broken)
    p.on_published(marker)
    with p as tmp:
        tmp.write_bytes(b"newer")
    assert seen == [(b"newer", True)] and not pub_tmp.exists()
    assert tree(tmp_path) == {"pic.png": b"newer"}


def test_a_failed_commit_removes_the_temporary_and_releases_the_lock(tmp_path, monkeypatch):
    out = tmp_path / "pic.png"
    out.write_bytes(b"previous")

    def refuse(*a):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(PermissionError):
        with publishing(out, "picture", force=True) as tmp:
            tmp.write_bytes(b"new")
    monkeypatch.undo()
    assert tree(tmp_path) == {"pic.png": b"previous"}


def test_publish_dir_without_renameat2_moves_the_old_aside_and_removes_it(tmp_path, monkeypatch):
    _no_renameat2(monkeypatch)
    final, tmp = tmp_path / "s", tmp_path / ".s.tmp-1-00000000"
    _old_dir(final)
    tmp.mkdir()
    (tmp / "n").write_bytes(b"n")
    atomic.publish_dir(tmp, final)
    assert tree(tmp_path) == {"s": None, "s/n": b"n"}


def test_publish_new_never_replaces(tmp_path, rename_mode):
    for make in (lambda p: p.write_bytes(b"there"), lambda p: p.mkdir()):
        final = tmp_path / "f"
        make(final)
        tmp = tmp_path / ".f.tmp-1-00000000"
        tmp.write_bytes(b"mine")
        with pytest.raises(StoreExistsError, match=re.escape(f"{final}: already exists")):
            atomic.publish_new(tmp, final)
        remove_path(tmp)
        assert (final.read_bytes() == b"there") if final.is_file() else final.is_dir()
        remove_path(final)
    tmp = tmp_path / ".f.tmp-1-00000000"
    tmp.mkdir()
    atomic.publish_new(tmp, tmp_path / "f")
    assert tree(tmp_path) == {"f": None}


def test_temp_owner_reads_only_our_names():
    cases = {".s.zarr.tmp-123-abcdef12": 123, ".s.zarr.old-7-0a": 7, ".x.part-42": 42, ".x.extract.9": 9,
             ".x.convert-5": 5, ".dvsprep-convert-77-k2j3": 77, "s.zarr.tmp-123-abcdef12": None,
             ".s.zarr.tmp-abc": None, ".s.zarr.lock": None, ".dvsprep-Convert-7-": None, "..tmp-": None}
    assert {n: temp_owner(n) for n in cases} == cases
    name = temp_sibling(Path("/d/out.h5"), "old").name
    assert temp_owner(name) == os.getpid() and name.startswith(".out.h5.old-")


def test_pid_alive_edges():
    assert pid_alive(os.getpid()) and pid_alive(1)            # ours; init (EPERM or alive: alive)
    assert not pid_alive(0) and not pid_alive(-1)


def test_clean_stale_temps_keeps_non_temporaries_and_live_ones(tmp_path):
    dead = 2 ** 22 + 12345                                     # above pid_max's default
    assert not pid_alive(dead)
    keep = [f".s.tmp-{os.getpid()}-0a", "s.tmp-1-0a", ".s.lock", "s"]
    gone = [f".s.tmp-{dead}-0a", f".dvsprep-convert-{dead}-x"]
    for n in keep + gone:
        (tmp_path / n).mkdir()
    assert sorted(p.name for p in clean_stale_temps(tmp_path)) == sorted(gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert clean_stale_temps(tmp_path / "missing") == []


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "m.json"
    out.write_bytes(b"previous")
    atomic_write(out, lambda p: p.write_bytes(b"new"))
    assert tree(tmp_path) == {"m.json": b"new"}
    with pytest.raises(KeyboardInterrupt):
        atomic_write(out, lambda p: (p.write_bytes(b"half"), (_ for _ in ()).throw(KeyboardInterrupt())))
    assert tree(tmp_path) == {"m.json": b"new"}


def test_remove_path_never_follows_a_link_into_a_tree(tmp_path):
    target = tmp_path / "t"
    (target / "d").mkdir(parents=True)
    (target / "d" / "f").write_bytes(b"f")
    (tmp_path / "l").symlink_to(target)
    remove_path(tmp_path / "l")
    remove_path(tmp_path / "missing")
    assert tree(tmp_path) == {"t": None, "t/d": None, "t/d/f": b"f"}
    remove_path(target)
    assert list(tmp_path.iterdir()) == []


def test_same_or_inside(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "f").write_bytes(b"f")
    os.link(a / "f", tmp_path / "hard")
    assert same_or_inside(a, a) and same_or_inside(a / "x" / "y", a)
    assert same_or_inside(tmp_path / "hard", a / "f")                  # a hard link is the file
    assert not same_or_inside(a, a / "x") and not same_or_inside(tmp_path / "ab", a)
    assert not same_or_inside(tmp_path / "nope", a / "f")


def test_output_lock_writes_our_pid_and_removes_its_file(tmp_path):
    out = tmp_path / "deeper" / "o"
    with output_lock(out, "report") as held:
        assert held == out and lock_path(out) == tmp_path / "deeper" / ".o.lock"
        assert lock_path(out).read_text() == str(os.getpid())
        with pytest.raises(OutputLockedError, match=re.escape(f"{out}: report is being written by another "
                                                               f"process (pid {os.getpid()})")):
            with output_lock(out, "report"):
                pass
    assert tree(tmp_path) == {"deeper": None}


# --------------------------------------------------------------------------- the edges mutation testing found

def _fake_renameat2(err: int):
    """A renameat2 that fails with errno `err` (set where ctypes.get_errno reads it)."""
    import ctypes

    calls = []

    def fake(dirfd, src, dirfd2, dst, flags):
        calls.append((dirfd, src, dirfd2, dst, flags))
        ctypes.set_errno(err)
        return -1
    return fake, calls


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_filesystem_without_renameat2_falls_back(tmp_path, monkeypatch, err):
    fake, calls = _fake_renameat2(err)
    monkeypatch.setattr(atomic, "_renameat2", fake)
    final, tmp = tmp_path / "s", tmp_path / ".s.tmp-1-00000000"
    _old_dir(final)
    tmp.mkdir()
    atomic.publish_dir(tmp, final)                                      # EXCHANGE refused: moved aside
    assert tree(tmp_path) == {"s": None}
    assert calls == [(-100, os.fsencode(tmp), -100, os.fsencode(final), 2)]


def test_another_renameat2_error_is_raised_naming_both_paths(tmp_path, monkeypatch):
    fake, _ = _fake_renameat2(errno.EXDEV)
    monkeypatch.setattr(atomic, "_renameat2", fake)
    with pytest.raises(OSError) as e:
        atomic.publish_new(tmp_path / "a", tmp_path / "b")
    assert (e.value.errno, e.value.strerror, e.value.filename, e.value.filename2) == (
        errno.EXDEV, os.strerror(errno.EXDEV), str(tmp_path / "a"), str(tmp_path / "b"))


def test_relative_paths_are_renamed_in_the_current_folder(tmp_path, monkeypatch):
    """renameat2 gets AT_FDCWD: relative paths resolve in the current folder."""
    monkeypatch.chdir(tmp_path)
    Path(".a.tmp-1-0").write_bytes(b"a")
    atomic.publish_new(Path(".a.tmp-1-0"), Path("a"))
    Path(".a.tmp-1-1").write_bytes(b"b")
    atomic.publish_dir(Path(".a.tmp-1-1"), Path("a"))
    assert tree(tmp_path) == {"a": b"b"}


def test_the_fallback_moves_the_old_output_aside_under_an_old_name(tmp_path, monkeypatch):
    """Without renameat2 the old output is renamed to .<name>.old-<pid>-<hex> (a name the next
    writer recognises and removes should this process die here), then removed."""
    _no_renameat2(monkeypatch)
    moves = []
    real = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (moves.append((Path(a).name, Path(b).name)), real(a, b)))
    final, tmp = tmp_path / "s", tmp_path / ".s.tmp-1-00000000"
    _old_dir(final)
    tmp.mkdir()
    atomic.publish_dir(tmp, final)
    assert moves[0][0] == "s" and re.fullmatch(rf"\.s\.old-{os.getpid()}-[0-9a-f]{{8}}", moves[0][1])
    assert temp_owner(moves[0][1]) == os.getpid()
    assert moves[1] == (tmp.name, "s") and tree(tmp_path) == {"s": None}


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_force_publishes_where_nothing_was(tmp_path, rename_mode, kind):
    out = tmp_path / "o"
    with publishing(out, "thing", force=True, kind=kind) as tmp:
        tmp.mkdir() if kind == "dir" else tmp.write_bytes(b"x")
    assert tree(tmp_path) == ({"o": None} if kind == "dir" else {"o": b"x"})


def test_the_fallback_publishes_a_file_by_hard_link_and_a_folder_by_rename(tmp_path, monkeypatch):
    """A hard link never replaces: the file path needs no check-then-rename window."""
    _no_renameat2(monkeypatch)
    links = []
    real = os.link
    monkeypatch.setattr(atomic.os, "link", lambda a, b: (links.append(Path(a).name), real(a, b)))
    f = tmp_path / ".f.tmp-1-0"
    f.write_bytes(b"f")
    atomic.publish_new(f, tmp_path / "f")
    d = tmp_path / ".d.tmp-1-0"
    d.mkdir()
    atomic.publish_new(d, tmp_path / "d")
    target = tmp_path / "t"
    target.write_bytes(b"t")
    ln = tmp_path / ".l.tmp-1-0"
    ln.symlink_to(target)                                                 # a link is published as one
    atomic.publish_new(ln, tmp_path / "l")
    assert links == [".f.tmp-1-0"]
    assert (tmp_path / "l").is_symlink() and tree(tmp_path) == {"d": None, "f": b"f", "l": b"t", "t": b"t"}


def test_check_output_defaults_to_a_file_in_an_existing_folder(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(StoreError, match="is a directory, not a file to write"):
        atomic.check_output(tmp_path / "d", "x", force=True)
    with pytest.raises(MissingFileError, match="output directory does not exist"):
        atomic.check_output(tmp_path / "no" / "f", "x", force=True)
    with pytest.raises(StoreError, match="is a directory, not a file to write"):
        atomic.Publication(tmp_path / "d", "x", force=True).begin()
    with pytest.raises(MissingFileError, match="output directory does not exist"):
        atomic.Publication(tmp_path / "no" / "f", "x", force=True).begin()


def test_clean_stale_temps_for_one_output_also_takes_dead_scratch_folders(tmp_path):
    dead = 2 ** 22 + 12345
    for n in (f".s.tmp-{dead}-0a", f".dvsprep-convert-{dead}-x", f".other.tmp-{dead}-0a"):
        (tmp_path / n).mkdir()
    removed = clean_stale_temps(tmp_path, "s")
    assert sorted(p.name for p in removed) == [f".dvsprep-convert-{dead}-x", f".s.tmp-{dead}-0a"]
    assert [p.name for p in tmp_path.iterdir()] == [f".other.tmp-{dead}-0a"]


def test_local_paths_leave_out_urls_and_none():
    assert atomic.local_paths(["http://h/x", None, "a", Path("b"), "s3://b/k"]) == [Path("a"), Path("b")]


def test_pid_alive_sends_no_signal(tmp_path):
    """Signal 0 only checks: a live process is not touched (it would print HUP on SIGHUP)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import signal, sys\n"
                              "signal.signal(signal.SIGHUP, lambda *a: print('HUP', flush=True))\n"
                              "print('ready', flush=True)\nsys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    assert pid_alive(child.pid)
    out, _ = child.communicate("")
    assert out == "" and child.returncode == 0


def test_pid_alive_counts_a_process_we_may_not_signal(monkeypatch):
    def denied(pid, sig):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    def gone(pid, sig):
        raise ProcessLookupError(errno.ESRCH, "No such process")
    monkeypatch.setattr(atomic.os, "kill", denied)
    assert pid_alive(4242)
    monkeypatch.setattr(atomic.os, "kill", gone)
    assert not pid_alive(4242)


def test_remove_path_never_raises_on_a_tree_it_cannot_remove(tmp_path, monkeypatch):
    d = tmp_path / "busy"
    d.mkdir()

    def busy(*a, **k):
        raise OSError(errno.EBUSY, "Device or resource busy")
    monkeypatch.setattr(os, "rmdir", busy)
    remove_path(d)                                                        # a mount point, say
    monkeypatch.undo()
    assert d.is_dir()


def test_same_or_inside_is_false_when_the_files_cannot_be_compared(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")

    def fails(a, b):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(atomic.os.path, "samefile", fails)
    assert not same_or_inside(tmp_path / "a", tmp_path / "b")


def test_scratch_dir_is_a_new_hidden_folder_inside_its_parent(tmp_path):
    s = atomic.scratch_dir(tmp_path / "a" / "b", "convert")
    assert s.parent == tmp_path / "a" / "b" and s.is_dir()
    assert re.fullmatch(rf"\.dvsprep-convert-{os.getpid()}-\w+", s.name) and temp_owner(s.name) == os.getpid()
    assert atomic.scratch_dir(tmp_path / "a" / "b", "convert") != s


@pytest.mark.parametrize("kind", [None, "file", "dir"])
def test_a_publication_aborted_before_it_began_does_nothing(tmp_path, kind):
    """Nothing created, and a previous output (which --force would replace) left byte for byte."""
    before = lay_previous(tmp_path / "o", kind) if kind else {}
    p = atomic.Publication(tmp_path / "o", "x", force=True, kind=kind or "file")
    p.abort()
    p.abort()
    assert tree(tmp_path) == before


def test_a_failing_marker_is_logged_at_debug_naming_the_output(tmp_path, caplog):
    import logging

    out = tmp_path / "pic.png"
    p = atomic.Publication(out, "picture", force=False)
    p.on_published(lambda: (_ for _ in ()).throw(ValueError("no marker")))
    with caplog.at_level(logging.DEBUG, logger="dvsprep.atomic"):
        with p as tmp:
            tmp.write_bytes(b"x")
    assert [r.getMessage() for r in caplog.records] == [f"{out}: after publishing: no marker"]
