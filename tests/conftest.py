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
