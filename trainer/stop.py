"""Graceful stop on SIGTERM (what schedulers send before a kill) and SIGINT (Ctrl-C), on any rank.

The handler only sets a flag. Every rank hands its flag to the step's one agreement (step.py, agree_step), and
`agree()` all-reduces it where no step runs (at epoch boundaries); either way all ranks learn it at the same
step, finish it, save and exit 0 together: no rank waits forever on a collective that a dead or stopping peer
never joins. A second Ctrl-C raises KeyboardInterrupt, as Python's own handler would: the user means it, and the
command layer (commands/train.py) ends the process at once.
"""

from __future__ import annotations

import logging
import signal

from lowmem_train.trainer import distributed

log = logging.getLogger(__name__)


class StopSignal:
    def __init__(self, backend):
        self.backend = backend
        self.flag = False  # this rank received a signal
        self.agreed = False  # some rank did, and every rank knows it
        self.signal_name = ""
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: quit now, without the save (commands/train.py exits)
        self.flag = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to quit now)",
                    self.signal_name)

    def agree(self) -> bool:
        """Where no step runs: the same answer on every rank (one tiny all-reduce)."""
        return self.heard(distributed.agree_any(self.backend, self.flag))

    def heard(self, agreed: bool) -> bool:
        """What the ranks agreed (here or in a step's agreement) about stopping."""
        if agreed and not self.flag:
            self.flag, self.signal_name = True, "a signal on another rank"
        self.agreed = self.agreed or agreed
        return self.agreed

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class SnapshotRequest:
    """`kill -USR1 <pid>` asks for a memory snapshot (the one logged at epoch ends) at the next step, without
    stopping. The handler only sets a flag; the loop takes it between steps (Trainer.one_step)."""

    def __init__(self):
        self.flag = False
        self.previous = signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def take(self) -> bool:
        asked, self.flag = self.flag, False
        return asked

    def restore(self) -> None:
        signal.signal(signal.SIGUSR1, self.previous)
