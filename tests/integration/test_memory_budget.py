"""A host-memory budget, checked from outside: the test samples the run's process-tree PSS itself."""

from __future__ import annotations

import json
import os
import sys

import pytest

from bench.outside import run_sampled as sampled

from tests.helpers import ENTRY, REPO, TINY_MODEL, accelerate_launch, task_options

pytestmark = pytest.mark.slow
GB = 2**30


def run_sampled(args: list[str], launcher: list[str] | None = None) -> list[tuple[float, int]]:
    """Run `train` and sample (time, tree PSS) every 50 ms until it exits; under a launcher, the PSS of every rank's
    tree together (the launcher's own process aside: the guard budgets the ranks of this machine)."""
    run = sampled([*(launcher or [sys.executable]), str(ENTRY), "train", *args], timeout=900, cwd=REPO,
                  env={**os.environ, "PYTHONWARNINGS": "ignore"}, with_root=launcher is None)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.samples


def plans(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "memory.jsonl").read_text().splitlines()) if r["kind"] == "plan"]


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
    shed = plans(out)
    assert shed and shed[0]["plan"]["num_workers"] < 2, "the guard never shed a worker"
    assert max(p for _, p in samples) <= budget * GB, (max(p for _, p in samples) / GB, budget, peak / GB, lean / GB)


def test_a_budget_holds_for_both_ranks_of_a_two_process_run_measured_from_outside(tiny_task, tmp_path, deepspeed_ops):
    """The budget covers every rank on the machine: two ranks (DeepSpeed ZeRO-2 + CPU offload), each with its
    workers, measured together from outside, stay under a budget that the unconstrained run breaks."""
    common = [*TINY_MODEL, "--max_steps=40", "--batch_size_per_gpu=32", "--save_steps=100000", "--validation_file="]

    def ranks_peak(out: str, port: int, *extra: str) -> int:
        launcher = accelerate_launch("cpu_2proc_deepspeed.yaml", port)
        return max(p for _, p in run_sampled([*task_options(tiny_task, tmp_path / out), *common, *extra], launcher))

    peak = ranks_peak("p", 29801, "--data.num_workers=2")
    lean = ranks_peak("l", 29802, "--data.num_workers=0")
    assert peak > lean * 1.1, (peak, lean)  # four workers cost something measurable
    budget = (lean + (peak - lean) / 2) / GB
    out = tmp_path / "budget"
    held = ranks_peak("budget", 29803, "--data.num_workers=2", "--force", f"--memory.host_budget_gb={budget:.4f}")
    print(f"2 ranks: unconstrained {peak / GB:.3f} GB, leanest {lean / GB:.3f} GB, budget {budget:.3f} GB, "
          f"held at {held / GB:.3f} GB")
    shed = plans(out)
    assert shed and shed[0]["plan"]["num_workers"] < 2, "the guard never shed a worker"
    assert held <= budget * GB, (held / GB, budget, peak / GB, lean / GB)
