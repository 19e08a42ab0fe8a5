"""Where a training step's time goes: lowmem-train's step cut into phases next to the bare torch loop's and
Seq2SeqTrainer's, on the model, tokenizer, data and batch of bench/peers.py (1 process, every loop flushing denormal
floats; --preset t5_tiny, the default, or t5_small: batch 32, dropout 0, as bench/peer_loops.py PRESETS).

    python bench/step_phases.py [--preset t5_small] [--steps 200] [--rounds 2] [--threads N] [--only NAMES]  # ~5 min
    python bench/step_phases.py --quick      # a smoke run: 1 round of 10 steps

Every configuration runs in a process of its own with the same timing wrappers around the five calls both loops
make: the family's `token_loss_sum` (forward), `Tensor.backward`, clipping (`clip_grad_norm_`, or the two halves
accelerate calls), `AdamW.step`, `zero_grad` (the optimizer's, or the model's as Seq2SeqTrainer calls it).
A step is the time between the ends of two successive `AdamW.step` calls; `outside` is the rest of it: fetching
the batch and everything the loop does besides those five calls. Phase columns: medians over the timed steps of
a run's fastest round; the last column pairs each round with the bare torch loop's run of the same round (run
back to back, so other jobs on a shared machine slow both alike). A wrapper costs about a microsecond.

  lowmem          `train_low_mem.py train` as a user runs it: without workers, a thread prepares the next batches
                  while the step computes (trainer/data/loader.py, Prefetcher)
  lowmem_serial   the same, the batches prepared in the training thread between steps (no thread)
  lowmem_tok      the default again, from the token-id parquet of `prepare --tokenize`
  lowmem_premade  the same steps' batches made before the first step: what the peer gets; its loop alone
  torch           the bare torch loop of bench/peer_loops.py over pre-tokenized rows in memory
  hf              Seq2SeqTrainer as bench/peer_loops.py runs it (its default fused AdamW, same loss), pre-tokenized rows

`lowmem_serial` and `lowmem_premade` replace the loader context of trainer/trainer.py (`batches_of`) in their own
process, nothing else. Then the data path alone, no training: `LowMemDataset.iter_steps` in one thread, wall and
CPU ms per step, from text and from token ids. Work folder: WORK/data as bench/peers.py writes it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for bench.*
from bench.peer_loops import PRESETS
from bench.peers import REPO, preset_options, prepare_data, run_env
from bench.peers_report import machine

MARK = "PHASES_RESULT "
WARM_DATA_STEPS = 50  # steps of the data path alone run before its clock starts
PHASES = ("forward", "backward", "clip", "adam", "zero_grad")
CONFIGS = {"lowmem": "lowmem-train (prefetch thread: the default)",
           "lowmem_serial": "lowmem-train, batches made in the training thread",
           "lowmem_tok": "lowmem-train from token ids (prefetch thread)",
           "lowmem_premade": "lowmem-train, batches made before the first step",
           "torch": "bare torch loop, pre-tokenized rows",
           "hf": "HF Seq2SeqTrainer, pre-tokenized rows"}
DEFAULT_STEPS = {"t5_tiny": 200, "t5_small": 60}  # t5_small's step is ~7x t5_tiny's


# ---- the child: one configuration, timed from inside -----------------------------------------------------------
def install_timers() -> list[tuple[str, float, float]]:
    import functools

    import torch
    from lowmem_train.model.families import t5

    events: list[tuple[str, float, float]] = []

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                events.append((name, start, time.perf_counter()))
        return wrapper

    t5.T5Family.token_loss_sum = timed("forward", t5.T5Family.token_loss_sum)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    torch.nn.utils.clip_grad_norm_ = timed("clip", torch.nn.utils.clip_grad_norm_)  # the bare loop calls it
    # accelerate >= 1.1x clips without it (Accelerator._clip_grad_norm_dtensor_aware): these two, imported from
    # torch.nn.utils at each call. clip_grad_norm_ calls their private twins, so nothing is counted twice.
    torch.nn.utils.get_total_norm = timed("clip", torch.nn.utils.get_total_norm)
    torch.nn.utils.clip_grads_with_norm_ = timed("clip", torch.nn.utils.clip_grads_with_norm_)
    torch.optim.AdamW.step = timed("adam", torch.optim.AdamW.step)
    torch.optim.Optimizer.zero_grad = timed("zero_grad", torch.optim.Optimizer.zero_grad)
    torch.nn.Module.zero_grad = timed("zero_grad", torch.nn.Module.zero_grad)  # Seq2SeqTrainer: model.zero_grad()
    return events


def replace_loader(mode: str, batches: int) -> None:
    """lowmem_serial / lowmem_premade: the trainer's loop takes its batches from here instead."""
    import contextlib

    from lowmem_train.trainer import trainer

    @contextlib.contextmanager
    def batches_of(dataset, plan, seed):
        steps = dataset.iter_steps()  # the loader's own batches, in its order, in this (the training) thread
        yield iter(list(itertools.islice(steps, batches))) if mode == "lowmem_premade" else steps

    trainer.batches_of = batches_of


