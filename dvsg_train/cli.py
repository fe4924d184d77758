"""`dvsg-train` and `dvsg-eval`: thin click layers that build a TrainConfig / call the engine.

Library errors become one line on stderr and exit 1 (click's usage errors exit 2); --debug
shows the traceback instead. Under torchrun only rank 0 prints: epoch lines, the summary, info
logs and errors that every rank agreed on (other ranks log warnings and their own errors).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

from dvsprep.errors import DvsprepError
from dvsprep.interrupts import stop_signals

from .config import AMP_DTYPES, DEFAULTS, NETS, NEURONS, OPTIMIZERS, PRELOAD, SCHEDULERS, TrainConfig, check_field
from .errors import ConfigError, TrainError
from .launch_env import FAILED_RANK_ATTR, env_rank
from .presets import PRESETS

log = logging.getLogger("dvsg_train")

AGREED_EXIT_DELAY_S = 5.0


def _rank() -> int:
    try:
        return env_rank()
    except TrainError:
        return 0


def _setup_logging(verbose: bool) -> None:
    rank = _rank()
    logging.basicConfig(level=logging.INFO if verbose and rank == 0 else logging.WARNING,
                        format="%(levelname)s: %(message)s" if rank == 0 else f"rank {rank}: %(levelname)s: %(message)s",
                        stream=sys.stderr)


def _one_line_errors(fn):
    """Turn library (and OS) errors into `error: ...` on stderr and exit 1, unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            with stop_signals():   # Ctrl-C and SIGTERM stop it at any moment, once
                return fn(*args, **kwargs)
        except (TrainError, DvsprepError, OSError) as exc:
            if debug or (isinstance(exc, BrokenPipeError) and not isinstance(exc, (TrainError, DvsprepError))):
                raise  # a closed stdout (`| head`): click's main() exits 1 without a word
            if _rank() != 0 and getattr(exc, FAILED_RANK_ATTR, None) is not None:
                # every rank raised it and rank 0 says it once; wait a little so that rank 0
                # exits first (torchrun stops the other ranks as soon as one exits)
                time.sleep(AGREED_EXIT_DELAY_S)
                sys.exit(1)
            if isinstance(exc, OSError) and not isinstance(exc, (TrainError, DvsprepError)):
                where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
                msg = f"{where}{exc.strerror or exc}"
            else:
                msg = str(exc)
            rank = _rank()
            click.echo(f"{f'rank {rank}: ' if rank else ''}error: {msg}", err=True)
            sys.exit(1)

    return wrapper


_CHOICE = functools.partial(click.Choice, case_sensitive=False)


