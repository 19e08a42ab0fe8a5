"""Every collective lowmem-train makes, in one place, named for what the ranks agree on.

Callers say what they need (does any rank want to stop? the total of these numbers? every rank's memory
sample?), not how it travels. On one process each is the identity, so callers never branch on the world size.
Numbers travel as float64: byte counts up to 2^53 stay exact.

Collectives are matched by order: every rank must make the same calls in the same order, which is why each
caller decides *whether* to call from numbers every rank already agrees on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


def _reduce(backend, values: Sequence[float], op) -> list[float]:
    if backend.world_size == 1:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=backend.accelerator.device)
    torch.distributed.all_reduce(t, op=op)
    return t.tolist()


def sum_(backend, values: Sequence[float]) -> list[float]:
    """The element-wise sum over all ranks."""
    return _reduce(backend, values, torch.distributed.ReduceOp.SUM)


def agree_max(backend, values: Sequence[float]) -> list[float]:
    """The element-wise maximum over all ranks."""
    return _reduce(backend, values, torch.distributed.ReduceOp.MAX)


def agree_any(backend, flag: bool) -> bool:
    """True on every rank when it is true on any rank (a stop request, a failed forward, a refused start)."""
    return bool(agree_max(backend, [float(flag)])[0])


def agree_all(backend, flag: bool) -> bool:
    """True on every rank only when it is true on every rank (enough disk on each rank to save)."""
    return not agree_any(backend, not flag)


@dataclass(frozen=True)
class StepAgreement:
    """What every rank must know during a step, agreed in one all-reduce (distributed.agree_step)."""

    oom: bool  # some rank ran out of memory in this forward pass
    loader_failed: bool  # some rank could not prepare its batch
    stop: bool  # some rank was asked to stop (a signal)
    tokens: float  # summed over ranks: the target tokens of the global step
    loss: float  # summed over ranks: the step's summed token loss


def agree_step(backend, oom: bool = False, loader_failed: bool = False, stop: bool = False, tokens: float = 0.0,
               loss: float = 0.0) -> StepAgreement:
    """One SUM all-reduce of five numbers per micro-batch (flags sum to more than 0 where any rank raised them)."""
    total = sum_(backend, [float(oom), float(loader_failed), float(stop), tokens, loss])
    return StepAgreement(total[0] > 0, total[1] > 0, total[2] > 0, total[3], total[4])


def collect(backend, vector: Sequence[float]) -> list[list[float]]:
    """Every rank's vector (all the same length), in rank order, on every rank."""
    if backend.world_size == 1:
        return [[float(v) for v in vector]]
    local = torch.tensor(list(vector), dtype=torch.float64, device=backend.accelerator.device)
    return backend.accelerator.gather(local[None]).cpu().tolist()


def barrier(backend) -> None:
    """Wait until every rank got here."""
    backend.accelerator.wait_for_everyone()


def leave_process_group() -> None:
    """At the end of a run that every rank ended together: wait for the others, then tear the process group down.
    A rank that exits with gloo's threads still alive can abort in their destructors ("terminate called without an
    active exception", exit -6), and the launcher then reports a finished run as failed (seen in CI on 2-process
    test scripts); torch asks for it with NCCL too. A no-op on one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def rank_zero_first(backend) -> Iterator[None]:
    """Rank 0 runs the block first (it may write files the others then read); the others follow."""
    with backend.accelerator.main_process_first():
        yield


def full_state_dict(backend, model) -> dict:
    """The whole model's weights on rank 0 (a gather of the partitions under ZeRO-3: every rank must call it)."""
    return backend.accelerator.get_state_dict(model)


# What NCCL, gloo and torch's store say, as fragments of their own messages (lowercase), checked in this order, the
# first match deciding. Sources: NCCL's ncclGetErrorString (src/init.cc) and WARN texts (init.cc, bootstrap.cc,
# alloc.h, checks.h), torch's NCCLUtils.cpp / ProcessGroupNCCL.cpp, gloo's transport/tcp/pair.cc; the gloo and store
# texts were reproduced with torch 2.13. NCCL reports a lost peer under several codes ("internal error",
# "unhandled system error" with "Last error: ... Connection closed by remote peer"), so the whole text is searched.
COLLECTIVE_ERROR_SIGNS = (
    ("out_of_memory", ("out of memory", "failed to cuda calloc", "failed to cuda malloc", "failed to cuda host alloc",
                       "failed to malloc ")),
    ("misconfigured", ("duplicate gpu detected", "multiple ranks are using the same gpu", "mismatched nccl version",
                       "no socket interface found", "no usable listening interface found", "invalid nccl_comm_id",
                       "invalid usage (run with nccl_debug", "ncclinvalidusage")),
    ("lost_peer", ("remote process exited or there was a network error", "ncclremoteerror", "connection reset by peer",
                   "connection closed by peer", "connection closed by remote peer", "broken pipe", "connection refused",
                   "software caused connection abort", "read timeout", "socket timeout", "timed out waiting",
                   "failed to recv, got 0 bytes", "did the remote server shutdown or crash",
                   "the client socket has timed out", "got completion from peer", "remote process exited",
                   "watchdog caught collective operation timeout", "nccl communicator was aborted", "timed out")),
)

