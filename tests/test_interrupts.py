"""`jaxdpo.interrupts` in this process, with real signals (SIGTERM: SIGINT may be ignored in a
test worker); the whole command under SIGINT and SIGTERM is in tests/test_loop.py."""

import os
import signal
import time

import pytest

from jaxdpo import interrupts


def signal_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs at the next bytecode of the main thread


def test_a_signal_raises_at_once_with_its_exit_code():
    before = signal.getsignal(signal.SIGTERM)
    with interrupts.stop_on_signals(), pytest.raises(interrupts.Interrupted) as stopped:
        signal_self()
        pytest.fail("not interrupted")
    assert stopped.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) is before
    interrupts.check()  # nothing pending once the block is left


def test_a_deferred_block_finishes_before_the_signal_is_raised():
    finished = []
    with interrupts.stop_on_signals(), pytest.raises(interrupts.Interrupted):
        with interrupts.deferred():
            signal_self()
            signal_self()  # a second signal changes nothing
            finished.append(True)
    assert finished == [True]


def test_a_signal_dropped_on_its_way_is_raised_at_the_next_safe_point_and_not_printed(capsys):
    class Dropping:  # like JAX's garbage-collection callback: an exception raised in it is dropped
        def __del__(self):
            signal_self()

    with interrupts.stop_on_signals():
        Dropping()  # the signal arrives, and its exception is dropped, inside __del__
        with pytest.raises(interrupts.Interrupted):
            interrupts.check()
    assert "Traceback" not in capsys.readouterr().err
