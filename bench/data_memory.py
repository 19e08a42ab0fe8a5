"""Host memory and speed of data loading: LowMemDataset vs the loaders people usually write.

    python bench/data_memory.py            # ~1.5 GB and ~0.15 GB text files (made once, cached), ~15 min
    python bench/data_memory.py --quick    # ~0.15 GB and ~0.015 GB files, a smoke run

Table 1, memory: one full epoch of each file with 0 and 2 DataLoader workers, batches of 64 shuffled rows:
  lowmem      LowMemDataset (row group by row group, shuffle buffer 8192)
  read_table  a map-style Dataset holding `pq.read_table(file)`, shuffled by a RandomSampler (a simple script)
  hf          `datasets.load_dataset("parquet")`: a memory-mapped Arrow cache (built beforehand, not timed)
Rows are turned into Python strings and handed through the DataLoader, but not tokenized: tokenizing 1.5 GB
of text costs the same CPU time for every loader (~10 k long rows/s per core here) and would make each epoch
take half an hour. Each configuration runs in a fresh subprocess; a thread here samples the PSS of that
process and all of its descendants (DataLoader workers included) every 50 ms. PSS start / end are taken at
the epoch's first and last batch.

Table 2, speed with tokenization: LowMemDataset with the real Encoder (t5, max_seq_len 32), in steps of t5_tiny's
global batch (128), on the bundled task that t5_tiny trains on and on the long rows of the big file (first steps
only), against the rows/s a t5_tiny training step consumes (`train_low_mem.py train --config t5_tiny`, from its
metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for bench.*
from bench.outside import tree_pss

REPO = Path(__file__).resolve().parent.parent
GLOBAL_BATCH, MAX_SEQ_LEN = 64, 32
T5_TINY_BATCH = 128  # table 2 cuts t5_tiny's steps: its global batch (config/schema.py's default)
ALPHABET = "零一二三四五六七八九十百千万亿"


# ---- data -------------------------------------------------------------------------------------------------
def make_text_parquet(path: Path, target_bytes: int, row_group_rows: int = 20_000, seed: int = 0) -> Path:
    """Rows of (number, a long Chinese-numeral-like text of 200-1000 characters, ~1 KB on disk) until the file
    reaches target_bytes; built straight into Arrow buffers one row group at a time (memory: one group)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    utf8 = np.frombuffer(ALPHABET.encode(), dtype=np.uint8).reshape(len(ALPHABET), 3)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(tmp, pa.schema([("prompt", pa.string()), ("response", pa.string())])) as writer:
        while not tmp.exists() or tmp.stat().st_size < target_bytes:
            lengths = rng.integers(200, 1001, row_group_rows)
            data = utf8[rng.integers(0, len(ALPHABET), int(lengths.sum()))].tobytes()
            offsets = np.concatenate([[0], np.cumsum(lengths * 3)]).astype(np.int32)
            response = pa.StringArray.from_buffers(row_group_rows, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data))
            prompt = pa.array(rng.integers(1, 10**12, row_group_rows).astype(str))
            writer.write_table(pa.table({"prompt": prompt, "response": response}), row_group_size=row_group_rows)
    tmp.rename(path)
    return path


def make_task_and_tokenizer(cache: Path) -> tuple[Path, Path]:
    """The bundled task (what t5_tiny trains on) and its character-level tokenizer, which covers ALPHABET."""
    from lowmem_train.model.tokenizer import train_tokenizer
    from lowmem_train.trainer.data.setup import tokenizer_texts
    from lowmem_train.trainer.data.source import ParquetIndex
    from lowmem_train.trainer.data.zh_numerals import write_task

    task = cache / "zh_numerals"
    if not (task / "train.parquet").exists():
        write_task(task)
    if not (task / "tokenizer" / "tokenizer.json").exists():
        train_tokenizer(tokenizer_texts(ParquetIndex.build(str(task / "train.parquet"), ("prompt", "response"))), 64,
                        task / "tokenizer")
    return task / "train.parquet", task / "tokenizer"


# ---- the child: one loader, one file, one epoch ---------------------------------------------------------------
class TouchEncoder:
    """Reads every string of a batch (as a consumer must) without tokenizing: table 1 measures the loader."""

    model_type = "t5"

    def __init__(self):
        from lowmem_train.trainer.data.encode import EncodeStats

        self.stats, self.Stats = EncodeStats(), EncodeStats

    def encode(self, rows):
        self.stats.rows += len(rows)
        self.stats.truncated += sum(len(p) + len(r) for p, r in rows) > 0  # touch the text
        return [([1], [1])]

    def take_stats(self):
        stats, self.stats = self.stats, self.Stats()
        return stats


