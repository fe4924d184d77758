"""Worker process pools that behave under Ctrl-C and SIGTERM.

Workers ignore SIGINT: the terminal sends it to the whole process group, and a worker that
dies of KeyboardInterrupt prints its own traceback and breaks the pool. The parent alone takes
the interrupt, kills the workers rather than wait for the task each holds (`stop_pool`), removes
its temporaries and lets click print "Aborted!". SIGTERM keeps its default action in workers
(die at once); a worker that dies under the pool is one line (`worker_deaths`).

The workers are forked when the pool is made, with SIGINT and SIGTERM held back meanwhile: a
signal handled in the middle of a fork runs inside the interpreter's at-fork hooks, where the
exception it raises is printed ("Exception ignored") and lost, and the command runs on.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import ContextManager, Iterator

from .errors import WorkerDiedError
from .interrupts import stop_signals, take_pending

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this worker when the thread that forked it dies (its process killed, even by
    SIGKILL). A worker forked just after a group-wide SIGTERM was sent would otherwise outlive the
    command, waiting for work forever and holding the pipes of whoever ran it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _init_worker(parent: int | None = None) -> None:
    """Each worker: die with the parent, ignore SIGINT, die on SIGTERM, unblock both."""
    if parent is not None and sys.platform.startswith("linux"):
        _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the CLI's SIGTERM handler (which raises SystemExit to run the
    # parent's cleanup); a worker has nothing to clean up and must simply die when terminated.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):  # the parent held them back while forking us
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _noop() -> None:
    return None


def process_pool(jobs: int) -> ProcessPoolExecutor:
    """A pool of `jobs` workers that ignore SIGINT and die with this process. Fork on Linux
    (workers start in ms instead of re-importing numpy/zarr/h5py); start it before this process
    starts zarr's event-loop thread, which a forked child must not inherit, and from the thread
    that will stop it (on Linux the workers die with the thread that forked them)."""
    fork = sys.platform.startswith("linux")
    ctx = mp.get_context("fork" if fork else "spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(os.getpid(),))
    if not (fork and hasattr(signal, "pthread_sigmask")):
        return pool
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # the current mask; nothing started yet
    try:
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            pool.submit(_noop)  # with fork, the first submit starts every worker
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a held-back signal is handled here
    except BaseException:
        stop_pool(pool, kill=True)
        raise
    return pool


def stop_pool(pool: ProcessPoolExecutor | None, *, kill: bool = False, wait: bool = True) -> None:
    """Cancel what has not started and end the workers: after success let them go idle, on any
    failure (`kill`: an error, Ctrl-C, SIGTERM) kill them at once, since the task a worker holds
    may take seconds and what it writes goes with the temporary; they are gone on return, so
    the caller may remove that temporary. `wait=False` (after success only) lets idle workers
    exit while the caller goes on."""
    if pool is None:
        return
    # shutdown(wait=False) forgets the pool's manager thread, so a later shutdown(wait=True)
    # waits for nothing: keep the thread to join it. One still running at interpreter exit races
    # concurrent.futures' exit hook, which writes to the thread's wake-up pipe while the thread
    # closes it: "Exception ignored ... Bad file descriptor" under the command's error line.
    manager = pool.__dict__.setdefault("_dvsprep_manager", getattr(pool, "_executor_manager_thread", None))
    if kill:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        results = getattr(pool, "_result_queue", None)
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            try:
                p.kill()
            except (OSError, ValueError, AttributeError):  # already gone or never started
                pass
        for p in procs:
            try:
                p.join()
            except (OSError, ValueError, AssertionError):
                pass
        _unblock_results(results)
    pool.shutdown(wait=wait or kill, cancel_futures=True)
    if (wait or kill) and manager is not None:
        manager.join()


def _unblock_results(results: object) -> None:
    """A worker killed while it sent a large result leaves half a message in the pool's result
    pipe; the pool's manager thread then waits for the rest forever (this process holds the
    pipe's writing end too), and the interpreter joins that thread at exit: the command would
    hang after its clean-up. Closing our writing end turns the wait into EOF, which the manager
    thread takes as a broken pool and ends."""
    writer = getattr(results, "_writer", None)
    if writer is not None:
        try:
            writer.close()
        except OSError:
            pass


@contextmanager
def worker_deaths(output: str | os.PathLike) -> Iterator[None]:
    """Around the use of a pool: a worker that died under it (killed by someone, or by the kernel
    when memory ran out) is one line naming the `output` being written, not a BrokenProcessPool
    traceback; one that died of the SIGTERM this process also received is that SIGTERM."""
    try:
        yield
    except BrokenProcessPool:
        stop = take_pending()
        if stop is not None:
            raise stop from None
        raise WorkerDiedError(f"{output}: a worker process died before finishing (killed, or out of "
                              f"memory?)") from None


def interrupt_once() -> ContextManager[None]:
    """Ctrl-C interrupts the body once, at any moment; later presses are ignored while the clean-up
    that the first KeyboardInterrupt runs goes on (`dvsprep.interrupts.stop_signals`; inside a
    command, the command's own handling of Ctrl-C and SIGTERM stays in charge)."""
    return stop_signals((signal.SIGINT,))
