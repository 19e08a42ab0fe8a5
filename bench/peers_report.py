"""The tables and the closing report of bench/peers.py: what each configuration is called, the machine it ran on,
the fastest-round summary, the ratios against lowmem-train of the same process count, and round-by-round pairs.
Kept apart from the runs themselves so the measuring script reads on its own."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

MB = 2**20

# name -> (processes, label); order = the order of the first round
CONFIGS = {
    "lowmem": (1, "lowmem-train"),
    "lowmem_tok": (1, "lowmem-train, token-id parquet"),
    "torch": (1, "bare torch loop"),
    "accelerate": (1, "bare Accelerate loop"),
    "hf": (1, "HF Seq2SeqTrainer"),
    "lowmem_ds": (2, "lowmem-train"),
    "accelerate_ds": (2, "bare Accelerate + DeepSpeed loop"),
}
REFERENCE = {1: "lowmem", 2: "lowmem_ds"}

def machine() -> str:
    import psutil

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem = psutil.virtual_memory()
    versions = []
    for mod in ("torch", "transformers", "accelerate", "deepspeed"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            versions.append(f"{mod} not installed")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} logical cores ({psutil.cpu_count(logical=False)} physical), {model}; "
            f"{mem.total / 2**30:.1f} GiB RAM ({mem.available / 2**30:.1f} GiB available); "
            f"{'a GPU' if __import__('torch').cuda.is_available() else 'no GPU'}; Python {platform.python_version()}; {', '.join(versions)}; "
            f"load average at start (1, 5, 15 min): {load}")


def summary(rs: list[dict]) -> dict:
    """Each rate from the fastest round (other jobs on a shared machine only ever slow a run down, so the fastest
    round is the closest to the run alone); memory from the largest."""
    med = lambda r: r["samples"] / r["steps"] / statistics.median(r["step_s"])
    return {"samples_per_s": max(r["samples_per_s"] for r in rs), "tokens_per_s": max(r["tokens_per_s"] for r in rs),
            "median_samples_per_s": max(med(r) for r in rs),
            "peak": max(r["peak"] for r in rs), "steady_peak": max(r["steady_peak"] for r in rs)}


def spread(values: list[float]) -> str:
    return "" if len(values) == 1 else f" ({min(values):,.0f}-{max(values):,.0f})"


def table(results: dict[str, list[dict]]) -> str:
    best = {n: summary(rs) for n, rs in results.items()}
    keys = ("samples_per_s", "tokens_per_s", "median_samples_per_s", "peak")
    lines = [("| run | processes | samples/s | target tokens/s | samples/s at the median step | peak tree PSS MB | "
             "tree PSS MB in timed steps | lowmem-train / this: samples/s | tokens/s | samples/s at the median step | "
             "peak PSS | lowmem-train from token ids / this: samples/s | wall s per run |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in results.items():
        procs, label = CONFIGS[name]
        ref = REFERENCE[procs]
        ratios = ["-"] * len(keys) if name.startswith("lowmem") or ref not in best else \
            [f"{best[ref][k] / best[name][k]:.2f}" for k in keys]
        tok = "-" if procs != 1 or name.startswith("lowmem") or "lowmem_tok" not in best else \
            f"{best['lowmem_tok']['samples_per_s'] / best[name]['samples_per_s']:.2f}"
        b = best[name]
        lines.append(f"| {label} | {procs} | {b['samples_per_s']:,.0f}{spread([r['samples_per_s'] for r in rs])} | "
                     f"{b['tokens_per_s']:,.0f}{spread([r['tokens_per_s'] for r in rs])} | "
                     f"{b['median_samples_per_s']:,.0f} | {b['peak'] / MB:,.0f} | {b['steady_peak'] / MB:,.0f} | "
                     f"{' | '.join(ratios)} | {tok} | {statistics.median(r['wall'] for r in rs):.0f}"
                     f"{spread([r['wall'] for r in rs])} |")
    return "\n".join(lines)


def rounds_table(results: dict[str, list[dict]]) -> str:
    """lowmem-train / each one-process peer, round by round: over all timed steps, and at the median step."""
    med = lambda r: r["samples"] / r["steps"] / statistics.median(r["step_s"])  # noqa: E731
    peers = [n for n in results if CONFIGS[n][0] == 1 and not n.startswith("lowmem")]
    if "lowmem" not in results or not peers:
        return ""
    head = " | ".join(f"lowmem-train / {CONFIGS[n][1]}: samples/s, at the median step" for n in peers)
    lines = [f"| round | load average (1 min) after lowmem-train's run | lowmem-train samples/s | {head} |",
             "|---|---|---|" + "---|" * len(peers)]
    for r, ref in enumerate(results["lowmem"]):
        cells = [f"{ref['samples_per_s'] / results[n][r]['samples_per_s']:.2f}, {med(ref) / med(results[n][r]):.2f}"
                 for n in peers]
        lines.append(f"| {r + 1} | {ref['load']:.1f} | {ref['samples_per_s']:,.0f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def report(results: dict[str, list[dict]], *, header: str, load_end: str, cfg, args, steps: tuple[int, int],
           rounds: int, pad: dict, loads: list[float]) -> None:
    """Print what was measured, the tables, the padding per step and the warnings about load and stray peaks."""
    steps1, steps2 = steps
    print()
    print(f"Machine: {header}; at the end: {load_end}.")
    print(f"Model {args.preset} (T5 d_model {cfg.model.d_model}, {cfg.model.num_layers}+{cfg.model.num_decoder_layers} "
          f"layers, vocabulary from {args.work / 'data' / 'tokenizer'}), max_seq_len {cfg.max_seq_len}, micro-batch "
          f"{cfg.batch_size_per_gpu} per process, fp32{f', OMP_NUM_THREADS={args.threads}' if args.threads else ''}"
          f"{', the peers flush denormals' if args.peers_flush_denormal else ''}; {args.warmup} warm-up steps, then "
          f"{steps1} (1 process) / {steps2} (2 processes) timed steps; {rounds} round(s)"
          f"{': the fastest round, (all rounds)' if rounds > 1 else ''}. Peak PSS: whole process tree "
          f"(launcher, ranks, workers), whole run; 'in timed steps': the same, over the timed steps only. samples/s and "
          f"tokens/s: over all timed steps of a round; 'at the median step': batch / the median step of a round, "
          f"which a stall caused by other jobs moves less. Ratios: lowmem-train / this run, same process count; above "
          f"1 = lowmem-train faster (or, for PSS, larger).")
    print()
    print(table(results))
    print()
    if rounds > 1 and rounds_table(results):
        print("By round (lowmem-train / peer of the same round; above 1 = lowmem-train faster):\n")
        print(rounds_table(results))
        print()
    print(f"Padding per step (the trainer's collate: pad to the batch's longest row), {pad['steps']} random batches of "
          f"{cfg.batch_size_per_gpu} (one epoch): input_ids {100 * pad['input_pad']:.1f}% pad "
          f"({100 * pad['input_pad_range'][0]:.1f}-{100 * pad['input_pad_range'][1]:.1f}%; "
          f"{pad['input_real']:.1f} real of {pad['input_width']:.1f} columns on average), "
          f"labels / decoder inputs {100 * pad['label_pad']:.1f}% pad ({100 * pad['label_pad_range'][0]:.1f}-"
          f"{100 * pad['label_pad_range'][1]:.1f}%; {pad['label_real']:.1f} real of {pad['label_width']:.1f}); "
          f"{pad['targets_per_step']:,.0f} target tokens per micro-batch of {cfg.batch_size_per_gpu}.")
    cores = os.cpu_count() or 1
    if max(loads) > cores:
        print(f"Measured under load (load average up to {max(loads):.1f} on {cores} cores): other jobs share the CPU. "
              f"With torch's default of one intra-op thread per core, a one-process run stalls at every parallel "
              f"region whose other thread was descheduled, so under load it can slow down several-fold, far more "
              f"than the 2-process runs (one thread per rank); compare the range of the rounds, or use --threads 1.")
    for name, rs in results.items():
        for r in rs:
            if r["peak"] > 1.5 * r["steady_peak"]:
                print(f"{name}: the peak of one round ({r['peak'] / MB:,.0f} MB) is far above its timed steps "
                      f"({r['steady_peak'] / MB:,.0f} MB): something outside training (e.g. a JIT build of DeepSpeed's "
                      f"ops, the final save) was counted; the timed-steps column is not affected.")