def _checked(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Option callback: TrainConfig's own rule for the field (config.check_field) as a usage error."""
    try:
        check_field(_FIELD.get(param.name, param.name), value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


# dvsg-train's options that set a TrainConfig field of another name
_FIELD = {"t_max": "T_max"}
_NOT_FIELDS = ("quiet", "debug", "seeds")


def _field_option(*decls: str, **attrs: Any) -> Callable[[Callable], Callable]:
    """click.option whose default is that of the TrainConfig field it sets (config.DEFAULTS), so
    that dvsg-train and TrainConfig(...) start from the same values."""
    name = click.Option(list(decls)).name    # the parameter name click derives from the declarations
    return click.option(*decls, default=DEFAULTS[_FIELD.get(name, name)], **attrs)


def _augment_text(value: str) -> str:
    """--augment SPEC in its canonical form (names case-insensitive, as other choices); a bad SPEC
    is a usage error (exit 2)."""
    from .augment_spec import parse_augment
    from .errors import ConfigError

    try:
        return parse_augment(value.lower()).text()
    except ConfigError as exc:
        raise click.BadParameter(str(exc).removeprefix("--augment: ")) from None


def _explicit_options(ctx: click.Context) -> dict[str, Any]:
    """TrainConfig field -> value for every option typed on the command line (or set in the
    environment), as opposed to left at its default."""
    given = {}
    for name, value in ctx.params.items():
        if name in _NOT_FIELDS or ctx.get_parameter_source(name) not in (ParameterSource.COMMANDLINE,
                                                                        ParameterSource.ENVIRONMENT):
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, str) and name not in ("data", "run_name", "device", "data_fingerprint"):
            value = value.lower()
        given[_FIELD.get(name, name)] = value
    return given


def _train_config(ctx: click.Context) -> TrainConfig:
    """A fresh run: defaults < --preset < explicit options. --resume: the checkpoint's settings
    with the explicit options that do not change its numbers (see `resume_config`)."""
    from .launch_env import _env_int
    from .presets import apply_preset

    p = ctx.params
    given = _explicit_options(ctx)
    given["progress"] = sys.stderr.isatty()
    if p["init"] is not None and p["resume"] is not None:
        raise click.UsageError("--init starts a new run from a checkpoint's weights, --resume continues a run: "
                               "give one of them")
    if p["resume"] is not None:
        if p["force"]:
            raise click.UsageError("--force starts a run over and cannot be combined with --resume")
        from .checkpoint import resume_config   # torch: imported when work begins, not for a usage error
        return resume_config(p["resume"], given, world_size=max(1, _env_int("WORLD_SIZE", 1)))
    if p["data"] is None:
        raise click.UsageError("Missing option '--data' (needed unless --resume CKPT continues a run).")
    defaults = {_FIELD.get(k, k): (str(v) if isinstance(v, Path) else v.lower() if isinstance(v, str)
                                   and k in ("opt", "lr_scheduler", "net", "neuron", "preload") else v)
                for k, v in p.items() if k not in _NOT_FIELDS and _FIELD.get(k, k) not in given}
    if defaults.get("workers", 0) is None:
        del defaults["workers"]
    values = apply_preset(p["preset"], given, defaults)
    return TrainConfig(**values)


MAX_SEED = 2**64 - 1     # what torch.manual_seed takes


def _parse_seeds(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """--seeds 0,1,2 -> [0, 1, 2]: distinct integers in [0, 2**64 - 1]; anything else is one usage line."""
    if value is None:
        return None
    items = [s.strip() for s in value.split(",")]
    if not value.strip() or not all(items):
        raise click.BadParameter(f"{value!r} holds an empty seed; give integers separated by commas, e.g. 0,1,2")
    seeds: list[int] = []
    for item in items:
        if not re.fullmatch(r"[+-]?[0-9]+", item, re.ASCII):
            raise click.BadParameter(f"{item!r} is not an integer; give integers separated by commas, e.g. 0,1,2")
        seed = int(item)
        if seed < 0:
            raise click.BadParameter(f"seed {item} is negative; seeds are 0 to 2**64-1")
        if seed > MAX_SEED:
            raise click.BadParameter(f"seed {item} does not fit in 64 bits; seeds are 0 to 2**64-1")
        if seed in seeds:
            raise click.BadParameter(f"seed {seed} is given twice")
        seeds.append(seed)
    return seeds


def _check_seeds_options(ctx: click.Context) -> None:
    """--seeds excludes --seed, --resume and torchrun (usage errors)."""
    from .distributed import _env_int

    if ctx.get_parameter_source("seed") in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
        raise click.UsageError("--seeds runs one run per seed; it cannot be combined with --seed")
    if ctx.params["resume"] is not None:
        raise click.UsageError("--resume continues one run; it cannot be combined with --seeds "
                               "(resume each seed's run by its checkpoint)")
    if _env_int("WORLD_SIZE", 1) > 1:
        raise click.UsageError("--seeds runs in one process; under torchrun start one run per seed "
                               "(--seed N --run-name NAME_seedN, see the README)")


def _seed_runs(config: TrainConfig, seeds: list[int]) -> list[TrainConfig]:
    """--seeds: one config per seed, each in its sibling folder <run name>_seed<N>, checked before
    the first run starts (a folder that holds a run needs --force)."""
    from .data import resolve_store_path

    if config.data is not None:   # a mistyped --data first, before "already holds a run"
        resolve_store_path(config.data, config.T)
    base = config.run_name or config.default_run_name()
    configs = [dataclasses.replace(config, seed=s, run_name=f"{base}_seed{s}") for s in seeds]
    for c in configs:
        folder = Path(c.out_dir) / c.run_name
        if (folder / "checkpoint_latest.pt").exists() and not c.force:
            raise TrainError(f"{folder} already holds a run; start over with --force, or pick --run-name")
    return configs


def _echo_summary(summary: dict[str, Any]) -> None:
    click.echo(f"run: {summary['run_dir']}")
    click.echo(f"max test acc {summary['max_test_acc']:.4f}, final epoch ({summary['final_epoch']}) "
               f"test acc {summary['final_test_acc']:.4f}")
    if "test_acc_at_best_val" in summary:
        click.echo(f"best val acc {summary['best_val_acc']:.4f} at epoch {summary['best_val_epoch']}: "
                   f"test acc {summary['test_acc_at_best_val']:.4f} (accuracy-B)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", default=None, metavar="PATH|URL",
              help="Frame store (frames_T<T>_<split>.zarr, its .zip from dvsprep pack, or an http(s) URL "
                   "of either) or the DATA_ROOT holding frames_T<T>_number.zarr. With --resume: default "
                   "the checkpoint's store.")
@_field_option("--preset", type=click.Choice(sorted(PRESETS)),
               help="A whole recipe: seed (SpikingJelly's tutorial: T 16, 256 epochs, AMP, CUDA neurons), "
                    "seed-augment (the seed plus the published augmentations, label-aware mirror) or "
                    "plif (the PLIF paper: T 20, PLIF neurons, 1024 epochs). Options given explicitly win.")
@_field_option("-T", "T", type=click.IntRange(min=1), show_default=True, help="Time steps (frames per sample).")
@_field_option("-b", "batch_size", type=click.IntRange(min=1), show_default=True,
               help="Batch size per process (under torchrun the global batch is -b x WORLD_SIZE).")
@_field_option("--epochs", type=click.IntRange(min=1), show_default=True)
@click.option("-j", "workers", type=click.IntRange(min=0), default=None,
              help="DataLoader workers when not preloading (default: min(4, CPUs)).")
@_field_option("--threads", type=click.IntRange(min=0), show_default=True,
               help="torch CPU threads of this process (0: torch's default, one per core). 1 holds up "
                    "when the machine is shared and keeps results independent of the load; see the README.")
@_field_option("--channels", type=click.IntRange(min=1), show_default=True)
@_field_option("--out-dir", type=click.Path(path_type=Path), show_default=True)
@_field_option("--run-name", help="Run folder under --out-dir (default: T16_b16_adam_lr0.001_c128...).")
@_field_option("--resume", type=click.Path(path_type=Path),
               help="Continue the run of this checkpoint, in its folder, with its saved settings.")
@_field_option("--init", type=click.Path(path_type=Path),
               help="Start a new run from the weights of this checkpoint (dvsg-train's, or the SpikingJelly "
                    "tutorial's): fresh optimizer, epoch 0.")
@_field_option("--force", is_flag=True, help="Start over in a run folder that already holds a run.")
@_field_option("--amp/--no-amp", show_default=True,
               help="Automatic mixed precision (autocast around forward and loss); --no-amp overrides a preset.")
@_field_option("--amp-dtype", type=_CHOICE(AMP_DTYPES),
               help="fp16 with a GradScaler or bf16 without (default: fp16 on CUDA, bf16 on CPU).")
@_field_option("--cupy/--no-cupy", show_default=True,
               help="CUDA neuron kernels (needs pip install 'dvsgesture-kit[cuda]'). Presets use them when "
                    "the run is on CUDA with CuPy installed; --no-cupy turns that off.")
@_field_option("--opt", type=_CHOICE(OPTIMIZERS), show_default=True)
@_field_option("--lr", type=float, show_default=True, callback=_checked)
@_field_option("--momentum", type=float, show_default=True, help="SGD momentum.", callback=_checked)
@_field_option("--lr-scheduler", type=_CHOICE(SCHEDULERS), show_default=True)
@_field_option("--step-size", type=click.IntRange(min=1), show_default=True, help="StepLR step (epochs).")
@_field_option("--gamma", type=float, show_default=True, help="StepLR factor.", callback=_checked)
@_field_option("--T-max", "t_max", type=click.IntRange(min=1), help="CosALR period in epochs (default: --epochs).")
@_field_option("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present).", callback=_checked)
@_field_option("--seed", type=int, show_default=True, callback=_checked)
@click.option("--seeds", metavar="N,N,...", default=None, callback=_parse_seeds,
              help="One run per seed (e.g. 0,1,2), one after another, into sibling folders <run name>_seed<N>; "
                   "then the dvsg-report table of them (mean +- std over the seeds). Not with --seed, --resume.")
@_field_option("--net", type=_CHOICE(NETS), show_default=True)
@_field_option("--neuron", type=_CHOICE(NEURONS), show_default=True)
@_field_option("--preload", type=_CHOICE(PRELOAD), show_default=True,
               help="Hold the store in memory (auto: when it fits, on the GPU first).")
@_field_option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), show_default=True,
               help="Hold out this share of train for model selection (PLIF paper's accuracy-B).")
