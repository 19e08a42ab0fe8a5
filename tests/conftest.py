"""Shared fixtures: a tiny copy of the bundled task (made once per session) and DeepSpeed's CPU op."""

from __future__ import annotations

from pathlib import Path

import pytest


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
