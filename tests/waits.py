"""Waiting for events, never for time: `wait_for_tree` blocks on inotify until a condition on a
folder tree holds (or a process ends); `wait_signal_taken` polls /proc until a signal sent to a
process is no longer pending. Tests use these instead of sleeps (issue #20)."""
from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
from pathlib import Path
from typing import Callable

_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x8, 0x80, 0x100
_IN_ONLYDIR, _IN_NONBLOCK, _IN_CLOEXEC = 0x01000000, 0o4000, 0o2000000
_MASK = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
# A safety net for a broken build, never a measurement: nothing asserts how long a wait took.
_GIVE_UP_S = 120


class _Inotify:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")

    def watch_tree(self, root: Path) -> None:
        """Watch every folder under root. Folders appear while a writer works, and one can be
        removed and made again under its old name (zarr's mode "w"), so every walk adds them all:
        adding a watch that exists is a no-op."""
        for folder, _, _ in os.walk(root):   # a folder gone since the walk saw it fails: skipped
            self._libc.inotify_add_watch(self.fd, os.fsencode(folder), _MASK | _IN_ONLYDIR)

    def drain(self) -> None:
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


def wait_for_tree(root: Path, condition: Callable[[], bool], proc: subprocess.Popen | None = None) -> bool:
    """Block until condition() holds, re-checking it after every change inotify reports under
    root. Returns False (without waiting further) if proc ends first."""
    ino = _Inotify()
    pidfd = os.pidfd_open(proc.pid) if proc is not None else None
    try:
        while True:
            ino.watch_tree(root)          # watch first, then look: no change falls in between
            if condition():
                return True
            if proc is not None and proc.poll() is not None:
                return False
            fds = [ino.fd] + ([pidfd] if pidfd is not None else [])
            ready, _, _ = select.select(fds, [], [], _GIVE_UP_S)
            if not ready:
                raise TimeoutError(f"nothing changed under {root} for {_GIVE_UP_S} s")
            ino.drain()
    finally:
        ino.close()
        if pidfd is not None:
            os.close(pidfd)


def _pending(pid: int, sig: int) -> bool:
    """Whether sig is pending for the process (shared) or any of its threads."""
    bit = 1 << (sig - 1)
    task = Path(f"/proc/{pid}/task")
    try:
        texts = [Path(f"/proc/{pid}/status").read_text()]
        texts += [(t / "status").read_text() for t in task.iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        return False                    # the process (or a thread) is gone: nothing pending
    for text in texts:
        for line in text.splitlines():
            if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) & bit:
                return True
    return False


def wait_signal_taken(pid: int, sig: int = signal.SIGINT) -> None:
    """Block until the kernel has handed sig to the process (no longer pending in /proc): a
    second identical signal sent after this is a second press, not merged with the first."""
    while _pending(pid, sig):
        os.sched_yield()


def signal_ignored(pid: int, sig: int) -> bool:
    """Whether the process ignores sig (SigIgn in /proc/PID/status): the kernel drops it unseen."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    raise AssertionError(f"no SigIgn line for pid {pid}")
