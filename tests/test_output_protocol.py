"""The one output protocol (`dvsprep.atomic.publishing`), writer by writer.

Every writer of both packages is run through the same cases:

* lock: while another process holds the output's lock, the writer refuses at once, one line;
* force: an existing output is refused without --force and replaced with it, and one that
  appears while the writer works is not replaced without it (checkpoints and run files are
  replaced by design: only the replacing is checked);
* own_input: an output that is, lies inside or holds an input of the command is refused, and
  the input stays byte for byte what it was;
* full_disk: ENOSPC from the lowest write call the writer makes is one line naming the output,
  the previous output is intact and no temporary is left;
* stale_temp: a temporary of a dead process beside the output is removed by the next write;
* killed: a writer killed with SIGKILL inside the protocol (its temporary complete, not yet
  published) leaves the previous output intact, and the next run succeeds and leaves nothing.

The inputs (a release, events.h5, a frame store, its zip, a checkpoint) are built once per
module and only read.
"""
from __future__ import annotations

import errno
import inspect
import os
import pathlib
import signal
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dvsprep.frames.build as frames_build
import dvsprep.frames.store as frames_store
import dvsprep.raw.synth as synth
from dvsprep.atomic import EXISTS, Publication, output_lock
from dvsprep.cli import main as dvsprep_main
from dvsprep.errors import DvsprepError
from dvsprep.events import convert_release
from dvsprep.frames import pack_store, write_frame_store_from_arrays
from dvsg_train.checkpoint import LATEST, MAX, rng_state, save_checkpoint
from dvsg_train.cli import eval_main, export_main, train_main
from dvsg_train.config import TrainConfig
from dvsg_train.errors import TrainError
from dvsg_train.model import build_model
from dvsg_train.report import write_metrics

from aedat_fixtures import small_release

REPO = Path(__file__).resolve().parents[1]
T = 2
TINY_TRAIN = ["-T", str(T), "-b", "2", "--channels", "4", "--device", "cpu", "-j", "0", "-q"]
HISTORY = [{"epoch": 0, "train_loss": 0.1, "train_acc": 0.5, "test_loss": 0.1, "test_acc": 0.5}]


# ----------------------------------------------------------------------------- the inputs


@dataclass
class World:
    raw: Path          # holds DvsGesture/
    release: Path      # raw/DvsGesture
    data: Path         # DATA_ROOT holding events.h5
    events: Path
    store: Path        # a frame store, T=2
    zip: Path          # the store packed, alone in its folder
    ckpt: Path         # a dvsg-train checkpoint (channels 4, T=2), alone in its folder


def _splits(n_train: int = 4, n_test: int = 3) -> dict[str, dict[str, Any]]:
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        frames = np.zeros((n, T, 2, 128, 128), np.uint8)
        frames[:, :, :, 60:68, 60:68] = 1
        out[split] = {"frames": frames, "label": np.arange(n) % 11, "recording": ["user01_lab"] * n,
                      "row": np.arange(n), "t_start": np.arange(n) * 1000, "t_end": np.arange(n) * 1000 + 500,
                      "n_events": frames.reshape(n, -1).sum(1)}
    return out


def _checkpoint(path: Path) -> None:
    cfg = TrainConfig(data="unused", T=T, channels=4)
    save_checkpoint(path, {"epoch": 0, "model": build_model(4).state_dict(),
                           "optimizer": {"state": {}, "param_groups": []}, "scheduler": None, "scaler": None,
                           "rng": rng_state(torch.Generator().manual_seed(0)), "config": cfg.to_dict(),
                           "data_fingerprint": "0" * 64, "history": HISTORY,
                           "run": {"id": "0" * 32, "name": path.parent.name, "dir": str(path.parent)}})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("protocol")
    release = small_release(root / "raw")
    convert_release(root / "raw", root / "data", jobs=1)
    (root / "store").mkdir()
    store = root / "store" / f"frames_T{T}_number.zarr"
    write_frame_store_from_arrays(store, T=T, splits=_splits())
    (root / "zip").mkdir()
    pack_store(store, root / "zip" / "s.zip")
    (root / "ckpt").mkdir()
    _checkpoint(root / "ckpt" / "c.pt")
    return World(root / "raw", release, root / "data", root / "data" / "events.h5", store,
                 root / "zip" / "s.zip", root / "ckpt" / "c.pt")


