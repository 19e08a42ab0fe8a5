"""Resume cost: time from process start to the first new optimizer step, at 10%, 50% and 90% of an epoch.

    python bench/resume_cost.py [--rows 2000000] [--work /tmp/resume_cost]

The data is the bundled task scaled up (2 M rows, ~20 MB of parquet in 100 row groups). A one-step run writes a
checkpoint; its data position is then set to 10/50/90% of the epoch (the position is one number, so this is what
a run that had trained that far would hold) and `train --is_keep_training=True --max_steps=step+1` is timed
until its first step is logged. The peer, measured in the same run, is the way most resumable loaders skip
ahead: iterate the loader from the epoch's start and throw the batches away (what replay/skip_first_batches
does), here with the very same LowMemDataset so the comparison isolates seek vs replay.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "train_low_mem.py"


def make_data(work: Path, rows: int) -> Path:
    from lowmem_train.trainer.data.zh_numerals import write_task

    train = work / "data" / "train.parquet"
    if not train.is_file():
        write_task(work / "data", train_rows=rows, validation_rows=100, row_group_size=rows // 100)
    return train


def common_args(work: Path, train: Path) -> list[str]:
    return [f"--train_file={train}", "--validation_file=", f"--tokenizer_dir={work / 'tokenizer'}",
            f"--output_dir={work / 'run'}", "--batch_size_per_gpu=64", "--logging_steps=1", "--save_steps=100000",
            "--memory.probe_every=0", "--epochs=1"]


def seek_resume_seconds(work: Path, train: Path, fraction: float, steps_per_epoch: int) -> float:
    ckpt = sorted((work / "run" / "checkpoints").glob("step_*"))[0]
    meta = json.loads((ckpt / "train_state.json").read_text())
    step = int(steps_per_epoch * fraction)
    meta["train_state"].update(step=step, samples_seen=step * 64)
    target = ckpt.parent / f"step_{step:08d}"
    if target != ckpt:
        ckpt.rename(target)
    (target / "train_state.json").write_text(json.dumps(meta))
    metrics = work / "run" / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    start = time.time()
    subprocess.run([sys.executable, str(ENTRY), "train", *common_args(work, train), "--is_keep_training=True",
                    f"--max_steps={step + 1}"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    first = next(json.loads(line) for line in metrics.read_text().splitlines() if '"kind": "train"' in line)
    shutil.rmtree(target.parent / f"step_{step + 1:08d}", ignore_errors=True)  # keep one checkpoint for the next
    return first["time"] - start


def replay_seconds(work: Path, train: Path, fraction: float, steps_per_epoch: int) -> float:
    """Time to reach the same position by iterating and discarding batches from the epoch's start."""
    from lowmem_train.model.tokenizer import load_tokenizer
    from lowmem_train.trainer.data.dataset import LowMemDataset
    from lowmem_train.trainer.data.encode import Encoder
    from lowmem_train.trainer.data.source import ParquetIndex

    tok = load_tokenizer(work / "tokenizer")
    data = LowMemDataset(ParquetIndex.build(str(train), ("prompt", "response")), Encoder(tok, "t5", 32),
                         tok.pad_token_id, 64, 0, 1, 23333, 8192)
    target = int(steps_per_epoch * fraction)
    start = time.perf_counter()
    for i, _ in enumerate(data):
        if i + 1 >= target:
            break
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/resume_cost"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    train = make_data(args.work, args.rows)
    shutil.rmtree(args.work / "run", ignore_errors=True)
    subprocess.run([sys.executable, str(ENTRY), "train", *common_args(args.work, train), "--max_steps=1"], cwd=REPO,
                   check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    steps = args.rows // 64
    rows = []
    for fraction in (0.1, 0.5, 0.9):
        seek = seek_resume_seconds(args.work, train, fraction, steps)
        replay = replay_seconds(args.work, train, fraction, steps)
        rows.append((fraction, seek, replay))
    print(f"resume cost, {args.rows:,} rows ({steps:,} steps of 64) per epoch, t5_tiny, this machine\n")
    print("| position in epoch | seek resume: start -> first new step | replay peer: skipping alone | replay / seek |")
    print("|---|---|---|---|")
    for fraction, seek, replay in rows:
        print(f"| {fraction:.0%} ({int(steps * fraction):,} steps) | {seek:.1f} s | {replay:.1f} s | {replay / seek:.1f}x |")


if __name__ == "__main__":
    main()
