"""Hostile or broken checkpoints (issue 19, item 1) at every command that reads one: dvsg-eval
--checkpoint, dvsg-train --init, dvsg-export and, where it applies, dvsg-train --resume. Each is
refused in one line `error: <file>: ...`, exit 1, no traceback, before anything large is
allocated, and nothing is written.

Files: SpikingJelly-style state dicts ({'net': state_dict, 'epoch': N}, what the seed tutorial
saves) and our own checkpoints re-signed after tampering (valid digest, so only the content
checks can catch them)."""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, strategies as st

from dvsg_train.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from dvsg_train.cli import eval_main, export_main, train_main
from dvsg_train.errors import CheckpointError
from dvsg_train.export.network import read_weights
from dvsg_train.model import build_model

from fuzz_settings import fuzz
from hostile_fixtures import snapshot
from previous_output import lay_previous, tree
from train_fixtures import make_learnable_store

TINY = ["-T", "4", "-b", "6", "--channels", "4", "--device", "cpu", "-j", "0"]
COMMANDS = ("eval", "init", "export")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(store, run folder): a 2-epoch run of a 4-channel network."""
    root = tmp_path_factory.mktemp("hostile_ckpt")
    store = root / "frames_T4_number.zarr"
    make_learnable_store(store, T=4, n_train=12, n_test=11)
    res = CliRunner().invoke(train_main, ["--data", str(store), "--out-dir", str(root / "runs"), "-q",
                                          "--epochs", "2", *TINY])
    assert res.exit_code == 0, res.output
    return store, root / "runs" / "T4_b6_adam_lr0.001_c4"


def sj_state(channels: int, fill=lambda shape: torch.zeros(1).expand(*shape)) -> dict[str, torch.Tensor]:
    """A DVSGestureNet-style state dict of ``channels`` whose tensors come from ``fill(shape)``
    (default: stride-0 views of a single float: a tiny file declaring the full shapes)."""
    s: dict[str, torch.Tensor] = {}
    cin = 2
    for i in range(5):
        b = i * 4
        s[f"conv_fc.{b}.weight"] = fill((channels, cin, 3, 3))
        cin = channels
        for name in ("weight", "bias", "running_mean", "running_var"):
            s[f"conv_fc.{b + 1}.{name}"] = fill((channels,))
        s[f"conv_fc.{b + 1}.num_batches_tracked"] = torch.tensor(0)
    s["conv_fc.22.weight"] = fill((channels * 4, channels * 16))
    s["conv_fc.22.bias"] = fill((channels * 4,))
    s["conv_fc.25.weight"] = fill((110, channels * 4))
    s["conv_fc.25.bias"] = fill((110,))
    return s


def dense(shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    return torch.rand(*shape, generator=g) * 0.1


def write_sj(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"net": state, "epoch": 1, "max_test_acc": 0.5}, path)
    return path


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Fail (rather than hang the suite) when the body blocks, e.g. on opening a FIFO."""
    def alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def memory_limit(limit: int = 2 << 30):
    """At most ``limit`` bytes more address space than now: a checkpoint that makes the command
    allocate gigabytes fails the test instead of the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (now + limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def invoke(command: str, ckpt: Path, trained, out: Path, force: bool = False):
    """`command` with its outputs in `out` (with `force`: --force, and init's run folder runs/r)."""
    store, _ = trained
    more = ["--force"] if force else []
    if command == "eval":
        return CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(store), "--device", "cpu",
                                              "--png", str(out / "c.png"), *more])
    if command == "init":
        return CliRunner().invoke(train_main, ["--data", str(store), "--out-dir", str(out / "runs"), "--epochs", "1",
                                               *TINY, "--init", str(ckpt), *more, *(["--run-name", "r"] if force else [])])
    if command == "export":
        return CliRunner().invoke(export_main, [str(ckpt), "--format", "spikingjelly", "-o", str(out / "n.pth"), *more])
    assert command == "resume"
    return CliRunner().invoke(train_main, ["--resume", str(ckpt), "--epochs", "3"])


def refused(res, ckpt: Path) -> str:
    """The one `error: <ckpt>: ...` line of a refusal (exit 1, no traceback)."""
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    assert not isinstance(res.exception, (MemoryError, TimeoutError)) and "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {ckpt}: "), res.output
    return lines[0]


def refused_everywhere(trained, ckpt: Path, tmp_path: Path, commands=COMMANDS, memory: bool = True) -> list[str]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    msgs = []
    for command in commands:
        with no_hang(), memory_limit() if memory else contextlib.nullcontext():
            res = invoke(command, ckpt, trained, out)
        msgs.append(refused(res, ckpt))
        assert list(out.iterdir()) == [], f"{command} wrote {list(out.iterdir())}"
    # again over previous outputs that --force would replace (a resume has no --force): the same
    # refusal, and they stay byte for byte
    kept = tmp_path / "kept"
    for name in ("c.png", "n.pth", "runs/r/checkpoint_latest.pt"):
        lay_previous(kept / name)
    before = tree(kept)
    for command in (c for c in commands if c != "resume"):
        with no_hang(), memory_limit() if memory else contextlib.nullcontext():
            res = invoke(command, ckpt, trained, kept, force=True)
        assert refused(res, ckpt) == msgs[commands.index(command)]
        assert tree(kept) == before, command
    return msgs


