"""Ctrl-C (SIGINT) and SIGTERM stop a command at any moment, quietly, leaving no temporaries.

While `stop_signals` is active, SIGINT raises KeyboardInterrupt (click prints "Aborted!", exit 1)
and SIGTERM raises SystemExit(143) (nothing printed) in the main thread, so that every `finally`
and `dvsprep.atomic.publishing` removes what it made. Two things make that hold at any moment:

- Python runs a handler between any two bytecodes, also inside a weakref callback, a ``__del__``
  or an import lock's clean-up, where the exception it raises is printed as "Exception ignored"
  and dropped: the command ran on to the end (issue 19). `sys.unraisablehook` catches such a
  dropped stop exception and delivers the signal again, from a helper thread, so that it is
  handled once the hook has returned, where it can stop the command.
- Once a stop exception is raised, further signals are ignored for `REPEAT_AFTER_S`, so that the
  clean-up it runs is not itself interrupted (a second Ctrl-C pressed at once); one that comes
  later raises again, in case something swallowed the first one.

A signal ignored when the command started (``nohup``, a background job of a script) stays
ignored, as it does for Python itself and for other programs.

`ConsoleScript` is what the console scripts run: it takes over the signals before the command's
modules are imported, so a Ctrl-C during start-up is "Aborted!" too, not an import traceback.
"""
from __future__ import annotations

import importlib
import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager
from types import FrameType
from typing import Any, Iterator, NoReturn

# Clean-up after a stop (removing a temporary store) takes milliseconds; a signal after this
# long means the first one was lost or the clean-up is stuck: stop again.
REPEAT_AFTER_S = 1.0

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _State:
    depth = 0                        # nesting of active stop_signals blocks
    raised: BaseException | None = None   # the stop exception on its way, if any
    signum = 0
    since = 0.0
    pending = 0                      # a signal whose exception was dropped, being redelivered
    redelivering = False
    previous: dict[int, Any] = {}
    previous_hook: Any = None


_state = _State()


def stop_exception(signum: int) -> BaseException:
    """What a stop signal raises: KeyboardInterrupt for SIGINT, SystemExit(128 + n) otherwise."""
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    st = _state
    if _inside_hook(frame):      # raised here, it would be dropped again: after the hook
        _deliver_later(signum)
        return
    if st.raised is not None and time.monotonic() - st.since < REPEAT_AFTER_S:
        return                   # the first one is unwinding: let its clean-up finish
    raise _raise(signum)


def _raise(signum: int) -> BaseException:
    st = _state
    st.pending = 0
    # zarr's event loop, cut short, logs "Task was destroyed but it is pending!" on the way out
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    st.raised, st.signum, st.since = stop_exception(signum), signum, time.monotonic()
    return st.raised


def take_pending() -> BaseException | None:
    """The stop exception of a signal that was received but whose exception was dropped and is
    not raised again yet (see the module's docstring), now marked raised; else None. A pool
    whose workers died of the same SIGTERM raises this instead of BrokenProcessPool."""
    return _raise(_state.pending) if _state.pending else None


def _unraisable(unraisable: Any) -> None:
    st = _state
    if st.raised is not None and unraisable.exc_value is st.raised:
        st.raised = None         # dropped where exceptions cannot propagate: deliver it again
        _deliver_later(st.signum)
        return
    if st.raised is not None:    # stopping: what breaks on the way out (a DataLoader's workers
        return                   # killed by the same SIGTERM, say) is no news to the user
    (st.previous_hook or sys.__unraisablehook__)(unraisable)


def _inside_hook(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code is _unraisable.__code__:
            return True
        frame = frame.f_back
    return False


def _deliver_later(signum: int) -> None:
    """Deliver `signum` to the main thread again until its exception is raised where it stops
    the command, from one helper thread: each delivery is handled at the main thread's next
    check for signals, which may come before the hook has returned."""
    st = _state
    st.pending = signum
    if st.redelivering:
        return
    st.redelivering = True
    main = threading.main_thread().ident

    def send() -> None:
        try:
            while st.pending and st.depth > 0 and main is not None:
                signal.pthread_kill(main, st.pending)
                time.sleep(0.01)
        finally:
            st.redelivering = False

    threading.Thread(target=send, name="dvsprep-redeliver", daemon=True).start()


@contextmanager
def stop_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """While the body runs (main thread), `signals` raise their stop exception once (see the
    module's docstring); a nested block leaves the outer one in charge. Elsewhere: no change."""
    st = _state
    if threading.current_thread() is not threading.main_thread() or st.depth > 0:
        yield
        return
    st.depth, st.raised, st.previous, st.pending = 1, None, {}, 0
    try:
        for s in signals:
            old = signal.getsignal(s)
            if old is not signal.SIG_IGN:    # ignored at start (nohup, `cmd &`): stays ignored
                st.previous[s] = signal.signal(s, _handler)
        st.previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable
        yield
    finally:
        for s, old in st.previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        if sys.unraisablehook is _unraisable:
            sys.unraisablehook = st.previous_hook or sys.__unraisablehook__
        st.depth, st.raised, st.previous, st.previous_hook, st.pending = 0, None, {}, None, 0


class ConsoleScript:
    """A console script (``name = "pkg.entry:name"``): stop signals are taken over first, then
    the click command `module.function` is imported and run; a Ctrl-C during the imports prints
    what click prints for one, "Aborted!" (exit 1)."""

    def __init__(self, module: str, function: str, prog_name: str):
        self.module, self.function, self.prog_name = module, function, prog_name

    @property
    def click_command(self) -> Any:
        """The click command it runs (imported now)."""
        return getattr(importlib.import_module(self.module), self.function)

    def __call__(self) -> NoReturn:
        try:
            with stop_signals():
                try:
                    command = self.click_command
                except KeyboardInterrupt:
                    sys.stderr.write("\nAborted!\n")
                    sys.exit(1)
                command(prog_name=self.prog_name)
            sys.exit(0)
        finally:
            # the command is done (or stopping): a signal now would only turn a finished
            # command's exit into a traceback during the interpreter's shutdown
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
