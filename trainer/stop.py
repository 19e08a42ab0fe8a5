"""Graceful stop on SIGTERM (what schedulers send before a kill) and SIGINT (Ctrl-C), on any rank.

The handler only sets a flag. Once per step every rank asks `requested()`, which all-reduces the flag
(max), so all ranks see the same answer at the same step, finish it, save and exit 0 together: no rank
waits forever on a collective that a dead or stopping peer never joins. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import logging
import os
import signal

from lowmem_train.trainer.backend import all_reduce

log = logging.getLogger(__name__)


class StopSignal:
    def __init__(self, backend):
        self.backend = backend
        self.flag = False
        self.signal_name = ""
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.flag and signum == signal.SIGINT:
            os._exit(130)  # second Ctrl-C: the user means it
        self.flag = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to quit now)",
                    self.signal_name)

    def requested(self) -> bool:
        """The same answer on every rank (one tiny all-reduce)."""
        agreed = bool(all_reduce(self.backend, [float(self.flag)], "max")[0])
        if agreed and not self.flag:
            self.flag, self.signal_name = True, "a signal on another rank"
        return agreed

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