def build_loader(job: dict):
    import torch
    from torch.utils.data import DataLoader

    from lowmem_train.model.tokenizer import load_tokenizer
    from lowmem_train.trainer.data.encode import Encoder, collate

    tok = load_tokenizer(Path(job["tokenizer"]))
    encoder = Encoder(tok, "t5", MAX_SEQ_LEN) if job["tokenize"] else TouchEncoder()
    common = {"num_workers": job["workers"], "prefetch_factor": 2 if job["workers"] else None}

    def encode_rows(rows):
        batch = collate(encoder.encode(rows), tok.pad_token_id, "t5")
        batch["rows"] = torch.tensor(len(rows))
        return batch

    if job["kind"] == "lowmem":
        from lowmem_train.trainer.data.dataset import LowMemDataset
        from lowmem_train.trainer.data.source import ParquetIndex

        index = ParquetIndex.build(job["file"], ("prompt", "response"))
        ds = LowMemDataset(index, encoder, tok.pad_token_id, job.get("batch", GLOBAL_BATCH), 0, 1, seed=0,
                           shuffle_buffer=8192)
        return DataLoader(ds, batch_size=None, **common), ds.steps_per_epoch()
    if job["kind"] == "read_table":
        import pyarrow.parquet as pq

        class TableDataset(torch.utils.data.Dataset):
            def __init__(self, path):
                self.table = pq.read_table(path, columns=["prompt", "response"])

            def __len__(self):
                return self.table.num_rows

            def __getitem__(self, i):  # a zero-copy slice (Table.take on a chunked table copies every chunk)
                row = self.table.slice(i, 1)
                return row.column(0)[0].as_py(), row.column(1)[0].as_py()

        ds = TableDataset(job["file"])
    else:
        import datasets

        datasets.disable_progress_bars()
        hf = datasets.load_dataset("parquet", data_files=job["file"], split="train", cache_dir=job["hf_cache"])

        class HFRows(torch.utils.data.Dataset):
            def __len__(self):
                return len(hf)

            def __getitems__(self, indices):
                batch = hf[indices]
                return list(zip(batch["prompt"], batch["response"]))

        ds = HFRows()
    loader = DataLoader(ds, batch_size=GLOBAL_BATCH, shuffle=True, drop_last=True, collate_fn=encode_rows,
                        generator=torch.Generator().manual_seed(0), **common)
    return loader, len(loader)


def child(job: dict) -> None:
    t0 = time.perf_counter()
    loader, steps = build_loader(job)
    steps = min(steps, job.get("max_steps") or steps)
    setup = time.perf_counter() - t0
    rows, start_pss, end_pss, t1 = 0, 0, 0, time.perf_counter()
    from lowmem_train.trainer.data.packing import unpack

    for i, batch in enumerate(map(unpack, loader)):  # as the trainer unpacks what LowMemDataset's workers pack
        rows += int(batch["rows"]) if "rows" in batch else int(batch["positions"].numel())
        if i == 0:
            start_pss = tree_pss(os.getpid())
        if i == steps - 1:
            end_pss = tree_pss(os.getpid())
            break
    seconds = time.perf_counter() - t1
    print(json.dumps({"rows": rows, "seconds": seconds, "setup": setup, "pss_start": start_pss, "pss_end": end_pss}))


# ---- the parent: one subprocess per configuration, sampled from outside -------------------------------------
def measure(job: dict) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    peak = 0

    def sample():
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, tree_pss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = proc.communicate()
    finally:
        if proc.poll() is None:  # interrupted: take the child (and so its workers) down with us
            proc.kill()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"child {job} failed with exit code {proc.returncode}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak": peak}


