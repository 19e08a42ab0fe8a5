"""The processes bench/gpu_check.py starts besides lowmem-train's own commands, one sub-command each:

    python bench/gpu_check_children.py gpus                   the visible GPUs (torch's view), as JSON
    python bench/gpu_check_children.py setup --small_rows N   (in WORK) the bundled task and its tokenizer, made by
                                                              the code `train` runs for them; the rows pre-tokenized
                                                              for the bare loop; a small training file
    python bench/gpu_check_children.py torch ...              the bare torch loop of bench/peer_loops.py on a GPU
    python bench/gpu_check_children.py probe ...              t5_small forward passes of doubling size until one
                                                              runs out of GPU memory
    python bench/gpu_check_children.py hog ...                another process on our GPU: once the run's memory.jsonl
                                                              holds samples, it takes most of the free memory, holds
                                                              it until told to stop, then frees it

Each runs in a process of its own so that bench/gpu_check.py never initialises CUDA itself: every byte on a device
during a check belongs to the check's own processes. Each prints one line starting with MARK (JSON) for the parent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for bench.*
from bench.peer_loops import child_common, child_torch

MARK = "GPU_CHECK "
GB = 2**30
PRESET = "t5_small"
TASK = Path("data/zh_numerals")  # where `train` generates the bundled task, relative to its working folder


def say(record) -> None:
    print(MARK + json.dumps(record), flush=True)


def gpus(_args) -> None:
    """Device properties only: no CUDA context is created here (the product's estimate reads them the same way)."""
    import torch

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"name": p.name, "total_gb": p.total_memory / GB, "cc": [p.major, p.minor]})
    say(devices)


def setup(args) -> None:
    """In WORK: the bundled task where `train` generates it and the tokenizer `train` would train for t5_small, by
    the same call (trainer/data/setup.py load_datasets); the rows encoded once for the bare loop (peer_loops reads
    TASK/encoded.pkl); the longest encoded row; the first `small_rows` rows as a small training file."""
    import pyarrow.parquet as pq

    from lowmem_train.config.loader import build_config
    from lowmem_train.trainer.data.encode import Encoder
    from lowmem_train.trainer.data.setup import load_datasets

    cfg = build_config(PRESET, {"validation_file": ""})
    loaded = load_datasets(cfg, True, contextlib.nullcontext)
    table = pq.read_table(TASK / "train.parquet", columns=[cfg.data.prompt_column, cfg.data.response_column])
    rows = list(zip(*(column.to_pylist() for column in table.columns)))
    pairs = Encoder(loaded.tokenizer, cfg.model.type, cfg.max_seq_len, cfg.data.overlong).encode(rows)
    (TASK / "encoded.pkl").write_bytes(pickle.dumps(pairs, protocol=pickle.HIGHEST_PROTOCOL))
    small = Path("data/small")
    small.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.slice(0, args.small_rows), small / "train.parquet", row_group_size=2048)
    longest = max(max(len(p), len(label)) for p, label in pairs)
    say({"rows": len(pairs), "longest": longest, "small_rows": min(args.small_rows, len(pairs)),
         "truncated_at": cfg.max_seq_len if longest >= cfg.max_seq_len else None})


