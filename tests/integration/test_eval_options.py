"""Evaluation options through the real train command: open-text scores (--eval.metrics), the best checkpoint picked
by one of them (--eval.best_metric), and loss-only evaluation (--eval.generate=false)."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import TINY_MODEL, metric_records, run_cli, task_options

pytestmark = pytest.mark.slow
BASE = [*TINY_MODEL, "--batch_size_per_gpu=32", "--data.eval_max_samples=16", "--logging_steps=4",
        "--deepspeed_config=none"]


def test_open_text_scores_are_reported_and_the_best_checkpoint_is_the_best_bleu(tiny_task, tmp_path):
    out = tmp_path / "run"
    done = run_cli(["train", *task_options(tiny_task, out), *BASE, "--max_steps=30", "--eval_steps=6",
                    "--save_steps=6", "--keep_latest_n_ckp=1", "--eval.metrics=exact_match,bleu,rouge_l",
                    "--eval.best_metric=bleu", "--learn_rate=1e-2"])
    assert done.returncode == 0, done.stderr[-3000:]
    scored = metric_records(out, "eval")
    assert [e["step"] for e in scored] == [6, 12, 18, 24, 30]
    for e in scored:
        assert 0 <= e["exact_match"] <= 1 and 0 <= e["rouge_l"] <= 1 and 0 <= e["bleu"] <= 100, e
    assert any(e["bleu"] > 0 for e in scored), scored  # the scores move: a BLEU stuck at 0 would pick nothing
    assert "BLEU " in done.stderr and "ROUGE-L " in done.stderr and "exact match " in done.stderr
    assert re.search(r"\d\d:\d\d   \S+ -> .*(ok|\(expected .*\))$", done.stderr, re.M)  # examples, as the next test's lack
    # Each checkpoint carries its BLEU (negated: the state keeps every figure as a loss); the best one is kept
    bleu_at = {e["step"]: e["bleu"] for e in scored}
    kept = {}
    for folder in (out / "checkpoints").glob("step_*"):
        state = json.loads((folder / "train_state.json").read_text())["train_state"]
        kept[state["step"]] = state["eval_score"]
        assert state["eval_score"] == pytest.approx(-bleu_at[state["step"]]), (state["step"], state, bleu_at)
    best = max(bleu_at.values())
    assert 30 in kept and any(-score == pytest.approx(best) for score in kept.values()), (kept, bleu_at)
    assert len(kept) <= 2


def test_loss_only_evaluation_generates_nothing_and_a_score_it_cannot_have_is_refused(tiny_task, tmp_path):
    out = tmp_path / "loss_only"
    done = run_cli(["train", *task_options(tiny_task, out), *BASE, "--max_steps=8", "--eval_steps=4",
                    "--eval.generate=false"])
    assert done.returncode == 0, done.stderr[-3000:]
    scored = metric_records(out, "eval")
    assert [e["step"] for e in scored] == [4, 8]
    for e in scored:
        assert e["loss"] > 0 and e["perplexity"] > 1
        assert not {k for k in e if k.startswith(("exact_match", "bleu", "rouge_l"))}, e
    assert not re.search(r"\d\d:\d\d   \S+ -> .*(ok|\(expected .*\))$", done.stderr, re.M)  # no generated examples

    refused = run_cli(["train", *task_options(tiny_task, tmp_path / "refused"), *BASE, "--eval.generate=false",
                       "--eval.metrics=bleu", "--eval.best_metric=bleu"])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "--eval.best_metric=bleu scores generated answers" in errors[0]
    assert not (tmp_path / "refused").exists()
