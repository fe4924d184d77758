"""Worker process pools that behave under Ctrl-C.

Workers ignore SIGINT: the terminal sends it to the whole process group, and a worker that
dies of KeyboardInterrupt prints its own traceback and breaks the pool. The parent alone takes
the interrupt, stops the pool (`stop_pool`), removes its temporaries and lets click print
"Aborted!". SIGTERM keeps its default action in workers (die at once).
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import sys
from concurrent.futures import ProcessPoolExecutor


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the CLI's SIGTERM handler (which raises SystemExit to run the
    # parent's cleanup); a worker has nothing to clean up and must simply die when terminated.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def process_pool(jobs: int) -> ProcessPoolExecutor:
    """A pool of `jobs` workers that ignore SIGINT. Fork on Linux (workers start in ms instead
    of re-importing numpy/zarr/h5py); start it before this process starts zarr's event-loop
    thread, which a forked child must not inherit."""
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_ignore_sigint)


def stop_pool(pool: ProcessPoolExecutor | None, *, wait: bool = True) -> None:
    """Cancel what has not started and end the workers (on success, error or Ctrl-C)."""
    if pool is None:
        return
    pool.shutdown(wait=wait, cancel_futures=True)
