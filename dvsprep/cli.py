"""`dvsprep` command line: a thin layer that turns library exceptions into one-line errors."""
from __future__ import annotations

import errno
import logging
import os
import re
import sys
from pathlib import Path

import click

from .errors import DvsprepError, one_line
from .interrupts import stop_signals

log = logging.getLogger("dvsprep")


class _Group(click.Group):
    """Library errors (and OS errors such as permissions) become `error: ...` and exit 1.

    While a command runs, Ctrl-C raises KeyboardInterrupt ("Aborted!", exit 1) and SIGTERM
    SystemExit(143), once and at any moment (`dvsprep.interrupts.stop_signals`), so that every
    `finally` removes its temporaries. A closed stdout (``| head``) is left to click, which
    exits 1 without a word."""

    def invoke(self, ctx: click.Context):
        try:
            with stop_signals():
                return super().invoke(ctx)
        except (DvsprepError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE and not isinstance(exc, DvsprepError):
                raise  # click's main() exits 1 quietly on EPIPE
            if ctx.obj and ctx.obj.get("debug"):
                raise
            msg = str(exc) if isinstance(exc, DvsprepError) else _os_error_line(exc)
            click.echo(f"error: {one_line(msg)}", err=True)
            ctx.exit(1)


def _os_error_line(exc: OSError) -> str:
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    return f"{where}{exc.strerror or exc}"


_FINGERPRINT = re.compile(r"[0-9a-fA-F]{12,64}")


def _fingerprint_arg(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _FINGERPRINT.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not a fingerprint (12 to 64 hex digits: the sha256 or a prefix)")
    return value.lower() if value is not None else None


def _size_arg(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from .frames import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _split_by_arg(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--split-by: one of SPLIT_METHODS, as a usage error (imported here: the CLI loads no numpy)."""
    from .constants import SPLIT_METHODS

    if value is not None and value not in SPLIT_METHODS:
        raise click.BadParameter(f"{value!r} is not one of {', '.join(map(repr, SPLIT_METHODS))}.")
    return value


def _label_arg(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """show --label: the library's own parse (`show.parse_label`), its refusal as a usage error."""
    if value is not None:
        from .show import parse_label

        try:
            parse_label(value)
        except DvsprepError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


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
              help="small: a few hundred samples in seconds; full: the real release's shape (~4.3 GB).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: number of CPUs).")
@click.option("--force", is_flag=True, help="Replace an existing OUT/DvsGesture.")
def synth(out: Path, users: int | None, test_users: int | None, seed: int, scale: str, jobs: int | None,
          force: bool) -> None:
    """Write a synthetic release in the raw DvsGesture layout to OUT/DvsGesture."""
    from .raw import write_release

    summary = write_release(out, users=users, test_users=test_users, seed=seed, scale=scale,
                            jobs=jobs or os.cpu_count(), force=force, progress=_progress())
    for line in summary.lines():
        click.echo(line)


@main.command()
@click.argument("raw")  # a str: a Path would fold a URL's "//" before the input resolver sees it
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="DATA_ROOT: events.h5 is written here.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: number of CPUs).")
@click.option("--strict", is_flag=True, help="Fail when a recording's md5 differs from the published release.")
@click.option("--force", is_flag=True, help="Replace an existing events.h5.")
def convert(raw: str, out_dir: Path, jobs: int | None, strict: bool, force: bool) -> None:
    """Convert RAW (folder holding DvsGesture/, that folder, or DvsGesture.tar.gz) to DATA_ROOT/events.h5."""
    from .events import convert_release

    summary = convert_release(raw, out_dir, jobs=jobs or os.cpu_count(), strict=strict, force=force,
                              progress=_progress())
    for line in summary.lines():
        click.echo(line)


@main.command()
@click.option("-T", "T", type=click.IntRange(min=1), required=True, help="Frames per sample.")
@click.option("--split-by", default="number", show_default=True, metavar="number|time", callback=_split_by_arg,
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
    from .constants import EVENTS_NAME
    from .frames import build_frame_store
    from .frames import frame_store_name
    from .frames import check_params

    T, split_by = check_params(T, split_by)
    out = out_path or data_root / frame_store_name(T, split_by)
    summary = build_frame_store(data_root / EVENTS_NAME, out, T=T, split_by=split_by,
                                jobs=jobs or os.cpu_count(), force=force, progress=_progress())
    for line in summary.lines():
        click.echo(line)


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(path: str, as_json: bool) -> None:
    """Show what an events.h5 file or a frame store (directory, .zip or http(s) URL) holds."""
    from .info import describe, format_description

    d = describe(path)
    if as_json:
        import json

        click.echo(json.dumps(d, indent=2))
    else:
        for line in format_description(d):
            click.echo(line)


@main.command()
@click.argument("path")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--sample", default=None, metavar="INDEX|RECORDING:ROW",
              help="Sample by index in the split or by recording and label-csv row (default: 0).")
@click.option("--label", default=None, metavar="K|NAME|all", callback=_label_arg,
              help="Contact sheet of one class (0..10 or its name), or of every class.")
@click.option("--count", type=int, default=None, help="Samples per class on a contact sheet (default 4; 1 for all).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="OUT.png or OUT.gif (animation); default <split>_<recording>_<row>.png here.")
@click.option("-T", "T", type=int, default=None, help="events.h5 only: frames to integrate (default 8).")
@click.option("--split-by", default=None, metavar="number|time", callback=_split_by_arg,
              help="events.h5 only (default number).")
@click.option("--scale", type=int, default=None, help="Pixels per sensor pixel (default 2; 1 for sheets).")
@click.option("--columns", type=int, default=4, show_default=True, help="Frames per row of a sample's grid.")
@click.option("--fps", type=float, default=4.0, show_default=True, help="GIF frames per second.")
@click.option("--force", is_flag=True, help="Replace an existing picture.")
@click.pass_context
def show(ctx: click.Context, path: str, split: str, sample: str | None, label: str | None, count: int | None,
         out: Path | None, T: int | None, split_by: str | None, scale: int | None, columns: int,
         fps: float, force: bool) -> None:
    """Render a sample of PATH (frame store: directory, .zip or URL; or events.h5) as PNG or GIF.

    ON events orange, OFF blue, both near white; y = 0 is the top row."""
    from .show import show as render

    try:
        result = render(path, out, split=split, sample=sample, label=label, count=count, T=T,
                        split_by=split_by, scale=scale, columns=columns, fps=fps, force=force)
    except ImportError as exc:  # Pillow is the optional `show` extra
        if "dvsgesture-kit[show]" not in str(exc) or ctx.obj.get("debug"):
            raise
        click.echo(f"error: {exc}", err=True)
        ctx.exit(1)
    for line in result.lines():
        click.echo(line)


@main.command()
@click.argument("path")
@click.option("--fingerprint", "expected", default=None, metavar="SHA256", callback=_fingerprint_arg,
              help="Also require this fingerprint (the full sha256 or a prefix of at least 12 hex digits).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Download cache for URLs (default: $DVSPREP_CACHE or ~/.cache/dvsprep).")
@click.option("--max-download", default=None, metavar="SIZE", callback=_size_arg,
              help="Refuse URL downloads larger than SIZE (e.g. 500M, 8G; default: $DVSPREP_MAX_DOWNLOAD or 8G).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Threads hashing (files of a store or release, datasets of events.h5; default: number of CPUs).")
@click.option("--decode", is_flag=True,
              help="Frame stores: decode every sample even when this content (same fingerprint) was decoded "
                   "on this machine before (then every file is only hashed against the manifest).")
@click.option("-v", "--verbose", "list_all", is_flag=True, help="List every problem, not the first few of each kind.")
@click.pass_context
def verify(ctx: click.Context, path: str, expected: str | None, cache_dir: Path | None, max_download: int | None,
           jobs: int | None, decode: bool, list_all: bool) -> None:
    """Check PATH is intact: a frame store (directory, .zip or http(s) URL) or events.h5 against
    its manifest, or a raw release (folder or tar.gz) against the published md5s. Exit 0 when
    intact, 1 listing what differs."""
    from .frames import download_limit
    from .verify import verify_path

    with download_limit(max_download):
        report = verify_path(path, cache_dir=cache_dir, expected_fingerprint=expected, jobs=jobs, decode=decode)
    for line in report.lines(verbose=list_all):
        click.echo(line)
    if not report.ok:
        ctx.exit(1)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=None,
              help="Output zip (default: STORE.zip next to STORE).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
def pack(store: Path, out: Path | None, force: bool) -> None:
    """Pack a frame store into one uncompressed zip that reads in place (every file checked on the way)."""
    from .frames import pack_store

    for line in pack_store(store, out, force=force).lines():
        click.echo(line)


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=None,
              help="Output store directory (default: the zip's name without .zip).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
def unpack(archive: Path, out: Path | None, force: bool) -> None:
    """Extract a packed frame store into a directory (every member checked against the manifest)."""
    from .frames import unpack_store

    for line in unpack_store(archive, out, force=force).lines():
        click.echo(line)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("url")
@click.option("--force", is_flag=True, help="Replace a store already at URL.")
def push(store: Path, url: str, force: bool) -> None:
    """Upload a frame store (folder or .zip, verified first) to an s3:// URL so that no reader
    ever sees half of it; prints the URL pinned to its fingerprint. A URL ending in / gets the
    store's name appended."""
    from .frames import push_store

    for line in push_store(store, url, force=force).lines():
        click.echo(line)


@main.command()
@click.argument("url")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="Where the store goes (a .zip URL gives a .zip, a folder URL a folder).")
@click.option("--max-download", default=None, metavar="SIZE", callback=_size_arg,
              help="Refuse downloads larger than SIZE (default: $DVSPREP_MAX_DOWNLOAD or 8G).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
def pull(url: str, out: Path, max_download: int | None, force: bool) -> None:
    """Download the frame store at URL (http(s) or s3://; #fingerprint= and &mirror= in its
    fragment) to OUT, verified in full, as the cache does."""
    from .frames import pull_store

    for line in pull_store(url, out, force=force, max_bytes=max_download).lines():
        click.echo(line)
