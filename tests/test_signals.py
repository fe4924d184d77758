"""Ctrl-C and SIGTERM stop every command at any moment, quietly, leaving nothing behind (issue 19).

The mechanism (`dvsprep.interrupts`) is tested in this process: a stop exception that Python
drops (raised inside a weakref callback) is delivered again. Every command is then run in its
own process group and sent SIGINT or SIGTERM at several moments. No sleeps: a moment is an
event of the command itself, the k-th time it opens a file, makes a folder, renames, forks,
removes a tree..., seen by an audit hook (`sys.addaudithook`) that sends the signal to the
whole group (as a terminal does) from a helper thread, so that it lands a little after the
event, anywhere. The first moment of each command surely comes mid-run (its output's lock
taken), where it must stop; the others are drawn with a fixed seed (DVSPREP_SIGNAL_SEED to
vary them) and may come when the work is done (then: exit 0 and the output complete). Counting starts
when the console script's function is called: Python's own start-up and the import of that
one small module come before any handler can be installed.

After the signal the command has stopped: SIGINT prints only click's "Aborted!" (exit 1),
SIGTERM nothing (exit 143, or -15 when it came before Python had the handler); the output is
absent or complete, and nothing else is left (no temporary, lock, scratch folder or folder
the command made).
"""
from __future__ import annotations

import gc
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest

from aedat_fixtures import small_release
from dvsprep.interrupts import stop_signals

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("DVSPREP_SIGNAL_SEED", "19"))


# ----------------------------------------------------------------------------- the mechanism


def _raise_signal_inside_a_weakref_callback(signum: int) -> None:
    """The handler runs inside the callback (the loop's backward jump checks for signals), where
    Python prints the exception as "Exception ignored" and drops it."""

    class Thing:
        pass

    def callback(_ref: object) -> None:
        signal.raise_signal(signum)
        for _ in range(3):
            pass

    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("signum, exc", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_a_stop_dropped_inside_a_weakref_callback_is_delivered_again(signum, exc, capfd):
    woke = threading.Event()
    with pytest.raises(exc) as info:
        with stop_signals():
            _raise_signal_inside_a_weakref_callback(signum)
            woke.wait(20)   # the redelivered signal interrupts this wait
    assert not woke.is_set()
    if exc is SystemExit:
        assert info.value.code == 128 + signal.SIGTERM
    assert "Exception ignored" not in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored


def test_a_second_signal_during_the_clean_up_is_ignored_and_later_ones_stop_again(monkeypatch):
    import dvsprep.interrupts as interrupts

    cleaned = []
    with pytest.raises(KeyboardInterrupt):
        with stop_signals():
            try:
                signal.raise_signal(signal.SIGINT)
            finally:
                signal.raise_signal(signal.SIGINT)   # the clean-up runs on
                cleaned.append(True)
    assert cleaned == [True]
    monkeypatch.setattr(interrupts, "REPEAT_AFTER_S", 0.0)   # a first stop that something swallowed
    with pytest.raises(KeyboardInterrupt):
        with stop_signals():
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass
            signal.raise_signal(signal.SIGINT)


def test_a_signal_ignored_at_start_stays_ignored():
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with stop_signals():
            signal.raise_signal(signal.SIGTERM)
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)


# ----------------------------------------------------------------------------- every command

# The child: an audit hook counts the events of one kind (in every process of the command) and
# at the k-th sends the signal to the process group from a thread; then the console script.
_CHILD = r"""
import os, signal, sys, threading
kind, k, signum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
entry_module, entry_name = sys.argv[4], sys.argv[5]
del sys.argv[1:6]
seen = [-1]   # counting starts when the console script's function is called
def hook(event, args):
    if event != kind or seen[0] < 0:
        return
    seen[0] += 1
    if seen[0] == k:
        seen[0] = -2
        threading.Thread(target=os.killpg, args=(0, signum), daemon=True).start()
sys.addaudithook(hook)
import importlib
script = getattr(importlib.import_module(entry_module), entry_name)
seen[0] = 0
script()
"""

# event kinds: file opens (imports first, then reads and writes), folders made, the output lock
# taken (its file truncated), files removed (the lock released, spill files), forks (worker
# pools), trees removed (clean-up), directory listings
KINDS = ["open", "open", "open", "open", "os.mkdir", "os.truncate", "os.remove", "os.fork", "shutil.rmtree",
         "os.listdir"]


def _quiet_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # a background job's ignored SIGINT is not ours


