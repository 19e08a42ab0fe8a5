"""A host-memory budget, checked from outside: the test samples the run's process-tree PSS itself."""

from __future__ import annotations

import json
import os
import sys

import pytest

from bench.outside import run_sampled as sampled

from tests.helpers import ENTRY, REPO, TINY_MODEL, task_options

pytestmark = pytest.mark.slow
GB = 2**30


def run_sampled(args: list[str]) -> list[tuple[float, int]]:
    """Run `train` and sample (time, tree PSS) every 50 ms until it exits."""
    run = sampled([sys.executable, str(ENTRY), "train", *args], timeout=900, cwd=REPO,
                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.samples


def test_budget_below_the_unconstrained_peak_holds_after_the_first_adjustment(tiny_task, tmp_path):
    common = [*TINY_MODEL, "--epochs=2", "--batch_size_per_gpu=32", "--save_steps=100000",
              "--data.eval_max_samples=8", "--validation_file="]
    peak = max(p for _, p in run_sampled([*task_options(tiny_task, tmp_path / "p"), *common, "--data.num_workers=2"]))
    lean = max(p for _, p in run_sampled([*task_options(tiny_task, tmp_path / "l"), *common, "--data.num_workers=0"]))
    assert peak > lean * 1.1, (peak, lean)  # two workers cost something measurable
    spread = (peak - lean) / GB
    budget = lean / GB + spread / 2  # below the unconstrained peak, above the leanest plan's footprint
    out = tmp_path / "budget"
    samples = run_sampled([*task_options(tiny_task, out), *common, "--data.num_workers=2", "--force",
                           f"--memory.host_budget_gb={budget:.4f}", "--memory.probe_every=1",
                           # thresholds on the scale of this small budget: with any worker left, below the floor
                           f"--memory.host_emergency_gb={spread / 4:.4f}", f"--memory.host_low_gb={spread * 0.3:.4f}",
                           f"--memory.host_headroom_gb={spread * 0.6:.4f}"])
    plans = [r for r in map(json.loads, (out / "memory.jsonl").read_text().splitlines()) if r["kind"] == "plan"]
    assert plans, "the guard never adjusted the plan"
    assert plans[-1]["plan"]["num_workers"] == 0
    first = plans[0]["time"]
    grace = 2.0  # workers of the old loader exit once its iterator is dropped
    after = [p for t, p in samples if t > first + grace]
    assert after, "the run ended right after the adjustment: nothing to check"
    assert max(after) <= budget * GB, (max(after) / GB, budget, peak / GB, lean / GB)
