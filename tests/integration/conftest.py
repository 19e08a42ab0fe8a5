"""Fixtures of the integration tests that need a trained model (made once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY_MODEL, memorisable_task, run_cli

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
