"""The real CLI, one process: T5 and GPT learn, the final model loads with plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import TINY_MODEL, memorisable_task, run_cli, task_options

pytestmark = pytest.mark.slow


def metrics(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_gpt_tiny_validation_loss_falls(tiny_task, tmp_path):
    out = tmp_path / "gpt"
    result = run_cli(["train", "--config=gpt_tiny", *task_options(tiny_task, out), *TINY_MODEL, "--epochs=2",
                      "--batch_size_per_gpu=32", "--eval_steps=16", "--logging_steps=8", "--data.eval_max_samples=64"])
    assert result.returncode == 0, result.stderr[-3000:]
    evals = metrics(out, "eval")
    assert len(evals) >= 3
    assert evals[-1]["loss"] < 0.8 * evals[0]["loss"], evals
    assert "gpt" in result.stderr
    if not __import__("torch").cuda.is_available():  # one process on a GPU trains with ZeRO-2 offload by default
        assert "plain Accelerate" in result.stderr


def test_t5_learns_and_final_model_loads_with_plain_transformers(tiny_task, tmp_path):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    numbers = [7, 12, 305, 4000, 10010, 99, 1234, 60]
    train = memorisable_task(tmp_path, numbers)
    out = tmp_path / "t5"
    args = ["train", f"--train_file={train}", f"--validation_file={train}", f"--tokenizer_dir={tiny_task['tokenizer']}",
            f"--output_dir={out}", *TINY_MODEL, "--epochs=12", "--batch_size_per_gpu=32", "--learn_rate=1e-2",
            "--logging_steps=4", "--data.eval_max_samples=64", "--seed=3"]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["loss"] for r in metrics(out, "train")]
    assert losses[-1] < 0.3 * losses[0], losses
    assert "exact match" in result.stderr.splitlines()[-1] or "exact match" in result.stderr
    assert (out / "config.yaml").is_file()

    # Loaded with no project code at all, as a user of the exported model would.
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ids = tokenizer("1234", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        generated = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(generated[0], skip_special_tokens=True).replace(" ", "")
    assert answer == "一千二百三十四"