@_field_option("--sync-bn", is_flag=True,
               help="Under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm).")
@_field_option("--data-fingerprint", metavar="SHA256",
               help="Refuse to train unless the store's fingerprint is this (or starts with it, >= 12 hex digits).")
@_field_option("--augment", metavar="SPEC", callback=lambda ctx, param, value: _augment_text(value),
               help="Training augmentations on the device, e.g. mirror,translate=5,rotate=30,drop=0.1,"
                    "mixup=0.5,smooth=0.1 (mirror relabels left/right gestures; see the README). "
                    "Evaluation never augments.")
@click.option("-q", "--quiet", is_flag=True, help="Only the per-epoch lines and errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="dvsgesture-kit")
@_one_line_errors
def train_main(quiet: bool, debug: bool, seeds: list[int] | None, **options: Any) -> None:
    """Train the PLIF-paper network on a dvsprep frame store.

    Reproduce SpikingJelly's tutorial: dvsg-train --data DATA_ROOT --preset seed.
    Continue a run: dvsg-train --resume logs/RUN/checkpoint_latest.pt [--epochs N].

    Several seeds of one recipe: dvsg-train --data DATA_ROOT --seeds 0,1,2.

    Several GPUs or machines: start it with torchrun, e.g.
    torchrun --nproc-per-node 8 -m dvsg_train --data STORE -b 16 (global batch 128).
    """
    from .report import epoch_line

    _setup_logging(not quiet)
    main_rank = _rank() == 0
    ctx = click.get_current_context()
    if seeds is not None:
        _check_seeds_options(ctx)
    config = _train_config(ctx)
    from .engine import main   # torch: imported when work begins, after the usage errors
    if seeds is None:
        summary = main(config, on_epoch=lambda r: click.echo(epoch_line(r)))
        if summary["epochs"] and main_rank:
            _echo_summary(summary)
        return
    from .compare import read_runs, report_text

    configs = _seed_runs(config, seeds)
    folders = []
    for i, c in enumerate(configs, 1):
        folder = Path(c.out_dir) / c.run_name
        click.echo(f"seed {c.seed} (run {i} of {len(configs)}): {folder}")
        summary = main(c, on_epoch=lambda r: click.echo(epoch_line(r)))
        if summary["epochs"]:
            _echo_summary(summary)
        folders.append(folder)
    click.echo("")
    click.echo(report_text(read_runs(folders)))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="A dvsg-train checkpoint (.pt).")
