"""Fault injection for tests: the narrow seams through which a test makes rare failures happen on demand.

    LOWMEM_FAULT_OOM="micro_batch_over=4[,rank=1][,times=N][,after=K][,phase=backward|eval]"
A CUDA out-of-memory error cannot happen on a machine without a GPU: every forward pass (or, with
phase=backward, every backward pass; with phase=eval, every evaluation batch) of a micro-batch with more than 4
rows (on that rank only, at most N times, not before K such passes went through) raises torch.OutOfMemoryError,
the very exception torch raises on a GPU.

    LOWMEM_FAULT_KILL_IN_SAVE=N
The N-th checkpoint save of the process SIGKILLs it after the model and optimizer files are written and before
the completion marker: the worst moment for a crash, hard to hit with a random kill.

    LOWMEM_FAULT_SLOW_SAVE=SECONDS
Every checkpoint save of the process takes SECONDS longer, after its files are written and before the completion
marker: a large model's save on slow storage, for the time a stop signal leaves (a launcher that kills its
workers 30 s after a SIGTERM would kill such a save half-way).

    LOWMEM_FAULT_HOST_AVAILABLE="gb=1.0[,rank=1][,from_step=4]"
One rank of several on one machine under host-memory pressure that the others do not feel (as one node of a
cluster would be) cannot be produced for real on a single machine: that rank's memory samples report at most
`gb` available from `from_step` on. Everything downstream (all-gather, policy, actuator) is the real code.

    LOWMEM_FAULT_COLLATE_OOM="step=3,rank=1,marker=PATH"
A MemoryError while the batch of `step` is prepared (in a DataLoader worker or the prefetch thread), on that rank,
once per run: the first process to fire creates `marker`, whatever process (a new worker) comes next.

    LOWMEM_FAULT_CRASH="step=N[,rank=R]"
A bug that surfaces mid-run: the N-th optimizer step (numbered as the log numbers it; on that rank only) raises an
error the trainer does not expect (InjectedCrash, a RuntimeError as most errors inside torch code are), so that a
test sees what a crash leaves behind: exit code 1, its status, the checkpoints before it.

    LOWMEM_FAULT_ALLOCATE="mb=M,step=N[,keep=1]"
Memory of a known size inside a step: the N-th optimizer step touches M MB more than it needs and frees them
before the step ends, between two samples of the memory guard, where only a step peak can see them; with keep=1
it holds them for the rest of the run (a run that grows past its start).

Unset (always, outside tests), each check is a single attribute read.
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import torch

ENV = "LOWMEM_FAULT_OOM"


class OomFault:
    def __init__(self, spec: str | None):
        fields = dict(part.split("=", 1) for part in spec.split(",")) if spec else {}
        self.active = bool(fields)
        self.micro_batch_over = int(fields.get("micro_batch_over", 0))
        self.rank = int(fields["rank"]) if "rank" in fields else None
        self.times = int(fields.get("times", 1_000_000))
        self.phase = fields.get("phase", "forward")
        self.after = int(fields.get("after", 0))

    def before_forward(self, rows: int, rank: int) -> None:
        if self.phase == "forward":
            self._maybe_raise(rows, rank)

    def before_backward(self, rows: int, rank: int) -> None:
        if self.phase == "backward":
            self._maybe_raise(rows, rank)

    def before_eval(self, rows: int, rank: int) -> None:
        if self.phase == "eval":
            self._maybe_raise(rows, rank)

    def _maybe_raise(self, rows: int, rank: int) -> None:
        if not self.active or self.times <= 0:
            return
        if rows > self.micro_batch_over and (self.rank is None or self.rank == rank):
            if self.after > 0:
                self.after -= 1
                return
            self.times -= 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {ENV} in {self.phase} for a micro-batch "
                                         f"of {rows} rows)")


OOM_FAULT = OomFault(os.environ.get(ENV))


class HostPressure:
    def __init__(self, spec: str | None):
        fields = dict(part.split("=", 1) for part in spec.split(",")) if spec else {}
        self.active = bool(fields)
        self.cap = int(float(fields.get("gb", 0)) * 2**30)
        self.rank = int(fields["rank"]) if "rank" in fields else None
        self.from_step = int(fields.get("from_step", 0))

    def apply(self, sample, rank: int):
        if not self.active or (self.rank is not None and rank != self.rank) or sample.step < self.from_step:
            return sample
        at_peak = sample.job_available_at_peak
        return replace(sample, host_available=min(sample.host_available, self.cap),
                       job_available=min(sample.job_available, self.cap),
                       job_available_at_peak=None if at_peak is None else min(at_peak, self.cap))


HOST_PRESSURE = HostPressure(os.environ.get("LOWMEM_FAULT_HOST_AVAILABLE"))


class KillInSave:
    def __init__(self, spec: str | None):
        self.countdown = int(spec) if spec else 0

    def after_files_written(self) -> None:
        if self.countdown:
            self.countdown -= 1
            if self.countdown == 0:
                os.kill(os.getpid(), signal.SIGKILL)


KILL_IN_SAVE = KillInSave(os.environ.get("LOWMEM_FAULT_KILL_IN_SAVE"))


class SlowSave:
    def __init__(self, spec: str | None):
        self.seconds = float(spec) if spec else 0.0

    def after_files_written(self) -> None:
        if self.seconds:
            import time

            time.sleep(self.seconds)


SLOW_SAVE = SlowSave(os.environ.get("LOWMEM_FAULT_SLOW_SAVE"))


class CollateFault:
    def __init__(self, spec: str | None):
        fields = dict(part.split("=", 1) for part in spec.split(",")) if spec else {}
        self.active = bool(fields)
        self.step = int(fields.get("step", 0))
        self.rank = int(fields["rank"]) if "rank" in fields else None
        self.marker = fields.get("marker", "")

    def before_collate(self, step: int, rank: int) -> None:
        if not self.active or step != self.step or (self.rank is not None and rank != self.rank):
            return
        try:
            with open(self.marker, "x"):  # exclusive create: fires in exactly one process
                pass
        except FileExistsError:
            return
        raise MemoryError(f"injected by LOWMEM_FAULT_COLLATE_OOM while collating step {step}")


COLLATE_FAULT = CollateFault(os.environ.get("LOWMEM_FAULT_COLLATE_OOM"))


def _fields(spec: str | None) -> dict[str, str]:
    return dict(part.split("=", 1) for part in spec.split(",")) if spec else {}


class InjectedCrash(RuntimeError):
    """The error LOWMEM_FAULT_CRASH raises: nothing in the product catches it by name."""


class Crash:
    def __init__(self, spec: str | None):
        fields = _fields(spec)
        self.step = int(fields.get("step", 0))
        self.rank = int(fields["rank"]) if "rank" in fields else None

    def during_step(self, step: int, rank: int) -> None:
        if self.step and step == self.step and (self.rank is None or self.rank == rank):
            raise InjectedCrash(f"injected by LOWMEM_FAULT_CRASH in step {step} on rank {rank}")


CRASH = Crash(os.environ.get("LOWMEM_FAULT_CRASH"))


class Allocate:
    def __init__(self, spec: str | None):
        fields = _fields(spec)
        self.bytes = int(float(fields.get("mb", 0)) * 2**20)
        self.step = int(fields.get("step", 0))
        self.keep = fields.get("keep", "0") == "1"
        self.held: list[torch.Tensor] = []

    def during_step(self, step: int) -> None:
        if not self.bytes or step != self.step:
            return
        block = torch.ones(self.bytes // 4)  # written, so every page is resident (an untouched one costs nothing)
        if self.keep:
            self.held.append(block)
        del block  # freed here: a block this large goes straight back to the system (mmap'ed, not kept by malloc)


ALLOCATE = Allocate(os.environ.get("LOWMEM_FAULT_ALLOCATE"))
