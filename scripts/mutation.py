#!/usr/bin/env python3
"""Mutation testing of the core modules with mutmut 3 (`make mutation`; not part of `make test`).

Each cluster mutates a few modules and runs only the test files that cover them: mutmut first
records which of those tests call which function, then runs each mutant against only the tests
that reach its function. Every cluster works in its own copy of the tree under
build/mutation/<cluster>/ (mutmut reads its settings from the pyproject.toml of the folder it runs
in, so each copy gets a [tool.mutmut] section of its own) and leaves there:
  result.json    killed / survived / no tests / timeout / ... counts, the survivors' names, seconds
  survivors.txt  each survivor's diff (`mutmut show`), to kill with a test or explain in tests/MUTANTS.md

Usage: scripts/mutation.py [CLUSTER ...] [--jobs N] [--only GLOB ...] [--keep] [--list]
  no CLUSTER: all of them (hours on 2 cores); --list prints the clusters and their files.
  --only GLOB: run only the mutants whose mutmut name matches (e.g. 'dvsg_train.engine.x_main__mutmut_*');
  --keep: keep the cluster's copy and the results of mutants already run (resume a stopped run, or
  finish one started with --only), with the tests brought up to date; refused when the packages
  changed since the copy was made. Without it the copy is made afresh.
Runs under `nice -n 19` when started by `make mutation`; needs the `mutation` extra (mutmut).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "mutation"

# cluster -> (modules mutated, test files run against them)
CLUSTERS: dict[str, tuple[list[str], list[str]]] = {
    # test_output_protocol runs every writer of both packages through atomic (minutes a mutant):
    # the unit tests of test_atomic.py must pin the protocol by themselves
    "atomic": (["dvsprep/atomic.py"], ["tests/test_atomic.py", "tests/test_publishing.py"]),
    "integrate": (["dvsprep/frames/integrate.py"], ["tests/test_framing.py", "tests/test_framing_edges.py"]),
    "frames_build": (["dvsprep/frames/build.py", "dvsprep/frames/check.py"],
                     ["tests/test_frames_build.py", "tests/test_frames_build_edges.py", "tests/test_frames_shards.py",
                      "tests/test_frames_meta_edges.py", "tests/test_writer_vouches.py",
                      "tests/test_frames_store.py", "tests/test_verify_fast.py",
                      "tests/test_hostile_stores.py", "tests/test_frames_schema.py",
                      "tests/test_frames_check_edges.py", "tests/test_frames_build_steps.py",
                      "tests/test_frames_layout_edges.py"]),
    "aedat": (["dvsprep/raw/aedat.py"], ["tests/test_aedat.py", "tests/test_aedat_edges.py", "tests/test_fuzz_parsers.py"]),
    # (test_hostile_inputs.py whole takes ~20 s, mostly CLI runs that never open an archive: its
    # archive cases only, which pin safe_extract's refusals through the CLI)
    "release": (["dvsprep/raw/release.py"], ["tests/test_release.py", "tests/test_release_edges.py",
                                            "tests/test_release_archive_edges.py", "tests/test_fuzz_parsers.py",
                                            *(f"tests/test_hostile_inputs.py::{t}" for t in (
                                                "test_a_huge_declared_member_is_refused_before_extracting",
                                                "test_a_gnu_sparse_member_is_refused",
                                                "test_total_and_member_count_bounds",
                                                "test_members_outside_the_release_layout",
                                                "test_extraction_checks_free_space_first"))]),
    "integrity": (["dvsprep/integrity/manifest.py", "dvsprep/integrity/trust.py"],
                  ["tests/test_container.py", "tests/test_frames_store.py", "tests/test_writer_vouches.py",
                   "tests/test_hostile_stores.py", "tests/test_verify.py", "tests/test_verify_fast.py",
                   "tests/test_integrity_edges.py"]),
    "neuron": (["dvsg_train/neuron.py"], ["tests/test_train_neuron.py"]),
    "model": (["dvsg_train/model.py"], ["tests/test_train_model.py", "tests/test_train_bookkeeping.py",
                                        "tests/test_network_equivalence.py", "tests/test_train_model_edges.py"]),
    # Nearly every function here is reached by the whole-run tests, so with all of them listed a
    # survivor ran them all (53 s of test calls, about a minute with their fixtures: most of a day
    # for the cluster on 2 cores). The fast exact-value files pin the steps one by one; of the
    # whole runs only one resume and the cheapest runs stay (test_train_resume's resume variants
    # are for survivors, run by hand).
    "engine_data": (["dvsg_train/engine.py", "dvsg_train/data.py"],
                    ["tests/test_train_bookkeeping.py", "tests/test_train_data.py", "tests/test_train_data_edges.py",
                     "tests/test_train_engine_edges.py", "tests/test_train_eval_edges.py",
                     "tests/test_train_run_steps.py", "tests/test_train_epoch_loop.py",
                     *(f"tests/test_train_engine.py::{t}" for t in (
                         "test_resume_reproduces_uninterrupted_run", "test_amp_bf16_one_optimizer_step_per_batch",
                         "test_validation_selects_checkpoint_and_reports_accuracy_b",
                         "test_threads_are_set_for_the_run_and_restored", "test_amp_on_a_cpu_without_bf16_warns_once",
                         "test_cpu_bf16_detection_reads_cpuinfo")),
                     *(f"tests/test_train_resume.py::{t}" for t in (
                         "test_resume_accepts_options_that_keep_the_numbers",
                         "test_resume_options_that_conflict_are_refused",
                         "test_resume_under_torchrun_splits_the_saved_global_batch",
                         "test_run_folder_is_locked_while_training"))]),
    "checkpoint": (["dvsg_train/checkpoint.py"],
                   ["tests/test_train_checkpoint.py", "tests/test_train_checkpoint_format.py",
                    "tests/test_hostile_checkpoints.py", "tests/test_train_checkpoint_edges.py"]),
    "export": (["dvsg_train/export/*.py"], ["tests/test_export_nir.py", "tests/test_export_spikingjelly.py",
                                           "tests/test_export_edges.py",
                                           "tests/test_export_nir_nodes.py", "tests/test_export_nir_graph.py",
                                           "tests/test_export_writer_edges.py"]),
    "remote": (["dvsprep/frames/remote.py"], ["tests/test_remote.py", "tests/test_remote_guarantees.py",
                                              "tests/test_remote_edges.py", "tests/test_remote_fetch_edges.py"]),
}
# Tests of the repository's own layout that a mutmut copy cannot pass: mutmut copies the
# dvsprep/data symlink as a folder.
DESELECT = ["tests/test_release.py::test_the_published_manifest_lives_once_in_data_manifests"]
# What a copy needs: the packages, the tests and what tests read (scripts, README, manifests).
COPY = ["dvsprep", "dvsg_train", "tests", "scripts", "benchmarks", "data_manifests", "README.md", "Makefile",
        "pyproject.toml"]


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _sources(tree: Path) -> dict[str, bytes]:
    """Every Python file of the packages under ``tree``, by path: what the mutants were made from."""
    return {str(p.relative_to(tree)): p.read_bytes() for pkg in ("dvsprep", "dvsg_train")
            for p in sorted((tree / pkg).rglob("*.py")) if "__pycache__" not in p.parts}


def _copy(work: Path, items: list[str]) -> None:
    for item in items:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, work / item, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
        else:
            shutil.copy2(src, work / item)


def _write_pyproject(work: Path, name: str) -> None:
    """The project's pyproject.toml plus a [tool.mutmut] section for the cluster (mutmut copies it
    into mutants/ at the start of every run, with tests/)."""
    modules, tests = CLUSTERS[name]
    extra = (f"\n[tool.mutmut]\nsource_paths = [\"dvsprep\", \"dvsg_train\"]\n"
             f"only_mutate = {_toml_list(modules)}\n"
             f"also_copy = {_toml_list(['dvsprep/data'] + [c for c in COPY if c not in ('dvsprep', 'dvsg_train', 'tests')])}\n"
             f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
             # no .pytest_cache shared by mutmut's parallel workers
             f"pytest_add_cli_args = {_toml_list(['-p', 'no:cacheprovider'] + [a for d in DESELECT for a in ('--deselect', d)])}\n")
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + extra)


def prepare(name: str, keep: bool = False) -> Path:
    """A fresh copy of the tree for one cluster, its pyproject.toml naming what to mutate.

    keep: an existing copy keeps mutmut's results (mutants it has run are not run again unless
    named with --only); its tests and test list are brought up to date, and it is refused
    (SystemExit) when the packages changed since it was made: mutmut never remakes a mutant."""
    work = OUT / name
    if keep and (work / "pyproject.toml").exists():
        if _sources(work) != _sources(ROOT):
            raise SystemExit(f"{work}: the packages changed since this copy was made, so its mutants "
                             f"are of other code; run without --keep")
        shutil.rmtree(work / "tests")
        _copy(work, ["tests"])
        _write_pyproject(work, name)
        return work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    _copy(work, COPY)
    _write_pyproject(work, name)
    return work


def _statuses(work: Path) -> dict[str, str]:
    """Every mutant's status from mutmut's .meta files (exit codes read as mutmut reads them)."""
    from mutmut.stats import status_by_exit_code  # mutmut's own reading of its exit codes

    out: dict[str, str] = {}
    for meta in sorted((work / "mutants").rglob("*.meta")):
        for key, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items():
            out[key] = status_by_exit_code[code]
    return out


def run_cluster(name: str, jobs: int, only: list[str] | None = None, keep: bool = False) -> dict:
    work = prepare(name, keep)
    t0 = time.monotonic()
    # One OpenMP thread: mutmut forks each mutant from a process that has run torch, and a forked
    # child that uses an OpenMP pool started by its parent waits on it forever (every export
    # mutant "timed out" so); the children run --jobs at a time anyway.
    env = {**os.environ, "PYTHONPATH": "", "DVSPREP_HYPOTHESIS": "ci", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    mutmut = [sys.executable, "-m", "mutmut"]
    with open(work / "mutmut.log", "w") as log:
        rc = subprocess.call([*mutmut, "run", "--max-children", str(jobs), *(only or [])], cwd=work, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    seconds = round(time.monotonic() - t0)
    statuses = _statuses(work)
    survivors = sorted(k for k, v in statuses.items() if v == "survived")
    with open(work / "survivors.txt", "w") as f:
        for s in survivors:
            shown = subprocess.run([*mutmut, "show", s], cwd=work, env=env, capture_output=True, text=True)
            f.write(f"### {s}\n{shown.stdout}\n")
    # with --keep the counts are the copy's, every run of it together; seconds is this run's
    result = {"cluster": name, "modules": CLUSTERS[name][0], "tests": CLUSTERS[name][1], "mutmut_exit": rc,
              "only": only or [], "kept": keep,
              "seconds": seconds, "counts": dict(Counter(statuses.values())), "survivors": survivors}
    (work / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clusters", nargs="*", help=f"some of: {', '.join(CLUSTERS)} (default: all)")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--only", action="append", metavar="GLOB", help="run only the mutants matching (mutmut names)")
    ap.add_argument("--keep", action="store_true", help="resume in the cluster's existing copy")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    unknown = [c for c in args.clusters if c not in CLUSTERS]
    if unknown:
        ap.error(f"unknown cluster {', '.join(unknown)} (one of: {', '.join(CLUSTERS)})")
    if args.list:
        for name, (mods, tests) in CLUSTERS.items():
            print(f"{name}: {' '.join(mods)}  <-  {' '.join(tests)}")
        return 0
    for name in args.clusters or list(CLUSTERS):
        r = run_cluster(name, args.jobs, args.only, args.keep)
        c = r["counts"]
        print(f"{name}: killed {c.get('killed', 0)}, survived {c.get('survived', 0)}, "
              f"no tests {c.get('no tests', 0)}, timeout {c.get('timeout', 0)}, other "
              f"{sum(v for k, v in c.items() if k not in ('killed', 'survived', 'no tests', 'timeout'))} "
              f"in {r['seconds']} s (mutmut exit {r['mutmut_exit']}; build/mutation/{name}/)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