# ----------------------------------------------------------------------------- declared sizes

@pytest.mark.parametrize("channels", [2048, 10**6])
def test_stride_0_tensors_declaring_huge_shapes_are_refused_before_allocating(trained, tmp_path, channels):
    ckpt = write_sj(tmp_path / f"expanded_{channels}.pth", sj_state(channels))
    assert ckpt.stat().st_size < 20_000
    for msg in refused_everywhere(trained, ckpt, tmp_path):
        assert f"tensor conv_fc.0.weight declares shape ({channels}, 2, 3, 3)" in msg
        assert "from 4 bytes of data (an expanded or overlapping tensor)" in msg


def test_tensors_sharing_one_storage_are_refused(trained, tmp_path):
    """Each tensor dense over a shared storage: together they declare more than the file holds."""
    channels = 64
    big = torch.zeros(channels * 4 * channels * 16)
    state = sj_state(channels, fill=lambda shape: big[:torch.Size(shape).numel()].view(*shape))
    ckpt = write_sj(tmp_path / "shared.pth", state)
    for msg in refused_everywhere(trained, ckpt, tmp_path):
        assert "its tensors declare" in msg and "more than the" in msg and "tensors sharing their data" in msg


def test_resigned_own_checkpoint_with_expanded_weights(trained, tmp_path):
    _, run = trained
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    ckpt = folder / "checkpoint_latest.pt"
    p = load_checkpoint(ckpt)
    p["model"]["conv_fc.4.weight"] = torch.zeros(1).expand(4, 4, 3, 3)
    save_checkpoint(ckpt, {k: v for k, v in p.items() if k not in ("format", "version")})
    for msg in refused_everywhere(trained, ckpt, tmp_path, commands=(*COMMANDS, "resume")):
        assert "tensor payload['model']['conv_fc.4.weight'] declares shape (4, 4, 3, 3)" in msg


def test_an_expanded_container_payload_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"format": "dvsg-train-checkpoint/2", "sha256": "0" * 64,
                "payload": torch.zeros(1, dtype=torch.uint8).expand(10**12)}, path)
    with memory_limit(), pytest.raises(CheckpointError, match=r"tensor payload declares shape \(1000000000000,\)"):
        load_checkpoint(path)


def test_a_sparse_weight_is_refused(trained, tmp_path):
    state = sj_state(4, fill=dense)
    state["conv_fc.25.weight"] = state["conv_fc.25.weight"].to_sparse()
    ckpt = write_sj(tmp_path / "sparse.pth", state)
    # torch's UserWarning about sparse invariants would come before the one line: none is shown
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="conv_fc.25.weight is not a dense tensor") as e:
            read_weights(ckpt)
    assert seen == [] and str(e.value).endswith("tensor conv_fc.25.weight is not a dense tensor (torch.sparse_coo)")
    refused_everywhere(trained, ckpt, tmp_path, commands=("export",))


# ----------------------------------------------------------------------------- NaN and inf

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_holding_nan_or_inf_are_refused_naming_the_tensor(trained, tmp_path, bad):
    state = sj_state(4, fill=dense)
    state["conv_fc.25.weight"][3, 7] = bad
    ckpt = write_sj(tmp_path / "nan.pth", state)
    what = "NaN" if bad != bad else "inf"
    for msg in refused_everywhere(trained, ckpt, tmp_path):
        assert msg.endswith(f"weight conv_fc.25.weight holds {what} values: refusing to use it"), msg


def test_our_checkpoint_with_nan_weights_or_optimizer_state(trained, tmp_path):
    _, run = trained
    for where in ("model", "optimizer"):
        folder = tmp_path / where
        shutil.copytree(run, folder)
        ckpt = folder / "checkpoint_latest.pt"
        p = load_checkpoint(ckpt)
        if where == "model":
            p["model"]["conv_fc.1.running_var"][0] = float("nan")
            expect = "weight conv_fc.1.running_var holds NaN values"
        else:
            p["optimizer"]["state"][0]["exp_avg"].view(-1)[0] = float("inf")
            expect = "optimizer state payload['optimizer']['state'][0]['exp_avg'] holds inf values"
        save_checkpoint(ckpt, {k: v for k, v in p.items() if k not in ("format", "version")})
        commands = (*COMMANDS, "resume") if where == "model" else ("eval", "resume")
        for msg in refused_everywhere(trained, ckpt, tmp_path, commands=commands):
            assert expect in msg, msg


# ----------------------------------------------------------------------------- not regular files