def _quick_synth_task(task: tuple) -> tuple[str, int, int]:
    """synth's recordings as empty AEDAT files: the protocol around them is what is tested here
    (test_synth covers their content), and the real ones take seconds."""
    from pathlib import Path

    from dvsprep.raw.aedat import write_aedat

    rec, _, _, tmp = task
    write_aedat(Path(tmp) / f"{rec.name}.aedat", [])
    return rec.name, 0, 0


@pytest.fixture(autouse=True)
def _quick_synth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "_write_task", _quick_synth_task)


# ----------------------------------------------------------------------------- running a writer

Outcome = tuple[bool, str]   # (succeeded, else the one error line without "error: ")


def _cli(command: Any, *args: object) -> Outcome:
    res = CliRunner().invoke(command, [str(a) for a in args])
    if res.exit_code == 0:
        return True, ""
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, \
        (res.exit_code, res.output, res.exception)
    return False, res.stderr[len("error: "):].rstrip("\n")


def _call(fn: Callable[..., object], *args: Any, **kwargs: Any) -> Outcome:
    try:
        fn(*args, **kwargs)
    except (DvsprepError, TrainError) as exc:
        return False, str(exc)
    return True, ""


def _force(force: bool) -> list[str]:
    return ["--force"] if force else []


@dataclass(frozen=True)
class Writer:
    name: str
    what: str                                         # its name in the lock's refusal line
    kind: str                                         # "file" or "dir"
    output: Callable[[Path], Path]                    # a case's folder -> the output
    write: Callable[[World, Path, bool], Outcome]     # (inputs, output, force)
    argv: Callable[[World, Path], str]                # Python code: the same write with --force
    fill: Callable[[], tuple[Any, str]]               # the write call a full disk fails
    clashes: Callable[[World], list[tuple[Path, Path]]] = lambda w: []   # (output asked for, input)
    force_flag: bool = True                           # False: replaced by design, no --force
    run_folder: bool = False
    fill_always: bool = False                         # fill's call names no file: it always fails

    def __repr__(self) -> str:
        return self.name

    # what a full disk names, and what must survive a failed or killed write
    def named(self, out: Path) -> Path:
        return out / LATEST if self.run_folder else out

    def kept(self, out: Path) -> list[Path]:
        return [out / LATEST, out / MAX] if self.run_folder else [out]

    def refusal(self, out: Path) -> str:
        if self.run_folder:
            return (f"{out} already holds a run; continue it with --resume {out / LATEST}, start over with "
                    f"--force, or pick --run-name")
        return f"{out}: {EXISTS}"

    def previous(self, world: World, out: Path) -> None:
        """Lay an output as a previous run would have left it."""
        out.parent.mkdir(parents=True, exist_ok=True)
        if self.run_folder:
            ok, msg = self.write(world, out, False)
            assert ok, msg
        elif self.kind == "dir":
            out.mkdir()
            (out / "previous").write_bytes(b"the previous output")
        else:
            out.write_bytes(b"the previous output")

    def again(self, world: World, out: Path) -> Outcome:
        """Write over the previous output (a run folder continues its run)."""
        if self.run_folder:
            return _cli(train_main, "--resume", out / LATEST, "--epochs", "2", "-q")
        return self.write(world, out, True)

    def again_code(self, world: World, out: Path) -> str:
        if self.run_folder:
            return _py_cli("dvsg_train.cli", "train_main", ["--resume", out / LATEST, "--epochs", "2", "-q"])
        return self.argv(world, out)


def _py_cli(module: str, command: str, args: list[object]) -> str:
    return f"from {module} import {command}\n{command}({[str(a) for a in args]!r})\n"


def _nir() -> tuple[Any, str]:
    import nir

    return nir, "write"


