"""lowmem-train against peers on the same model, tokenizer, data and batch: samples/s, target tokens/s, peak memory.

    python bench/peers.py [--quick] [--preset t5_tiny|t5_small] [--work DIR] [--rounds R] [--steps N] [--only NAMES]

Configurations (--preset t5_tiny, the default, i.e. the defaults of config/schema.py: T5 d_model 128, 2+2 layers,
character vocabulary, max_seq_len 32, AdamW lr 3e-3, fp32, micro-batch 128 per process, on the bundled task of
200,000 rows; --preset t5_small: config/t5_small.yaml's model, d_model 512, 6+6 layers, 44 M parameters with the same
vocabulary, lr 1e-3, batch 32 per step without accumulation, dropout 0, no DataLoader worker, and by default only
lowmem, torch and hf, one process; bench/peer_loops.py PRESETS):

  1 process   lowmem       `train_low_mem.py train` from the text parquet (validation off, no checkpoint before the end)
              lowmem_tok   the same from a token-id parquet written once by `train_low_mem.py prepare --tokenize`
                           (what lowmem-train offers instead of the peers' pre-tokenized rows in memory)
              torch        a bare torch loop
              accelerate   a bare Accelerate loop
              hf           HF Seq2SeqTrainer (report_to=[], no eval, no saving, its default optim adamw_torch_fused)
  2 processes lowmem_ds    `accelerate launch --config_file accelerate_configs/cpu_2proc_deepspeed.yaml train_low_mem.py
                           train`: DeepSpeed ZeRO-2, optimizer offloaded to CPU (ds_configs/zero2_offload.json)
              accelerate_ds  a bare Accelerate + DeepSpeed loop, launched the same way, on the same JSON file
                           (its "auto" values filled here, as the plain Accelerate path requires)

Every configuration runs in its own fresh subprocess, sampled from outside (bench/outside.py: PSS of the whole
process tree, launcher and ranks included, every 0.1 s). Every loop does the same arithmetic: the model is
`build_model(cfg, tokenizer)`, batches are `Encoder(...).encode` + `collate` (padded to the longest row of the
batch), the loss is `families.get("t5").token_loss_sum(model, batch) / target tokens of the batch`, AdamW with
the trainer's parameter groups (torch's fused kernel in every loop, as lowmem-train and Seq2SeqTrainer build it),
gradient clipping at 1.0. The peers pre-tokenize every training row once (as their
users would after a `datasets.map`; cached in the data folder) and shuffle with a DataLoader; lowmem-train reads
and tokenizes parquet inside its training process, as it does for a user.

Steady state: the first `--warmup` optimizer steps are skipped, the next N are timed (lowmem-train: the
timestamps and token counts of its own metrics.jsonl, written every step here; peers: a clock read after every
optimizer step). samples/s and tokens/s are over all timed steps of a run; "at the median step" divides the batch
by the median step of the run (other jobs on a shared machine stall a run for seconds at a time, which moves the
mean more than the median). Every configuration runs `--rounds` times, in alternating order (drift hits both ends
alike); the table shows the fastest round, since other jobs only ever slow a run down, with the range of all
rounds next to it; peak memory is the largest of the rounds. Ratios are lowmem-train / peer of the same process
count, measured in the same run of this script; with several rounds a second table pairs them by round (a round's
runs follow one another, so a busy spell moves them more alike than it moves different rounds). The pad share per
step (the trainer's collate pads to the batch's longest row) is counted over one epoch of random batches.

Other jobs on the machine: torch runs one intra-op thread per core by default, and a one-process run then waits at
every parallel region for a thread that another job's process has pushed off its core; under load such runs slow
down several-fold (far more than the 2-process runs, whose launcher sets one thread per rank). The script says so
below the table when the load average exceeded the core count; `--threads 1` sets OMP_NUM_THREADS for every run.

The bundled task, its tokenizer and the peers' pre-tokenized rows are written once into WORK/data; run folders
go to WORK/runs (WORK defaults to bench/results/peers). `--help` lists every option.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for bench.*
from bench.outside import run_sampled
from bench.peer_loops import MARK, PRESETS, base_config, run_child
from bench.peers_report import CONFIGS, MB, machine, report

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "train_low_mem.py"
LAUNCH_CONFIG = REPO / "accelerate_configs" / "cpu_2proc_deepspeed.yaml"
IGNORE_INDEX = -100

DEFAULT_NAMES = {"t5_small": ("lowmem", "torch", "hf")}  # t5_small: the comparison; --only for the others


def preset_config(data: Path, preset: str):
    name, overrides = PRESETS[preset]
    return base_config(data, name, overrides)


def preset_options(preset: str) -> list[str]:
    """lowmem-train's command-line options for what PRESETS gives the peers."""
    name, overrides = PRESETS[preset]
    return ([f"--config={name}"] if name else []) + [f"--{k}={v}" for k, v in overrides.items()]