def t5_tiny_rows_per_s(task: Path, tokenizer: Path, cache: Path, steps: int) -> float:
    """Steady-state rows/s of `train --config t5_tiny` (its defaults: 0 workers), between its last two
    metric lines (the logged samples_per_s averages from the epoch's start, warm-up included)."""
    out = cache / "t5_tiny_run"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "train_low_mem.py"), "train", "--config=t5_tiny", f"--train_file={task}",
           "--validation_file=", f"--tokenizer_dir={tokenizer}", f"--output_dir={out}", f"--max_steps={steps}",
           f"--logging_steps={steps // 3}"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    lines = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    a, b = lines[-2], lines[-1]
    return (b["step"] - a["step"]) * b["micro_batch"] * b["grad_accum"] / (b["time"] - a["time"])


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="files of ~0.15 GB and ~0.015 GB")
    parser.add_argument("--cache_dir", default=str(REPO / "bench" / "results" / "data"), help="where data files live")
    parser.add_argument("--loaders", default="lowmem,read_table,hf")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--speed_only", action="store_true",
                        help="only the second table: tokenizing loader rows/s vs what t5_tiny training consumes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    cache = Path(args.cache_dir)
    big, small = (150, 15) if args.quick else (1500, 150)
    t0 = time.perf_counter()
    files = {f"{size} MB": make_text_parquet(cache / f"text_{size}mb.parquet", size * 10**6) for size in (small, big)}
    task, tokenizer = make_task_and_tokenizer(cache)
    print(f"data ready in {time.perf_counter() - t0:.0f} s: " + ", ".join(
        f"{p.name} {p.stat().st_size / 1e6:,.0f} MB" for p in files.values()), flush=True)
    loaders, worker_counts = args.loaders.split(","), [int(w) for w in args.workers.split(",")]
    if args.speed_only:
        loaders = []
    base = {"tokenizer": str(tokenizer), "hf_cache": str(cache / "hf_cache"), "tokenize": False}
    if "hf" in loaders:  # convert to the Arrow cache once, outside the measurement
        for file in files.values():
            subprocess.run([sys.executable, "-c", "import datasets, sys; datasets.disable_progress_bars(); "
                            "datasets.load_dataset('parquet', data_files=sys.argv[1], split='train', cache_dir=sys.argv[2])",
                            str(file), base["hf_cache"]], check=True)
    results = {}
    for name, file in files.items():
        for workers in worker_counts:
            for kind in loaders:
                r = results[name, workers, kind] = measure({**base, "kind": kind, "file": str(file), "workers": workers})
                print(f"  {kind:<10} {name:>8} {workers} workers: peak {mb(r['peak'])} MB, "
                      f"{r['rows'] / r['seconds']:,.0f} rows/s", flush=True)
    consumed = t5_tiny_rows_per_s(task, tokenizer, cache, 60)
    tokenized = {}
    for label, file, steps in (("bundled task (t5_tiny's data)", task, 0), (f"{big} MB file, long rows", files[f"{big} MB"], 400)):
        for workers in worker_counts:
            r = tokenized[label, workers] = measure({**base, "kind": "lowmem", "file": str(file), "workers": workers,
                                                     "tokenize": True, "max_steps": steps, "batch": T5_TINY_BATCH})
            print(f"  tokenized {label} {workers} workers: {r['rows'] / r['seconds']:,.0f} rows/s", flush=True)

    if results:
        print("\n| loader | file | workers | peak PSS MB | peak vs read_table | PSS start -> end MB | rows/s | setup s |")
        print("|---|---|---|---|---|---|---|---|")
    for (name, workers, kind), r in results.items():
        peer = results.get((name, workers, "read_table"))
        ratio = f"{r['peak'] / peer['peak']:.2f}" if peer else "-"
        print(f"| {kind} | {name} | {workers} | {mb(r['peak'])} | {ratio} | {mb(r['pss_start'])} -> {mb(r['pss_end'])} "
              f"| {r['rows'] / r['seconds']:,.0f} | {r['setup']:.1f} |")
    print(f"\n| LowMemDataset + Encoder (t5, max_seq_len {MAX_SEQ_LEN}) | workers | rows/s | vs t5_tiny training "
          f"({consumed:,.0f} rows/s) | peak PSS MB |")
    print("|---|---|---|---|---|")
    for (label, workers), r in tokenized.items():
        rate = r["rows"] / r["seconds"]
        print(f"| {label} | {workers} | {rate:,.0f} | {rate / consumed:.1f}x | {mb(r['peak'])} |")
    if "lowmem" in loaders and "read_table" in loaders:
        print()
        for workers in worker_counts:
            low_big, low_small = results[f"{big} MB", workers, "lowmem"], results[f"{small} MB", workers, "lowmem"]
            peer = results[f"{big} MB", workers, "read_table"]
            speed = tokenized["bundled task (t5_tiny's data)", workers]
            print(f"{workers} workers: lowmem peak = {low_big['peak'] / peer['peak']:.2f} x read_table (target <= 0.20); "
                  f"{big} MB vs {small} MB file {100 * (low_big['peak'] / low_small['peak'] - 1):+.1f}% "
                  f"(target within 15%); tokenized task rows {speed['rows'] / speed['seconds'] / consumed:.1f}x t5_tiny "
                  f"(target >= 10x)")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
