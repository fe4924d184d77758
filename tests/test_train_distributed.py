"""dvsg_train.distributed: DDP over 2 CPU processes (gloo) equals one process with the global batch.

The 2-process runs go through `engine.main` exactly as torchrun starts it (rank, world and
rendezvous from the environment); one more goes through `torchrun -m dvsg_train` itself.
"""
from __future__ import annotations

import http.server
import json
import multiprocessing
import os
import socket
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

import dvsg_train.engine as engine
from dvsg_train import distributed
from dvsg_train.checkpoint import check_resume, load_checkpoint
from dvsg_train.cli import eval_main
from dvsg_train.config import TrainConfig
from dvsg_train.data import Batches, batch_order, n_batches
from dvsg_train.errors import ConfigError, ConfigMismatchError
from dvsg_train.model import SequenceDropout
from dvsprep.frames.store import open_frame_store

from train_fixtures import make_learnable_store

N_TRAIN, N_TEST, B, WORLD, SEED = 26, 11, 3, 2, 3


# ----------------------------------------------------------------------------- without processes

def test_ranks_split_each_global_batch_without_padding():
    for n, b, world, drop_last in [(26, 3, 2, True), (11, 3, 2, False), (7, 2, 3, False), (2, 4, 3, False)]:
        single = batch_order(n, b * world, True, drop_last, torch.Generator().manual_seed(5))
        shares = [batch_order(n, b, True, drop_last, torch.Generator().manual_seed(5), r, world)
                  for r in range(world)]
        for r in range(world):
            assert len(shares[r]) == n_batches(n, b, drop_last, r, world)
        # rank r's k-th batch is its contiguous part of the single-process k-th batch of b * world
        for k, whole in enumerate(single):
            parts = [s[k] for s in shares if k < len(s) and len(whole) > 0]
            got = torch.cat([p for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
            assert torch.equal(got, whole), (n, b, world, k)
            if len(whole) == b * world:
                assert all(len(p) == b for p in parts)          # full batches: equal shares
        seen = torch.cat([torch.cat(s) for s in shares if s])
        assert len(seen) == len(set(seen.tolist()))             # disjoint: nothing padded or repeated
        assert len(seen) == (n - n % (b * world) if drop_last else n)
    assert n_batches(2, 4, False, 2, 3) == 0                    # rank 2 gets nothing of 2 samples


def test_batches_take_the_rank_share():
    labels = torch.arange(11)
    frames = torch.arange(11).view(11, 1, 1, 1, 1).to(torch.uint8)
    got = [torch.cat([f.flatten() for f, _ in Batches(labels, 3, shuffle=False, drop_last=False,
                                                      frames=frames, rank=r, world_size=2)])
           for r in range(2)]
    assert got[0].tolist() == [0, 1, 2, 6, 7, 8] and got[1].tolist() == [3, 4, 5, 9, 10]
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        Batches(labels, 3, shuffle=False, drop_last=False, frames=frames, rank=2, world_size=2)


def test_resume_compares_the_global_batch(tmp_path):
    one = TrainConfig(data="x", batch_size=6, world_size=1)
    two = TrainConfig(data="x", batch_size=3, world_size=2)
    assert one.resume_key() == two.resume_key()
    assert two.default_run_name() == one.default_run_name() == "T16_b6_adam_lr0.001_c128"
    ckpt = {"config": two.to_dict()}
    check_resume(ckpt, "ck.pt", one)
    with pytest.raises(ConfigMismatchError, match="global_batch_size 6 vs 12"):
        check_resume(ckpt, "ck.pt", TrainConfig(data="x", batch_size=6, world_size=2))
    with pytest.raises(ConfigError, match="data_fingerprint must be 12 to 64 hex digits"):
        TrainConfig(data="x", data_fingerprint="abc")


def test_environment_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT not set"):
        distributed.setup("cpu")
    with pytest.raises(ConfigError, match="pass --device cuda"):
        distributed.setup("cuda:1")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ConfigError, match="inconsistent"):
        distributed.setup("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    env = distributed.setup("cpu")
    assert not env.enabled and env.is_main and env.device == torch.device("cpu")


def test_rank_seeds_differ_and_repeat():
    seeds = {distributed.rank_seed(0, e, r) for e in range(3) for r in range(4)}
    assert len(seeds) == 12 and distributed.rank_seed(0, 1, 2) == distributed.rank_seed(0, 1, 2)


# ----------------------------------------------------------------------------- 2 processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hash_weights(numel: int) -> torch.Tensor:
    return torch.randint(0, 1 << 20, (numel,), generator=torch.Generator().manual_seed(0))


def sample_hashes(frames: torch.Tensor) -> list[int]:
    """An exact integer fingerprint per sample of integer frames [B, ...]."""
    flat = frames.reshape(len(frames), -1).long()
    return (flat * _hash_weights(flat.shape[1])).sum(1).tolist()


def _without_dropout(build):
    """build_model with dropout off. Only for comparing 2 ranks with 1 process: each rank draws its
    own masks from `rank_seed` (seed, epoch, rank), which one process drawing one stream for the
    whole global batch cannot reproduce. Dropout under DDP is pinned by the dropout tests below."""
    def wrapped(*args, **kwargs):
        model = build(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, SequenceDropout):
                m.p = 0.0
        return model
    return wrapped


def _join_as_rank(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives a rank (engine.main joins the group from it)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def _rank_worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    """One torchrun-like rank: environment, then engine.main; records which samples it fed."""
    _join_as_rank(rank, world, port)
    seen: list[tuple[str, list[int]]] = []
    phase = ["train"]
    real_input, real_train, real_eval = engine.to_network_input, engine.train_one_epoch, engine.evaluate

    def record_input(frames, labels, device):
        seen.append((phase[0], sample_hashes(frames)))
        return real_input(frames, labels, device)

    def train(*a, **k):
        phase[0] = "train"
        return real_train(*a, **k)

    def evaluate(*a, **k):
        phase[0] = "eval"
        return real_eval(*a, **k)

    engine.to_network_input, engine.train_one_epoch, engine.evaluate = record_input, train, evaluate
    engine.build_model = _without_dropout(engine.build_model)
    summary = engine.main(TrainConfig(**cfg))
    torch.save({"seen": seen, "summary": summary}, f"{out}/rank{rank}.pt")


def run_ranks(tmp_path, cfg: dict, tag: str, worker=_rank_worker, extra: tuple = ()) -> list[dict]:
    """Start WORLD ranks of ``worker`` and return what each saved in rank{r}.pt."""
    out = tmp_path / f"seen_{tag}"
    out.mkdir()
    # from a fork server that imported torch and the trainer once: each rank then starts in
    # milliseconds instead of paying torch's import (~3 s of CPU) again
    multiprocessing.set_forkserver_preload(["torch", "dvsg_train.engine", __name__])
    mp.start_processes(worker, args=(WORLD, _free_port(), cfg, str(out), *extra), nprocs=WORLD, join=True,
                       start_method="forkserver")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "frames_T2_number.zarr"
    make_learnable_store(path, T=2, n_train=N_TRAIN, n_test=N_TEST, seed=7)
    return path


def cfg(store, out, **kw) -> dict:
    base = dict(data=str(store), out_dir=str(out), T=2, batch_size=B * WORLD, epochs=1, channels=4,
                opt="sgd", lr=0.2, lr_scheduler="none", device="cpu", workers=0, seed=SEED,
                sync_bn=True, preload="cpu")
    base.update(kw)
    return base


def weights(summary) -> dict:
    return load_checkpoint(f"{summary['run_dir']}/checkpoint_latest.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-6), \
            (k, (a[k].double() - b[k].double()).abs().max().item())


def test_two_ranks_equal_one_process_with_the_global_batch(store, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "build_model", _without_dropout(engine.build_model))
    # one process, -b 6: epoch 0, then resumed to epoch 1
    r1 = engine.main(TrainConfig(**cfg(store, tmp_path / "single")))
    # a resumed run continues in its checkpoint's folder: continue copies, keep r1 at epoch 0
    for copy in ("single2", "single3"):
        shutil.copytree(r1["run_dir"], tmp_path / copy)
    r2 = engine.main(TrainConfig(**cfg(store, tmp_path / "single2", epochs=2,
                                       resume=f"{tmp_path / 'single2'}/checkpoint_latest.pt")))
    ref1, ref2 = load_checkpoint(f"{r1['run_dir']}/checkpoint_latest.pt"), weights(r2)

    # two processes, -b 3 each, SyncBatchNorm, dropout off: epoch 0
    ranks = run_ranks(tmp_path, cfg(store, tmp_path / "ddp", batch_size=B), "fresh")
    d1 = ranks[0]["summary"]
    assert ranks[1]["summary"] == d1 and d1["run_dir"].endswith("T2_b6_sgd_lr0.2_c4_syncbn")
    ck = load_checkpoint(f"{d1['run_dir']}/checkpoint_latest.pt")
    assert ck["config"]["world_size"] == 2 and ck["config"]["batch_size"] == B
    assert_same_weights(ck["model"], ref1["model"])
    got, want = ck["history"][0], ref1["history"][0]
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
    assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)
    assert got["test_acc"] == want["test_acc"] and got["train_acc"] == want["train_acc"]
    assert len((tmp_path / "ddp" / "T2_b6_sgd_lr0.2_c4_syncbn" / "metrics.jsonl").read_text().splitlines()) == 1

    # which samples each rank fed: its share of every global batch of the single-process order
    train_sp, test_sp = (open_frame_store(store).split(s) for s in ("train", "test"))
    index_of = {h: i for i, h in enumerate(sample_hashes(torch.from_numpy(train_sp.load_all())))}
    test_index = {h: i for i, h in enumerate(sample_hashes(torch.from_numpy(test_sp.load_all())))}
    assert len(index_of) == N_TRAIN and len(test_index) == N_TEST
    order = batch_order(N_TRAIN, B * WORLD, True, True, torch.Generator().manual_seed(SEED))
    per_rank = [[[index_of[h] for h in hs] for p, hs in r["seen"] if p == "train"] for r in ranks]
    assert [len(p) for p in per_rank] == [len(order)] * WORLD == [N_TRAIN // (B * WORLD)] * WORLD
    for k, batch in enumerate(order):
        assert per_rank[0][k] + per_rank[1][k] == batch.tolist()
        assert len(per_rank[0][k]) == len(per_rank[1][k]) == B
    evaluated = [[test_index[h] for p, hs in r["seen"] if p == "eval" for h in hs] for r in ranks]
    assert sorted(evaluated[0] + evaluated[1]) == list(range(N_TEST))   # each test sample once
    assert len(evaluated[0]) == 6 and len(evaluated[1]) == 5            # last batch of 5: 3 + 2

    # resume on another world size: 2 ranks continue the 1-process run (reading through the
    # DataLoader this time), 1 process continues the 2-rank run
    ranks = run_ranks(tmp_path, cfg(store, tmp_path / "ddp_resumed", batch_size=B, epochs=2, preload="none",
                                    resume=f"{tmp_path / 'single3'}/checkpoint_latest.pt"), "resumed")
    assert_same_weights(weights(ranks[0]["summary"]), ref2)
    d2 = engine.main(TrainConfig(**cfg(store, tmp_path / "ddp2", epochs=2,
                                       resume=f"{d1['run_dir']}/checkpoint_latest.pt")))
    assert_same_weights(weights(d2), ref2)
    hist = load_checkpoint(f"{d2['run_dir']}/checkpoint_latest.pt")["history"]
    assert [r["epoch"] for r in hist] == [0, 1]
    assert hist[1]["train_loss"] == pytest.approx(load_checkpoint(
        f"{r2['run_dir']}/checkpoint_latest.pt")["history"][1]["train_loss"], rel=1e-5)


def torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m dvsg_train ARGS`` on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", "dvsg_train",
           "-T", "2", "-b", str(B), "--epochs", "1", "--channels", "4", "-j", "0", "--device", "cpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture
def served(store):
    """The store's folder over http on 127.0.0.1: (base URL, list of requested paths)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(store.parent), **k)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    thread.join()


def test_torchrun_cli_counts_every_test_sample_once(store, served, tmp_path, monkeypatch):
    fp = open_frame_store(store).fingerprint
    runs = tmp_path / "runs"
    base, requests = served
    url = f"{base}/{store.name}/"
    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "cache"))
    # from a URL, on the step-by-step net (neuron state reset per rank and step) with PLIF, and
    # augmented (each rank its own draws; evaluation is not augmented, as dvsg-eval shows below)
    res = torchrun("--data", url, "--out-dir", str(runs), "--data-fingerprint", fp[:16],
                   "--sync-bn", "--net", "stepwise", "--neuron", "plif", "--augment", "mirror,translate=4,mixup=0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    # one machine, two ranks: every file of the store was downloaded exactly once
    files = json.loads((store / "manifest.json").read_text())["files"]
    assert len(requests) == len(files) + 1 and len(set(requests)) == len(requests)
    lines = res.stdout.splitlines()
    assert sum(l.startswith("epoch = 0, ") for l in lines) == 1           # rank 0 alone prints
    assert sum(l.startswith("max test acc") for l in lines) == 1
    assert "DDP over 2 processes: -b 3 per process, global batch 6, SyncBatchNorm" in res.stderr
    run = runs / "T2_b6_adam_lr0.001_c4_plif_stepwise_syncbn_aug-mirror-translate4-mixup0.5"
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["data_fingerprint"] == fp
    assert config["augment"] == "mirror,translate=4,mixup=0.5"
    test_acc = json.loads((run / "metrics.jsonl").read_text())["test_acc"]
    # one process evaluating the saved model finds the accuracy the two ranks reported together
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(run / "checkpoint_latest.pt"), "--data",
                                         url, "--device", "cpu", "--png", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    correct = int(res.output.split("(")[2].split("/")[0])
    assert f"/{N_TEST})" in res.output.splitlines()[0]
    assert test_acc == correct / N_TEST
    assert len(requests) == len(files) + 1                              # dvsg-eval used the cache


def test_torchrun_error_is_one_line_from_rank_0(store, tmp_path):
    res = torchrun("--data", str(store), "--out-dir", str(tmp_path / "runs"), "--data-fingerprint", "0" * 16)
    assert res.returncode != 0
    errors = [l for l in res.stderr.splitlines() if "error: " in l and "fingerprint" in l]
    assert len(errors) == 1 and errors[0].startswith("error: "), res.stderr[-3000:]
    assert "differs from the expected 0000000000000000" in errors[0]
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- 2 processes, dropout on

DROPOUT_LAYERS = (21, 24)                      # conv_fc indices of the two dropout layers
STEPS = N_TRAIN // (B * WORLD)                 # training steps per epoch: 4


def _dropout_rank_worker(rank: int, world: int, port: int, cfg: dict, out: str, snapshot: str) -> None:
    """One torchrun-like rank with dropout ON, recording: every mask F.dropout draws (model.py
    draws each mask as F.dropout of ones, so what it returns is the mask) and in which phase; per
    forward of a dropout layer its input, output, mode and the masks drawn meanwhile; this rank's
    parameters after every training step. ``snapshot``: copy the epoch-0 checkpoint there."""
    import torch.nn.functional as F

    _join_as_rank(rank, world, port)
    where = {"phase": "train", "epoch": -1, "step": 0}
    forwards: list[dict] = []
    params: list[tuple[int, int, dict]] = []
    draw_phases: list[str] = []
    drawn: list[torch.Tensor] = []
    real_dropout = F.dropout

    def recording_dropout(x, p=0.5, training=True, inplace=False):
        mask = real_dropout(x, p, training, inplace)
        drawn.append(mask.detach().clone())
        draw_phases.append(where["phase"])
        return mask

    F.dropout = recording_dropout          # this spawned process only

    def hooked(build):
        def wrapped(*args, **kwargs):
            model = build(*args, **kwargs)
            for i in DROPOUT_LAYERS:
                layer = model.conv_fc[i]
                assert isinstance(layer, SequenceDropout) and layer.p == 0.5
                layer.register_forward_pre_hook(lambda m, inp: drawn.clear())
                layer.register_forward_hook(lambda m, inp, y, i=i: forwards.append(dict(
                    where, layer=i, training=m.training, input=inp[0].detach().clone(),
                    output=y.detach().clone(), drawn=list(drawn))))
            return model
        return wrapped

    real_train, real_eval = engine.train_one_epoch, engine.evaluate

    def train(net, *a, **k):
        where.update(phase="train", epoch=k["epoch"], step=0)
        forecast = k.get("on_batch")

        def on_batch(step):
            params.append((k["epoch"], step, {n: p.detach().clone()
                                              for n, p in distributed.unwrap(net).named_parameters()}))
            where["step"] = step + 1
            if forecast is not None:
                forecast(step)
        return real_train(net, *a, **{**k, "on_batch": on_batch})

    def evaluate(*a, **k):
        where["phase"] = "eval"
        return real_eval(*a, **k)

    def on_epoch(record):                  # rank 0 alone, after it saved the epoch's checkpoint
        if snapshot and record["epoch"] == 0:
            (latest,) = Path(cfg["out_dir"]).glob("*/checkpoint_latest.pt")
            Path(snapshot).mkdir()
            shutil.copy(latest, snapshot)

    engine.build_model = hooked(engine.build_model)
    engine.train_one_epoch, engine.evaluate = train, evaluate
    summary = engine.main(TrainConfig(**cfg), on_epoch=on_epoch)
    torch.save({"summary": summary, "forwards": forwards, "params": params, "draw_phases": draw_phases},
               f"{out}/rank{rank}.pt")


NETS = ("multistep", "stepwise")


@pytest.fixture(scope="module")
def dropout_runs(store, tmp_path_factory) -> dict:
    """2 ranks with dropout on, 2 epochs straight, on each net ("multistep", "stepwise"), and the
    multi-step run resumed on 2 ranks from its epoch-0 checkpoint ("resumed"): per rank what
    `_dropout_rank_worker` recorded. No SyncBatchNorm: a rank whose evaluation ran in train mode
    would then wait at a collective the other never joins, instead of failing a test."""
    tmp = tmp_path_factory.mktemp("dropout")
    runs = {}
    for net in NETS:
        kw = dict(batch_size=B, epochs=2, net=net, sync_bn=False)
        snapshot = str(tmp / "cut") if net == "multistep" else ""
        runs[net] = run_ranks(tmp, cfg(store, tmp / net, **kw), net, _dropout_rank_worker, (snapshot,))
    runs["resumed"] = run_ranks(tmp, cfg(store, tmp / "multistep", resume=str(tmp / "cut" / "checkpoint_latest.pt"),
                                         batch_size=B, epochs=2, net="multistep", sync_bn=False),
                                "resumed", _dropout_rank_worker, ("",))
    return runs


def _calls(rec: dict, phase: str) -> dict[tuple[int, int, int], list[dict]]:
    """A rank's dropout-layer forwards of one phase by (epoch, step, layer): one call per batch
    on the multi-step net, one per time step on the stepwise net."""
    out: dict[tuple[int, int, int], list[dict]] = {}
    for f in rec["forwards"]:
        if f["phase"] == phase:
            out.setdefault((f["epoch"], f["step"], f["layer"]), []).append(f)
    return out


def _train_masks(rec: dict) -> dict[tuple[int, int, int], torch.Tensor]:
    """The one mask each dropout layer drew for each training step, by (epoch, step, layer)."""
    masks = {}
    for key, calls in _calls(rec, "train").items():
        drawn = [m for c in calls for m in c["drawn"]]
        assert len(drawn) == 1, (key, len(drawn))
        masks[key] = drawn[0]
    return masks


def test_ddp_dropout_one_mask_per_sample_for_all_time_steps(dropout_runs):
    for net in NETS:
        dropped = kept = 0
        for rank, rec in enumerate(dropout_runs[net]):
            calls = _calls(rec, "train")
            assert sorted(calls) == [(e, s, l) for e in range(2) for s in range(STEPS) for l in DROPOUT_LAYERS]
            for key, cs in calls.items():
                where = (net, rank, key)
                if net == "multistep":                      # one call on the whole sequence [T, B, F]
                    assert len(cs) == 1, where
                    x, y = cs[0]["input"], cs[0]["output"]
                else:                                       # one call per step [B, F]; drawn at the first
                    assert len(cs) == 2 and len(cs[0]["drawn"]) == 1 and cs[1]["drawn"] == [], where
                    x, y = torch.stack([c["input"] for c in cs]), torch.stack([c["output"] for c in cs])
                (m,) = [d for c in cs for d in c["drawn"]]
                assert x.shape[:2] == (2, B) and m.shape == x.shape[1:], where   # [B, F]: no time axis
                assert set(m.unique().tolist()) == {0.0, 2.0}, where   # kept: scaled by 1 / (1 - 0.5)
                assert torch.equal(y, x * m), where                    # the same mask at both steps
                assert len({tuple(row) for row in m.tolist()}) == B, where    # each sample its own
                dropped += int(((x != 0) & (m == 0)).sum())
                kept += int(((x != 0) & (m == 2)).sum())
        assert dropped > 0 and kept > 0, net     # spikes were both dropped and kept: the products bit


def test_ddp_ranks_draw_their_own_dropout_masks_each_epoch(dropout_runs):
    for net in NETS:
        m0, m1 = (_train_masks(rec) for rec in dropout_runs[net])
        assert m0.keys() == m1.keys() and len(m0) == 2 * STEPS * len(DROPOUT_LAYERS)
        for key in m0:
            assert m0[key].shape == m1[key].shape
            assert not torch.equal(m0[key], m1[key]), (net, key)       # not one stream on every rank
        for masks in (m0, m1):
            for s in range(STEPS):
                for l in DROPOUT_LAYERS:
                    assert not torch.equal(masks[(0, s, l)], masks[(1, s, l)]), (net, s, l)  # nor epoch


def test_ddp_dropout_keeps_parameters_identical_on_every_rank_after_every_step(dropout_runs):
    for name, epochs in (("multistep", [0, 1]), ("stepwise", [0, 1]), ("resumed", [1])):
        ranks = dropout_runs[name]
        p0, p1 = (rec["params"] for rec in ranks)
        assert [(e, s) for e, s, _ in p0] == [(e, s) for e, s, _ in p1] == \
            [(e, s) for e in epochs for s in range(STEPS)]
        for (e, s, a), (_, _, b) in zip(p0, p1):
            assert a.keys() == b.keys()
            for n in a:
                assert torch.equal(a[n], b[n]), (name, e, s, n)          # gradients were all-reduced
        for (_, _, before), (e, s, after) in zip(p0, p0[1:]):
            assert any(not torch.equal(before[n], after[n]) for n in after), (name, e, s)  # and applied
        assert ranks[0]["summary"] == ranks[1]["summary"]
        saved, last = weights(ranks[0]["summary"]), p0[-1][2]
        assert all(torch.equal(saved[n], last[n]) for n in last), name  # rank 0 saved what it trained


def test_ddp_evaluation_has_dropout_off_on_every_rank(dropout_runs):
    for net in NETS:
        per_step = 2 if net == "stepwise" else 1        # the stepwise net calls each layer per time step
        for rank, rec in enumerate(dropout_runs[net]):
            calls = [f for cs in _calls(rec, "eval").values() for f in cs]
            assert len(calls) == 2 * 2 * len(DROPOUT_LAYERS) * per_step, (net, rank)  # epochs x batches
            # the test split's 11 samples in global batches of 6: 3 + 3, then 3 + 2 per rank
            sizes = {f["input"].shape[0] if net == "stepwise" else f["input"].shape[1] for f in calls}
            assert sorted(sizes) == ([B - 1, B] if rank else [B]), (net, rank)
            for f in calls:
                assert not f["training"] and f["drawn"] == [], (net, rank, f["epoch"], f["layer"])
                assert torch.equal(f["output"], f["input"])
            assert "eval" not in rec["draw_phases"], (net, rank)     # nothing drawn in evaluation


def test_ddp_resume_with_dropout_is_bit_exact(dropout_runs):
    whole, resumed = dropout_runs["multistep"], dropout_runs["resumed"]
    for rank in range(WORLD):
        want, got = _train_masks(whole[rank]), _train_masks(resumed[rank])
        assert sorted(got) == sorted(k for k in want if k[0] == 1)
        for key in got:
            assert torch.equal(got[key], want[key]), (rank, key)     # the same masks, rank by rank
        after = [(e, s, p) for e, s, p in whole[rank]["params"] if e == 1]
        for (e, s, a), (_, _, b) in zip(after, resumed[rank]["params"], strict=True):
            assert all(torch.equal(a[n], b[n]) for n in a), (rank, e, s)
    a = load_checkpoint(f"{whole[0]['summary']['run_dir']}/checkpoint_latest.pt")
    b = load_checkpoint(f"{resumed[0]['summary']['run_dir']}/checkpoint_latest.pt")
    assert a["epoch"] == b["epoch"] == 1 and a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    clock = ("epoch_seconds", "train_samples_per_s")
    assert [{k: v for k, v in r.items() if k not in clock} for r in a["history"]] == \
        [{k: v for k, v in r.items() if k not in clock} for r in b["history"]]