def overrides(args) -> dict:
    return {"max_seq_len": args.max_seq_len, "batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1}


def bare_torch(args) -> None:
    say(child_torch(TASK, args.warmup + args.steps, args.warmup, "cuda", args.precision, PRESET, overrides(args)))


def probe(args) -> None:
    """Forward passes of t5_small as the trainer makes them (build_model, the family's token loss, bf16 autocast when
    asked), on micro-batches of real rows doubling from `start` until one runs out of memory: the GPU memory a
    training forward takes per sample on this device, measured, for sizing the out-of-memory check."""
    from lowmem_train.trainer.data.encode import collate

    cfg, tokenizer, model, pairs, family, torch = child_common(TASK, PRESET, overrides(args))
    model.to("cuda").train()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    free, total = torch.cuda.mem_get_info()

    def autocast():  # a fresh context each time, as Accelerate enters one per forward
        return torch.autocast("cuda", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    fits, oom_at, m = [], None, args.start
    while m <= len(pairs):
        batch = {k: v.to("cuda") for k, v in collate([pairs[i % len(pairs)] for i in range(m)],
                                                     tokenizer.pad_token_id, cfg.model.type).items()}
        torch.cuda.reset_peak_memory_stats()
        try:
            with autocast():
                loss = family.token_loss_sum(model, batch)
            fits.append([m, torch.cuda.max_memory_allocated() - base])
            del loss
        except torch.OutOfMemoryError:
            oom_at = m
        del batch
        torch.cuda.empty_cache()
        if oom_at:
            break
        m *= 2
    say({"base": base, "free": free, "total": total, "fits": fits, "oom_at": oom_at, "rows": len(pairs)})


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file another process is writing; a line still being written is left out."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def hog(args) -> None:
    """Another user's job on our device. Ready once its own CUDA context exists; then it waits for the run's
    memory.jsonl to hold `after` GPU samples (the run has stepped: its allocator cache holds its peak), and takes the
    free memory but what would leave the run a GPU pressure (peak / (free + its own cache), units.py) of `target`."""
    import torch

    torch.zeros(1, device="cuda")
    say({"ready": True})
    stop, deadline, held = Path(args.stop_file), time.time() + args.timeout, None
    while held is None and not stop.exists() and time.time() < deadline:
        samples = [r for r in read_jsonl(Path(args.journal)) if r.get("kind") == "sample" and "torch_peak_gb" in r]
        if len(samples) < args.after:
            time.sleep(0.01)
            continue
        peak, reserved = max(r["torch_peak_gb"] for r in samples), samples[-1]["torch_reserved_gb"]
        leave = max(0.0, peak / args.target - reserved) * GB
        free = torch.cuda.mem_get_info()[0]
        take = int(free - leave) // 2**21 * 2**21
        while held is None and take > 0:
            try:
                held = torch.empty(take, dtype=torch.uint8, device="cuda")
            except torch.OutOfMemoryError:  # the run allocated meanwhile: a little less
                take -= 64 * 2**20
        held = held if held is not None else torch.empty(0)
        say({"held_gb": held.numel() / GB, "after_step": samples[-1]["step"], "run_peak_gb": peak,
             "run_reserved_gb": reserved, "free_before_gb": free / GB,
             "free_after_gb": torch.cuda.mem_get_info()[0] / GB})
    while not stop.exists() and time.time() < deadline:  # hold it while the run goes on
        time.sleep(0.05)
    del held
    torch.cuda.empty_cache()
    say({"freed": True, "free_gb": torch.cuda.mem_get_info()[0] / GB})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="child", required=True)
    sub.add_parser("gpus")
    sub.add_parser("setup").add_argument("--small_rows", type=int, default=15360)
    for name in ("torch", "probe"):
        p = sub.add_parser(name)
        p.add_argument("--max_seq_len", type=int, required=True)
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--precision", choices=("bf16", "no"), default="no")
        p.add_argument("--warmup", type=int, default=20)
        p.add_argument("--steps", type=int, default=200)
        p.add_argument("--start", type=int, default=1024, help="probe: the first micro-batch tried")
    p = sub.add_parser("hog")
    p.add_argument("--journal", required=True)
    p.add_argument("--stop_file", required=True)
    p.add_argument("--after", type=int, default=2, help="samples in the journal before it allocates")
    p.add_argument("--target", type=float, default=0.95, help="the GPU pressure it leaves the run")
    p.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    {"gpus": gpus, "setup": setup, "torch": bare_torch, "probe": probe, "hog": hog}[args.child](args)


if __name__ == "__main__":
    main()
