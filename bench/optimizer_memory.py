"""Peak host memory by optimizer and by what is trained (t5_small, one process), each against the pre-flight estimate.

    python bench/optimizer_memory.py            # 4 configurations x 2 rounds of 40 steps, ~15 min on a quiet machine
    python bench/optimizer_memory.py --quick    # 1 round of 8 steps, ~4 min

Configurations, every other setting the t5_small preset's (micro-batch 16 x accumulation 2, dropout 0.1):
  adamw      the default: torch AdamW, fused (m and v: 8 bytes per trained parameter)
  adafactor  --optimizer adafactor (transformers' Adafactor: a factored second moment, no first moment)
  freeze     --freeze embeddings,encoder (the prior art's fine-tuning: no gradient, no state for those)
  lora       --lora.r 8 (peft adapters on the attention projections of a frozen base)

Each run is `train_low_mem.py train` in a fresh process, sampled from outside by bench/outside.py (PSS of the whole
process tree every 50 ms, process start to exit: the peak includes the first step, where the optimizer's state is
created, and the final save). Rounds alternate the order of the configurations, so drift on a shared machine hits
every configuration alike; a configuration's peak is the median of its rounds, its difference to AdamW is paired by
round. DataLoader workers: 0 by default (--workers): each worker adds ~114 MB of its own that is the same for every
optimizer and moves from run to run, which would only blur the differences measured here. Threads: 1 (--threads):
with the product's default of one thread per core, a run on a busy 2-core machine stalls at every
parallel region (measured here: 20 s steps instead of 0.8), and memory is what is measured, not speed.

The estimate is what `train` checks before it starts and `estimate` prints ("this machine: X GB"): footprint.estimate
of the same resolved config (host_node, one process). tests/integration/test_memory_estimate_calibration.py holds
measured / estimate within (0.75, 1.05) for AdamW; the last column says whether each configuration would pass it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for bench.*
from bench.outside import run_sampled

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "train_low_mem.py"
GB, MB = 2**30, 2**20
CALIBRATION = (0.75, 1.05)  # measured / estimate, tests/integration/test_memory_estimate_calibration.py
CONFIGS = {
    "adamw": ("AdamW (fused)", []),
    "adafactor": ("Adafactor", ["--optimizer=adafactor"]),
    "freeze": ("AdamW, --freeze embeddings,encoder", ["--freeze=embeddings,encoder"]),
    "lora": ("AdamW, --lora.r 8", ["--lora.r=8"]),
}


def options(args, data: Path, out: Path, extra: list[str]) -> list[str]:
    """The command line of one run (after `train`). --force: the check's refusal depends on what other jobs hold
    at that moment; the estimate itself is computed here from the same options, not read from the run."""
    return ["--config=t5_small", f"--train_file={data / 'train.parquet'}", "--validation_file=",
            f"--tokenizer_dir={data / 'tokenizer'}", f"--output_dir={out}", f"--max_steps={args.steps}",
            "--save_steps=1000000", "--logging_steps=1", f"--data.num_workers={args.workers}", "--force=true",
            *([f"--cpu_threads={args.threads}"] if getattr(args, "threads", 0) else []), *extra]


def estimate_of(opts: list[str]):
    """footprint.estimate for the same options as the run, as `train`'s pre-flight check computes it."""
    from lowmem_train.config.loader import build_config
    from lowmem_train.trainer.memory.footprint import estimate

    values = dict(o[2:].split("=", 1) for o in opts if o.startswith("--") and not o.startswith("--config="))
    return estimate(build_config("t5_small", values), 1)