WRITERS = [
    Writer("convert", "events.h5", "file", lambda d: d / "data" / "events.h5",
           lambda w, out, force: _cli(dvsprep_main, "convert", w.raw, "-o", out.parent, "-j", "1", *_force(force)),
           lambda w, out: _py_cli("dvsprep.cli", "main", ["convert", w.raw, "-o", out.parent, "-j", "1", "--force"]),
           lambda: (h5py.Dataset, "__setitem__"),
           lambda w: [(w.release / "data" / "events.h5", w.release)], fill_always=True),
    Writer("frames", "frame store", "dir", lambda d: d / "s.zarr",
           lambda w, out, force: _cli(dvsprep_main, "frames", "-T", T, "-d", w.data, "-o", out, "-j", "1",
                                      *_force(force)),
           lambda w, out: _py_cli("dvsprep.cli", "main", ["frames", "-T", T, "-d", w.data, "-o", out, "-j", "1",
                                                          "--force"]),
           lambda: (frames_build, "write_metadata"),
           lambda w: [(w.events, w.events), (w.events / "x.zarr", w.events), (w.data, w.events)],
           fill_always=True),
    Writer("arrays", "frame store", "dir", lambda d: d / "a.zarr",
           lambda w, out, force: _call(write_frame_store_from_arrays, out, T=T, splits=_splits(), force=force),
           lambda w, out: ("import numpy as np\n"
                           "from dvsprep.frames import write_frame_store_from_arrays\n"
                           "n = 2\n"
                           f"sp = {{'frames': np.zeros((n, {T}, 2, 128, 128), np.uint8), 'label': np.arange(n), "
                           "'recording': ['user01_lab'] * n, 'row': np.arange(n), 't_start': np.arange(n), "
                           "'t_end': np.arange(n) + 1, 'n_events': np.zeros(n, np.int64)}\n"
                           f"write_frame_store_from_arrays({str(out)!r}, T={T}, splits={{'train': sp}}, force=True)\n"),
           lambda: (frames_store, "write_metadata"), fill_always=True),
    Writer("pack", "packed store", "file", lambda d: d / "s.zip",
           lambda w, out, force: _cli(dvsprep_main, "pack", w.store, "-o", out, *_force(force)),
           lambda w, out: _py_cli("dvsprep.cli", "main", ["pack", w.store, "-o", out, "--force"]),
           lambda: (zipfile.ZipFile, "writestr"),
           lambda w: [(w.store / "x.zip", w.store)], fill_always=True),
    Writer("unpack", "store", "dir", lambda d: d / "u.zarr",
           lambda w, out, force: _cli(dvsprep_main, "unpack", w.zip, "-o", out, *_force(force)),
           lambda w, out: _py_cli("dvsprep.cli", "main", ["unpack", w.zip, "-o", out, "--force"]),
           lambda: (pathlib.Path, "write_bytes"),                     # the manifest, written last
           lambda w: [(w.zip, w.zip), (w.zip.parent, w.zip)]),
    Writer("synth", "synthetic release", "dir", lambda d: d / "raw" / "DvsGesture",
           lambda w, out, force: _cli(dvsprep_main, "synth", out.parent, "--users", "2", "--test-users", "1",
                                      "-j", "1", *_force(force)),
           lambda w, out: (inspect.getsource(_quick_synth_task)
                           + "import dvsprep.raw.synth as synth\nsynth._write_task = _quick_synth_task\n"
                           + _py_cli("dvsprep.cli", "main", ["synth", out.parent, "--users", "2", "--test-users",
                                                             "1", "-j", "1", "--force"])),
           lambda: (pathlib.Path, "write_bytes")),                    # the trial lists, written last
    Writer("show -o", "picture", "file", lambda d: d / "p.png",
           lambda w, out, force: _cli(dvsprep_main, "show", w.store, "--sample", "0", "-o", out, *_force(force)),
           lambda w, out: _py_cli("dvsprep.cli", "main", ["show", w.store, "--sample", "0", "-o", out, "--force"]),
           lambda: (__import__("PIL.Image", fromlist=["Image"]).Image, "save"),
           lambda w: [(w.store / "x.png", w.store), (w.store / "train" / "x.png", w.store)]),
    Writer("dvsg-eval --png", "confusion matrix", "file", lambda d: d / "c.png",
           lambda w, out, force: _cli(eval_main, "--checkpoint", w.ckpt, "--data", w.store, "--device", "cpu",
                                      "--png", out, *_force(force)),
           lambda w, out: _py_cli("dvsg_train.cli", "eval_main", ["--checkpoint", w.ckpt, "--data", w.store,
                                                                  "--device", "cpu", "--png", out, "--force"]),
           lambda: (__import__("matplotlib.figure", fromlist=["Figure"]).Figure, "savefig"),
           lambda w: [(w.ckpt, w.ckpt), (w.store / "manifest.json", w.store), (w.store / "c.png", w.store)]),
    Writer("dvsg-export -o", "export", "file", lambda d: d / "m.nir",
           lambda w, out, force: _cli(export_main, w.ckpt, "-o", out, *_force(force)),
           lambda w, out: _py_cli("dvsg_train.cli", "export_main", [w.ckpt, "-o", out, "--force"]),
           _nir,
           lambda w: [(w.ckpt, w.ckpt)]),
    Writer("checkpoint", "checkpoint", "file", lambda d: d / LATEST,
           lambda w, out, force: _call(save_checkpoint, out, {"epoch": 0, "model": {}}),
           lambda w, out: ("from dvsg_train.checkpoint import save_checkpoint\n"
                           f"save_checkpoint({str(out)!r}, {{'epoch': 0, 'model': {{}}}})\n"),
           lambda: (pathlib.Path, "write_bytes"), force_flag=False),   # torch.save goes to memory first
    Writer("report", "metrics", "file", lambda d: d / "metrics.jsonl",
           lambda w, out, force: _call(write_metrics, out, HISTORY),
           lambda w, out: ("from dvsg_train.report import write_metrics\n"
                           f"write_metrics({str(out)!r}, {HISTORY!r})\n"),
           lambda: (pathlib.Path, "write_text"), force_flag=False),
    Writer("dvsg-train run folder", "training run", "dir", lambda d: d / "runs" / "r",
           lambda w, out, force: _cli(train_main, "--data", w.store, "--out-dir", out.parent, "--run-name",
                                      out.name, "--epochs", "1", *TINY_TRAIN, *_force(force)),
           lambda w, out: _py_cli("dvsg_train.cli", "train_main",
                                  ["--data", w.store, "--out-dir", out.parent, "--run-name", out.name,
                                   "--epochs", "1", *TINY_TRAIN, "--force"]),
           lambda: (pathlib.Path, "write_bytes"),                     # the checkpoint of the resumed epoch
           lambda w: [(w.store / "runs" / "r", w.store)], run_folder=True),
]

