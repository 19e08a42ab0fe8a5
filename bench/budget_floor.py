"""Does a `--memory.host_budget_gb` below the unconstrained peak hold, with default settings, and at what cost?

    python bench/budget_floor.py [--steps 40] [--work /tmp/budget_floor]

One process, t5_small (micro-batch 16 x accumulation 2, 2 DataLoader workers), the bundled task, every guard
setting at its default (probe_every 10: sampling tightens by itself near the limit). Every run is sampled from
outside: PSS of the whole process tree (trainer, fork server, DataLoader workers) every 50 ms, from process start
to exit, so the peak below is the peak of the whole run, first step included.
  P    the unconstrained run with the preset's 2 workers (its median step is the reference)
  L    the leanest plan's run (0 workers, no prefetch): near the floor no budget can go below
  then budgets 8% and 16% below P. "held" means the whole run's peak stayed under the budget.
  s/step is the median optimizer step (metrics.jsonl, one line per step), as a ratio to P's median step.
The pre-flight check is skipped (`--force`) in the budget runs: its estimate is deliberately conservative (see
the README's calibration table) and refuses the tighter budget before it is tried.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def median_step(out: Path) -> float:
    """Median seconds per optimizer step, from the per-step lines of metrics.jsonl (the first two steps warm up)."""
    times = [r["time"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    return statistics.median(b - a for a, b in zip(times[2:], times[3:]))


def describe(plan: dict) -> str:
    return (f"micro {plan['micro_batch']} x {plan['grad_accum']}, {plan['num_workers']} workers"
            + (", checkpointing" if plan.get("gradient_checkpointing") else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/budget_floor"))
    args = ap.parse_args()
    from lowmem_train.trainer.data.zh_numerals import write_task

    data = args.work / "data"
    if not (data / "train.parquet").is_file():
        write_task(data, train_rows=20_000, validation_rows=100, row_group_size=2_000, seed=3)

    def run(name: str, *extra: str) -> tuple[int, Path]:
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        samples = run_sampled(["--config=t5_small", f"--train_file={data / 'train.parquet'}", "--validation_file=",
                               f"--tokenizer_dir={data / 'tokenizer'}", f"--output_dir={out}",
                               f"--max_steps={args.steps}", "--save_steps=1000000", "--logging_steps=1", *extra])
        return max(p for _, p in samples), out

    run("warm", "--max_steps=1")  # trains the tokenizer once, outside the measurements
    peak, p_out = run("P", "--data.num_workers=2")
    lean, l_out = run("L", "--data.num_workers=0")
    reference = median_step(p_out)
    rows = []
    for below in (0.08, 0.16):
        budget = peak * (1 - below) / GB
        worst, out = run(f"b{round(100 * below)}", "--data.num_workers=2", "--force", f"--memory.host_budget_gb={budget:.3f}")
        journal = read_jsonl(out / "memory.jsonl")
        plans = [r for r in journal if r["kind"] == "plan"]
        effects = [f"step {r['step']}: {r['effect']}" for r in journal if r["kind"] == "effect"]
        rows.append((below, budget, worst, plans, effects, median_step(out)))

    print(f"t5_small, 1 process, micro-batch 16 x accumulation 2, 2 workers, {args.steps} steps, default guard settings\n")
    print(f"unconstrained peak P (2 workers): {peak / GB:.3f} GB, median step {reference:.2f} s; leanest plan L "
          f"(0 workers): {lean / GB:.3f} GB ({100 * (1 - lean / peak):.1f}% below P), median step "
          f"{median_step(l_out):.2f} s\n")
    print("| budget | below P | peak of the whole run | held | plan changes | final plan | median step | vs P |")
    print("|---|---|---|---|---|---|---|---|")
    for below, budget, worst, plans, _, step in rows:
        final = describe(plans[-1]["plan"]) if plans else "unchanged"
        print(f"| {budget:.3f} GB | {100 * below:.0f}% | {worst / GB:.3f} GB | {'yes' if worst <= budget * GB else 'NO'} "
              f"| {len(plans)} | {final} | {step:.2f} s | {step / reference:.2f}x |")
    for below, _, _, plans, effects, _ in rows:
        print(f"\n{100 * below:.0f}% below P, what each change was and saved:")
        for r in plans:
            print(f"- step {r['step']} ({r['when']}): {describe(r['plan'])}: {r['reason']}")
        for line in effects:
            print(f"- {line}")


if __name__ == "__main__":
    main()
