"""Reads memory numbers of the host, the job's limits, this process tree and the GPUs. Decides nothing, writes nothing.

Every file the probe reads (/proc, /sys/fs/cgroup) is read below one `root` directory and the environment comes
from a mapping, so tests build fake cgroup v1/v2 trees in a temporary folder. GPU numbers come from one
injectable callable, `read_gpu`: by default this rank's own device (gpu.py), opened at the first sample, once the
device is chosen. All sizes are bytes; a field is None when that figure does not exist here.

Cost, measured on a 2-core VM with torch loaded: ~0.2 ms per sample (0.2% of a 100 ms step, and a sample is taken
every probe_every steps). The only expensive figure is PSS: the kernel walks page tables for it (~9 ms for a 430 MB
process here, growing with resident size), so PSS is re-read when the tree changes (a worker came or went) or after
max(pss_refresh_seconds, 100 x the last read's cost); in between each process's PSS moves with its RSS (a cheap
counter), which tracks private memory one for one. The tree is walked through /proc/<pid>/task/<tid>/children
(CONFIG_PROC_CHILDREN, on in mainstream distribution kernels). Without /proc (not Linux) host figures come from
psutil and the tree reads as empty.
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from lowmem_train.trainer.memory.units import GB, MB, GpuReading, MemorySample

if TYPE_CHECKING:
    from lowmem_train.config.memory import MemoryConfig

UNLIMITED_AT = 1 << 60  # cgroup v1 says "no limit" with 9223372036854771712 (a page-size dependent huge number)
PAGE_SIZE = resource.getpagesize()


class MemoryProbe:
    """Call `sample(step)` every few steps; cheap enough for every step (see module docstring)."""

    def __init__(self, root: Path = Path("/"), budget_bytes: int | None = None,
                 environ: Mapping[str, str] | None = None, read_gpu: Callable[[], GpuReading] | None = None,
                 pid: int | None = None, pss_refresh_seconds: float = 30.0):
        self.root = Path(root)
        self._proc = str(self.root / "proc")  # plain strings: pathlib doubles the cost of a small read
        self._procfs = os.path.exists(f"{self._proc}/meminfo")
        environ = os.environ if environ is None else environ
        self.pid = os.getpid() if pid is None else pid
        self.budget = budget_bytes if budget_bytes and budget_bytes > 0 else None
        self.slurm_limit = slurm_limit(environ)
        # Budget and Slurm limits cover all ranks of the machine, but each rank sees only its own tree: ranks are
        # alike, so the machine's use is taken as local ranks x this tree.
        local = environ.get("LOCAL_WORLD_SIZE", "")
        self.ranks_on_node = int(local) if local.isdigit() and int(local) > 0 else 1
        self.read_gpu = read_gpu if read_gpu is not None else self._own_gpu
        self._gpu = None  # gpu.OwnGpu, opened by the first sample that reads it
        self._gpu_is_ours = read_gpu is None
        self.cgroup_levels = find_cgroup_levels(self.root)
        self.pss_refresh_seconds = pss_refresh_seconds
        self._pss_at_refresh: dict[int, tuple[int, int]] = {}  # pid -> (pss, rss) when PSS was last read
        self._pss_read_at, self._pss_read_cost = -math.inf, 0.0
        self._last_swap: tuple[float, int, int] | None = None  # (monotonic time, bytes in, bytes out)

    @classmethod
    def from_config(cls, memory_cfg: MemoryConfig, **kwargs) -> MemoryProbe:
        """A probe with the budget of a MemoryConfig (host_budget_gb)."""
        return cls(budget_bytes=int(memory_cfg.host_budget_gb * GB), **kwargs)

    def sample(self, step: int = 0, reset_peaks: bool = True) -> MemorySample:
        """One reading. The step peaks (host high-water mark, GPU allocator peak) cover the time since the previous
        reading and start over after it; `reset_peaks=False` reads them without consuming them (a snapshot between
        two samples of the guard)."""
        host_total, host_available, swap_used, swap_in, swap_out = self._host()
        now, last = time.monotonic(), self._last_swap
        self._last_swap = (now, swap_in, swap_out)
        elapsed = max(now - last[0], 1e-9) if last else 0.0
        tree_pss, tree_rss, processes = self._tree_memory()
        rise = self._rise_to_peak(reset_peaks)  # read before anything below allocates
        gpu = self.read_gpu() if reset_peaks or not self._gpu_is_ours else self._open_gpu().read(reset_peak=False)
        readings = [level.read() for level in self.cgroup_levels]
        limited = [(limit, usage) for limit, usage in readings if limit is not None]
        # The level with the least headroom binds; without a limit, the own group's usage is still reported.
        cgroup_limit, cgroup_usage = (min(limited, key=lambda lu: lu[0] - lu[1]) if limited
                                      else (None, readings[0][1] if readings else None))
        headrooms = [host_available] + ([cgroup_limit - cgroup_usage] if cgroup_limit is not None else [])
        headrooms += [limit - self.ranks_on_node * tree_pss for limit in (self.slurm_limit, self.budget) if limit]
        limits = [v for v in (host_total, cgroup_limit, self.slurm_limit, self.budget) if v]
        # At the peak every rank of the machine had risen alike (they run the same steps): the headrooms were smaller
        # by the rise of all of them.
        at_peak = min(headrooms) - self.ranks_on_node * rise
        return MemorySample(
            step=step, time=time.time(), host_total=host_total, host_available=host_available, swap_used=swap_used,
            swap_in_rate=(swap_in - last[1]) / elapsed if last else None,
            swap_out_rate=(swap_out - last[2]) / elapsed if last else None,
            swapped_out=swap_out - last[2] if last else None, tree_pss=tree_pss, tree_rss=tree_rss,
            tree_processes=processes, cgroup_limit=cgroup_limit, cgroup_usage=cgroup_usage,
            slurm_limit=self.slurm_limit, budget=self.budget, job_available=max(0, min(headrooms)),
            job_limit=min(limits) if limits else None, gpu_total=gpu.total, gpu_free=gpu.free, gpu_used=gpu.used,
            torch_allocated=gpu.allocated, torch_reserved=gpu.reserved, torch_max_allocated=gpu.peak,
            step_peak=tree_pss + rise,
            job_available_at_peak=max(0, at_peak), shm_free=self._shm_free(),
        )

    def _open_gpu(self):
        if self._gpu is None:
            from lowmem_train.trainer.memory.gpu import OwnGpu

            self._gpu = OwnGpu()
        return self._gpu

    def _own_gpu(self) -> GpuReading:
        return self._open_gpu().read()

    def release_gpu_cache(self) -> None:
        """After a shrink: the allocator's unused cache back to the driver, and a new peak (gpu.OwnGpu)."""
        if self._gpu_is_ours:
            self._open_gpu().release_cache()

    def _rise_to_peak(self, reset: bool = True) -> int:
        """How far above its present RSS this process went since the last call (its high-water mark, VmHWM), which
        is then reset (Linux: writing 5 to clear_refs). Samples between steps miss what a step allocates and frees:
        activations, the optimizer step's temporaries; the high-water mark holds it."""
        status = read_fields(f"{self._proc}/{self.pid}/status", (b"VmHWM:", b"VmRSS:"), scale=1024)
        if not reset:
            return max(0, status.get(b"VmHWM:", 0) - status.get(b"VmRSS:", 0))
        try:
            with open(f"{self._proc}/{self.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # not Linux >= 4.0, or not ours to reset: the mark then covers the whole run
            pass
        return max(0, status.get(b"VmHWM:", 0) - status.get(b"VmRSS:", 0))

    def _shm_free(self) -> int | None:
        try:
            st = os.statvfs(self.root / "dev" / "shm")
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _host(self) -> tuple[int, int, int, int, int]:
        """(total, available, swap used, bytes swapped in and out since boot), as psutil computes them."""
        if not self._procfs:  # not Linux: psutil's own sources
            import psutil

            vm, swap = psutil.virtual_memory(), psutil.swap_memory()
            return vm.total, vm.available, swap.used, swap.sin, swap.sout
        mem = read_fields(f"{self._proc}/meminfo", (b"MemTotal:", b"MemFree:", b"MemAvailable:", b"Buffers:",
                                                    b"Cached:", b"SwapTotal:", b"SwapFree:"), scale=1024)
        available = mem.get(b"MemAvailable:")
        if available is None:  # kernels before 3.14
            available = sum(mem.get(k, 0) for k in (b"MemFree:", b"Buffers:", b"Cached:"))
        swaps = read_fields(f"{self._proc}/vmstat", (b"pswpin ", b"pswpout "), scale=PAGE_SIZE)
        return (mem.get(b"MemTotal:", 0), available, mem.get(b"SwapTotal:", 0) - mem.get(b"SwapFree:", 0),
                swaps.get(b"pswpin ", 0), swaps.get(b"pswpout ", 0))

    def _tree_memory(self) -> tuple[int, int, int]:
        """(PSS, RSS, process count) of the tree; processes that vanish while being read are skipped."""
        rss = {pid: value for pid in self._tree_pids() if (value := self._read_rss(pid)) is not None}
        now = time.monotonic()
        # PSS of a big process costs milliseconds: re-read it no more than 1% of the time, however often asked.
        stale = now - self._pss_read_at >= max(self.pss_refresh_seconds, 100 * self._pss_read_cost)
        if stale or rss.keys() != self._pss_at_refresh.keys():  # a worker's fork also re-splits shared pages
            self._pss_at_refresh = {pid: (self._read_pss(pid, r), r) for pid, r in rss.items()}
            self._pss_read_at, self._pss_read_cost = now, time.monotonic() - now
        pss = sum(max(0, pss0 + rss[pid] - rss0) for pid, (pss0, rss0) in self._pss_at_refresh.items())
        return pss, sum(rss.values()), len(rss)

    def _tree_pids(self) -> list[int]:
        # /proc/<pid>/task/<tid>/children lists the children each thread forked: a walk down the tree that costs
        # a few reads, unlike psutil's children() which reads /proc/*/stat of every process on the machine.
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            if pid in pids:
                continue
            pids.append(pid)
            try:
                tids = os.listdir(f"{self._proc}/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                todo += [int(c) for c in (read_file(f"{self._proc}/{pid}/task/{tid}/children") or b"").split()]
        return pids

    def _read_rss(self, pid: int) -> int | None:
        statm = (read_file(f"{self._proc}/{pid}/statm") or b"").split()
        return int(statm[1]) * PAGE_SIZE if len(statm) > 1 else None

    def _read_pss(self, pid: int, rss: int) -> int:
        return process_pss(pid, self._proc) or rss


@dataclass(frozen=True)
class CgroupLevel:
    """One cgroup directory with a memory limit: the process's own group or an ancestor (limits nest)."""

    limit_files: tuple[str, ...]  # v2: memory.max and memory.high (throttling starts there); v1: limit_in_bytes
    usage_file: str
    stat_file: str
    inactive_key: bytes  # v2: inactive_file; v1: total_inactive_file (hierarchical)

    def read(self) -> tuple[int | None, int]:
        """(limit or None when unlimited, usage minus inactive file cache)."""
        limits = [v for v in map(read_number, self.limit_files) if v is not None and v < UNLIMITED_AT]
        usage = read_number(self.usage_file) or 0
        inactive = read_fields(self.stat_file, (self.inactive_key,)).get(self.inactive_key, 0)
        return (min(limits) if limits else None), max(0, usage - inactive)


def find_cgroup_levels(root: Path) -> list[CgroupLevel]:
    """The process's memory cgroup and its limited ancestors, from /proc/self/cgroup; found once, read each sample."""
    lines = (read_file(str(root / "proc/self/cgroup")) or b"").decode().splitlines()
    groups = {ctl: path for _, ctl, path in (line.split(":", 2) for line in lines if line.count(":") >= 2)}
    v1_path = next((path for ctl, path in groups.items() if "memory" in ctl.split(",")), None)
    if v1_path is not None and (root / "sys/fs/cgroup/memory").is_dir():
        base, path, names = root / "sys/fs/cgroup/memory", v1_path, ("memory.limit_in_bytes",)
        usage_name, stat_key = "memory.usage_in_bytes", b"total_inactive_file "
    elif "" in groups and (root / "sys/fs/cgroup/cgroup.controllers").exists():
        base, path, names = root / "sys/fs/cgroup", groups[""], ("memory.max", "memory.high")
        usage_name, stat_key = "memory.current", b"inactive_file "
    else:
        return []
    group = base / path.strip().lstrip("/")
    if not group.is_dir():  # in a container the mount root often *is* the group named in /proc/self/cgroup
        group = base
    chain = [group] + [base / parent for parent in group.relative_to(base).parents]  # own group up to the mount
    levels = [CgroupLevel(tuple(str(d / n) for n in names), str(d / usage_name), str(d / "memory.stat"), stat_key)
              for d in chain]
    limited = [level for level in levels if level.read()[0] is not None]
    # Without any limit keep the own group, so that its usage is still reported.
    return limited or [level for level in levels[:1] if os.path.exists(level.usage_file)]


def slurm_limit(environ: Mapping[str, str]) -> int | None:
    """The Slurm allocation of this node in bytes, from SLURM_MEM_PER_NODE or SLURM_MEM_PER_CPU x CPUs (in MB)."""
    per_node, per_cpu, cpus = (environ.get(k, "") for k in ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU",
                                                             "SLURM_CPUS_ON_NODE"))
    if per_node.isdigit() and int(per_node) > 0:  # --mem=0 means "all of the node": no limit of its own
        return int(per_node) * MB
    if per_cpu.isdigit() and cpus.isdigit() and int(per_cpu) * int(cpus) > 0:
        return int(per_cpu) * int(cpus) * MB
    return None


def process_pss(pid: int | str = "self", proc: str = "/proc") -> int:
    """PSS of one process in bytes (shared pages split between their users), 0 when it cannot be read."""
    return read_fields(f"{proc}/{pid}/smaps_rollup", (b"Pss:",), scale=1024).get(b"Pss:", 0)


def read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:  # gone (a process that exited), or never there
        return None


def read_number(path: str) -> int | None:
    """An integer file such as memory.max; None for "max", a missing file or garbage."""
    try:
        return int(read_file(path) or b"")
    except ValueError:
        return None


def read_fields(path: str, keys: Sequence[bytes], scale: int = 1) -> dict[bytes, int]:
    """{key: number after it * scale} for `key value` lines; each key carries its separator (b"Pss:", b"pswpin ")."""
    data = b"\n" + (read_file(path) or b"")
    found = {}
    for key in keys:
        at = data.find(b"\n" + key)
        if at >= 0:
            number = data[at + len(key) + 1: at + len(key) + 40].split()[:1]
            if number and number[0].isdigit():
                found[key] = int(number[0]) * scale
    return found