@click.option("--data", required=True, metavar="PATH|URL", help="Frame store (directory, .zip or URL) or DATA_ROOT.")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--device", default=None, help="Default: cuda when present.", callback=_checked)
@click.option("-b", "batch_size", type=click.IntRange(min=1), default=None, help="Default: the checkpoint's.")
@click.option("-j", "workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--preload", type=_CHOICE(PRELOAD), default="auto", show_default=True)
@click.option("--png", type=click.Path(path_type=Path), default=None,
              help="Confusion matrix PNG (default: confusion_<split>.png next to the checkpoint).")
@click.option("--force", is_flag=True, help="Replace an existing --png file.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@_one_line_errors
def eval_main(checkpoint, data, split, device, batch_size, workers, preload, png, force, debug) -> None:
    """Accuracy, per-class accuracy and confusion matrix of a checkpoint on a frame store."""
    from dvsprep.atomic import publishing
    from dvsprep.resources import disk_full

    from .data import store_inputs
    from .engine import evaluate_checkpoint
    from .report import check_output_file, confusion_text, write_confusion_png

    _setup_logging(False)
    png = png or checkpoint.with_name(f"confusion_{split}.png")
    check_output_file(png)              # before the work, naming the user's path
    # the PNG is locked for the whole evaluation (a second dvsg-eval onto it refuses at once),
    # never replaces a file without --force, and never lands on or in the checkpoint or store
    with publishing(png, "confusion matrix", force=force, inputs=[checkpoint, *store_inputs(data)]) as tmp:
        r = evaluate_checkpoint(str(checkpoint), str(data), split=split, device=device,
                                batch_size=batch_size, workers=workers, preload=preload.lower())
        correct = int(r["confusion"].trace())
        epoch = "" if r["epoch"] is None else f" (epoch {r['epoch']})"
        click.echo(f"{checkpoint}{epoch} on {split} of {data}: accuracy {r['acc']:.4f} "
                   f"({correct}/{r['samples']}), loss {r['loss']:.4f}")
        click.echo(confusion_text(r["confusion"]))
        try:
            write_confusion_png(tmp, r["confusion"], f"{checkpoint.name} on {split}: accuracy {r['acc']:.4f}")
        except OSError as exc:
            if disk_full(exc):
                raise               # the protocol's one line, naming the PNG
            raise TrainError(f"{png}: cannot write the confusion matrix ({exc.strerror or exc})") from exc
    click.echo(f"confusion matrix written to {png}")


# --- dvsg-export ---------------------------------------------------------------------------

def _checked_dt(value: float) -> float:
    from .config import check_dt

    try:
        return check_dt(value)
    except TrainError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="File to write (model.nir, net.pth).")
