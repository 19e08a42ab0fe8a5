"""The stop handler (trainer/stop.py): a first Ctrl-C asks for a graceful stop, a second one quits at once. The
handler only raises; the command layer turns that into exit code 130 (tests/integration/test_exit_codes.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lowmem_train.trainer.stop import StopSignal


def deliver(sig: int) -> None:
    """Send a signal to this process and give its Python handler the moment it runs in (the next bytecodes)."""
    os.kill(os.getpid(), sig)
    time.sleep(0.05)


def test_a_first_ctrl_c_asks_for_a_stop_and_a_second_raises_keyboard_interrupt():
    stop = StopSignal(backend=None)
    try:
        deliver(signal.SIGINT)
        assert stop.flag and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)
    finally:
        stop.restore()


def test_sigterm_twice_still_only_asks_for_a_stop():
    """A scheduler may repeat its SIGTERM; only a person presses Ctrl-C twice to mean "now"."""
    stop = StopSignal(backend=None)
    try:
        deliver(signal.SIGTERM)
        deliver(signal.SIGTERM)
        assert stop.flag and stop.signal_name == "SIGTERM"
    finally:
        stop.restore()
