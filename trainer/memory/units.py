"""Memory figures as plain data: units, one memory sample of a rank, a GPU reading. Reads nothing, decides nothing.

Both the probe (which fills these from /proc, cgroups and the GPUs) and the pure policy (which decides from them)
import this module; the policy never imports the probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Sequence

GB = 1 << 30
MB = 1 << 20
KB = 1 << 10


@dataclass(frozen=True)
class GpuReading:
    """What gpu.OwnGpu.read returns about this rank's own device (all None without a GPU; see gpu.py)."""

    total: int | None = None
    free: int | None = None  # free on the device: what every process, ours included, left
    used: int | None = None  # NVML's used (nvidia-smi's figure), None without NVML
    allocated: int | None = None  # torch's live tensors in this process
    reserved: int | None = None  # ... plus the allocator's cached blocks
    peak: int | None = None  # most allocated since the previous reading


@dataclass(frozen=True)
class MemorySample:
    """One reading of one rank (or the worst case of several); None = that figure does not exist here."""

    step: int
    time: float  # wall clock (time.time()), comparable across ranks
    host_total: int
    host_available: int  # MemAvailable, as psutil.virtual_memory().available
    swap_used: int
    swap_in_rate: float | None  # bytes/s since the previous sample (None on the first one)
    swap_out_rate: float | None
    swapped_out: int | None  # bytes written to swap since the previous sample: the policy's swap signal
    tree_pss: int  # this process and all its descendants (DataLoader workers); RSS where PSS is unreadable
    tree_rss: int
    tree_processes: int
    cgroup_limit: int | None  # the binding limit: the process's own cgroup or an ancestor's
    cgroup_usage: int | None  # that group's usage minus inactive file cache (reclaimed before any OOM kill)
    slurm_limit: int | None
    budget: int | None
    job_available: int  # what the job may still use here: the least headroom of host, cgroup, Slurm, budget
    job_limit: int | None
    gpu_total: int | None = None  # this rank's own device (gpu.py), never another one
    gpu_free: int | None = None  # free on that device: what every process, ours included, left
    gpu_used: int | None = None  # NVML's used on it (nvidia-smi's figure; counts our cache and other processes)
    torch_allocated: int | None = None  # this process's live tensors on it
    torch_reserved: int | None = None  # ... plus its allocator's cache
    torch_max_allocated: int | None = None  # the most allocated since the previous sample (the GPU step peak)
    step_peak: int | None = None  # the tree's peak since the previous sample (this process's high-water mark)
    job_available_at_peak: int | None = None  # job_available at that peak: what a limit saw at the worst moment
    shm_free: int | None = None  # free bytes in /dev/shm, where DataLoader workers hand batches over

    @property
    def gpu_pressure(self) -> float | None:
        """This rank's GPU demand against what it could have: peak allocated / (free + reserved). Our allocator's
        cache is ours to reuse, so it is not pressure; other processes and our CUDA context are. None without a GPU.
        Without torch's figures (a reading of NVML alone): used / total."""
        if not self.gpu_total:
            return None
        if self.torch_max_allocated is None or self.torch_reserved is None or self.gpu_free is None:
            return None if self.gpu_used is None else self.gpu_used / self.gpu_total
        room = self.gpu_free + self.torch_reserved
        return self.torch_max_allocated / room if room > 0 else 1.0

    @property
    def available_at_peak(self) -> int:
        """What the job had left at its worst moment since the previous sample (the moment a limit would kill)."""
        return self.job_available if self.job_available_at_peak is None else self.job_available_at_peak

    def describe(self) -> str:
        gpu = self.gpu_pressure
        return (f"step {self.step}: job available {self.job_available / GB:.1f} GB"
                + (f" of {self.job_limit / GB:.1f} GB" if self.job_limit else "")
                + f", tree PSS {self.tree_pss / GB:.2f} GB in {self.tree_processes} process(es)"
                + f", swap out {(self.swap_out_rate or 0) / MB:.1f} MB/s"
                + (f", GPU peak {gpu:.0%} of what this rank can have" if gpu is not None else ", no GPU"))

    @classmethod
    def worst(cls, samples: Sequence[MemorySample]) -> MemorySample:
        """The worst case of several ranks (or several moments): least available, most used; the GPU figures all
        come from the sample whose GPU is under the most pressure (they describe one device together)."""
        if not samples:
            raise ValueError("MemorySample.worst needs at least one sample")

        def pick(name: str, choose: Callable) -> object:
            present = [getattr(s, name) for s in samples if getattr(s, name) is not None]
            return choose(present) if present else None

        lowest = ("host_total", "host_available", "cgroup_limit", "slurm_limit", "budget", "job_available", "job_limit",
                  "job_available_at_peak", "shm_free")
        values = {f.name: pick(f.name, min if f.name in lowest else max) for f in fields(cls)
                  if f.name not in GPU_FIELDS}
        tightest = max(samples, key=lambda s: -1.0 if s.gpu_pressure is None else s.gpu_pressure)
        return cls(**values, **{name: getattr(tightest, name) for name in GPU_FIELDS})

    def to_vector(self) -> list[float]:
        """Flat floats (NaN = absent) to all-gather as one float64 tensor."""
        return [math.nan if v is None else float(v) for v in (getattr(self, name) for name in _SCALAR_FIELDS)]

    @classmethod
    def from_vector(cls, vector: Sequence[float]) -> MemorySample:
        if len(vector) != VECTOR_LENGTH:
            raise ValueError(f"a memory sample vector has {VECTOR_LENGTH} numbers, got {len(vector)}")
        floats = {"time", "swap_in_rate", "swap_out_rate"}
        return cls(**{name: None if math.isnan(v) else (float(v) if name in floats else int(round(v)))
                      for name, v in zip(_SCALAR_FIELDS, vector)})


GPU_FIELDS = ("gpu_total", "gpu_free", "gpu_used", "torch_allocated", "torch_reserved", "torch_max_allocated")
_SCALAR_FIELDS = tuple(f.name for f in fields(MemorySample))
VECTOR_LENGTH = len(_SCALAR_FIELDS)


def gb_text(n: float, digits: int = 1) -> str:
    """Bytes as GB for log lines: '1.5 GB'."""
    return f"{n / GB:.{digits}f} GB"


def size_text(n: float) -> str:
    """Bytes in the largest unit that keeps the figure above 0.1: '1.25 GB', '35.0 MB', '4.2 KB', '12 B'."""
    for unit, scale, digits in (("GB", GB, 2), ("MB", MB, 1), ("KB", KB, 1)):
        if n >= 0.1 * scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} B"