CASES = ["lock", "force", "own_input", "full_disk", "stale_temp", "killed"]
PARAMS = [pytest.param(wr, case, id=f"{wr.name}-{case}") for wr in WRITERS for case in CASES
          # the arrays writer, synth, checkpoints and reports read no file that could be hit
          if case != "own_input" or wr.name not in ("arrays", "synth", "checkpoint", "report")]


# ----------------------------------------------------------------------------- checks


def _snapshot(*paths: Path) -> dict[str, bytes]:
    """Every file under `paths` (files or folders), by path, with its bytes."""
    out = {}
    for p in paths:
        if p.is_file():
            out[str(p)] = p.read_bytes()
        elif p.is_dir():
            out.update((str(f), f.read_bytes()) for f in sorted(p.rglob("*")) if f.is_file())
    return out


def _hidden(*folders: Path) -> list[str]:
    """Temporaries and locks: hidden names in `folders`."""
    return sorted(str(p) for d in folders if d.is_dir() for p in d.iterdir() if p.name.startswith("."))


def _places(wr: Writer, out: Path) -> tuple[Path, ...]:
    """Where a writer's temporaries and locks would be."""
    return (out.parent, out) if wr.run_folder else (out.parent,)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _no_space(real: Callable[..., Any], always: bool) -> Callable[..., Any]:
    """`real` on a full disk: every call fails (`always`: calls that name no file, an HDF5 or zarr
    write, a zip member), or those given a temporary's path (a few bytes reach it first), while
    the others still work (torch.save into memory, say)."""

    def full(*args: Any, **kwargs: Any) -> Any:
        temps = [os.fspath(a) for a in (*args, *kwargs.values())
                 if isinstance(a, os.PathLike) and ".tmp-" in os.fspath(a)]
        if not always and not temps:
            return real(*args, **kwargs)
        for t in temps:
            if not os.path.isdir(t):
                with open(t, "wb") as f:
                    f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return full


# the child's hook: stop inside the protocol, the temporary complete and not yet published
_STOP_BEFORE_PUBLISHING = """\
import sys
from dvsprep import atomic

_commit = atomic.Publication.commit


def _commit_once_released(self):
    if self.final.name == {name!r}:
        print("inside the protocol", flush=True)
        sys.stdin.read()                  # until SIGKILL
    return _commit(self)


atomic.Publication.commit = _commit_once_released
"""