def read_rows(path: Path, columns: tuple[str, str]) -> list[tuple]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=list(columns))  # 200k short rows: a few MB, only in the parent
    return list(zip(*(table.column(c).to_pylist() for c in columns)))


def prepare_data(data: Path) -> None:
    """The bundled task (as `train` would generate it), its tokenizer (trained as `train` would train it) and the
    peers' pre-tokenized rows, each written once."""
    from lowmem_train.model.tokenizer import load_or_train_tokenizer
    from lowmem_train.trainer.data.encode import Encoder
    from lowmem_train.trainer.data.zh_numerals import write_task

    if not (data / "train.parquet").is_file():
        print(f"writing the bundled task into {data}", flush=True)
        write_task(data)  # the defaults of `train`: 200,000 training rows in row groups of 20,000
    cfg = base_config(data)
    columns = (cfg.data.prompt_column, cfg.data.response_column)
    rows = read_rows(data / "train.parquet", columns)
    fresh = not (data / "tokenizer" / "tokenizer.json").is_file()
    texts = (text for row in rows for text in row if isinstance(text, str))  # train's order: prompt, response, ...
    tokenizer = load_or_train_tokenizer(data / "tokenizer", texts, cfg.model.vocab_size)
    if not (data / "tokenized" / "train.parquet").is_file():
        subprocess.run([sys.executable, str(ENTRY), "prepare", f"--input={data / 'train.parquet'}",
                        f"--output_dir={data / 'tokenized'}", "--row_group_size=20000", "--validation_fraction=0",
                        f"--tokenizer_dir={data / 'tokenizer'}", "--tokenize"], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
    encoded = data / "encoded.pkl"
    if fresh or not encoded.is_file():
        t0 = time.perf_counter()
        pairs = Encoder(tokenizer, cfg.model.type, cfg.max_seq_len, cfg.data.overlong).encode(rows)
        tmp = encoded.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(pairs, protocol=pickle.HIGHEST_PROTOCOL))
        tmp.replace(encoded)
        print(f"pre-tokenized {len(pairs):,} rows for the peers in {time.perf_counter() - t0:.1f} s", flush=True)


def padding_stats(data: Path, batch: int, seed: int) -> dict:
    """Pad share per step of one epoch of random batches of `batch` rows, collated as the trainer collates (to the
    batch's longest row): input_ids (encoder) and labels (= decoder_input_ids' width)."""
    import torch
    from lowmem_train.model.tokenizer import load_tokenizer
    from lowmem_train.trainer.data.encode import collate

    pairs = pickle.loads((data / "encoded.pkl").read_bytes())
    pad_id = load_tokenizer(data / "tokenizer").pad_token_id
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    inp, lab, targets, widths = [], [], [], []
    for start in range(0, len(order) - batch + 1, batch):
        b = collate([pairs[i] for i in order[start:start + batch]], pad_id, "t5")
        mask, labels = b["attention_mask"], b["labels"]
        inp.append(1 - float(mask.sum()) / mask.numel())
        lab.append(float((labels == IGNORE_INDEX).sum()) / labels.numel())
        targets.append(int((labels != IGNORE_INDEX).sum()))
        widths.append((mask.shape[1], labels.shape[1]))
    return {"steps": len(inp), "input_pad": statistics.mean(inp), "label_pad": statistics.mean(lab),
            "input_pad_range": (min(inp), max(inp)), "label_pad_range": (min(lab), max(lab)),
            "targets_per_step": statistics.mean(targets),
            "input_width": statistics.mean(w[0] for w in widths), "label_width": statistics.mean(w[1] for w in widths),
            "input_real": statistics.mean(len(p[0]) for p in pairs), "label_real": statistics.mean(len(p[1]) for p in pairs)}


# ---- the parent: one subprocess per configuration, sampled from outside --------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable]
    accelerate = Path(sys.executable).parent / "accelerate"
    launch = [str(accelerate)] if accelerate.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate.is_file():
        launch.append("launch")
    return [*launch, "--config_file", str(LAUNCH_CONFIG), "--main_process_port", str(free_port())]


