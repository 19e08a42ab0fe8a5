"""Fixtures of the integration tests: a trained model (made once per session), and the stand-ins that run the
cluster scripts without a scheduler (tests/integration/stand_ins.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY_MODEL, memorisable_task, run_cli
from tests.integration.stand_ins import FAKE_ACCELERATE, FAKE_TRAINER, install

MEMORISED = [7, 305, 1234, 10010]  # 12 epochs of these (96 steps) make a tiny GPT sure of each


@pytest.fixture(scope="session")
def memorised_gpt(tiny_task, tmp_path_factory) -> Path:
    """A tiny GPT (2 layers, d_model 64) trained through the real CLI until it answers MEMORISED; its final/
    model folder (what `generate --model` reads). Other prompts get its guesses: a mix of sure and unsure
    answers, which evaluation and the decoding strategies need."""
    root = tmp_path_factory.mktemp("memorised_gpt")
    out = root / "run"
    result = run_cli(["train", "--config=gpt_tiny", f"--train_file={memorisable_task(root, MEMORISED)}",
                      "--validation_file=", f"--tokenizer_dir={tiny_task['tokenizer']}", f"--output_dir={out}",
                      *TINY_MODEL, "--epochs=12", "--batch_size_per_gpu=32", "--learn_rate=1e-2", "--seed=3"],
                     timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return out / "final"


@pytest.fixture
def stand_ins(tmp_path):
    """The stand-in trainer (`lowmem-train`) and launcher (`accelerate`) first on PATH, an environment without
    any scheduler's variables, and the folder they log to: (env, log)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    log.mkdir()
    install(bin_dir, sys.executable, **{"lowmem-train": FAKE_TRAINER, "accelerate": FAKE_ACCELERATE})
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "PET_", "FAKE_", "LOWMEM_")) and key not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NUM_PROCESSES",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", FAKE_LOG=str(log), PYTHON=sys.executable, TMPDIR=str(tmp_path))
    return env, log
