"""Shared fixtures: a tiny copy of the bundled task (made once per session) and DeepSpeed's CPU op."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import psutil
import pytest

PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config):
    """Processes orphaned by a test (ranks under a launcher killed on a timeout) are re-parented to pytest rather
    than to init, so `no_stray_processes` can find and stop them: nothing a test started outlives it, and a hung
    run cannot keep CI waiting after pytest is done."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans go to init as usual
        pass


def _ours_to_keep(proc: psutil.Process) -> bool:
    # pytest's own multiprocessing helpers (resource tracker, fork server) serve later tests; an adopted orphan
    # that already exited is a zombie of ours to reap (killing it is a no-op, waiting for it reaps it)
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return proc.ppid() == os.getpid() and "multiprocessing" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


ALL_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def worker_share() -> list[int]:
    """The cores of this pytest-xdist worker: the machine's cores split evenly between the workers (`-n 2` on 2
    cores: one each); [] outside xdist or with more workers than cores."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or len(ALL_CORES) < count:
        return []
    index = int(worker[2:]) % count
    return ALL_CORES[index * len(ALL_CORES) // count:(index + 1) * len(ALL_CORES) // count]


@pytest.fixture(autouse=True)
def cores_of_this_worker(request):
    """Under `pytest -n 2` every test runs on its worker's share of the cores, and so does everything it starts
    (affinity is inherited; the trainer sizes its threads from it, trainer/threads.py). Unpinned, two tests' torch
    thread pools oversubscribe the cores and stall at every parallel region (bench/peers.py's docstring), which
    made the parallel suite barely faster than the serial one. A test marked `all_cores` gets the whole machine."""
    share = worker_share()
    if not share or request.node.get_closest_marker("all_cores"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    os.sched_setaffinity(0, share)
    torch.set_num_threads(len(share))  # this process's own pool, for tests that compute in-process
    try:
        yield
    finally:
        os.sched_setaffinity(0, ALL_CORES)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_stray_processes():
    yield
    strays = [p for p in psutil.Process().children(recursive=True) if not _ours_to_keep(p)]
    for proc in strays:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(strays, timeout=10)


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> dict[str, Path]:
    """Train/validation parquet (several row groups) and a tokenizer, made once per test session."""
    from lowmem_train.model.tokenizer import train_tokenizer
    from lowmem_train.trainer.data.source import ParquetIndex
    from lowmem_train.trainer.data.setup import tokenizer_texts
    from lowmem_train.trainer.data.zh_numerals import write_task

    root = tmp_path_factory.mktemp("task")
    train, validation = write_task(root, train_rows=4096, validation_rows=128, row_group_size=512, seed=1)
    train_tokenizer(tokenizer_texts(ParquetIndex.build(str(train), ("prompt", "response"))), 64, root / "tokenizer")
    return {"train": train, "validation": validation, "tokenizer": root / "tokenizer", "root": root}


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """Build DeepSpeed's CPU Adam op once, before any multi-process test (both ranks would race to build it).

    It lands in ~/.cache/torch_extensions and is reused by later runs; the first build takes ~2 minutes.
    """
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load()
