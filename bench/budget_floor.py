"""How far below its unconstrained peak can a `--memory.host_budget_gb` go for t5_small?

    python bench/budget_floor.py [--steps 40] [--work /tmp/budget_floor]

One process, t5_small (micro-batch 16 x accumulation 2), the bundled task. Every run is sampled from outside:
peak PSS of the whole process tree (trainer, fork server, DataLoader workers) every 50 ms.
  P    the unconstrained run with the preset's 2 workers
  L    the leanest plan's run (0 workers, no prefetch): the floor no budget can go below
  then runs with budgets between L and P at the default guard thresholds (what a user gets), each checked:
  its peak after the guard's first adjustment must stay under the budget.
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

from lowmem_train.trainer.memory.outside import run_sampled as sampled

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
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
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
    rows = []
    for share in (0.5, 0.25, 0.1):
        budget = (lean + share * (peak - lean)) / GB
        samples = run_sampled([*options(f"b{share}"), "--data.num_workers=2", "--force",
                               f"--memory.host_budget_gb={budget:.3f}"])
        journal = [json.loads(line) for line in (args.work / f"b{share}" / "memory.jsonl").read_text().splitlines()]
        plans = [r for r in journal if r["kind"] == "plan"]
        first = plans[0]["time"] if plans else samples[0][0]
        after = [p for t, p in samples if t > first + 2.0]  # the old loader's workers exit once it is dropped
        worst = max(after) if after else float("nan")
        rows.append((budget, plans, worst, max(p for _, p in samples)))

    print(f"t5_small, 1 process, micro-batch 16 x accumulation 2, {args.steps} steps, this machine\n")
    print(f"unconstrained peak P (2 workers): {peak / GB:.2f} GB; leanest plan L (0 workers): {lean / GB:.2f} GB "
          f"({100 * (1 - lean / peak):.1f}% below P)\n")
    print("| budget | below P | first plan change | peak after it | whole-run peak | held |")
    print("|---|---|---|---|---|---|")
    for budget, plans, worst, whole in rows:
        change = f"{plans[0]['when']}: {plans[0]['reason']}" if plans else "none"
        print(f"| {budget:.2f} GB | {100 * (1 - budget * GB / peak):.1f}% | {change} | {worst / GB:.2f} GB "
              f"| {whole / GB:.2f} GB | {'yes' if worst <= budget * GB else 'NO'} |")


if __name__ == "__main__":
    main()
