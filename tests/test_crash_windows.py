"""Crash windows of the output protocol and full disks (issue 19, items 3 and 4): an orphaned
previous output is put back, never deleted; an interrupted replacement undoes itself; a failed
writer leaves no folder it made; publication is durable (fsync of the data before the rename
and of the folder after); a checkpoint onto a full disk is one line and the previous one stays."""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import dvsprep.atomic as atomic
from aedat_fixtures import small_release
from dvsprep.atomic import publishing
from dvsprep.cli import main
from previous_output import lay_previous, tree
from store_fixtures import make_multishard_store

REPO = Path(__file__).resolve().parents[1]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- .old- put back


def test_an_orphaned_old_store_beside_a_missing_output_is_put_back(tmp_path):
    """A writer killed between the two renames of a replacement (no renameat2) leaves the previous
    store only as .<name>.old-<pid>-<hex>: the next writer of that output (here what `frames -o
    STORE` does first) puts it back, and then refuses to replace it without --force."""
    store = tmp_path / "frames_T4_number.zarr"
    make_multishard_store(store, n_train=2, n_test=1)
    before = _tree(store)
    orphan = tmp_path / f".{store.name}.old-{_dead_pid()}-0123abcd"
    store.rename(orphan)
    with pytest.raises(atomic.StoreExistsError):
        with publishing(store, "frame store", force=False, kind="dir"):
            pass
    assert _tree(store) == before and not orphan.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [store.name]


def test_an_old_store_beside_a_present_output_is_removed(tmp_path):
    """Killed after the second rename: the new store is in place, the old one is stale."""
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / "new").write_text("new")
    orphan = tmp_path / f".s.zarr.old-{_dead_pid()}-0123abcd"
    orphan.mkdir()
    (orphan / "old").write_text("old")
    with publishing(store, "frame store", force=True, kind="dir") as tmp:
        tmp.mkdir()
        (tmp / "newer").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"] and _tree(store) == {
        "newer": hashlib.sha256(b"newer").hexdigest()}


def test_an_interrupted_replacement_without_renameat2_puts_the_old_store_back(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, or an error) between moving the old store aside and moving the new one
    in: the old one is back at its path and no .old- is left."""
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / "old").write_text("old")
    monkeypatch.setattr(atomic, "_rename2", lambda *a: False)   # a system without renameat2
    real = os.replace

    def second_rename_interrupted(src, dst):
        if Path(src).name.startswith(".s.zarr.tmp-"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_rename_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with publishing(store, "frame store", force=True, kind="dir") as tmp:
            tmp.mkdir()
            (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    assert (store / "old").read_text() == "old"


# ----------------------------------------------------------------------------- no folder left


@pytest.mark.parametrize("previous", [False, True])
def test_a_failed_synth_leaves_no_folder_it_made(tmp_path, monkeypatch, previous):
    """... and a release that --force was replacing, byte for byte."""
    import dvsprep.raw.synth as synth

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(synth, "write_aedat", disk_full)
    out = tmp_path / "a" / "b"
    if previous:
        lay_previous(out / "DvsGesture", "dir")
    before = tree(tmp_path)
    r = _cli("synth", out, "--users", "2", "--test-users", "1", "-j", "1", *(["--force"] if previous else []))
    assert r.exit_code == 1 and r.output == f"error: {out / 'DvsGesture'}: No space left on device\n"
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- durability


def test_publishing_syncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_replace, real_rename2 = os.fsync, os.replace, atomic._rename2

    def fsync(fd):
        calls.append("fsync " + os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), tmp_path))
        return real_fsync(fd)

    def rename2(src, dst, flags):
        calls.append(f"rename {src.name.split('-')[0]} {dst.name}")
        return real_rename2(src, dst, flags)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic, "_rename2", rename2)
    with publishing(tmp_path / "s.zarr", "frame store", force=False, kind="dir") as tmp:
        (tmp / "c").mkdir(parents=True)
        (tmp / "c" / "0").write_bytes(b"chunk")
        (tmp / "zarr.json").write_text("{}")
    tmp_name = tmp.name
    # every file and folder of the temporary, on threads (so in any order), all before the rename
    assert sorted(calls[:-2]) == [f"fsync {tmp_name}", f"fsync {tmp_name}/c", f"fsync {tmp_name}/c/0",
                                  f"fsync {tmp_name}/zarr.json"]
    assert calls[-2:] == ["rename .s.zarr.tmp s.zarr", "fsync ."]
    calls.clear()
    monkeypatch.setenv("DVSPREP_NO_FSYNC", "1")
    with publishing(tmp_path / "f.bin", "file", force=False) as tmp:
        tmp.write_bytes(b"x")
    assert calls == ["rename .f.bin.tmp f.bin"] and (tmp_path / "f.bin").read_bytes() == b"x"


@pytest.mark.parametrize("failing", ["c/0", "c", "zarr.json", ""])
def test_an_fsync_that_fails_publishes_nothing(tmp_path, monkeypatch, failing):
    """The fsyncs run on threads: the first failure, whichever file or folder it hits, still
    stops the publication with the previous output untouched and the temporary removed."""
    import errno

    real_fsync = os.fsync
    lay_previous(tmp_path / "s.zarr", "dir")
    before = tree(tmp_path)

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path == os.path.join(str(tmp), failing).rstrip("/"):
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        with publishing(tmp_path / "s.zarr", "frame store", force=True, kind="dir") as tmp:
            (tmp / "c").mkdir(parents=True)
            (tmp / "c" / "0").write_bytes(b"chunk")
            (tmp / "zarr.json").write_text("{}")
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- checkpoints


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.fixture()
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_checkpoint_onto_a_full_disk_is_one_line_and_the_previous_one_stays(small_disk):
    torch = pytest.importorskip("torch")
    from dvsg_train.checkpoint import save_checkpoint
    from dvsprep.errors import ResourceLimitError

    ckpt = small_disk / "run" / "checkpoint_latest.pt"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, {"epoch": 0, "w": torch.zeros(1000)})
    before = ckpt.read_bytes()
    with pytest.raises(ResourceLimitError) as info:   # 4 MB of weights onto a 2 MB disk
        save_checkpoint(ckpt, {"epoch": 1, "w": torch.ones(1 << 20)})
    assert str(info.value) == f"{ckpt}: No space left on device"
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint_latest.pt"]
