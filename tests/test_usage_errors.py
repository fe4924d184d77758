"""Usage errors are usage errors (issue 19, item 6): a value no run can use is refused while the
options are parsed, exit 2, with click's usage block and one `Error:` line that names the option
and the rule, nothing else (no warning, no `error:` line, no traceback); and the library's
TrainConfig refuses the same values in the same words (one rule, config.FIELD_RULES)."""
from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from dvsg_train.cli import eval_main, export_main, train_main
from dvsg_train.config import TrainConfig
from dvsg_train.errors import ConfigError, ExportError
from dvsprep.cli import main as dvsprep_main


def usage_error(res) -> str:
    """The one `Error:` line of a usage error (exit 2), after click's `Usage:` / `Try` lines."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in res.output and "Warning" not in res.output and "error:" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines[0].startswith("Usage: ") and lines[1].startswith("Try ") and len(lines) == 3, res.output
    assert lines[2].startswith("Error: ")
    return lines[2]


TRAIN = {
    # option, value: the Error line's message after "Invalid value for 'OPTION': "
    ("--momentum", "-1"): "momentum must be in [0, 1), got -1.0",
    ("--momentum", "1"): "momentum must be in [0, 1), got 1.0",
    ("--momentum", "nan"): "momentum must be in [0, 1), got nan",
    ("--seed", "-1"): "seed must be an integer in [0, 2**64), got -1",
    ("--seed", str(2 ** 64)): f"seed must be an integer in [0, 2**64), got {2 ** 64}",
    ("--seed", str(10 ** 30)): f"seed must be an integer in [0, 2**64), got {10 ** 30}",
    ("--lr", "1e308"): "lr must be > 0 and at most 1000, got 1e+308",
    ("--lr", "inf"): "lr must be > 0 and at most 1000, got inf",
    ("--lr", "nan"): "lr must be > 0 and at most 1000, got nan",
    ("--lr", "0"): "lr must be > 0 and at most 1000, got 0.0",
    ("--lr", "-0.1"): "lr must be > 0 and at most 1000, got -0.1",
    ("--gamma", "0"): "gamma must be a finite number > 0, got 0.0",
    ("--gamma", "inf"): "gamma must be a finite number > 0, got inf",
    ("--device", "meta"): "device must be cpu, cuda or cuda:N, got 'meta'",
    ("--device", "cuda:x"): "device must be cpu, cuda or cuda:N, got 'cuda:x'",
    ("--device", "mps"): "device must be cpu, cuda or cuda:N, got 'mps'",
    ("--device", ""): "device must be cpu, cuda or cuda:N, got ''",
}


@pytest.mark.parametrize("option, value", list(TRAIN), ids=[f"{o} {v[:12]}" for o, v in TRAIN])
def test_dvsg_train_option_values_no_run_can_use(tmp_path, option, value):
    res = CliRunner().invoke(train_main, ["--data", str(tmp_path), "--out-dir", str(tmp_path / "runs"),
                                          option, value])
    assert usage_error(res) == f"Error: Invalid value for '{option}': {TRAIN[option, value]}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value", list(TRAIN), ids=[f"{o} {v[:12]}" for o, v in TRAIN])
def test_trainconfig_refuses_the_same_values_in_the_same_words(option, value):
    field = option.lstrip("-")
    parsed = int(value) if field == "seed" else value if field == "device" else float(value)
    with pytest.raises(ConfigError) as e:
        TrainConfig(data="x", **{field: parsed})
    msg = TRAIN[option, value]
    if isinstance(parsed, float) and not math.isfinite(parsed):   # the type check comes first
        msg = f"{field} must be a finite number, got {parsed!r}"
    assert str(e.value) == msg


@pytest.mark.parametrize("option, value", [("--lr", "1000"), ("--lr", "1e-9"), ("--momentum", "0"),
                                           ("--momentum", "0.99"), ("--seed", str(2 ** 64 - 1)), ("--seed", "0"),
                                           ("--device", "cpu"), ("--device", "cuda"), ("--device", "cuda:12"),
                                           ("--gamma", "2")])
def test_values_at_the_edges_are_accepted(tmp_path, option, value):
    field = option.lstrip("-")
    parsed = int(value) if field == "seed" else value if field == "device" else float(value)
    TrainConfig(data="x", **{field: parsed})
    res = CliRunner().invoke(train_main, ["--data", str(tmp_path / "nope"), option, value])
    # got past option parsing: refused later for the missing store (or a CUDA device this machine lacks)
    assert res.exit_code == 1 and ("no such frame store" in res.output or "no CUDA device" in res.output), res.output


@pytest.mark.parametrize("value", ["meta", "gpu", "cuda:"])
def test_dvsg_eval_device(tmp_path, value):
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(tmp_path / "c.pt"), "--data", str(tmp_path),
                                         "--device", value])
    assert usage_error(res) == f"Error: Invalid value for '--device': device must be cpu, cuda or cuda:N, got {value!r}"


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1e-4"])
def test_dvsg_export_dt(tmp_path, value):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"")
    res = CliRunner().invoke(export_main, [str(ckpt), "-o", str(tmp_path / "m.nir"), "--dt", value])
    assert usage_error(res) == (f"Error: Invalid value for '--dt': dt must be a finite number of seconds > 0, "
                                f"got {float(value)!r}")
    from dvsg_train.export import export_checkpoint

    with pytest.raises(ExportError, match="dt must be a finite number of seconds > 0"):
        export_checkpoint(ckpt, tmp_path / "m.nir", dt=float(value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_dvsprep_frames_split_by(tmp_path):
    res = CliRunner().invoke(dvsprep_main, ["frames", "-T", "4", "--split-by", "foo", "-d", str(tmp_path)])
    assert usage_error(res) == "Error: Invalid value for '--split-by': 'foo' is not one of 'number', 'time'."
    res = CliRunner().invoke(dvsprep_main, ["show", str(tmp_path), "--split-by", "foo"])
    assert usage_error(res) == "Error: Invalid value for '--split-by': 'foo' is not one of 'number', 'time'."


@pytest.mark.parametrize("label, message", [
    ("hand_claping", "label 'hand_claping': no such class; did you mean hand_clapping? (0..10, a class name or all)"),
    ("right-hand-wav", "label 'right-hand-wav': no such class; did you mean right_hand_wave or left_hand_wave? "
                       "(0..10, a class name or all)"),
    ("air_drum", "label 'air_drum': no such class; did you mean air_drums? (0..10, a class name or all)"),
    ("11", "label '11': expected 0..10, a class name (hand_clapping, right_hand_wave, left_hand_wave, "
           "right_arm_clockwise, right_arm_counter_clockwise, left_arm_clockwise, left_arm_counter_clockwise, "
           "arm_roll, air_drums, air_guitar, other_gestures) or all"),
    ("waving", "label 'waving': expected 0..10"),
])
def test_dvsprep_show_label_typo_suggests_the_closest_names(tmp_path, label, message):
    res = CliRunner().invoke(dvsprep_main, ["show", str(tmp_path), "--label", label])
    assert usage_error(res).startswith(f"Error: Invalid value for '--label': {message}")
    assert list(tmp_path.iterdir()) == []