@click.option("--format", "fmt", type=_CHOICE(["nir", "spikingjelly"]), default="nir", show_default=True,
              help="nir: the eval-mode network as an exact NIR graph (needs pip install "
                   "'dvsgesture-kit[nir]'); spikingjelly: a state dict for SpikingJelly's "
                   "DVSGestureNet(channels=128).")
@click.option("--dt", type=float, default=1e-4, show_default=True, callback=lambda c, p, v: _checked_dt(v),
              help="NIR: seconds per time step; SpikingJelly's import_from_nir must be given the same dt "
                   "(1e-4 is its default).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@_one_line_errors
def export_main(checkpoint, output, fmt, dt, force, debug) -> None:
    """Export the network of CHECKPOINT (dvsg-train's, or the SpikingJelly tutorial's) to NIR or
    to a SpikingJelly state dict."""
    from .export import export_checkpoint

    _setup_logging(False)
    info = export_checkpoint(checkpoint, output, fmt.lower(), dt=dt, force=force)
    what = f"channels {info['channels']}, {info['neuron'].upper()}"
    if fmt.lower() == "nir":
        click.echo(f"wrote {output}: NIR graph ({what}), dt {dt:g} s; in SpikingJelly: "
                   f"import_from_nir({str(output)!r}, dt={dt:g}); output = mean over T of its votes")
    else:
        neuron = "neuron.ParametricLIFNode" if info["neuron"] == "plif" else "neuron.LIFNode"
        tau = f", tau={info['tau']!r}" if info["neuron"] == "lif" and info["tau"] != 2.0 else ""
        click.echo(f"wrote {output}: state dict for DVSGestureNet(channels=128, spiking_neuron={neuron}{tau}, "
                   f"surrogate_function=surrogate.ATan(), detach_reset=True), load_state_dict(strict=True)")


# --- dvsg-report ---------------------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Also draw every run's test accuracy and loss curves into this PNG.")
@click.option("--force", is_flag=True, help="Replace an existing -o file.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@_one_line_errors
def report_main(run_dirs, output, force, debug) -> None:
    """Compare runs: one row per RUN_DIR (the settings that differ between the runs, max and final
    test accuracy, test accuracy at the best validation epoch, seconds per epoch), then mean +- std
    over the runs that differ only in their seed. Reads each run's config.json and metrics.jsonl."""
    from dvsprep.atomic import check_output

    from .compare import read_runs, report_text, run_files, write_report_png
    from .report import check_output_file

    _setup_logging(False)
    if output is not None:      # refused before any work: a missing folder, an existing file, a run's own file
        check_output_file(output)
        check_output(output, "report", force=force, inputs=run_files(run_dirs))
    runs = read_runs(run_dirs)
    text = report_text(runs)
    if output is not None:
        write_report_png(output, runs, force=force)
    click.echo(text)
    if output is not None:
        click.echo(f"curves written to {output}")