def per_step(events, warmup: int) -> dict[str, list[float]]:
    ends = [end for name, _, end in events if name == "adam"]
    out: dict[str, list[float]] = {"step": [], "outside": [], **{p: [] for p in PHASES}}
    for lo, hi in list(itertools.pairwise(ends))[warmup - 1:]:
        inside = {p: 0.0 for p in PHASES}
        for name, start, end in events:
            if lo <= start and end <= hi:
                inside[name] += end - start
        for p in PHASES:
            out[p].append(inside[p])
        out["step"].append(hi - lo)
        out["outside"].append(hi - lo - sum(inside.values()))
    return out


def data_alone(data: Path, train: Path, steps: int, preset: str) -> dict:
    """ms per step of the trainer's own dataset, iterated in one thread, nothing else running."""
    from lowmem_train.config.loader import build_config
    from lowmem_train.trainer.trainer import Trainer

    name, overrides = PRESETS[preset]
    with tempfile.TemporaryDirectory() as out:
        cfg = build_config(name, {**overrides, "train_file": str(train), "validation_file": "",
                                  "tokenizer_dir": str(data / "tokenizer"), "output_dir": out})
        trainer = Trainer(cfg)
        trainer.setup()
        batches = trainer.dataset.iter_steps()
        for _ in zip(range(WARM_DATA_STEPS), batches):  # first calls of pyarrow's kernels, first blocks: cold
            pass
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in zip(range(steps), batches):
            pass
        return {"wall_ms": 1000 * (time.perf_counter() - wall) / steps, "cpu_ms": 1000 * (time.process_time() - cpu) / steps}


def child(name: str, data: Path, steps: int, warmup: int, preset: str) -> dict:
    if name.startswith("data_"):
        return data_alone(data, data / ("tokenized" if name == "data_tok" else "") / "train.parquet", steps, preset)
    events = install_timers()
    if name == "torch":
        from bench.peer_loops import child_torch

        child_torch(data, warmup + steps, warmup, preset=PRESETS[preset][0], overrides=PRESETS[preset][1])
        return per_step(events, warmup)
    if name == "hf":
        from bench.peer_loops import child_hf

        with tempfile.TemporaryDirectory() as out:
            child_hf(data, warmup + steps, warmup, Path(out), *PRESETS[preset])
        return per_step(events, warmup)
    if name in ("lowmem_serial", "lowmem_premade"):
        replace_loader(name, warmup + steps + 1)
    from lowmem_train.commands.main import main as lowmem_main

    train = data / "tokenized" / "train.parquet" if name == "lowmem_tok" else data / "train.parquet"
    # --threads: lowmem-train reads OMP_NUM_THREADS=1 as a launcher's default (threads.py), so it is said as an option
    threads = [f"--cpu_threads={os.environ['OMP_NUM_THREADS']}"] if os.environ.get("OMP_NUM_THREADS") else []
    with tempfile.TemporaryDirectory() as out:
        code = lowmem_main(["train", *preset_options(preset), f"--train_file={train}", "--validation_file=",
                            f"--tokenizer_dir={data / 'tokenizer'}", f"--output_dir={out}/run",
                            f"--max_steps={warmup + steps}", "--save_steps=1000000", *threads])
    if code:
        raise SystemExit(f"{name}: train exited with {code}")
    return per_step(events, warmup)


