"""dvsg_train.export at its edges: the SpikingJelly state-dict checks one condition at a time,
their messages word for word, the dtype of the zero biases written for SpikingJelly, and which
T a checkpoint without one gets from a folder of stores. Small hand-made state dicts; nothing
is trained."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dvsg_train.errors import CheckpointError, ExportError
from dvsg_train.export.network import read_init_weights, read_weights, store_T
from dvsg_train.export.sj_state import find_spikingjelly_state, spikingjelly_fields, to_spikingjelly_state
from dvsg_train.model import build_model
from dvsprep.errors import MissingFileError


def sj_like(c: int = 2, hidden: int | None = None, bias=(True, True), dtype=torch.float32) -> dict:
    """The keys and shapes spikingjelly_fields reads: conv 0, Linear 22 (and 25), biases."""
    hidden = 4 * c if hidden is None else hidden
    s = {"conv_fc.0.weight": torch.zeros(c, 2, 3, 3, dtype=dtype),
         "conv_fc.22.weight": torch.zeros(hidden, c * 16, dtype=dtype),
         "conv_fc.25.weight": torch.zeros(110, hidden, dtype=dtype)}
    if bias[0]:
        s["conv_fc.22.bias"] = torch.zeros(hidden, dtype=dtype)
    if bias[1]:
        s["conv_fc.25.bias"] = torch.zeros(110, dtype=dtype)
    return s


# ----------------------------------------------------------------------------- sj_state

def test_find_state_takes_only_dicts_of_named_tensors():
    t = torch.zeros(1)
    assert find_spikingjelly_state({}) is None
    assert find_spikingjelly_state(["conv_fc.0.weight"]) is None          # a list, even of names
    assert find_spikingjelly_state({1: t, "conv_fc.0.weight": t}) is None   # a key that is no name
    assert find_spikingjelly_state({"net": {"module.conv_fc.0.weight": t}}) == {"conv_fc.0.weight": t}


def test_fields_of_a_fitting_state_dict():
    assert spikingjelly_fields(sj_like(3), "p") == {"channels": 3, "neuron": "lif", "tau": 2.0, "linear_bias": True}
    assert spikingjelly_fields(sj_like(3, bias=(False, False)), "p")["linear_bias"] is False
    plif = {**sj_like(3), "conv_fc.2.w": torch.zeros(())}
    assert spikingjelly_fields(plif, "p")["neuron"] == "plif"


@pytest.mark.parametrize("missing", ["conv_fc.0.weight", "conv_fc.22.weight"])
def test_a_missing_layer_is_named(missing):
    s = sj_like()
    del s[missing]
    with pytest.raises(CheckpointError) as err:
        spikingjelly_fields(s, "w.pth")
    assert str(err.value) == f"w.pth: not a DVSGestureNet state dict (no {missing})"


@pytest.mark.parametrize("conv0, fc1", [
    ((2, 2, 3), (8, 32)),          # conv 0 of 3 dimensions
    ((2, 3, 3, 3), (8, 32)),       # 3 input channels, not 2 polarities
    ((2, 2, 3, 5), (8, 32)),       # a 3x5 kernel
    ((2, 2, 3, 3), (8,)),          # Linear 22 of 1 dimension
])
def test_each_layout_condition_alone_refuses(conv0, fc1):
    s = {"conv_fc.0.weight": torch.zeros(conv0), "conv_fc.22.weight": torch.zeros(fc1)}
    with pytest.raises(CheckpointError) as err:
        spikingjelly_fields(s, "w.pth")
    assert str(err.value) == (f"w.pth: not a DVSGestureNet state dict (conv_fc.0.weight {conv0}, "
                              f"conv_fc.22.weight {fc1})")


def test_a_hidden_layer_other_than_four_times_channels():
    with pytest.raises(CheckpointError) as err:
        spikingjelly_fields(sj_like(2, hidden=9), "w.pth")
    assert str(err.value) == ("w.pth: SpikingJelly network with channels 2 and a hidden layer of 9; ours has "
                              "channels*4 = 8 (only channels 128 maps onto DVSGestureNet's fixed 512)")


@pytest.mark.parametrize("bias", [(True, False), (False, True)])
def test_a_bias_on_one_linear_layer_only(bias):
    with pytest.raises(CheckpointError) as err:
        spikingjelly_fields(sj_like(2, bias=bias), "w.pth")
    assert str(err.value) == "w.pth: DVSGestureNet state dict with a bias on only one Linear layer"


def test_zero_biases_for_spikingjelly_keep_the_weights_dtype():
    out = to_spikingjelly_state(sj_like(128, bias=(False, False), dtype=torch.float64))
    for fc, n in ((22, 512), (25, 110)):
        b = out[f"conv_fc.{fc}.bias"]
        assert b.dtype == torch.float64 and torch.equal(b, torch.zeros(n, dtype=torch.float64))


def test_only_a_hidden_layer_of_512_maps_onto_spikingjelly():
    with pytest.raises(ExportError) as err:
        to_spikingjelly_state(sj_like(3, bias=(False, False)))
    assert str(err.value) == ("SpikingJelly's DVSGestureNet has a hidden layer of 512, this network (channels 3) "
                              "one of 12: only channels 128 maps onto it")


# ----------------------------------------------------------------------------- network

@pytest.fixture
def sj_file(tmp_path):
    """A bare SpikingJelly-style state dict of our 2-channel network with Linear biases."""
    path = tmp_path / "w.pth"
    torch.save(build_model(channels=2, linear_bias=True).state_dict(), path)
    return path


def test_init_weights_that_do_not_fit_name_the_target_network(sj_file):
    with pytest.raises(CheckpointError) as err:
        read_init_weights(sj_file, channels=3, net="stepwise", neuron="lif", tau=2.0)
    assert str(err.value).startswith(f"{sj_file}: weights do not fit the network "
                                     "{'channels': 3, 'net': 'stepwise', 'neuron': 'lif', 'tau': 2.0} (")


def test_store_T_from_a_folder_of_stores(sj_file, tmp_path):
    weights = read_weights(sj_file)
    assert weights.T is None
    root = tmp_path / "data"
    root.mkdir()
    (root / "events.h5").write_bytes(b"")
    with pytest.raises(Exception) as err:
        store_T(root, weights)
    assert str(err.value) == (f"{root}: {weights.path} does not record T and this folder holds no "
                              "frames_T<T>_number.zarr; pass the frame store's path")
    for T in (8, 16):
        (root / f"frames_T{T}_number.zarr").mkdir()
    with pytest.raises(Exception) as err:
        store_T(root, weights)
    assert str(err.value) == (f"{root}: {weights.path} does not record T and this folder holds "
                              "frames_T8_number.zarr, frames_T16_number.zarr; pass the frame store's path")
    # a checkpoint that records T keeps it, whatever the folder holds
    assert store_T(root, dataclasses.replace(weights, T=4)) == 4
    (root / "frames_T8_number.zarr").rmdir()
    assert store_T(root, weights) == 16
    with pytest.raises(MissingFileError) as err:
        store_T(tmp_path / "absent", weights)
    assert str(err.value) == f"{tmp_path / 'absent'}: no such frame store"


def test_store_T_refuses_what_is_no_store_nor_data_root(sj_file, tmp_path):
    """A regular file is neither a frame store nor a data folder: refused by the same check
    (kind_of over STORE_OR_DATA_ROOT) before any T is looked for."""
    weights = read_weights(sj_file)
    odd = tmp_path / "notes.txt"
    odd.write_text("x")
    with pytest.raises(Exception) as err:
        store_T(odd, weights)
    assert str(err.value) == (f"{odd}: neither a frame store (.zarr folder, .zip or http(s)/s3:// URL) nor a "
                              "DATA_ROOT (a folder holding events.h5 or frames_T<T>_<split_by>.zarr)")