# What to do about a misconfigured process group, by the sign that named it.
MISCONFIGURED_HINTS = {
    "duplicate gpu detected": "two ranks on one GPU: launch at most one process per GPU (--num_processes)",
    "multiple ranks are using the same gpu": "two ranks on one GPU: launch at most one process per GPU "
                                             "(--num_processes)",
    "mismatched nccl version": "the nodes run different NCCL versions: run the same image on every node",
    "no socket interface found": "NCCL found no network interface to use: set NCCL_SOCKET_IFNAME to the interface "
                                 "the nodes reach each other on",
    "no usable listening interface found": "NCCL found no network interface to use: set NCCL_SOCKET_IFNAME",
    "invalid nccl_comm_id": "NCCL_COMM_ID is malformed: unset it or use host:port",
}


def classify_collective_error(exc: BaseException) -> str | None:
    """What a failed collective means: "lost_peer" (another rank or node is gone, or the network: restartable),
    "misconfigured" (the launch or the network setup is wrong: a restart fails the same way), "out_of_memory"
    (NCCL could not allocate its buffers), or None (a bug, or nothing this module recognises)."""
    text = str(exc).lower()
    for kind, signs in COLLECTIVE_ERROR_SIGNS:
        if any(sign in text for sign in signs):
            return kind
    network = getattr(torch.distributed, "DistNetworkError", ())
    return "lost_peer" if network and isinstance(exc, network) else None  # torch's TCP layer, any text


def misconfiguration_hint(exc: BaseException) -> str:
    """What to change for a "misconfigured" collective error."""
    text = str(exc).lower()
    return next((hint for sign, hint in MISCONFIGURED_HINTS.items() if sign in text),
                "the process group is misconfigured; rerun with NCCL_DEBUG=WARN to see why")


class PeerWatch:
    """Notices that another rank is gone, and ends this one, instead of waiting inside a collective until the
    process group times out (30 minutes with gloo; a collective with a dead peer never returns by itself).

    Every `interval` seconds a background thread bumps this rank's counter in the launcher's key-value store
    (torchrun's TCPStore at MASTER_ADDR:MASTER_PORT; its own client connection, public API) and reads the others'.
    A peer whose counter has not moved for `timeout` seconds (its node died, the network broke) or that announced
    a failure, or a store that cannot be reached for `timeout` seconds (the node hosting it died), ends this
    process through `on_lost(message, announced)`: it runs on the watch thread while the main thread may be
    blocked in C++, so it must leave the process itself (commands/train.py records the outcome, then os._exit).
    Peers that finished announce it (`done()`), so a slow last save on one rank is not taken for a death.
    Counters, not clocks: nodes' clocks may disagree.
    """

    def __init__(self, backend, timeout: float, on_lost, interval: float = 2.0):
        import os
        from datetime import timedelta

        self.rank, self.world = backend.rank, backend.world_size
        self.timeout, self.interval, self.on_lost = timeout, interval, on_lost
        self.store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                is_master=False, timeout=timedelta(seconds=max(interval, 5.0)))
        self._stop = None

    @classmethod
    def start(cls, backend, timeout: float, on_lost) -> "PeerWatch | None":
        """A running watch on a multi-process run (None on one process: nobody to lose)."""
        import os

        if backend.world_size == 1 or "MASTER_ADDR" not in os.environ:
            return None
        watch = cls(backend, timeout, on_lost)
        watch.run_in_background()
        return watch

    def run_in_background(self) -> None:
        import threading

        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="lowmem-peer-watch", daemon=True).start()

    def _watch(self) -> None:
        import time

        peers = [r for r in range(self.world) if r != self.rank]
        seen = {r: (-1, time.monotonic()) for r in peers}  # rank -> (counter, when it last moved)
        unreachable_since = None
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                self.store.add(f"lowmem/alive/{self.rank}", 1)
                ended = {r: self.store.get(f"lowmem/ended/{r}").decode() for r in peers
                         if self.store.check([f"lowmem/ended/{r}"])}
                counters = {r: self.store.add(f"lowmem/alive/{r}", 0) for r in peers if r not in ended}
                unreachable_since = None
            except (RuntimeError, OSError) as exc:  # the store's host is gone (or the network)
                unreachable_since = unreachable_since or now
                if now - unreachable_since >= self.timeout:
                    self.on_lost(f"the launcher's store on {self.store.host}:{self.store.port} cannot be reached "
                                 f"for {self.timeout:.0f} s ({type(exc).__name__}): the node of rank 0 is gone or "
                                 f"the network failed", None)
                continue
            failed = {r: why for r, why in ended.items() if why != "done"}
            if failed:
                rank, why = next(iter(failed.items()))
                self.on_lost(f"rank {rank} stopped: {why}", why)
            for r, count in counters.items():
                if count != seen[r][0]:
                    seen[r] = (count, now)
            silent = [r for r, (_, moved) in seen.items() if r in counters and now - moved >= self.timeout]
            if silent:
                self.on_lost(f"no sign of life from rank(s) {', '.join(map(str, silent))} for {self.timeout:.0f} s: a "
                             f"node died or the network failed", None)

    def announced(self) -> str | None:
        """The failure another rank announced before it left, if any (a rank that fails says why on its way out)."""
        try:
            for r in range(self.world):
                if r != self.rank and self.store.check([f"lowmem/ended/{r}"]):
                    why = self.store.get(f"lowmem/ended/{r}").decode()
                    if why != "done":
                        return why
        except (RuntimeError, OSError):
            pass
        return None

    def done(self, why: str = "done") -> None:
        """Tell the others this rank ends (`done`, or the reason of a failure), and stop watching."""
        if self._stop is not None:
            self._stop.set()
        try:
            self.store.set(f"lowmem/ended/{self.rank}", why)
        except (RuntimeError, OSError):
            pass  # the store is gone: the others find out by themselves
