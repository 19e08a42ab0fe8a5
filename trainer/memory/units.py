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
    """What `read_gpu` returns: pynvml used/total per visible device, torch.cuda figures of the current device."""

    used: tuple[int, ...] = ()
    total: tuple[int, ...] = ()
    torch_allocated: int | None = None
    torch_reserved: int | None = None
    torch_max_allocated: int | None = None


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
    gpu_used: tuple[int, ...] = ()  # per visible device
    gpu_total: tuple[int, ...] = ()
    torch_allocated: int | None = None  # current device
    torch_reserved: int | None = None
    torch_max_allocated: int | None = None
    step_peak: int | None = None  # the tree's peak since the previous sample (this process's high-water mark)
    job_available_at_peak: int | None = None  # job_available at that peak: what a limit saw at the worst moment
    shm_free: int | None = None  # free bytes in /dev/shm, where DataLoader workers hand batches over

    @property
    def gpu_used_fraction(self) -> float | None:
        """Used / total of the fullest GPU, or None without a GPU."""
        fractions = [u / t for u, t in zip(self.gpu_used, self.gpu_total) if t > 0]
        return max(fractions) if fractions else None

    @property
    def available_at_peak(self) -> int:
        """What the job had left at its worst moment since the previous sample (the moment a limit would kill)."""
        return self.job_available if self.job_available_at_peak is None else self.job_available_at_peak

    def describe(self) -> str:
        gpu = self.gpu_used_fraction
        return (f"step {self.step}: job available {self.job_available / GB:.1f} GB"
                + (f" of {self.job_limit / GB:.1f} GB" if self.job_limit else "")
                + f", tree PSS {self.tree_pss / GB:.2f} GB in {self.tree_processes} process(es)"
                + f", swap out {(self.swap_out_rate or 0) / MB:.1f} MB/s"
                + (f", GPU {gpu:.0%}" if gpu is not None else ", no GPU"))

    @classmethod
    def worst(cls, samples: Sequence[MemorySample]) -> MemorySample:
        """The worst case of several ranks (or several moments): least available, most used, fullest GPU."""
        if not samples:
            raise ValueError("MemorySample.worst needs at least one sample")

        def pick(name: str, choose: Callable) -> object:
            present = [getattr(s, name) for s in samples if getattr(s, name) is not None]
            return choose(present) if present else None

        lowest = ("host_total", "host_available", "cgroup_limit", "slurm_limit", "budget", "job_available", "job_limit",
                  "job_available_at_peak", "shm_free")
        values = {f.name: pick(f.name, min if f.name in lowest else max) for f in fields(cls)
                  if f.name not in ("gpu_used", "gpu_total")}
        fullest = max(samples, key=lambda s: -1.0 if s.gpu_used_fraction is None else s.gpu_used_fraction)
        return cls(**values, **fullest._fullest_gpu())

    def _fullest_gpu(self) -> dict[str, tuple[int, ...]]:
        """The GPU fields reduced to the fullest device (what the policy needs, and a fixed width for a vector)."""
        if self.gpu_used_fraction is None:
            return {"gpu_used": (), "gpu_total": ()}
        used, total = max(zip(self.gpu_used, self.gpu_total), key=lambda ut: ut[0] / ut[1] if ut[1] else -1.0)
        return {"gpu_used": (used,), "gpu_total": (total,)}

    def to_vector(self) -> list[float]:
        """Flat floats (NaN = absent) to all-gather as one float64 tensor; the GPUs shrink to the fullest device."""
        scalars = [getattr(self, name) for name in _SCALAR_FIELDS]
        gpu = self._fullest_gpu()
        scalars += [gpu["gpu_used"][0], gpu["gpu_total"][0]] if gpu["gpu_used"] else [None, None]
        return [math.nan if v is None else float(v) for v in scalars]

    @classmethod
    def from_vector(cls, vector: Sequence[float]) -> MemorySample:
        if len(vector) != VECTOR_LENGTH:
            raise ValueError(f"a memory sample vector has {VECTOR_LENGTH} numbers, got {len(vector)}")
        floats = {"time", "swap_in_rate", "swap_out_rate"}
        values = {name: None if math.isnan(v) else (float(v) if name in floats else int(round(v)))
                  for name, v in zip(_SCALAR_FIELDS, vector)}
        used, total = vector[-2:]
        gpu = {} if math.isnan(used) else {"gpu_used": (int(round(used)),), "gpu_total": (int(round(total)),)}
        return cls(**values, **gpu)


_SCALAR_FIELDS = tuple(f.name for f in fields(MemorySample) if f.name not in ("gpu_used", "gpu_total"))
VECTOR_LENGTH = len(_SCALAR_FIELDS) + 2


def gb_text(n: float, digits: int = 1) -> str:
    """Bytes as GB for log lines: '1.5 GB'."""
    return f"{n / GB:.{digits}f} GB"


def size_text(n: float) -> str:
    """Bytes in the largest unit that keeps the figure above 0.1: '1.25 GB', '35.0 MB', '4.2 KB', '12 B'."""
    for unit, scale, digits in (("GB", GB, 2), ("MB", MB, 1), ("KB", KB, 1)):
        if n >= 0.1 * scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} B"
