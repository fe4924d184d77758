"""dvsg_train.export's writer and checkpoint reader at their edges (issue 20, the export
cluster's survivors in export_checkpoint, read_weights, load_weights and load_network): what
export_checkpoint returns and writes for each format and by default, its refusals word for word
(an unknown format, an existing output, its own input, a locked output, an output turned into
the checkpoint while it loads), every field read_weights takes from our checkpoint, its refusals
of SpikingJelly files naming the file, and load_weights' one-line message for every shape of
torch's load_state_dict error. Small hand-made networks and state dicts; nothing is trained."""
from __future__ import annotations

import dataclasses
import os
import uuid

import pytest
import torch
from torch import nn

from dvsprep.atomic import output_lock
from dvsprep.errors import InputOutputClashError, OutputLockedError, StoreExistsError
from dvsg_train.checkpoint import TrainingState, make_payload, save_checkpoint
from dvsg_train.config import TrainConfig
from dvsg_train.errors import CheckpointError, ExportError
from dvsg_train.export import writer
from dvsg_train.export.network import NetworkWeights, load_network, load_weights, read_weights
from dvsg_train.export.writer import export_checkpoint
from dvsg_train.model import MultiStepNet, StepwiseNet, build_model

# The model fields of a bare SpikingJelly state dict of our 2-channel network with Linear biases
# (LIFNode's tau is not stored: the tutorial's default 2.0).
SJ2_FIELDS = {"channels": 2, "net": "multistep", "neuron": "lif", "tau": 2.0, "linear_bias": True}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bare SpikingJelly-style state dicts of our network with Linear biases: channels 2 (NIR
    export) and 128 (the only width DVSGestureNet holds: the spikingjelly format)."""
    root = tmp_path_factory.mktemp("sj")
    out = {}
    with torch.random.fork_rng(devices=[]):          # the tests after these keep their RNG
        torch.manual_seed(0)
        for c in (2, 128):
            state = build_model(channels=c, linear_bias=True).state_dict()
            torch.save(state, root / f"sj{c}.pth")
            out[c] = (root / f"sj{c}.pth", state)
    return out


# ----------------------------------------------------------------------------- export_checkpoint

def test_nir_is_the_default_format_and_the_graph_names_its_source(files, tmp_path):
    nir = pytest.importorskip("nir")
    src, _ = files[2]
    out = tmp_path / "net.nir"
    info = export_checkpoint(src, out)                     # no format, no dt: NIR at dt 1e-4 s
    assert info == {"format": "nir", "path": str(out), "dt": 1e-4, **SJ2_FIELDS, "T": None}
    meta = nir.read(out).metadata
    assert (meta["source"], meta["neuron"], meta["channels"], meta["dt"]) == ("spikingjelly", "lif", 2, 1e-4)


def test_spikingjelly_export_returns_no_dt_and_writes_the_weights(files, tmp_path):
    src, state = files[128]
    out = tmp_path / "net.pth"
    info = export_checkpoint(src, out, "spikingjelly", dt=0.5)
    assert info == {"format": "spikingjelly", "path": str(out), "dt": None, **SJ2_FIELDS, "channels": 128, "T": None}
    written = torch.load(out, weights_only=True)
    assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)


def test_an_unknown_format_is_refused_naming_the_choices(files, tmp_path):
    with pytest.raises(ExportError) as err:
        export_checkpoint(files[2][0], tmp_path / "net.onnx", "onnx")
    assert str(err.value) == "unknown export format 'onnx'; choose one of nir, spikingjelly"
    assert not (tmp_path / "net.onnx").exists()


def test_an_existing_output_is_kept_without_force(files, tmp_path):
    out = tmp_path / "net.pth"
    out.write_bytes(b"mine")
    with pytest.raises(StoreExistsError) as err:
        export_checkpoint(files[128][0], out, "spikingjelly")        # force defaults to False
    assert str(err.value) == f"{out}: already exists (use --force to replace it)"
    assert out.read_bytes() == b"mine"


def test_the_checkpoint_itself_is_never_the_output(files, tmp_path):
    src = tmp_path / "w.pth"
    src.write_bytes(files[2][0].read_bytes())
    with pytest.raises(InputOutputClashError) as err:
        export_checkpoint(src, src, "nir", force=True)
    assert str(err.value) == f"{src}: is the input {src}; the export would overwrite its own input"
    assert src.read_bytes() == files[2][0].read_bytes()


def test_an_output_another_writer_holds_is_refused_naming_the_export(files, tmp_path):
    out = tmp_path / "net.pth"
    with output_lock(out, "other"):
        with pytest.raises(OutputLockedError) as err:
            export_checkpoint(files[128][0], out, "spikingjelly")
    assert str(err.value) == (f"{out}: export is being written by another process (pid {os.getpid()}); "
                              "wait for it to finish")
    assert not out.exists()


def test_an_output_turned_into_the_checkpoint_while_it_loads_is_refused(files, tmp_path, monkeypatch):
    """The output protocol checks the inputs again under the lock: an output that became a link
    to the checkpoint after the first check is still refused, and the checkpoint is left whole."""
    src = tmp_path / "w.pth"
    src.write_bytes(files[128][0].read_bytes())
    out = tmp_path / "net.pth"
    real = writer.load_network

    def load_then_link(path):
        trained = real(path)
        out.symlink_to(src)
        return trained

    monkeypatch.setattr(writer, "load_network", load_then_link)
    with pytest.raises(InputOutputClashError) as err:
        export_checkpoint(src, out, "spikingjelly", force=True)
    assert str(err.value) == f"{out}: is the input {src}; the export would overwrite its own input"
    assert out.is_symlink() and src.read_bytes() == files[128][0].read_bytes()


# ----------------------------------------------------------------------------- read_weights

def test_every_field_of_our_checkpoint(tmp_path):
    """A stepwise net, tau 3, T 5, batch 3, after epoch 1: none of them the defaults."""
    model = build_model(2, "stepwise", "lif", tau=3.0)
    state = TrainingState(model, torch.optim.SGD(model.parameters(), lr=0.1), None, None,
                          torch.Generator().manual_seed(0))
    config = TrainConfig(data=str(tmp_path), channels=2, net="stepwise", tau=3.0, T=5, batch_size=3,
                         epochs=3, opt="sgd", lr=0.1)
    record = {"epoch": 0, "train_loss": 0.5, "train_acc": 0.25, "test_loss": 0.75, "test_acc": 0.125}
    history = [record, {**record, "epoch": 1}]
    path = tmp_path / "c.pt"
    save_checkpoint(path, make_payload(state, epoch=1, config=config, data_fingerprint="cd" * 32,
                                       history=history, run_id=uuid.uuid4().hex, run_dir=tmp_path / "R"))
    w = read_weights(path)
    got = {f.name: getattr(w, f.name) for f in dataclasses.fields(w) if f.name != "state"}
    assert got == {"path": str(path), "source": "dvsg-train", "channels": 2, "neuron": "lif", "tau": 3.0,
                   "linear_bias": False, "net": "stepwise", "T": 5, "batch_size": 3, "epoch": 1,
                   "data_fingerprint": "cd" * 32, "extra": {}}
    assert w.linear_bias is False
    want = model.state_dict()
    assert w.state.keys() == want.keys() and all(torch.equal(w.state[k], want[k]) for k in want)


def test_the_tutorial_epoch_only_when_it_is_an_int(files, tmp_path):
    _, state = files[2]
    for epoch, want in ((7, 7), ("7", None), (7.0, None)):
        torch.save({"net": state, "epoch": epoch}, tmp_path / "t.pth")
        assert read_weights(tmp_path / "t.pth").epoch == want
    assert read_weights(files[2][0]).epoch is None                       # a bare state dict


def _sj_refusal(tmp_path, obj) -> str:
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as err:
        read_weights(path)
    return str(err.value).replace(str(path), "P")


def test_spikingjelly_refusals_name_the_file(files, tmp_path):
    state = dict(files[2][1])
    assert _sj_refusal(tmp_path, [1, 2]) == ("P: neither a dvsg-train checkpoint nor a SpikingJelly DVSGestureNet "
                                             "checkpoint ({'net': state_dict, ...} or a state dict)")
    expanded = {**state, "conv_fc.0.weight": torch.zeros(1).expand(2, 2, 3, 3)}
    assert _sj_refusal(tmp_path, expanded) == ("P: tensor conv_fc.0.weight declares shape (2, 2, 3, 3) (144 bytes) "
                                               "from 4 bytes of data (an expanded or overlapping tensor): not a "
                                               "checkpoint of real weights")
    no_fc1 = {k: v for k, v in state.items() if k != "conv_fc.22.weight"}
    assert _sj_refusal(tmp_path, no_fc1) == "P: not a DVSGestureNet state dict (no conv_fc.22.weight)"
    nan = {**state, "conv_fc.0.weight": torch.full((2, 2, 3, 3), float("nan"))}
    assert _sj_refusal(tmp_path, nan) == "P: weight conv_fc.0.weight holds NaN values: refusing to use it"


# ----------------------------------------------------------------------------- load_network

def test_load_network_builds_the_net_asked_for(files):
    src, state = files[2]
    default, stepwise = load_network(src), load_network(src, net="stepwise")
    assert type(default.model) is MultiStepNet and type(stepwise.model) is StepwiseNet
    for trained in (default, stepwise):
        assert not trained.model.training
        assert all(torch.equal(v, state[k]) for k, v in trained.model.state_dict().items())


# ----------------------------------------------------------------------------- load_weights

class Odd(nn.Module):
    """One parameter w [2]; its load_state_dict fails as asked: torch's own message built from
    ``msgs`` (line 0 "Error(s) in loading state_dict for Odd:", then one line each), or ``exc``
    raised as it is."""

    def __init__(self, msgs: tuple[str, ...] = (), exc: BaseException | None = None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.msgs, self.exc = msgs, exc

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        error_msgs.extend(self.msgs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if self.exc is not None:
            raise self.exc
        return super().load_state_dict(state_dict, strict, assign)


def odd_weights(w: torch.Tensor) -> NetworkWeights:
    return NetworkWeights("w.pt", "spikingjelly", {"w": w}, channels=2, neuron="lif", tau=2.0, linear_bias=False)


OWN = "{'channels': 2, 'net': 'multistep', 'neuron': 'lif', 'tau': 2.0, 'linear_bias': False}"


@pytest.mark.parametrize("model, detail", [
    (Odd(msgs=("first problem", "second problem")), "first problem"),   # line 1 of three
    (Odd(msgs=("only problem",)), "only problem"),                      # line 1 of two
    (Odd(exc=RuntimeError("\n  one line  \n\n")), "one line"),          # one line: itself
    (Odd(exc=KeyError("k")), "'k'"),
    (Odd(exc=TypeError()), "TypeError"),                                # no text: the error's type
    (Odd(msgs=("x" * 201,)), "x" * 200),                                # cut at 200
    (Odd(msgs=("y" * 200,)), "y" * 200),
])
def test_a_load_state_dict_failure_is_one_line(model, detail):
    with pytest.raises(CheckpointError) as err:
        load_weights(model, odd_weights(torch.ones(2)))
    assert str(err.value) == f"w.pt: weights do not fit the network {OWN} ({detail})"
    with pytest.raises(CheckpointError) as err:
        load_weights(model, odd_weights(torch.ones(2)), network={"channels": 9})
    assert str(err.value) == f"w.pt: weights do not fit the network {{'channels': 9}} ({detail})"


def test_weights_of_another_shape_are_named_before_loading():
    """state_mismatch's phrase, not torch's: load_state_dict is never reached."""
    model = Odd(exc=AssertionError("load_state_dict must not be called"))
    with pytest.raises(CheckpointError) as err:
        load_weights(model, odd_weights(torch.ones(3)))
    assert str(err.value) == (f"w.pt: weights do not fit the network {OWN} "
                              "(size mismatch for w: shape (3,) in the checkpoint, (2,) in the network)")
    with pytest.raises(CheckpointError) as err:
        load_weights(model, odd_weights(torch.ones(3)), network={"channels": 9})
    assert str(err.value) == ("w.pt: weights do not fit the network {'channels': 9} "
                              "(size mismatch for w: shape (3,) in the checkpoint, (2,) in the network)")


def test_weights_that_fit_are_loaded():
    model = Odd()
    load_weights(model, odd_weights(torch.tensor([1.5, -2.0])))
    assert torch.equal(model.w.detach(), torch.tensor([1.5, -2.0]))
