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


def test_a_budget_below_the_unconstrained_peak_holds_for_the_whole_run_with_default_settings(tiny_task, tmp_path):
    """Every guard setting at its default (probe_every 10, thresholds relative to the job's limit): the starting
    plan fits the budget by the estimate and sampling tightens near the limit, so the peak of the whole run,
    measured from outside from the first moment, stays under the budget."""
    common = [*TINY_MODEL, "--epochs=2", "--batch_size_per_gpu=32", "--save_steps=100000",
              "--data.eval_max_samples=8", "--validation_file="]
    peak = max(p for _, p in run_sampled([*task_options(tiny_task, tmp_path / "p"), *common, "--data.num_workers=2"]))
    lean = max(p for _, p in run_sampled([*task_options(tiny_task, tmp_path / "l"), *common, "--data.num_workers=0"]))
    assert peak > lean * 1.1, (peak, lean)  # two workers cost something measurable
    budget = (lean + (peak - lean) / 2) / GB  # below the unconstrained peak, above the leanest plan's footprint
    out = tmp_path / "budget"
    samples = run_sampled([*task_options(tiny_task, out), *common, "--data.num_workers=2", "--force",
                           f"--memory.host_budget_gb={budget:.4f}"])
    plans = [r for r in map(json.loads, (out / "memory.jsonl").read_text().splitlines()) if r["kind"] == "plan"]
    assert plans and plans[0]["plan"]["num_workers"] < 2, "the guard never shed a worker"
    assert max(p for _, p in samples) <= budget * GB, (max(p for _, p in samples) / GB, budget, peak / GB, lean / GB)
