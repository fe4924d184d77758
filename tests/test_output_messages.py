"""Messages of writers the system refuses (issue 19, item 7): a read-only folder, a file-size
limit (EFBIG), a full disk: one line naming the output, never its hidden `.lock` or `.tmp-`
path, and never a library's text about the temporary (HDF5 names the file it failed to write).

The file-size limit is real: each command runs in a child process under RLIMIT_FSIZE (Python
ignores SIGXFSZ, so a write past the limit fails with EFBIG). The full disk itself is covered
writer by writer in test_output_protocol.py."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dvsprep import atomic, resources
from dvsprep.cli import main
from dvsprep.errors import OutputWriteError, ResourceLimitError

from aedat_fixtures import small_release
from hostile_fixtures import tiny_events, tiny_store

REPO = Path(__file__).resolve().parents[1]
CHILD = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
         "from dvsprep.cli import main; sys.argv[0] = 'dvsprep'; main()")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messages")
    tiny_events(root / "events.h5")
    tiny_store(root / "s.zarr")
    small_release(root / "raw")
    assert CliRunner().invoke(main, ["pack", str(root / "s.zarr"), "-o", str(root / "s.zip")]).exit_code == 0
    return root


# (arguments with IN for the inputs and OUT for the output folder, the output, file-size limit)
CASES = [
    (["pack", "IN/s.zarr", "-o", "OUT/s.zip"], "s.zip", 4096),
    (["unpack", "IN/s.zip", "-o", "OUT/u.zarr"], "u.zarr", 1024),
    (["show", "IN/events.h5", "-o", "OUT/e.gif"], "e.gif", 4096),
    (["frames", "-T", "2", "-d", "IN", "-o", "OUT/f.zarr", "-j", "1"], "f.zarr", 4096),
    (["convert", "IN/raw", "-o", "OUT", "-j", "1"], "events.h5", 4096),   # HDF5's own error text
    (["synth", "OUT/raw", "--users", "2", "--test-users", "1", "-j", "1"], "raw/DvsGesture", 4096),
]


@pytest.mark.parametrize("args, output, limit", CASES, ids=[c[0][0] for c in CASES])
def test_file_too_large_names_the_output(inputs, tmp_path, args, output, limit):
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.replace("IN", str(inputs)).replace("OUT", str(out)) for a in args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", CHILD.format(limit=limit), *argv], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr == f"error: {out / output}: File too large\n"
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_read_only_folder_names_the_output_not_its_lock(inputs, tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, *a, **k):
        if os.fspath(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(atomic.os, "open", read_only)
    out = tmp_path / "s.zip"
    res = CliRunner().invoke(main, ["pack", str(inputs / "s.zarr"), "-o", str(out)])
    assert res.exit_code == 1 and res.stderr == f"error: {out}: Read-only file system\n", res.output


def test_output_error_rules(tmp_path):
    final, tmp = tmp_path / "x.zarr", tmp_path / ".x.zarr.tmp-1-ab"
    lock = tmp_path / ".x.zarr.lock"
    said = resources.output_error(OSError(errno.EACCES, "Permission denied", str(tmp / "a" / "b")), final, [tmp, lock])
    assert isinstance(said, OutputWriteError) and str(said) == f"{final}: Permission denied"
    said = resources.output_error(OSError(errno.ENOSPC, "whatever"), final, [tmp])
    assert isinstance(said, ResourceLimitError) and str(said) == f"{final}: No space left on device"
    said = resources.output_error(OSError(errno.EIO, "Can't write data (file = .x.zarr.tmp-1-ab)"), final, [tmp])
    assert str(said) == f"{final}: Input/output error"
    # errors about an input keep their own words; errors without an errno are not the system's
    assert resources.output_error(OSError(errno.EACCES, "Permission denied", "/data/in.h5"), final, [tmp]) is None
    assert resources.output_error(OSError(errno.ENOENT, "No such file"), final, [tmp]) is None
    assert resources.output_error(OSError("unable to read"), final, [tmp]) is None
    assert resources.output_error(ValueError("x"), final, [tmp]) is None


def test_more_loader_workers_than_cpus_is_one_line_of_ours_not_torchs(tmp_path):
    """torch's DataLoader prints a four-line UserWarning (twice) when -j exceeds the CPUs."""
    import torch

    from dvsg_train.model import build_model

    tiny_store(tmp_path / "s.zarr")
    ckpt = tmp_path / "net.pth"
    torch.save({"net": build_model(4, linear_bias=True).state_dict(), "epoch": 1}, ckpt)
    cpus = len(os.sched_getaffinity(0))
    code = "import sys; from dvsg_train.cli import eval_main; sys.argv[0] = 'dvsg-eval'; eval_main()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(ckpt), "--data", str(tmp_path / "s.zarr"),
                        "--device", "cpu", "--preload", "none", "-j", str(cpus + 1), "--png", str(tmp_path / "c.png")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == (f"WARNING: -j {cpus + 1}: more DataLoader workers than the {cpus} CPUs this process may "
                        f"use, which usually slows loading\n")