def _run(cmd: list[str], kind: str, k: int, signum: int, cwd: Path) -> subprocess.CompletedProcess:
    entry = ("dvsg_train.entry", cmd[0].replace("-", "_")) if cmd[0].startswith("dvsg-") else tuple(os.environ.get("SIGTEST_ENTRY", "dvsprep.entry:dvsprep").split(":"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVSPREP_NO_FSYNC": "1"}
    return subprocess.run([sys.executable, "-c", _CHILD, kind, str(k), str(signum), *entry, *cmd[1:]],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
                          start_new_session=True, preexec_fn=_quiet_sigint)


def _leftovers(root: Path, before: set[str]) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if str(p.relative_to(root)) not in before and p.name.startswith("."))


# an event every run of the command has, after its start and before its work is done: the
# output's lock taken (its file truncated), or for verify the listing of the store's folders
CERTAIN = {"verify": ("os.scandir", 1)}


def _moments(name: str, n: int) -> list[tuple[str, int, int]]:
    """The first moment is one that surely comes mid-run (the command must stop there); the
    others are drawn, and may come after the work is done (then it exits 0, output complete)."""
    rng = random.Random(f"{SEED}-{name}")
    # synth's clean-up events come at its end: an early moment keeps the test short
    kinds = ["open", "os.mkdir", "os.fork"] if name == "synth" else KINDS
    out = [(*CERTAIN.get(name, ("os.truncate", 1)), rng.choice((signal.SIGINT, signal.SIGTERM)))]
    for i in range(1, n):
        signum = (signal.SIGINT, signal.SIGTERM)[(out[0][2] == signal.SIGINT) + i - 1 & 1]
        kind = rng.choice(kinds)
        k = rng.randint(1, 150) if kind == "open" else 1
        out.append((kind, k, signum))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny release, its events.h5, a T=4 store and its zip (made once, only read)."""
    from click.testing import CliRunner

    from dvsprep.cli import main

    root = tmp_path_factory.mktemp("signals")
    small_release(root / "raw")
    run = CliRunner().invoke
    for args in (["convert", root / "raw", "-o", root / "data", "-j", "1"],
                 ["frames", "-T", "4", "-d", root / "data", "-j", "1"],
                 ["pack", root / "data" / "frames_T4_number.zarr", "-o", root / "s.zip"]):
        r = run(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
    return root


def _commands(w: Path, out: Path) -> dict[str, tuple[list[str], list[Path]]]:
    """name -> (command, its outputs)."""
    store = w / "data" / "frames_T4_number.zarr"
    return {
        "convert -j1": (["dvsprep", "convert", str(w / "raw"), "-o", str(out / "d"), "-j", "1"], [out / "d"]),
        "convert -j2": (["dvsprep", "convert", str(w / "raw"), "-o", str(out / "d"), "-j", "2"], [out / "d"]),
        "frames -j1": (["dvsprep", "frames", "-T", "4", "-d", str(w / "data"), "-o", str(out / "f.zarr"), "-j", "1"],
                       [out / "f.zarr"]),
        "frames -j2": (["dvsprep", "frames", "-T", "4", "-d", str(w / "data"), "-o", str(out / "f.zarr"), "-j", "2"],
                       [out / "f.zarr"]),
        "frames --force": (["dvsprep", "frames", "-T", "4", "-d", str(w / "data"), "-o", str(out / "f.zarr"), "-j",
                            "2", "--force"], [out / "f.zarr"]),
        "pack": (["dvsprep", "pack", str(store), "-o", str(out / "s.zip")], [out / "s.zip"]),
        "unpack": (["dvsprep", "unpack", str(w / "s.zip"), "-o", str(out / "u.zarr")], [out / "u.zarr"]),
        "synth": (["dvsprep", "synth", str(out / "syn"), "--users", "2", "--test-users", "1", "-j", "2"],
                  [out / "syn"]),
        "show -o": (["dvsprep", "show", str(store), "-o", str(out / "s.png")], [out / "s.png"]),
        "verify": (["dvsprep", "verify", str(store)], []),
    }


def _check_stopped(r: subprocess.CompletedProcess, signum: int, what: str) -> bool:
    """True if the command stopped as it should; False if it had finished (exit 0) first."""
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, (what, r.stderr)
    if r.returncode == 0:
        return False
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("WARNING: ")]
    if signum == signal.SIGINT:
        assert (r.returncode, lines) == (1, ["", "Aborted!"]), (what, r.returncode, r.stderr)
    else:
        assert r.returncode in (128 + signal.SIGTERM, -signal.SIGTERM) and lines == [], (what, r.returncode, r.stderr)
    return True


@pytest.mark.parametrize("name", ["convert -j1", "convert -j2", "frames -j1", "frames -j2", "frames --force",
                                  "pack", "unpack", "synth", "show -o", "verify"])
def test_dvsprep_stops_at_any_moment(world, tmp_path, name):
    for i, (kind, k, signum) in enumerate(_moments(name, 4 if "-j2" in name or "force" in name else 3)):
        out = tmp_path / f"m{i}"
        out.mkdir()
        cmd, outputs = _commands(world, out)[name]
        if name == "frames --force":   # the store it replaces: the old one or the new one, whole
            shutil.copytree(world / "data" / "frames_T4_number.zarr", out / "f.zarr")
        r = _run(cmd, kind, k, signum, out)
        what = f"{name}: {signal.Signals(signum).name} at {kind} #{k}"
        stopped = _check_stopped(r, signum, what)
        assert stopped or i > 0, f"{what}: the command ran on to the end"
        assert _leftovers(out, set()) == [], what
        for o in outputs:   # absent, or complete (published before the signal came)
            if o.exists() and o.suffix in (".zarr", ".zip"):
                v = subprocess.run([sys.executable, "-c", "from dvsprep.entry import dvsprep; dvsprep()", "verify",
                                    str(o)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
                assert v.returncode == 0, (what, v.stdout, v.stderr)
        if not any(o.exists() for o in outputs):
            assert sorted(p.name for p in out.iterdir()) == [], what   # no folder it made either


# ----------------------------------------------------------------------------- the trainer

# moments of a run: folders made (the run folder), an output lock taken (metrics, checkpoints),
# files removed (a lock released), directory listings, forks (DataLoader workers)
TRAIN_KINDS = ["os.mkdir", "os.truncate", "os.truncate", "os.remove", "os.listdir", "os.fork"]


@pytest.fixture(scope="module")
def trained(world):
    """A 1-epoch run on the tiny store: (store, its checkpoint)."""
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from dvsg_train.cli import train_main

    store = world / "data" / "frames_T4_number.zarr"
    r = CliRunner().invoke(train_main, ["--data", str(store), "-T", "4", "--channels", "2", "--epochs", "1",
                                        "-b", "4", "--device", "cpu", "-j", "0", "--out-dir", str(world / "logs"),
                                        "--run-name", "r", "-q"])
    assert r.exit_code == 0, r.output
    return store, world / "logs" / "r" / "checkpoint_latest.pt"


@pytest.mark.parametrize("name", ["dvsg-train", "dvsg-eval"])
def test_the_trainer_stops_at_any_moment(trained, tmp_path, name):
    store, ckpt = trained
    rng = random.Random(f"{SEED}-{name}")
    first = rng.choice((signal.SIGINT, signal.SIGTERM))
    moments = [("os.truncate", 1, first),   # an output lock taken: surely mid-run
               (rng.choice(TRAIN_KINDS), rng.randint(1, 2), signal.SIGINT + signal.SIGTERM - first)]
    for i, (kind, k, signum) in enumerate(moments):
        out = tmp_path / f"m{i}"
        out.mkdir()
        if name == "dvsg-train":
            cmd = [name, "--data", str(store), "-T", "4", "--channels", "2", "--epochs", "2", "-b", "4",
                   "--device", "cpu", "-j", "2", "--preload", "none", "--out-dir", str(out / "logs"), "-q"]
        else:
            cmd = [name, "--checkpoint", str(ckpt), "--data", str(store), "--device", "cpu", "-j", "2",
                   "--preload", "none", "--png", str(out / "c.png")]
        r = _run(cmd, kind, k, signum, out)
        what = f"{name}: {signal.Signals(signum).name} at {kind} #{k}"
        stopped = _check_stopped(r, signum, what)
        assert stopped or i > 0, f"{what}: the command ran on to the end"
        assert _leftovers(out, set()) == [], what


# ----------------------------------------------------------------------------- pools and clean-up


_STUCK_WORKER = r"""
import os, signal, threading
import dvsprep.events.convert as m
def stuck(*a, **k):   # a worker's task that never ends (a huge recording, say)
    os.killpg(0, signal.{sig})
    threading.Event().wait()
m.process_recording = stuck
from dvsprep.entry import dvsprep
dvsprep()
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_does_not_wait_for_the_workers_tasks(world, tmp_path, sig):
    """The workers ignore SIGINT: the command kills them instead of waiting for their task."""
    out = tmp_path / "d"
    r = subprocess.run([sys.executable, "-c", _STUCK_WORKER.replace("{sig}", sig), "convert", str(world / "raw"),
                        "-o", str(out), "-j", "2"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True, preexec_fn=_quiet_sigint)
    if sig == "SIGINT":
        assert (r.returncode, r.stderr) == (1, "\nAborted!\n")
    else:
        assert (r.returncode, r.stderr) == (128 + signal.SIGTERM, "")
    assert list(tmp_path.iterdir()) == []


def test_a_removal_interrupted_midway_finishes_first(tmp_path, monkeypatch):
    import dvsprep.atomic as atomic

    tree = tmp_path / ".s.zarr.tmp-1-abcdef12"
    for i in range(3):
        (tree / f"d{i}").mkdir(parents=True)
        (tree / f"d{i}" / "chunk").write_bytes(b"x")
    real = shutil.rmtree
    calls = []

    def interrupted(path, ignore_errors=False):
        calls.append(path)
        if len(calls) == 1:   # Ctrl-C lands after part of the tree is gone
            real(Path(path) / "d0")
            raise KeyboardInterrupt
        return real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(atomic.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.remove_path(tree)
    assert not tree.exists() and len(calls) == 2


def test_a_lock_release_interrupted_midway_finishes_first(tmp_path, monkeypatch):
    """The first signal may land in the release of the lock of an output just published."""
    import dvsprep.atomic as atomic

    real = os.unlink
    calls = []

    def interrupted(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:
            raise SystemExit(143)   # SIGTERM's exception, raised as the lock file goes
        return real(path, *a, **k)

    with pytest.raises(SystemExit):
        with atomic.publishing(tmp_path / "f.bin", "file", force=False) as tmp:
            tmp.write_bytes(b"x")
            monkeypatch.setattr(atomic.os, "unlink", interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"] and len(calls) == 2