def lowmem_result(out: Path, warmup: int, steps: int, world: int, batch: int) -> dict:
    """Steady state from lowmem-train's own metrics.jsonl: one `train` line per step (--logging_steps=1), stamped
    when the step is done; tokens = target tokens of the global step."""
    records = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            records[rec["step"]] = rec
    need = range(warmup, warmup + steps + 1)
    missing = [s for s in need if s not in records]
    if missing:
        raise RuntimeError(f"{out}/metrics.jsonl lacks steps {missing[:5]}...")
    t0, t1 = records[warmup]["time"], records[warmup + steps]["time"]
    times = [records[s]["time"] for s in need]
    return {"steps": steps, "seconds": t1 - t0, "samples": steps * batch * world,
            "step_s": [b - a for a, b in itertools.pairwise(times)],
            "tokens": sum(records[s]["tokens"] for s in range(warmup + 1, warmup + steps + 1)), "window": (t0, t1),
            "micro_batch": records[warmup + steps].get("micro_batch"), "grad_accum": records[warmup + steps].get("grad_accum")}


def run_env(args) -> dict:
    """The environment of every run, the same for all of them."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads, in every process of every run
    if args.torch_extensions:
        env["TORCH_EXTENSIONS_DIR"] = str(args.torch_extensions)
    if args.peers_flush_denormal:
        env["PEERS_FLUSH_DENORMAL"] = "1"
    return env


def warm_deepspeed(args, data: Path) -> None:
    """One unmeasured 2-process run first: DeepSpeed JIT-builds its CPU ops (cpu_adam, shm comm) into
    ~/.cache/torch_extensions when they are missing or stale; a build inside a measured run would count the compiler
    in its time and its memory.

    A build that was killed leaves its `lock` file behind, and the next build waits for it forever (torch's
    FileBaton): nothing else builds in the bench's own extensions folder while the bench starts, so a lock
    there is stale and goes."""
    if args.torch_extensions and Path(args.torch_extensions).is_dir():
        for lock in Path(args.torch_extensions).glob("*/lock"):
            print(f"removing {lock}, left by a build that was killed", flush=True)
            lock.unlink()
    t0 = time.perf_counter()
    cmd = [*launcher(2), str(Path(__file__).resolve()), "--child", "accelerate_ds", "--data", str(data), "--steps", "1",
           "--warmup", "1", "--out", str(args.work / "runs" / "warm")]
    run = run_sampled(cmd, interval=1.0, timeout=args.timeout, cwd=REPO, env=run_env(args))
    if run.returncode != 0:
        raise SystemExit(f"the DeepSpeed warm-up run failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    shutil.rmtree(args.work / "runs" / "warm", ignore_errors=True)
    print(f"DeepSpeed ops ready ({time.perf_counter() - t0:.0f} s, unmeasured)", flush=True)


def run_config(name: str, args, data: Path, steps: int, tag: str) -> dict:
    procs, _ = CONFIGS[name]
    out = args.work / "runs" / f"{name}_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = run_env(args)
    if name.startswith("lowmem"):
        train = data / "tokenized" / "train.parquet" if name == "lowmem_tok" else data / "train.parquet"
        cmd = [*launcher(procs), str(ENTRY), "train", *preset_options(args.preset), f"--train_file={train}",
               "--validation_file=", f"--tokenizer_dir={data / 'tokenizer'}", f"--output_dir={out}",
               f"--max_steps={args.warmup + steps}", "--logging_steps=1", "--save_steps=1000000",
               # OMP_NUM_THREADS=1 alone would not do: lowmem-train reads 1 there as a launcher's default (threads.py)
               *([f"--cpu_threads={args.threads}"] if args.threads and procs == 1 else [])]
    else:
        cmd = [*launcher(procs), str(Path(__file__).resolve()), "--child", name, "--data", str(data),
               "--steps", str(steps), "--warmup", str(args.warmup), "--out", str(out), "--preset", args.preset]
    t0 = time.perf_counter()
    run = run_sampled(cmd, interval=args.interval, timeout=args.timeout, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    if args.keep_runs:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_stdout.txt").write_text(run.stdout)
        (out / "bench_stderr.txt").write_text(run.stderr)
    if run.returncode != 0:
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-25:])
        raise SystemExit(f"{name} failed (exit {run.returncode}): {' '.join(cmd)}\n{tail}")
    if name.startswith("lowmem"):
        result = lowmem_result(out, args.warmup, steps, procs, preset_config(data, args.preset).batch_size_per_gpu)
    else:
        lines = [line for line in run.stdout.splitlines() if line.startswith(MARK)]
        if not lines:
            raise SystemExit(f"{name}: no result line in its output\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        result = json.loads(lines[-1][len(MARK):])
    lo, hi = result["window"]
    steady = [pss for t, pss in run.samples if lo <= t <= hi]
    result.update(name=name, wall=wall, load=os.getloadavg()[0], peak=run.peak, steady_peak=max(steady, default=0),
                  samples_per_s=result["samples"] / result["seconds"], tokens_per_s=result["tokens"] / result["seconds"])
    step = statistics.median(result["step_s"])
    print(f"  {name:<14} {procs}p  {result['samples_per_s']:8,.0f} samples/s  {result['tokens_per_s']:9,.0f} tokens/s  "
          f"median step {1000 * step:5.0f} ms ({result['samples'] / result['steps'] / step:6,.0f} samples/s), slowest "
          f"{1000 * max(result['step_s']):5.0f} ms  peak {run.peak / MB:6,.0f} MB  ({wall:.0f} s)", flush=True)
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps, one round (~2-3 minutes)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="t5_tiny",
                    help="model and batch of every loop (module docstring); t5_small: one process, lowmem, torch, hf")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "peers",
                    help="data (written once) and run folders (default: bench/results/peers)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed optimizer steps, 1 process (default 120, t5_small 60; --quick 40, t5_small 10)")
    ap.add_argument("--steps_2proc", type=int, default=None,
                    help="timed optimizer steps, 2 processes (default 60; --quick 20)")
    ap.add_argument("--warmup", type=int, default=10, help="optimizer steps before the clock starts")
    ap.add_argument("--rounds", type=int, default=None, help="runs of every configuration, alternating order "
                                                              "(default 3; --quick 1)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between PSS samples")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds before a run is killed")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS for every run (default: unset, torch's default of one thread per core on one "
                         "process; the 2-process launcher sets 1). 1 makes one-process runs far less sensitive to other "
                         "jobs on the machine, but it is not what a user gets by default")
    ap.add_argument("--torch_extensions", default="WORK/torch_extensions",
                    help="TORCH_EXTENSIONS_DIR of the runs: DeepSpeed's JIT-built CPU ops (built once, in the unmeasured "
                         "warm-up run). A folder of its own, because two virtualenvs sharing ~/.cache/torch_extensions "
                         "rebuild each other's ops (their build files differ), which would put a compiler inside a "
                         "measured run. '' = the default cache")
    ap.add_argument("--peers_flush_denormal", action="store_true",
                    help="the peers call torch.set_flush_denormal(True) first, as lowmem-train does by default "
                         "(--flush_denormal): compares the loops alone, without that setting's effect")
    ap.add_argument("--keep_runs", action="store_true", help="keep the run folders (lowmem-train's metrics.jsonl, logs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.steps = args.steps or 1
        run_child(args)
        return
    # t5_small's step is ~7x t5_tiny's: fewer steps give a run of about the same length
    steps1 = args.steps or {"t5_small": (10 if args.quick else 60)}.get(args.preset, 40 if args.quick else 120)
    steps2 = args.steps_2proc or (20 if args.quick else 60)
    rounds = args.rounds or (1 if args.quick else 3)
    default = DEFAULT_NAMES.get(args.preset, tuple(CONFIGS))
    names = [n for n in CONFIGS if (n in args.only.split(",") if args.only else n in default)]
    unknown = set(filter(None, args.only.split(","))) - set(CONFIGS)
    if unknown or args.warmup < 1:
        raise SystemExit(f"unknown configuration(s) {', '.join(sorted(unknown))}" if unknown else "--warmup must be >= 1")
    args.work = args.work.resolve()
    if args.torch_extensions.startswith("WORK/"):
        args.torch_extensions = str(args.work / args.torch_extensions.removeprefix("WORK/"))
    data = args.work / "data"
    started = time.perf_counter()
    load_start = os.getloadavg()
    header = machine()
    print(header, flush=True)
    prepare_data(data)
    if any(CONFIGS[n][0] > 1 for n in names):
        warm_deepspeed(args, data)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", flush=True)
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(run_config(name, args, data, steps1 if CONFIGS[name][0] == 1 else steps2, f"r{r}"))
    cfg = preset_config(data, args.preset)
    pad = padding_stats(data, cfg.batch_size_per_gpu, cfg.seed)
    load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    total = time.perf_counter() - started
    report(results, header=header, load_end=load_end, cfg=cfg, args=args, steps=(steps1, steps2), rounds=rounds,
           pad=pad, loads=[*load_start, *os.getloadavg()])
    print(f"Whole script: {total / 60:.1f} min.")
    (args.work / "last_results.json").write_text(json.dumps({"machine": header, "load_end": load_end, "pad": pad,
                                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
