"""Memory of a command measured from outside: the PSS of its whole process tree, sampled while it runs.

The one definition of "peak tree PSS" that the benchmarks and the tests use to check the guard and the estimate:
the trainer, its fork server and every DataLoader worker, each counted by PSS (shared pages split between the
processes that share them, not counted once per process as RSS would). The guard's own probe (probe.py) reads
the same numbers from inside; this reads them as an observer that the run under test cannot influence.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field

import psutil


def tree_pss(pid: int, with_root: bool = True) -> int:
    """PSS of a process and all its descendants, in bytes (0 for whatever exits while we look). `with_root=False`:
    the descendants only (under a launcher: every rank's tree together, without the launcher itself)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)][0 if with_root else 1:]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:  # a worker that exited between the listing and the read
            pass
    return total


@dataclass
class SampledRun:
    returncode: int
    stdout: str
    stderr: str
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time.time(), tree PSS bytes)

    @property
    def peak(self) -> int:
        return max((pss for _, pss in self.samples), default=0)


def run_sampled(cmd: list[str], interval: float = 0.05, timeout: float | None = None, with_root: bool = True,
                **popen) -> SampledRun:
    """Run `cmd` to its end, sampling its tree's PSS every `interval` seconds (without `cmd`'s own process when
    `with_root` is False: a launcher's ranks). On a timeout or an interrupt the command's whole tree is killed
    before the exception propagates: nothing measured outlives the measurement."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    samples: list[tuple[float, int]] = []

    def sample() -> None:
        while proc.poll() is None:
            samples.append((time.time(), tree_pss(proc.pid, with_root)))
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        proc.kill()
        for child in descendants:
            try:
                child.kill()
            except psutil.Error:
                pass
        proc.wait()
        raise
    finally:
        sampler.join()
    return SampledRun(proc.returncode, out, err, samples)
