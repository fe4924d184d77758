"""`dvsprep` command line: a thin layer that turns library exceptions into one-line errors."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from .errors import DvsprepError

log = logging.getLogger("dvsprep")


class _Group(click.Group):
    """Library errors (and OS errors such as permissions) become `error: ...` and exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (DvsprepError, OSError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            msg = str(exc) if isinstance(exc, DvsprepError) else _os_error_line(exc)
            click.echo(f"error: {msg}", err=True)
            ctx.exit(1)


def _os_error_line(exc: OSError) -> str:
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    return f"{where}{exc.strerror or exc}"


def _progress() -> bool:
    return sys.stderr.isatty()


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.version_option(package_name="dvsgesture-kit")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Turn the DVS128 Gesture release into verifiable, fast training data."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--users", type=click.IntRange(min=2, max=99), default=None,
              help="Users user01..userNN (default: 6 small, 29 full).")
@click.option("--test-users", type=click.IntRange(min=1), default=None,
              help="Highest-numbered users that form the test split (default: 2 small, 6 full).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Same seed, same bytes.")
@click.option("--scale", type=click.Choice(["small", "full"]), default="small", show_default=True,
              help="small: a few hundred samples in seconds; full: the real release's shape (~5 GB).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: number of CPUs).")
@click.option("--force", is_flag=True, help="Replace an existing OUT/DvsGesture.")
def synth(out: Path, users: int | None, test_users: int | None, seed: int, scale: str, jobs: int | None,
          force: bool) -> None:
    """Write a synthetic release in the raw DvsGesture layout to OUT/DvsGesture."""
    from .synth import write_release

    summary = write_release(out, users=users, test_users=test_users, seed=seed, scale=scale,
                            jobs=jobs or os.cpu_count(), force=force, progress=_progress())
    for line in summary.lines():
        click.echo(line)


@main.command()
@click.argument("raw", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="DATA_ROOT: events.h5 is written here.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: number of CPUs).")
@click.option("--strict", is_flag=True, help="Fail when a recording's md5 differs from the published release.")
@click.option("--force", is_flag=True, help="Replace an existing events.h5.")
def convert(raw: Path, out_dir: Path, jobs: int | None, strict: bool, force: bool) -> None:
    """Convert RAW (folder holding DvsGesture/, that folder, or DvsGesture.tar.gz) to DATA_ROOT/events.h5."""
    from .convert import convert_release

    summary = convert_release(raw, out_dir, jobs=jobs or os.cpu_count(), strict=strict, force=force,
                              progress=_progress())
    for line in summary.lines():
        click.echo(line)


@main.command()
@click.option("-T", "T", type=int, required=True, help="Frames per sample.")
@click.option("--split-by", default="number", show_default=True, metavar="number|time",
              help="Split a sample's events into frames by event count or by time.")
@click.option("-d", "--data-root", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="DATA_ROOT holding events.h5.")
@click.option("-o", "--out", "out_path", type=click.Path(path_type=Path), default=None,
              help="Output store (default: DATA_ROOT/frames_T<T>_<split_by>.zarr).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: number of CPUs).")
@click.option("--force", is_flag=True, help="Replace an existing store.")
def frames(T: int, split_by: str, data_root: Path, out_path: Path | None, jobs: int | None, force: bool) -> None:
    """Integrate DATA_ROOT/events.h5 into a zarr frame store, exactly as SpikingJelly frames it."""
    from .frames_build import EVENTS_NAME, build_frame_store
    from .frames_store import check_params, frame_store_name

    T, split_by = check_params(T, split_by)
    out = out_path or data_root / frame_store_name(T, split_by)
    summary = build_frame_store(data_root / EVENTS_NAME, out, T=T, split_by=split_by,
                                jobs=jobs or os.cpu_count(), force=force, progress=_progress())
    for line in summary.lines():
        click.echo(line)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(path: Path, as_json: bool) -> None:
    """Show what an events.h5 file or a frame store holds."""
    from .info import describe, format_description

    d = describe(path)
    if as_json:
        import json

        click.echo(json.dumps(d, indent=2))
    else:
        for line in format_description(d):
            click.echo(line)
