"""The one output protocol (`publishing`), atomic publication of files and directories, output
locks, and temporaries that never outlive their process.

Every output a command writes (a store, events.h5, a zip, a picture, a checkpoint, an export)
goes through `publishing`: refuse an existing output without --force and an output that is, lies
inside or holds an input of the command; lock; write a hidden temporary; check --force again;
rename into place; remove the temporary on any failure; a full disk is one line naming the output.

Every temporary is a hidden sibling named ``.<name>.<tag>-<pid>-<hex>`` (or ``.dvsprep-<what>-<pid>-
<hex>`` for scratch folders), so that a later run in the same place can tell whose it is and
remove those of processes that no longer exist (`clean_stale_temps`). An interrupted run leaves at
most such a temporary, never a file or store that looks complete.

An output being written is held by an exclusive lock (`output_lock`): a second writer of the same
path refuses at once with one line instead of mixing its work into the first one's.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterable, Iterator, Literal

from .errors import InputOutputClashError, MissingFileError, OutputLockedError, StoreError, StoreExistsError
from .inputs import url_scheme
from .resources import output_error

log = logging.getLogger(__name__)

# The one wording of "refused: it exists" (tests and the README quote it).
EXISTS = "already exists (use --force to replace it)"

_TEMP_RE = re.compile(r"^\..+\.(?:tmp|old|part|extract|convert)[-.]?(\d+)(?:-[0-9a-f]+)?$")
_SCRATCH_RE = re.compile(r"^\.dvsprep-[a-z]+-(\d+)-")
_OLD_RE = re.compile(r"^\.(.+)\.old-\d+-[0-9a-f]+$")


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden sibling of `path` (same filesystem, so the final rename is atomic)."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def scratch_dir(parent: Path, what: str) -> Path:
    """A new hidden scratch folder ``parent/.dvsprep-<what>-<pid>-<random>`` (removable by
    `clean_stale_temps` once this process is gone)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".dvsprep-{what}-{os.getpid()}-", dir=parent))


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (ours counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_owner(name: str) -> int | None:
    """The PID in a temporary's name written by dvsprep, or None if the name is not one of ours."""
    m = _TEMP_RE.match(name) or _SCRATCH_RE.match(name)
    return int(m.group(1)) if m else None


def clean_stale_temps(directory: Path, name: str | None = None) -> list[Path]:
    """Remove our temporaries in `directory` whose process is gone (all of them, or only those
    of the output `name`). Returns what was removed; never raises."""
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        n = entry.name
        if name is not None and not (n.startswith(f".{name}.") or n.startswith(".dvsprep-")):
            continue
        pid = temp_owner(n)
        if pid is None or pid_alive(pid):
            continue
        try:
            if not _put_back(entry):
                remove_path(entry)
            removed.append(entry)
        except OSError:
            pass
    return removed


def _put_back(entry: Path) -> bool:
    """A dead writer's ``.<name>.old-<pid>-<hex>`` is the previous output, moved aside to make way
    for the new one: if the output is missing (killed between the two renames) it goes back to
    its place, never deleted. Returns whether it was put back."""
    m = _OLD_RE.match(entry.name)
    if m is None:
        return False
    final = entry.with_name(m.group(1))
    if final.exists() or final.is_symlink():
        return False          # the new output made it: the old one is stale
    publish_new(entry, final)
    log.warning("%s: put back from %s, left by an interrupted writer", final, entry.name)
    return True


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` and rename `tmp` onto `path`; on any error the temporary is removed.

    For the parts of an output (a manifest inside a store's temporary, recordings inside a
    release's) and for cache files (verified-markers, which readers write concurrently): no lock,
    no --force, no message. A command's own outputs go through `publishing`."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def settle_background_io(timeout: float = 10.0) -> None:
    """Wait (at most `timeout` s) for the zarr writes in flight to end. zarr runs them on its own
    event-loop thread: the main thread interrupted while it waits for one (Ctrl-C, SIGTERM, an
    error) gives up waiting, but the write goes on, and would recreate files in a temporary
    already removed. A no-op where zarr was never imported."""
    zsync = sys.modules.get("zarr.core.sync")
    loop = (getattr(zsync, "loop", None) or [None])[0]
    if loop is None or not loop.is_running():
        return
    import asyncio

    async def drained() -> None:
        me = asyncio.current_task()
        while others := [t for t in asyncio.all_tasks() if t is not me and not t.done()]:
            await asyncio.wait(others)

    try:
        asyncio.run_coroutine_threadsafe(drained(), loop).result(timeout)
    except Exception as exc:  # noqa: BLE001 - a clean-up aid: the removal follows anyway
        log.debug("zarr I/O did not settle: %s", exc)


def finish(step: Callable[[], object]) -> None:
    """Run a clean-up step that must not stop halfway: interrupted (Ctrl-C or SIGTERM landing
    in it, the first one included), run it again to its end before the interruption goes on
    (further signals are ignored while the first one unwinds: `dvsprep.interrupts`). `step`
    must be safe to run twice."""
    try:
        step()
    except BaseException:
        step()
        raise


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree (never following a link into a tree), to its end
    even if interrupted (`finish`)."""
    finish(lambda: _remove(path))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# renameat2(2) flags: swap two paths, or rename only where nothing is, each in one atomic step
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # a libc without it (glibc < 2.28, musl): the fallbacks below
    _renameat2 = None


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the system or filesystem does not offer it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def publish_dir(tmp: Path, final: Path) -> None:
    """Move the completed `tmp` (a directory, or a file) to `final`, replacing what is there.

    An existing `final` is swapped with `tmp` in one step and removed after, so that at every
    instant `final` is the old or the new one (a kill in between leaves the old one under the
    temporary's name, removed by the next writer). Without renameat2 it is moved aside first."""
    if final.exists() or final.is_symlink():
        if _rename2(tmp, final, _RENAME_EXCHANGE):
            remove_path(tmp)
            return
        trash = temp_sibling(final, "old")
        os.replace(final, trash)
        try:
            os.replace(tmp, final)
        except BaseException:   # Ctrl-C, SIGTERM or an error between the renames: undo the first
            if not (final.exists() or final.is_symlink()):
                os.replace(trash, final)
            raise
        remove_path(trash)
    else:
        os.replace(tmp, final)


def publish_new(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final` only where nothing is (StoreExistsError otherwise): an output that
    appeared after the last check is never replaced."""
    try:
        if _rename2(tmp, final, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise StoreExistsError(f"{final}: {EXISTS}") from None
    if tmp.is_file() and not tmp.is_symlink():
        try:  # a hard link publishes only where nothing is, too
            os.link(tmp, final)
        except FileExistsError:
            raise StoreExistsError(f"{final}: {EXISTS}") from None
        except OSError:
            pass  # no hard links here: check, then rename
        else:
            tmp.unlink()
            return
    if final.exists() or final.is_symlink():
        raise StoreExistsError(f"{final}: {EXISTS}")
    os.replace(tmp, final)


def durable() -> bool:
    """Whether outputs are synced to disk when published (the default); DVSPREP_NO_FSYNC=1 turns
    it off, for scratch data on a machine whose power loss costs nothing but a rerun."""
    return os.environ.get("DVSPREP_NO_FSYNC", "").strip() in ("", "0")


def sync_dir(path: str | os.PathLike) -> None:
    """fsync a folder: the names created, renamed or removed in it reach the disk."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def _sync_file(path: str | os.PathLike) -> None:
    _fsync(path, os.O_RDONLY)


def _fsync(path: str | os.PathLike, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SYNC_THREADS = 16


def sync_tree(path: Path) -> None:
    """fsync a file, or every file and folder of a folder tree (links are not followed: what
    they point at is not part of the output). The fsyncs of a tree run on up to SYNC_THREADS
    threads at once: the filesystem commits concurrent ones together (ext4 journals them in
    one transaction), several times faster than one after another on a virtual disk. Their
    order does not matter: the rename that publishes the tree waits for all of them."""
    if path.is_symlink():
        return
    if not path.is_dir():
        _sync_file(os.fspath(path))
        return
    todo: list[tuple[Callable[[str], None], str]] = []
    for root, _dirs, names in os.walk(path, topdown=False):
        todo.extend((_sync_file, p) for f in names if not os.path.islink(p := os.path.join(root, f)))
        todo.append((sync_dir, root))
    with ThreadPoolExecutor(min(SYNC_THREADS, len(todo))) as pool:
        for _ in pool.map(lambda job: job[0](job[1]), todo):   # re-raises the first error
            pass


def missing_parents(path: Path) -> list[Path]:
    """`path` and those of its ancestors that do not exist yet, deepest first."""
    out = []
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def same_or_inside(a: Path, b: Path) -> bool:
    """Whether path `a` (existing or not) is `b` (also as a hard link), or lies inside it; links
    resolved."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    if ra == rb or ra.is_relative_to(rb):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_own_input(src: str | os.PathLike, out: str | os.PathLike, what: str) -> None:
    """No command writes onto its own input: `out` (the `what` being written) must not be `src`,
    lie inside it, or hold it (replacing a folder that holds the input destroys the input too)."""
    src, out = Path(src), Path(out)
    if same_or_inside(out, src):
        if same_or_inside(src, out):
            raise InputOutputClashError(f"{out}: is the input {src}; the {what} would overwrite its own input")
        raise InputOutputClashError(f"{out}: lies inside the input {src}; the {what} would be written into "
                                    f"its own input")
    if same_or_inside(src, out):
        raise InputOutputClashError(f"{out}: holds the input {src}; replacing it would destroy the input")


def local_paths(inputs: Iterable[str | os.PathLike | None]) -> list[Path]:
    """The inputs that are paths on this machine (URLs and None left out)."""
    return [Path(p) for p in inputs if p is not None and url_scheme(os.fspath(p)) is None]


def check_output(final: str | os.PathLike, what: str, *, force: bool, inputs: Iterable[str | os.PathLike] = (),
                 kind: Literal["file", "dir"] = "file", parent: bool = True) -> Path:
    """The refusals of the protocol, in this order: `final` is, lies inside or holds one of
    `inputs`; a file output where a folder is; it exists and not `force`; its folder is missing
    (`parent`: writers that create it pass False). Returns `final` as a Path.

    `publishing` runs it on entry and again under the lock; a writer calls it alone to refuse
    before work that precedes the lock."""
    final = Path(final)
    for src in local_paths(inputs):
        refuse_own_input(src, final, what)
    if kind == "file" and final.is_dir() and not final.is_symlink():
        raise StoreError(f"{final}: is a directory, not a file to write")   # --force or not
    if not force and (final.exists() or final.is_symlink()):
        raise StoreExistsError(f"{final}: {EXISTS}")
    if parent and not final.parent.is_dir():
        raise MissingFileError(f"{final.parent}: output directory does not exist")
    return final


class Publication:
    """One pass of the output protocol for `final`, the `what` a command writes (a store, a
    picture, ...): `begin` refuses (see `check_output`), locks and returns the hidden temporary
    to write; `commit` checks --force again and renames the temporary into place; `abort`
    removes it. Either of the last two releases the lock. A full disk, in the writing or the
    publishing, becomes ResourceLimitError naming `final`.

    Use it through `publishing` (a with-block); the class is for writers whose life is not one
    block (`dvsprep.events.EventsWriter`: append ... finish)."""

    def __init__(self, final: str | os.PathLike, what: str, *, force: bool,
                 inputs: Iterable[str | os.PathLike] = (), kind: Literal["file", "dir"] = "file",
                 parent: bool = True):
        self.final = Path(final)
        self.what, self.force, self.kind, self.parent = what, force, kind, parent
        self.inputs = local_paths(inputs)
        self.tmp: Path | None = None
        self._held: ExitStack | None = None
        self._created: list[Path] = []
        self._published: list[Callable[[], object]] = []

    def on_published(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` once the output is in place, with its lock still held (a writer records
        the verified-marker of what it wrote there: `dvsprep.integrity.trust.vouch`). An error in
        ``fn`` is logged, never raised: the output is published by then."""
        self._published.append(fn)

    def _check(self) -> None:
        check_output(self.final, self.what, force=self.force, inputs=self.inputs, kind=self.kind,
                     parent=self.parent)

    def begin(self) -> Path:
        self._check()   # before the lock: a refusal takes no lock and leaves nothing
        self._created = missing_parents(self.final.parent)   # made by the lock; gone on abort
        held = ExitStack()
        held.enter_context(output_lock(self.final, self.what))
        try:
            self._check()   # again, now that no other writer can: one may have published since
        except BaseException:
            held.close()
            raise
        self._held = held
        self.tmp = temp_sibling(self.final)
        return self.tmp

    def commit(self) -> None:
        try:
            if durable():
                sync_tree(self.tmp)   # the data is on the disk before the name points at it
            if not self.force:
                publish_new(self.tmp, self.final)   # --force again: what appeared meanwhile stays
            elif self.kind == "dir":
                publish_dir(self.tmp, self.final)
            else:
                os.replace(self.tmp, self.final)
        except BaseException as exc:
            self.abort()
            named = output_error(exc, self.final, [self.tmp, lock_path(self.final)])
            if named is not None:
                raise named from None
            raise
        if durable():
            try:
                sync_dir(self.final.parent)   # ... and the rename itself survives a power loss
            except OSError as exc:
                log.warning("%s: published, but its folder could not be synced to disk: %s", self.final, exc)
        try:
            for fn in self._published:
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001 - a marker is a saving, never a failure
                    log.debug("%s: after publishing: %s", self.final, exc)
        finally:
            self._release()

    def abort(self) -> None:
        """Remove the temporary (whatever state it is in), release the lock and remove the folders
        that `begin` created for the output (if still empty); never raises."""
        if self.tmp is not None:
            settle_background_io()
            remove_path(self.tmp)
        self._release()
        finish(self._remove_created)

    def _remove_created(self) -> None:
        for d in self._created:   # deepest first
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()

    def __enter__(self) -> Path:
        return self.begin()

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if exc is None:
            self.commit()
            return False
        tmp = self.tmp
        self.abort()   # any failure, Ctrl-C and SystemExit included
        named = output_error(exc, self.final, [tmp, lock_path(self.final)])
        if named is not None:
            raise named from None
        return False


def publishing(final: str | os.PathLike, what: str, *, force: bool, inputs: Iterable[str | os.PathLike] = (),
               kind: Literal["file", "dir"] = "file", parent: bool = True) -> Publication:
    """The output protocol as a with-block: ``with publishing(out, "frame store", force=force,
    inputs=[events], kind="dir") as tmp: <write tmp>``; the output appears complete or not at all.

    On entry: refuse an output that is, lies inside or holds one of `inputs` (paths; URLs are
    skipped), an existing one without `force` (StoreExistsError, the one EXISTS wording), a file
    output where a folder is, or (`parent`) a missing folder; lock it (a second writer refuses
    at once); check again; yield the hidden temporary ``.<name>.tmp-<pid>-<hex>`` (the body
    creates it: a file, or a folder for kind "dir"). After the body: check --force again (an
    output that appeared meanwhile is never replaced without it) and rename into place. On any
    failure the temporary is removed; a full disk (ENOSPC, EDQUOT) is one ResourceLimitError
    naming `final`, never the temporary or the lock."""
    return Publication(final, what, force=force, inputs=inputs, kind=kind, parent=parent)


def lock_path(path: Path) -> Path:
    """The lock file that guards output `path`: ``.<name>.lock`` beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextmanager
def output_lock(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Hold an exclusive lock on output `path` (a file or folder, existing or not) while the body
    runs; a second holder in any process raises OutputLockedError at once, naming `path`.

    The lock is ``flock`` on ``.<name>.lock`` beside `path` (its parent must exist or is created):
    the kernel drops it when the process dies, so a killed writer never blocks the next one.
    Stale temporaries of dead processes for `path` are removed once the lock is held.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lp = lock_path(path)
    while True:
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:   # a read-only folder, say: named by the output, not the lock
            named = output_error(exc, path, [lp])
            if named is not None:
                raise named from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise OutputLockedError(f"{path}: {what} is being written by another process{by}; "
                                    f"wait for it to finish") from None
        # the previous holder unlinks the lock file on release: if we locked an unlinked
        # inode, someone else may lock the new file, so start again on the current one
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        clean_stale_temps(path.parent, path.name)
        yield path
    finally:
        done: list[str] = []

        def release() -> None:
            if "unlinked" not in done:
                try:
                    os.unlink(lp)
                except OSError:
                    pass
                done.append("unlinked")
            if "closed" not in done:
                done.append("closed")   # first: closing a number twice is worse than a leak
                os.close(fd)

        finish(release)
