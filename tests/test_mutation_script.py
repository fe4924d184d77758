"""scripts/mutation.py (`make mutation`): its clusters name files that exist, and --keep reuses a
cluster's copy (mutmut's results in it, its tests brought up to date, refused when the packages
changed) where a plain run makes it afresh. mutmut is not run."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def mutation(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mutation_script", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path / "mutation")
    return module


def test_every_cluster_names_modules_and_tests_that_exist(mutation):
    for name, (modules, tests) in mutation.CLUSTERS.items():
        for pattern in modules:
            assert sorted(ROOT.glob(pattern)), (name, pattern)
        for test in tests:
            path, _, node = test.partition("::")
            assert (ROOT / path).is_file(), (name, test)
            if node:    # a test function of that file, by name
                assert f"def {node}(" in (ROOT / path).read_text(), (name, test)


def test_keep_reuses_the_copy_and_a_plain_run_makes_it_afresh(mutation):
    work = mutation.prepare("atomic")
    assert work == mutation.OUT / "atomic" and (work / "dvsprep" / "atomic.py").is_file()
    toml = (work / "pyproject.toml").read_text()
    assert 'only_mutate = ["dvsprep/atomic.py"]' in toml
    assert 'pytest_add_cli_args_test_selection = ["tests/test_atomic.py", "tests/test_publishing.py"]' in toml
    (work / "mutants").mkdir()
    (work / "mutants" / "x.meta").write_text(json.dumps({"exit_code_by_key": {"m": 1}}))
    assert mutation.prepare("atomic", keep=True) == work
    assert (work / "mutants" / "x.meta").is_file() and (work / "pyproject.toml").read_text() == toml
    assert mutation.prepare("atomic") == work
    assert not (work / "mutants").exists() and (work / "pyproject.toml").read_text() == toml


def test_keep_brings_the_copys_tests_up_to_date(mutation):
    work = mutation.prepare("atomic")
    test = work / "tests" / "test_atomic.py"
    test.write_text("stale")
    (work / "tests" / "test_gone.py").write_text("stale")
    (work / "pyproject.toml").write_text("stale")
    (work / "mutants").mkdir()
    (work / "mutants" / "x.meta").write_text("{}")
    assert mutation.prepare("atomic", keep=True) == work
    assert test.read_bytes() == (ROOT / "tests" / "test_atomic.py").read_bytes()
    assert not (work / "tests" / "test_gone.py").exists() and (work / "mutants" / "x.meta").is_file()
    toml = (work / "pyproject.toml").read_text()
    assert toml.startswith((ROOT / "pyproject.toml").read_text()) and 'only_mutate = ["dvsprep/atomic.py"]' in toml


def test_keep_refuses_a_copy_of_other_code(mutation):
    """mutmut never remakes a mutant it has made: a copy of changed packages would test old mutants."""
    work = mutation.prepare("atomic")
    (work / "mutants").mkdir()
    (work / "mutants" / "x.meta").write_text("{}")
    source = work / "dvsg_train" / "engine.py"
    source.write_bytes(source.read_bytes() + b"\n")
    with pytest.raises(SystemExit) as exc:
        mutation.prepare("atomic", keep=True)
    assert str(exc.value) == (f"{work}: the packages changed since this copy was made, so its mutants are of "
                              "other code; run without --keep")
    assert (work / "mutants" / "x.meta").is_file()          # nothing removed
    (work / "dvsprep" / "extra.py").write_text("")
    source.write_bytes((ROOT / "dvsg_train" / "engine.py").read_bytes())
    with pytest.raises(SystemExit):                         # a file more is a change too
        mutation.prepare("atomic", keep=True)


def test_keep_without_a_copy_makes_one(mutation):
    work = mutation.prepare("neuron", keep=True)
    assert (work / "pyproject.toml").is_file() and (work / "dvsg_train" / "neuron.py").is_file()


def test_unknown_clusters_are_refused(mutation, capsys):
    with pytest.raises(SystemExit) as exc:
        mutation.main(["atomc"])
    assert exc.value.code == 2
    assert "unknown cluster atomc (one of: atomic, integrate," in capsys.readouterr().err


def test_only_passes_the_mutant_names_to_mutmut_run(mutation, monkeypatch):
    """The command mutmut gets and the result file (mutmut's run is replaced: it would take minutes;
    so is the reading of its records, which needs mutmut, not installed by `make test`)."""
    calls = []
    monkeypatch.setattr(mutation.subprocess, "call", lambda cmd, **kw: calls.append((cmd, kw)) or 0)
    monkeypatch.setattr(mutation, "_statuses", lambda work: {})
    result = mutation.run_cluster("neuron", 2, only=["dvsg_train.neuron.x_a__mutmut_*", "b"], keep=False)
    (cmd, kw), = calls
    assert cmd[1:] == ["-m", "mutmut", "run", "--max-children", "2", "dvsg_train.neuron.x_a__mutmut_*", "b"]
    assert kw["cwd"] == mutation.OUT / "neuron" and kw["env"]["OMP_NUM_THREADS"] == "1"
    assert (result["only"], result["kept"], result["counts"], result["survivors"]) == (
        ["dvsg_train.neuron.x_a__mutmut_*", "b"], False, {}, [])
    assert json.loads((mutation.OUT / "neuron" / "result.json").read_text())["only"] == result["only"]
    mutation.run_cluster("neuron", 1)
    assert calls[1][0][1:] == ["-m", "mutmut", "run", "--max-children", "1"]