@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_a_fifo_folder_or_device_is_refused_without_blocking(trained, tmp_path, kind):
    if kind == "fifo":
        ckpt = tmp_path / "ckpt.pt"
        os.mkfifo(ckpt)
        what = "a FIFO"
    elif kind == "folder":
        ckpt = tmp_path / "ckpt.pt"
        ckpt.mkdir()
        what = "a folder"
    else:
        ckpt = Path("/dev/zero")
        what = "a device"
    commands = (*COMMANDS, "resume") if kind == "fifo" else COMMANDS
    for msg in refused_everywhere(trained, ckpt, tmp_path, commands=commands):
        assert msg == f"error: {ckpt}: not a checkpoint file ({what})"


# ----------------------------------------------------------------------------- malformed pickles

TINY_PICKLES = [b"\x80\x02.", b"\x80\x02h\x05.", b"\x80\x02J\x01", b"\x80\x02}](K\x01ts.", b"", b"PK\x03\x04",
                b"\x80\x02" + b"(" * 100_000 + b"."]


@pytest.mark.parametrize("data", TINY_PICKLES, ids=lambda d: repr(d[:12]))
def test_malformed_pickles_are_not_a_checkpoint(trained, tmp_path, data):
    ckpt = tmp_path / "tiny.pt"
    ckpt.write_bytes(data)
    for msg in refused_everywhere(trained, ckpt, tmp_path, commands=(*COMMANDS, "resume")):
        assert msg.startswith(f"error: {ckpt}: not a checkpoint ("), msg


def test_ctrl_c_while_loading_is_not_a_refusal(tmp_path, monkeypatch):
    """The broad catch around torch.load takes Exception only: Ctrl-C stays Ctrl-C."""
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"\x80\x02.")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        read_weights(ckpt)


# ----------------------------------------------------------------------------- --resume

def test_resume_with_wrongly_shaped_weights_names_layer_and_shapes(trained, tmp_path):
    _, run = trained
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    ckpt = folder / "checkpoint_latest.pt"
    p = load_checkpoint(ckpt)
    p["model"]["conv_fc.4.weight"] = torch.zeros(4, 8, 3, 3)
    save_checkpoint(ckpt, {k: v for k, v in p.items() if k not in ("format", "version")})
    before = snapshot(folder)
    for msg in refused_everywhere(trained, ckpt, tmp_path, commands=(*COMMANDS, "resume")):
        assert "model weights do not fit the network" in msg or "weights do not fit the network" in msg
        assert "size mismatch for conv_fc.4.weight: shape (4, 8, 3, 3) in the checkpoint, (4, 4, 3, 3) in the network" \
            in msg, msg
        assert "Error(s) in loading state_dict" not in msg
    assert snapshot(folder) == before


def test_loading_model_state_into_another_network_names_layer_and_shapes(trained):
    _, run = trained
    ckpt = load_checkpoint(run / "checkpoint_latest.pt")
    with pytest.raises(CheckpointError) as e:
        load_model_state(build_model(8), ckpt, "c.pt")
    assert str(e.value).startswith("c.pt: model weights do not fit the network") and \
        "size mismatch for conv_fc.0.weight: shape (4, 2, 3, 3) in the checkpoint, (8, 2, 3, 3) in the network" \
        in str(e.value)


def test_resume_with_epochs_below_those_done_is_refused_before_writing(trained, tmp_path):
    _, run = trained
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    before = snapshot(folder)
    for epochs in ("1",):
        res = CliRunner().invoke(train_main, ["--resume", str(folder / "checkpoint_latest.pt"), "--epochs", epochs])
        msg = refused(res, folder / "checkpoint_latest.pt")
        assert msg.endswith("the run has done 2 epochs; --epochs 1 would end it before that "
                            "(give --epochs 2 or more, or leave it out)"), msg
    assert snapshot(folder) == before
    # exactly the epochs done: nothing to train, accepted
    res = CliRunner().invoke(train_main, ["--resume", str(folder / "checkpoint_latest.pt"), "--epochs", "2", "-q"])
    assert res.exit_code == 0, res.output


# ----------------------------------------------------------------------------- fuzzing

@pytest.fixture(scope="module")
def originals(trained, tmp_path_factory):
    """The bytes of a real small checkpoint of ours and of a SpikingJelly-style file."""
    _, run = trained
    sj = write_sj(tmp_path_factory.mktemp("sj") / "sj.pth", sj_state(4, fill=dense))
    return {"ours": (run / "checkpoint_latest.pt").read_bytes(), "spikingjelly": sj.read_bytes()}


FUZZ = fuzz(40)


@FUZZ
@given(kind=st.sampled_from(["ours", "spikingjelly"]), data=st.data())
def test_flipped_or_truncated_checkpoints_load_or_refuse_in_one_line(originals, tmp_path_factory, kind, data):
    raw = bytearray(originals[kind])
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for at, x in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)),
                                        min_size=1, max_size=4), label="flips"):
            raw[at] ^= x
    path = tmp_path_factory.mktemp("fuzz") / "c.pt"
    path.write_bytes(bytes(raw))
    try:
        with memory_limit():
            weights = read_weights(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(f"{path}: ")
        return
    assert all(bool(torch.isfinite(t).all()) for t in weights.state.values() if t.is_floating_point())
    weights.build().load_state_dict(weights.state)
