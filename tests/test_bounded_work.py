"""Bounded work (issue 19, item 5): a command estimates what it will allocate and refuses in one
line, before allocating, when that cannot fit the free memory (`dvsprep.resources.check_memory`,
one wording). The free memory is injected (`available_memory` patched): nothing here allocates
what it refuses, and the expected sizes are worked out by hand from the documented layouts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dvsprep.frames
from dvsprep import resources
from dvsprep.cli import main
from dvsg_train.cli import eval_main

from hostile_fixtures import tiny_events, tiny_store
from previous_output import lay_previous, tree

GiB, MiB = 2**30, 2**20


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bounded")
    tiny_events(root / "events.h5")
    tiny_store(root / "frames_T2_number.zarr")
    return root / "events.h5", root / "frames_T2_number.zarr"


@pytest.fixture()
def free(monkeypatch):
    """free(n): from now on `n` bytes of memory are available."""
    return lambda n: monkeypatch.setattr(resources, "available_memory", lambda: n)


def _refused(res) -> str:
    assert res.exit_code == 1, (res.output, res.exception)
    assert res.stdout == "" and res.stderr.count("\n") == 1 and "Traceback" not in res.output, res.output
    return res.stderr


def test_show_T_100000_is_refused_before_integrating(inputs, free, tmp_path, monkeypatch):
    events, _ = inputs
    monkeypatch.setattr(dvsprep.frames, "integrate", lambda *a, **k: pytest.fail("integrated"))
    free(8 * GiB)
    res = CliRunner().invoke(main, ["show", str(events), "-T", "100000", "-o", str(tmp_path / "a.png")])
    # grid: 4 columns of 256 px + 5 gaps = 1034; 3 title lines (42) + 25,000 rows of 256 px and
    # 25,001 gaps + two rasters of 14 + 256 + 4 = 6,450,592 rows. 16 B/pixel and 10 B for each
    # of 100,000 x 2 x 128 x 128 frame values: 139,486,594,048 B
    assert _refused(res) == (f"error: {events} (test): a picture of 1034x6450592 px from T=100000 frames needs "
                             f"about 129.9 GiB of memory, but only 8.0 GiB is free (use a smaller -T or --scale)\n")
    assert list(tmp_path.iterdir()) == []


def test_show_gif_and_sheet_are_estimated_too(inputs, free, tmp_path):
    events, store = inputs
    free(64 * MiB)
    res = CliRunner().invoke(main, ["show", str(events), "-T", "1000", "-o", str(tmp_path / "a.gif")])
    # 1,000 pictures of 260 x 316 (4 text lines, one 256 px tile): 1,314,560,000 + 327,680,000 B
    assert _refused(res) == (f"error: {events} (test): 1000 pictures of 260x316 px from T=1000 frames needs about "
                             f"1.5 GiB of memory, but only 64.0 MiB is free (use a smaller -T or --scale)\n")
    res = CliRunner().invoke(main, ["show", str(store), "--label", "all", "--scale", "16", "-o",
                                    str(tmp_path / "s.png")])
    # 3 test samples of 3 classes: 2 x 2048 + 3 x 2 gaps wide, 14 + 3 x (14 + 2048 + 4) high
    assert _refused(res) == (f"error: {store} (test): a picture of 4102x6212 px from T=2 frames needs about "
                             f"390.7 MiB of memory, but only 64.0 MiB is free (use a smaller --count or --scale)\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["-o", "g.png"], ["-o", "a.gif"], ["--label", "all", "-o", "s.png"],
                                  ["--scale", "3", "--columns", "3", "-o", "g3.png"]])
@pytest.mark.parametrize("which", [0, 1])
def test_estimated_size_is_the_size_written(inputs, free, tmp_path, monkeypatch, args, which):
    """The refusal names the picture size that rendering would produce (checked against the
    picture actually written when memory suffices)."""
    path = inputs[which]
    argv = ["show", str(path), *args[:-1], str(tmp_path / args[-1])]
    free(1)
    said = re.search(r"(\d+)x(\d+) px", _refused(CliRunner().invoke(main, argv))).groups()
    monkeypatch.undo()
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 0, res.output
    assert re.search(r"(\d+)x(\d+) px\)", res.stdout).groups() == said


def test_frames_refuses_what_its_workers_cannot_hold(inputs, free, tmp_path):
    events, _ = inputs
    free(1 * GiB)
    out = tmp_path / "f.zarr"
    res = CliRunner().invoke(main, ["frames", "-T", "4096", "-d", str(events.parent), "-o", str(out), "-j", "2"])
    # per worker: one sample of 4096 x 2 x 128 x 128 uint16 frames + int64 counts and index
    # (2 x 8 B per value): 2,415,919,104 B; two workers 4.5 GiB
    assert _refused(res) == (f"error: {out}: framing at -T 4096 with -j 2 needs about 4.5 GiB of memory, "
                             f"but only 1.0 GiB is free (use fewer jobs or a smaller -T)\n")
    assert not out.exists()


def _sj_checkpoint(path: Path, channels: int) -> Path:
    """A dense SpikingJelly-style checkpoint of `channels` (the tutorial's {'net': state_dict})."""
    from dvsg_train.model import build_model

    g = torch.Generator().manual_seed(0)
    state = {k: (torch.rand(v.shape, generator=g) * 0.1 if v.is_floating_point() else v)
             for k, v in build_model(channels, linear_bias=True).state_dict().items()}
    torch.save({"net": state, "epoch": 3}, path)
    return path


def test_eval_refuses_batches_that_cannot_fit(inputs, free, tmp_path):
    _, store = inputs
    ckpt = _sj_checkpoint(tmp_path / "net.pth", channels=4)
    free(1 * MiB)
    png = tmp_path / "c.png"
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(store), "--device", "cpu",
                                         "--png", str(png)])
    # the 3 test samples in one batch (-b 16 > 3) at T=2: float32 input (2 planes) and 4 float32
    # copies of [T*B, 4, 128, 128]: 4 x 2 x 3 x 16384 x (2 + 16) = 7,077,888 B
    assert _refused(res) == (f"error: {ckpt}: evaluating batches of 3 at T=2 with channels 4 needs about 6.8 MiB "
                             f"of memory, but only 1.0 MiB is free (use a smaller -b)\n")
    assert not png.exists()
    free(7_077_887)      # a byte short: refused
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(store), "--device", "cpu",
                                         "--png", str(png)])
    assert "needs about 6.8 MiB of memory, but only 6.7 MiB is free" in _refused(res)
    free(7_077_888)      # exactly what it needs: evaluated
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(store), "--device", "cpu",
                                         "--png", str(png), "--preload", "none"])
    assert res.exit_code == 0, res.output


