"""Exact resume: a run interrupted and resumed twice equals the uninterrupted run, step by step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, TINY_MODEL, accelerate_launch, task_options

pytestmark = pytest.mark.slow
RECORDER = REPO / "tests" / "integration" / "scripts" / "record_run.py"

# 4096 rows / global batch 64 = 64 steps per epoch, 2 epochs; dropout on so that RNG restore matters.
COMMON = [*TINY_MODEL, "--epochs=2", "--batch_size_per_gpu=32", "--gradient_accumulation_steps=2", "--save_steps=16",
          "--logging_steps=8", "--data.eval_max_samples=16", "--model.dropout=0.1", "--learn_rate=3e-3"]


def recorded(out, extra: list[str], tiny_task, launcher: list[str] | None = None, env: dict | None = None) -> list[dict]:
    cmd = (launcher or [sys.executable]) + [str(RECORDER), *task_options(tiny_task, out), *COMMON, *extra]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = sorted(out.glob("record_rank*.pt"))
    records = [torch.load(p, weights_only=False) for p in ranks]
    for p in ranks:
        p.unlink()  # the next segment writes its own
    return records


def max_weight_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def check_resumed_equals_straight(tiny_task, tmp_path, launcher_for, tolerance, env=None, env_first_only=False):
    # 80 of the 128 steps the schedule spans: the second resume lands after the epoch boundary (step 64)
    straight = recorded(tmp_path / "straight", ["--max_steps=80"], tiny_task, launcher_for(0), env)
    segments = []
    for i, extra in enumerate([["--max_steps=30"], ["--max_steps=70", "--is_keep_training=True"],
                               ["--max_steps=80", "--is_keep_training=True"]]):
        segment_env = env if i == 0 or not env_first_only else None
        segments.append(recorded(tmp_path / "resumed", extra, tiny_task, launcher_for(i + 1), segment_env))
    for rank in range(len(straight)):
        resumed_losses = [loss for seg in segments for loss in seg[rank]["losses"]]
        assert [s for s, _ in resumed_losses] == [s for s, _ in straight[rank]["losses"]]  # no step lost or repeated
        diffs = [(abs(a - b), s) for (s, a), (_, b) in zip(resumed_losses, straight[rank]["losses"])]
        assert max(diffs)[0] <= tolerance, (max(diffs), [s for d, s in diffs if d > tolerance][:3])
        resumed_positions = [step for seg in segments for step in seg[rank]["steps"]]
        assert resumed_positions == straight[rank]["steps"]  # the same samples, in the same order
        assert max_weight_diff(segments[-1][rank]["weights"], straight[rank]["weights"]) <= tolerance
    return straight, segments


def test_two_resumes_equal_an_uninterrupted_run_single_process(tiny_task, tmp_path):
    check_resumed_equals_straight(tiny_task, tmp_path, lambda i: None, tolerance=1e-6)


def test_two_resumes_equal_an_uninterrupted_run_two_process_deepspeed(tiny_task, tmp_path, deepspeed_ops):
    check_resumed_equals_straight(tiny_task, tmp_path, lambda i: accelerate_launch("cpu_2proc_deepspeed.yaml", 29640 + i),
                                  tolerance=1e-6)


def test_resume_keeps_the_plan_the_guard_chose_after_an_injected_oom(tiny_task, tmp_path):
    """An OOM injected at the first step (the OOM seam, first segment only) halves the micro-batch; the resumed
    segments, without the seam, can only be on that plan if the checkpoint brought it back."""
    env = {"LOWMEM_FAULT_OOM": "micro_batch_over=16,times=1"}
    straight, segments = check_resumed_equals_straight(tiny_task, tmp_path, lambda i: None, tolerance=1e-4, env=env,
                                                       env_first_only=True)
    assert straight[0]["plan"]["micro_batch"] == 16 and straight[0]["plan"]["grad_accum"] == 4
    assert segments[-1][0]["plan"] == straight[0]["plan"]
