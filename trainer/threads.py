"""CPU threads per rank: torch's intra-op pool and DeepSpeed's CPU Adam (OpenMP) share the machine's cores.

Why this exists. `accelerate launch` without `--cpu` sets OMP_NUM_THREADS of every process to the environment's
value or 1 (accelerate/commands/launch.py: `get_int_from_env(["OMP_NUM_THREADS"], 1)`, then utils/launch.py
writes it into every rank's environment), and torchrun does the same for more than one process per node. The
product's default on GPUs offloads the optimizer to the CPU (ZeRO-2 + CPU offload), where DeepSpeedCPUAdam runs its
update as an OpenMP loop: with one thread per rank, an 8-GPU, 64-core node leaves 56 cores idle through every
optimizer step. So when the user has not chosen (`--cpu_threads 0`, OMP_NUM_THREADS unset or the launchers'
default of 1), each rank takes its share: usable cores / processes on this machine.

"Usable cores": the CPUs this process may run on (its affinity: Slurm's and taskset's cpusets) capped by the
cgroup's CPU quota (a container's --cpus: cgroup v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us).

The JIT-built CPU Adam op has no OpenMP runtime of its own: it calls the libgomp torch ships (its GOMP_parallel
resolves through libtorch_cpu; `nm -D cpu_adam.so`), from the training thread. So `torch.set_num_threads` in that
thread sets the threads of both (OpenMP's nthreads-var is per thread); OMP_NUM_THREADS is set too, for anything
that reads it when it loads. The train command applies it first, before the model or the optimizer exist.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # OpenMP (torch, CPU Adam) and MKL, where torch uses it


def usable_cores(root: Path = Path("/")) -> tuple[int, str]:
    """(cores this process may use, how that was found)."""
    try:
        cores, how = len(os.sched_getaffinity(0)), "CPU affinity"
    except (AttributeError, OSError):  # not Linux
        cores, how = os.cpu_count() or 1, "CPU count"
    quota = cgroup_cpu_quota(root)
    if quota is not None and quota < cores:
        return max(1, math.floor(quota)), f"cgroup CPU quota {quota:g}"
    return max(1, cores), how


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs the cgroup's quota allows (quota / period), or None without a quota. Reads, never writes."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    groups = {ctl: path for _, ctl, path in (line.split(":", 2) for line in lines if line.count(":") >= 2)}
    v1 = next((path for ctl, path in groups.items() if "cpu" in ctl.split(",")), None)
    candidates = []
    if v1 is not None:
        for mount in ("sys/fs/cgroup/cpu,cpuacct", "sys/fs/cgroup/cpu"):
            for group in (root / mount / v1.lstrip("/"), root / mount):  # in a container the mount root is the group
                candidates.append((group / "cpu.cfs_quota_us", group / "cpu.cfs_period_us"))
    if "" in groups:
        for group in (root / "sys/fs/cgroup" / groups[""].lstrip("/"), root / "sys/fs/cgroup"):
            candidates.append((group / "cpu.max", None))
    for quota_file, period_file in candidates:
        try:
            text = quota_file.read_text().split()
            if period_file is None:  # v2: "max 100000" or "200000 100000"
                return None if text[0] == "max" else int(text[0]) / int(text[1])
            quota = int(text[0])
            return None if quota < 0 else quota / int(period_file.read_text())
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None


def threads_per_rank(requested: int, environ: Mapping[str, str], cores: int) -> tuple[int, str]:
    """(threads for each rank, why). `requested` > 0 is the user's --cpu_threads. Otherwise OMP_NUM_THREADS when the
    user set it above 1; 1 there is what the launchers write when nobody set it, so it is treated as unset."""
    if requested > 0:
        return requested, "--cpu_threads"
    given = environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 1:
        return int(given), "OMP_NUM_THREADS"
    local = environ.get("LOCAL_WORLD_SIZE", "")
    ranks = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, cores // ranks), f"{cores} usable cores / {ranks} process(es) on this machine"


def apply(threads: int) -> None:
    """Use `threads` CPU threads in this thread's parallel work (torch's ops, CPU Adam) and in what loads later."""
    import torch

    for name in VARIABLES:
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