# ----------------------------------------------------------------------------- the cases


@pytest.mark.parametrize("wr, case", PARAMS)
def test_writer_follows_the_protocol(world: World, wr: Writer, case: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = wr.output(tmp_path / "case")
    (tmp_path / "case").mkdir()
    globals()[f"_case_{case}"](world, wr, out, monkeypatch)


def _case_lock(world: World, wr: Writer, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out, "another writer"):
        ok, msg = wr.write(world, out, True)
        assert not ok
        assert msg == (f"{out}: {wr.what} is being written by another process (pid {os.getpid()}); "
                       f"wait for it to finish")
        assert not out.exists() and _hidden(out.parent) == [str(out.parent / f".{out.name}.lock")]
    assert _hidden(out.parent) == []


def _case_force(world: World, wr: Writer, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if wr.force_flag and not wr.run_folder:
        # --force is checked again when publishing: an output that appears while the writer
        # works (another writer that took no lock) stays, and the writer refuses
        late = wr.output(out.parent.parent / "meanwhile")
        late.parent.mkdir(parents=True, exist_ok=True)
        commit = Publication.commit

        def someone_else_first(self: Publication) -> None:
            if self.final == late:
                wr.previous(world, late)
            commit(self)

        with monkeypatch.context() as m:
            m.setattr(Publication, "commit", someone_else_first)
            ok, msg = wr.write(world, late, False)
        assert not ok and msg == wr.refusal(late)
        assert _snapshot(late) == {str(late / "previous" if wr.kind == "dir" else late): b"the previous output"}
        assert _hidden(late.parent) == []
    wr.previous(world, out)
    before = _snapshot(*wr.kept(out))
    if wr.force_flag:
        ok, msg = wr.write(world, out, False)
        assert not ok and msg == wr.refusal(out)
        assert _snapshot(*wr.kept(out)) == before
    ok, msg = wr.write(world, out, True)
    assert ok, msg
    assert out.exists() and _snapshot(*wr.kept(out)) != before      # replaced
    assert _hidden(*_places(wr, out)) == []


def _case_own_input(world: World, wr: Writer, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for asked, src in wr.clashes(world):
        before, around = _snapshot(src), _hidden(src.parent, src)
        existed = asked.exists()
        ok, msg = wr.write(world, asked, True)       # --force: even then
        assert not ok and "input" in msg and str(src) in msg, (asked, msg)
        assert _snapshot(src) == before and _hidden(src.parent, src) == around
        assert asked.exists() == existed


def _case_full_disk(world: World, wr: Writer, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wr.previous(world, out)
    before = _snapshot(*wr.kept(out))
    obj, attr = wr.fill()
    with monkeypatch.context() as m:
        m.setattr(obj, attr, _no_space(getattr(obj, attr), always=wr.fill_always))
        ok, msg = wr.again(world, out)
    assert not ok and msg == f"{wr.named(out)}: No space left on device"
    assert _snapshot(*wr.kept(out)) == before
    assert _hidden(*_places(wr, out)) == []


def _case_stale_temp(world: World, wr: Writer, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wr.previous(world, out)
    named = wr.named(out)
    stale = named.parent / f".{named.name}.tmp-{_dead_pid()}-0123abcd"
    if wr.kind == "dir" and not wr.run_folder:
        stale.mkdir()
        (stale / "zarr.json").write_text("{}")
    else:
        stale.write_bytes(b"half")
    ok, msg = wr.again(world, out)
    assert ok, msg
    assert not stale.exists() and _hidden(*_places(wr, out)) == []


def _case_killed(world: World, wr: Writer, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wr.previous(world, out)
    before = _snapshot(*wr.kept(out))
    code = _STOP_BEFORE_PUBLISHING.format(name=wr.named(out).name) + wr.again_code(world, out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        for line in proc.stdout:
            if line == "inside the protocol\n":
                break
        else:
            pytest.fail(f"the writer never reached the publication: {proc.stderr.read()}")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
    assert _snapshot(*wr.kept(out)) == before                        # the previous output, whole
    ok, msg = wr.again(world, out)
    assert ok, msg
    assert _hidden(*_places(wr, out)) == []                          # its temporary and lock gone