# ---- the parent -------------------------------------------------------------------------------------------------
def run(name: str, args, data: Path, steps: int) -> dict:
    env = run_env(argparse.Namespace(threads=args.threads, torch_extensions="", peers_flush_denormal=True))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--data", str(data), "--steps", str(steps),
           "--warmup", str(args.warmup), "--preset", args.preset]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def table(results: dict[str, list[dict]]) -> str:
    """Each run's phases from its fastest round; the difference to the bare torch loop paired by round (both ran
    back to back), its median and range over the rounds: other jobs on a shared machine move both alike."""
    best = {n: min(rs, key=lambda res: ms(res["step"])) for n, rs in results.items()}
    header = ("| run | step ms, fastest round | forward | backward | clip + AdamW + zero_grad | outside: data and loop | "
              "step - bare torch step, same round: median (range) |")
    rows = [header, "|---|---|---|---|---|---|---|"]
    for name, r in best.items():
        optim = ms([a + b + c for a, b, c in zip(r["clip"], r["adam"], r["zero_grad"])])
        diff = "-"
        if name != "torch" and "torch" in results:
            d = [ms(a["step"]) - ms(b["step"]) for a, b in zip(results[name], results["torch"])]
            diff = f"{statistics.median(d):+.1f} ({min(d):+.1f} to {max(d):+.1f})"
        rows.append(f"| {CONFIGS[name]} | {ms(r['step']):.1f} | {ms(r['forward']):.1f} | {ms(r['backward']):.1f} | "
                    f"{optim:.1f} | {ms(r['outside']):.2f} | {diff} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "peers",
                    help="the folder of bench/peers.py: its data/ is reused (written once if missing)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="t5_tiny", help="model and batch (module docstring)")
    ap.add_argument("--quick", action="store_true", help="1 round of 10 timed steps: a smoke run, not a measurement")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default 200, t5_small 60)")
    ap.add_argument("--warmup", type=int, default=10, help="optimizer steps before the timed ones")
    ap.add_argument("--rounds", type=int, default=None, help="runs of every configuration, alternating order "
                                                               "(default 2; --quick 1)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every run (default: unset, torch's "
                                                           "one thread per core)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(MARK + json.dumps(child(args.child, args.data, args.steps, args.warmup, args.preset)), flush=True)
        return
    args.steps = args.steps or (10 if args.quick else DEFAULT_STEPS[args.preset])
    args.rounds = args.rounds or (1 if args.quick else 2)
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    if set(filter(None, args.only.split(","))) - set(CONFIGS) or args.warmup < 1:
        raise SystemExit(f"--only takes names among {', '.join(CONFIGS)}; --warmup must be >= 1")
    started = time.perf_counter()
    header = machine()
    print(header, flush=True)
    data = args.work.resolve() / "data"
    prepare_data(data)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            res = run(name, args, data, args.steps)
            results[name].append(res)
            print(f"  round {r + 1}: {name:<15} median step {ms(res['step']):6.1f} ms, outside {ms(res['outside']):5.2f} ms",
                  flush=True)
    alone = {kind: run(f"data_{kind}", args, data, 40 if args.quick else 400) for kind in ("text", "tok")}
    print(f"\nMachine: {header}; at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}.")
    cfg = PRESETS[args.preset][1]
    print(f"{args.preset}, 1 process, batch {cfg.get('batch_size_per_gpu', 128)}, {args.warmup} warm-up then {args.steps} timed steps, "
          f"{f'OMP_NUM_THREADS={args.threads}' if args.threads else 'torch default threads'}, denormals flushed in "
          f"every run; medians (ms) over the timed steps, {args.rounds} round(s).\n")
    print(table(results))
    print(f"\nThe data path alone (LowMemDataset.iter_steps, one thread, {40 if args.quick else 400} steps after {WARM_DATA_STEPS}): from text {alone['text']['wall_ms']:.2f} "
          f"ms a step ({alone['text']['cpu_ms']:.2f} ms CPU), from token ids {alone['tok']['wall_ms']:.2f} ms "
          f"({alone['tok']['cpu_ms']:.2f} ms CPU).")
    print(f"Whole script: {(time.perf_counter() - started) / 60:.1f} min.")


if __name__ == "__main__":
    main()
