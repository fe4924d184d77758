"""Output locks, PID-named temporaries and their cleanup (dvsprep.atomic), SIGINT-proof pools."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dvsprep.atomic import (
    atomic_write,
    clean_stale_temps,
    lock_path,
    output_lock,
    pid_alive,
    scratch_dir,
    temp_owner,
    temp_sibling,
)
from dvsprep.errors import OutputLockedError
from dvsprep.workers import process_pool, stop_pool
from previous_output import lay_previous, tree
from waits import signal_ignored


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temp_names_carry_the_pid(tmp_path):
    t = temp_sibling(tmp_path / "events.h5")
    assert t.parent == tmp_path and t.name.startswith(f".events.h5.tmp-{os.getpid()}-")
    assert temp_owner(t.name) == os.getpid()
    s = scratch_dir(tmp_path, "extract")
    assert s.is_dir() and temp_owner(s.name) == os.getpid()
    assert temp_owner(".events.h5.tmp4242") == 4242          # events writer's older form
    assert temp_owner("events.h5") is None and temp_owner(".hidden") is None


def test_clean_stale_temps_removes_only_dead_owners(tmp_path):
    dead = _dead_pid()
    assert not pid_alive(dead)
    stale_dir = tmp_path / f".frames_T4_number.zarr.tmp-{dead}-0badc0de"
    stale_dir.mkdir()
    (stale_dir / "chunk").write_bytes(b"x")
    stale_scratch = tmp_path / f".dvsprep-convert-{dead}-abc"
    stale_scratch.mkdir()
    mine = temp_sibling(tmp_path / "frames_T4_number.zarr")
    mine.mkdir()
    user_file = tmp_path / ".notes.tmp"
    user_file.write_text("not ours")
    removed = clean_stale_temps(tmp_path)
    assert sorted(removed) == sorted([stale_dir, stale_scratch])
    assert mine.exists() and user_file.exists()


def test_clean_stale_temps_by_name_leaves_other_outputs(tmp_path):
    dead = _dead_pid()
    a = tmp_path / f".a.zarr.tmp-{dead}-00000000"
    b = tmp_path / f".b.zarr.tmp-{dead}-00000000"
    a.mkdir()
    b.mkdir()
    assert clean_stale_temps(tmp_path, "a.zarr") == [a]
    assert b.exists()


@pytest.mark.parametrize("previous", [False, True])
def test_atomic_write_removes_temp_on_error(tmp_path, previous):
    """The temporary goes, and a file it would have replaced (a manifest, a marker) stays whole."""
    def boom(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    before = lay_previous(tmp_path / "out.bin") if previous else {}
    with pytest.raises(OSError):
        atomic_write(tmp_path / "out.bin", boom)
    assert tree(tmp_path) == before


def test_output_lock_refuses_a_second_writer_in_another_process(tmp_path):
    out = tmp_path / "events.h5"
    code = textwrap.dedent(f"""
        from dvsprep.atomic import output_lock
        from dvsprep.errors import OutputLockedError
        try:
            with output_lock({str(out)!r}, "events file"):
                print("got it")
        except OutputLockedError as e:
            print("refused:", e)
    """)
    with output_lock(out, "events file"):
        assert lock_path(out).exists()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert r.stdout.strip() == (f"refused: {out}: events file is being written by another process "
                                    f"(pid {os.getpid()}); wait for it to finish")
    # released: the next writer gets it, and no lock file is left behind
    assert not lock_path(out).exists()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "got it"
    assert list(tmp_path.iterdir()) == []


def test_output_lock_in_the_same_process_also_refuses(tmp_path):
    out = tmp_path / "store.zarr"
    with output_lock(out):
        with pytest.raises(OutputLockedError, match="store.zarr: output is being written"):
            with output_lock(out):
                pass


def test_output_lock_is_released_when_the_holder_is_killed(tmp_path):
    out = tmp_path / "store.zarr"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import signal
        from dvsprep.atomic import output_lock
        with output_lock({str(out)!r}):
            print("held", flush=True)
            signal.pause()                      # holds the lock until killed
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError):
            with output_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the flock with the process; the leftover lock file is reused
    with output_lock(out):
        pass
    assert list(tmp_path.iterdir()) == []


def test_output_lock_removes_stale_temps_of_its_output(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".store.zarr.tmp-{dead}-12345678"
    stale.mkdir()
    with output_lock(tmp_path / "store.zarr"):
        assert not stale.exists()


def test_pool_workers_ignore_sigint():
    """A worker ignores SIGINT (SigIgn in /proc: the kernel drops it), keeps working after one,
    and ends normally with the pool (a worker that took the SIGINT would exit 1)."""
    pool = process_pool(2)
    workers = dict(pool._processes)
    try:
        worker = pool.submit(os.getpid).result(timeout=30)
        assert signal_ignored(worker, signal.SIGINT)
        os.kill(worker, signal.SIGINT)
        assert pool.submit(os.getpid).result(timeout=30) in workers
    finally:
        stop_pool(pool)
    assert sorted(workers) == sorted(p.pid for p in workers.values()) and len(workers) == 2
    assert [p.exitcode for p in workers.values()] == [0, 0]


def test_interrupt_once_lets_the_clean_up_finish():
    """The first Ctrl-C interrupts; a second one during the clean-up it starts is ignored."""
    from dvsprep.workers import interrupt_once

    before = signal.getsignal(signal.SIGINT)
    cleaned = []
    with pytest.raises(KeyboardInterrupt):
        with interrupt_once():
            try:
                signal.raise_signal(signal.SIGINT)    # handled before raise_signal returns
                pytest.fail("the first Ctrl-C did not interrupt")
            except KeyboardInterrupt:
                signal.raise_signal(signal.SIGINT)    # pressed again while cleaning up
                cleaned.append(True)
                raise
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("first", ["wait=False", "kill"])
def test_stopped_pool_leaves_no_thread_running(first):
    """Once stop_pool has waited (or killed), the pool's manager thread has ended, also when an
    earlier stop_pool(wait=False) returned before it: a thread left for the interpreter's exit
    races concurrent.futures' exit hook (an "Exception ignored ... Bad file descriptor" under
    convert's full-disk error, seen once in 1482 tests)."""
    pool = process_pool(2)
    pool.submit(os.getpid).result(timeout=30)
    manager = pool._executor_manager_thread
    assert manager is not None and manager.is_alive()
    if first == "kill":
        stop_pool(pool, kill=True)
    else:
        stop_pool(pool, wait=False)
        stop_pool(pool)
    assert not manager.is_alive()