def step_times(out: Path) -> list[float]:
    return [r["time"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "train"]


def run_one(name: str, args, data: Path, tag: str) -> dict:
    out = args.work / "runs" / f"{name}_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    opts = options(args, data, out, CONFIGS[name][1])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    run = run_sampled([sys.executable, str(ENTRY), "train", *opts], interval=args.interval, timeout=args.timeout,
                      cwd=REPO, env=env)
    if run.returncode != 0:
        raise SystemExit(f"{name} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    times = step_times(out)
    first, last = times[0], times[-1]
    # Where the peak falls: before the first optimizer step ends (model, loader, first forward/backward, the state
    # the first step creates), during the later steps, or after the last one (the final save).
    before = max((p for t, p in run.samples if t <= first), default=0)
    during = max((p for t, p in run.samples if first < t <= last), default=0)
    after = max((p for t, p in run.samples if t > last), default=0)
    result = {"name": name, "peak": run.peak, "before_first_step": before, "steps": during, "after_last_step": after,
              "wall": time.perf_counter() - t0, "median_step": statistics.median(b - a for a, b in zip(times, times[1:]))}
    print(f"  {name:<10} peak {run.peak / GB:.3f} GB (to step 1 {before / GB:.3f}, steps {during / GB:.3f}, "
          f"after {after / GB:.3f}); median step {result['median_step']:.2f} s; {result['wall']:.0f} s", flush=True)
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    return result


def load_text() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def table(results: dict[str, list[dict]], estimates: dict) -> str:
    lines = ["| configuration | trained parameters | optimizer state (estimate) | peak tree PSS GB: median (rounds) | "
             "estimate GB | estimate / measured | peak - AdamW's, same round: median (rounds) | estimate - AdamW's | "
             "measured / estimate in the calibration test's (0.75, 1.05) |", "|---|---|---|---|---|---|---|---|---|"]
    ref = results.get("adamw")
    for name, rs in results.items():
        est = estimates[name]
        peaks = [r["peak"] for r in rs]
        peak = statistics.median(peaks)
        spread = "" if len(rs) == 1 else f" ({', '.join(f'{p / GB:.3f}' for p in peaks)})"
        diff = de = "-"
        if ref and name != "adamw":
            d = [r["peak"] - a["peak"] for r, a in zip(rs, ref)]
            diff = f"{statistics.median(d) / GB:+.3f}" + ("" if len(d) == 1 else f" ({', '.join(f'{x / GB:+.3f}' for x in d)})")
            de = f"{(est.host_node - estimates['adamw'].host_node) / GB:+.3f}"
        s = est.shape
        trained = s.params if s.trained < 0 else s.trained
        state = 8 * trained if s.optimizer_state < 0 else s.optimizer_state
        ratio = peak / est.host_node
        ok = "yes" if CALIBRATION[0] < ratio < CALIBRATION[1] else f"NO ({ratio:.2f})"
        lines.append(f"| {CONFIGS[name][0]} | {trained / 1e6:.2f}M of {s.params / 1e6:.2f}M | {state / MB:,.1f} MB | "
                     f"{peak / GB:.3f}{spread} | {est.host_node / GB:.3f} | {est.host_node / peak:.2f} | {diff} | {de} | {ok} |")
    return "\n".join(lines)


def phases(results: dict[str, list[dict]]) -> str:
    lines = ["| configuration | to the end of step 1 | later steps | after the last step (final save) | median step s |",
             "|---|---|---|---|---|"]
    for name, rs in results.items():
        med = lambda k: statistics.median(r[k] for r in rs) / GB  # noqa: E731
        lines.append(f"| {CONFIGS[name][0]} | {med('before_first_step'):.3f} | {med('steps'):.3f} | "
                     f"{med('after_last_step'):.3f} | {statistics.median(r['median_step'] for r in rs):.2f} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round of 8 steps: a smoke run, not a measurement")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40; --quick 8)")
    ap.add_argument("--rounds", type=int, default=None, help="runs of every configuration (default 2; --quick 1)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--workers", type=int, default=0, help="--data.num_workers of every run (default 0)")
    ap.add_argument("--threads", type=int, default=1,
                    help="--cpu_threads of every run (default 1: the same memory within a few MB, and a run that other "
                         "jobs cannot slow down several-fold; 0 = the product's default, one per core). Not "
                         "OMP_NUM_THREADS: lowmem-train reads 1 there as a launcher's default and takes every core")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between PSS samples")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "optimizer_memory")
    ap.add_argument("--keep_runs", action="store_true", help="keep the run folders (metrics.jsonl, memory.jsonl)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (8 if args.quick else 40)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configuration(s) {', '.join(sorted(unknown))}; choose among {', '.join(CONFIGS)}")
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the median step needs two)")
    args.work = args.work.resolve()
    return args


def main() -> None:
    args = parse()
    from bench.peers_report import machine
    from lowmem_train.trainer.data.zh_numerals import write_task

    started = time.perf_counter()
    header = machine()
    print(header, flush=True)
    data = args.work / "data"
    if not (data / "train.parquet").is_file():
        write_task(data, train_rows=20_000, validation_rows=100, row_group_size=2_000, seed=3)  # as budget_floor.py
    if not (data / "tokenizer" / "tokenizer.json").is_file():  # `train` trains it once, outside the measurements
        warm = run_sampled([sys.executable, str(ENTRY), "train",
                            *options(argparse.Namespace(steps=1, workers=0), data, args.work / "runs" / "warm", [])],
                           cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if warm.returncode:
            raise SystemExit(f"the warm-up run failed:\n{warm.stderr[-3000:]}")
        shutil.rmtree(args.work / "runs" / "warm", ignore_errors=True)
    estimates = {n: estimate_of(options(args, data, args.work / "runs" / n, CONFIGS[n][1])) for n in args.names}
    results: dict[str, list[dict]] = {n: [] for n in args.names}
    loads = [load_text()]
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} (load average {load_text()})", flush=True)
        for name in args.names if r % 2 == 0 else args.names[::-1]:
            results[name].append(run_one(name, args, data, f"r{r}"))
        loads.append(load_text())
    print(f"\nMachine: {header}; load average (1, 5, 15 min) at each round's start and at the end: {' | '.join(loads)}.")
    print(f"t5_small, 1 process, micro-batch 16 x accumulation 2, {args.workers} DataLoader workers, {args.steps} steps, "
          f"{args.rounds} round(s); peak = PSS of the whole process tree, sampled every {1000 * args.interval:.0f} ms from "
          f"outside, process start to exit. Estimate = footprint.estimate (what `estimate` prints as 'this machine').\n")
    print(table(results, estimates))
    print("\nWhere the peak falls (tree PSS GB, median of the rounds):\n")
    print(phases(results))
    print("\nThe estimate's parts (MB, one rank):")
    for name in args.names:
        parts = ", ".join(f"{k} {v / MB:,.0f}" for k, v in estimates[name].host_parts.items())
        print(f"- {CONFIGS[name][0]}: {parts}; workers {estimates[name].workers / MB:,.0f}")
    print(f"\nWhole script: {(time.perf_counter() - started) / 60:.1f} min.")
    (args.work / "last_results.json").write_text(json.dumps({"machine": header, "loads": loads, "results": results,
                                                            "estimates": {n: e.host_node for n, e in estimates.items()}},
                                                           indent=1))


if __name__ == "__main__":
    main()
