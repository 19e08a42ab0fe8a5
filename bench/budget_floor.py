"""How far below its unconstrained peak can a `--memory.host_budget_gb` go for t5_small?

    python bench/budget_floor.py [--steps 40] [--work /tmp/budget_floor]

One process, t5_small (micro-batch 16 x accumulation 2), the bundled task. Every run is sampled from outside:
peak PSS of the whole process tree (trainer, fork server, DataLoader workers) every 50 ms.
  P    the unconstrained run with the preset's 2 workers
  L    the leanest plan's run (0 workers, no prefetch): the floor no budget can go below
  then runs with budgets between L and P, at the default guard thresholds (what a user gets) and at thresholds
  scaled to the budget, each checked: once the guard has shed the workers, the peak must stay under the budget.
  The peak after the very first change is shown too: with the defaults that change is partial (2 -> 1 worker
  before training) and the next one follows a step later.
The pre-flight check is skipped (`--force`) in the budget runs: its estimate is deliberately conservative
(see the README's calibration table) and would refuse the tightest budgets before they are tried.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for bench.*
from bench.outside import run_sampled as sampled

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "train_low_mem.py"
GB = 2**30


def run_sampled(args: list[str]) -> list[tuple[float, int]]:
    run = sampled([sys.executable, str(ENTRY), "train", *args], cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if run.returncode != 0:
        raise SystemExit(f"run failed ({run.returncode}): {run.stderr[-2000:]}")
    return run.samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/budget_floor"))
    args = ap.parse_args()
    from lowmem_train.trainer.data.zh_numerals import write_task

    data = args.work / "data"
    if not (data / "train.parquet").is_file():
        write_task(data, train_rows=20_000, validation_rows=100, row_group_size=2_000, seed=3)

    def options(name: str) -> list[str]:
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        return ["--config=t5_small", f"--train_file={data / 'train.parquet'}", "--validation_file=",
                f"--tokenizer_dir={data / 'tokenizer'}", f"--output_dir={out}", f"--max_steps={args.steps}",
                "--save_steps=1000000", "--memory.probe_every=1"]

    run_sampled([*options("warm"), "--max_steps=1"])  # trains the tokenizer once, outside the measurements
    peak = max(p for _, p in run_sampled([*options("P"), "--data.num_workers=2"]))
    lean = max(p for _, p in run_sampled([*options("L"), "--data.num_workers=0"]))
    spread = (peak - lean) / GB
    # The guard's thresholds are absolute (defaults: shed at epoch ends below 2.0 GB available, act mid-epoch below
    # 0.75 GB). A budget closer than that to the footprint keeps the guard in an emergency; scaled thresholds are
    # what a tight budget needs.
    scaled = [f"--memory.host_emergency_gb={spread / 4:.4f}", f"--memory.host_low_gb={spread * 0.3:.4f}",
              f"--memory.host_headroom_gb={spread * 0.6:.4f}"]
    cases = [("b50", 0.5, []), ("b10", 0.1, []), ("b10s", 0.1, scaled)]
    rows = []
    for name, share, thresholds in cases:
        budget = (lean + share * (peak - lean)) / GB
        samples = run_sampled([*options(name), "--data.num_workers=2", "--force", f"--memory.host_budget_gb={budget:.3f}",
                               *thresholds])
        journal = [json.loads(line) for line in (args.work / name / "memory.jsonl").read_text().splitlines()]
        plans = [r for r in journal if r["kind"] == "plan"]
        grace = 2.0  # the old loader's workers exit once it is dropped
        first = plans[0]["time"] if plans else samples[0][0]
        no_workers = next((r["time"] for r in plans if r["plan"]["num_workers"] == 0), first)
        after = [p for t, p in samples if t > first + grace]
        settled = [p for t, p in samples if t > no_workers + grace]
        steps = [r for r in journal if r["kind"] == "sample"]
        last_change = plans[-1]["step"] if plans else 0
        tail = [r["sample"][1] for r in steps if r["step"] > last_change + 1]  # the sample vector's [1] is its time
        per_step = (tail[-1] - tail[0]) / (len(tail) - 1) if len(tail) > 1 else float("nan")
        rows.append((budget, "scaled" if thresholds else "default", plans, max(after) if after else float("nan"),
                     max(settled) if settled else float("nan"), per_step))
    base = [r for r in map(json.loads, (args.work / "L" / "memory.jsonl").read_text().splitlines()) if r["kind"] == "sample"]
    lean_step = (base[-1]["sample"][1] - base[1]["sample"][1]) / (len(base) - 2)

    print(f"t5_small, 1 process, micro-batch 16 x accumulation 2, {args.steps} steps, this machine\n")
    print(f"unconstrained peak P (2 workers): {peak / GB:.2f} GB; leanest plan L (0 workers): {lean / GB:.2f} GB "
          f"({100 * (1 - lean / peak):.1f}% below P), {lean_step:.2f} s/step\n")
    print("| budget | below P | thresholds | plan changes | final plan | peak after the first change | peak once the "
          "workers are gone | s/step after the last change | held |")
    print("|---|---|---|---|---|---|---|---|---|")
    for budget, thresholds, plans, worst, settled, per_step in rows:
        final = plans[-1]["plan"] if plans else {}
        plan = (f"micro {final['micro_batch']} x {final['grad_accum']}, {final['num_workers']} workers"
                + (", checkpointing" if final.get("gradient_checkpointing") else "")) if final else "unchanged"
        print(f"| {budget:.3f} GB | {100 * (1 - budget * GB / peak):.1f}% | {thresholds} | {len(plans)} | {plan} "
              f"| {worst / GB:.3f} GB | {settled / GB:.3f} GB | {per_step:.2f} | {'yes' if settled <= budget * GB else 'NO'} |")


if __name__ == "__main__":
    main()
