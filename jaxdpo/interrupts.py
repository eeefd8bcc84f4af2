"""Stopping on Ctrl-C (SIGINT) or SIGTERM (what job schedulers send before SIGKILL) the same clean way.

Inside `stop_on_signals()` either signal raises `Interrupted` in the main thread at once, unless
the run is inside `deferred()` (appending labels, saving a checkpoint: it raises when that is
done) or the exception is swallowed on its way (JAX's garbage-collection callback, for one, drops
exceptions): the signal is remembered, and the next safe point (`check()`: a stage's start, end
and progress ticks, each step of the embedded SFT) raises it.

The process then leaves with `leave(code)`: streams flushed, then `os._exit`, so the interpreter is
not torn down under XLA threads that may still be running a computation (which can segfault).
Labels never wait for this: each is fsynced before anything trains on it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `exit_code` is 128 + its number (130, 143), as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []  # the signals that arrived, first first
_deferring = [0]  # depth of `deferred()` blocks


def _on_signal(signum: int, frame) -> None:
    _received.append(signum)
    if len(_received) == 1 and not _deferring[0]:  # a second signal while stopping changes nothing
        raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` inside the block (a signal ignored when the process
    started, like SIGINT in a shell's background job, stays ignored); the previous handlers after.
    Off the main thread, where Python runs no signal handler, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous, previous_hook = {signum: signal.getsignal(signum) for signum in SIGNALS}, sys.unraisablehook

    def quiet_hook(unraisable) -> None:  # an `Interrupted` dropped on its way is remembered, not printed
        if not isinstance(unraisable.exc_value, Interrupted):
            previous_hook(unraisable)

    _received.clear()
    sys.unraisablehook = quiet_hook
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = previous_hook
        _received.clear()


def check() -> None:
    """A safe point: raise `Interrupted` if a signal arrived whose exception did not reach us."""
    if _received and not _deferring[0]:
        raise Interrupted(_received[0])


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block a signal does not cut short (a checkpoint and its checksums): it raises after."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
    check()


def leave(code: int) -> None:
    """End the process with `code` now: flush stdout and stderr, then `os._exit` (no interpreter
    teardown, no atexit handlers: nothing of the run waits on them)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