def test_one_wording():
    assert resources.memory_refusal("x.zarr", "framing", 3 * GiB // 2, 512 * MiB, "use less") == \
        "x.zarr: framing needs about 1.5 GiB of memory, but only 512.0 MiB is free (use less)"
    assert resources.size_text(2**30 - 1) == "1,024.0 MiB" and resources.size_text(2**40) == "1,024.0 GiB"


@pytest.mark.parametrize("command, memory", [("show -o a.png", 8 * GiB), ("show -o a.gif", 64 * MiB),
                                             ("frames", 1 * GiB), ("eval --png", 1 * MiB)])
def test_a_refusal_leaves_the_output_that_force_would_replace(inputs, free, tmp_path, command, memory):
    """The refusals above, each over a previous output and with --force: it stays byte for byte,
    and nothing is left beside it."""
    events, store = inputs
    out = tmp_path / "out"
    target = out / {"show -o a.png": "a.png", "show -o a.gif": "a.gif", "frames": "f.zarr",
                    "eval --png": "c.png"}[command]
    before = lay_previous(target, "dir" if command == "frames" else "file")
    if command.startswith("show"):
        argv = ["show", str(events), "-T", "100000" if target.suffix == ".png" else "1000", "-o", str(target)]
    elif command == "frames":
        argv = ["frames", "-T", "4096", "-d", str(events.parent), "-o", str(target), "-j", "2"]
    else:
        ckpt = _sj_checkpoint(tmp_path / "net.pth", channels=4)
        argv = ["--checkpoint", str(ckpt), "--data", str(store), "--device", "cpu", "--png", str(target)]
    free(memory)
    res = CliRunner().invoke(eval_main if command == "eval --png" else main, [*argv, "--force"])
    assert "of memory, but only" in _refused(res)
    assert tree(out) == before
