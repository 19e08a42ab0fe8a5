"""Does `prepare` stay flat in memory as its input grows? Peak tree PSS of `train_low_mem.py prepare` on the same rows
in every input format it reads (jsonl, csv, parquet, a `datasets` save_to_disk folder), at two sizes, 10x apart.

    python bench/prepare_memory.py [--rows 100000] [--work bench/results/prepare_memory]   # ~4 min

Rows: a prompt of ~30 and a response of ~200 characters (random digits and words). Every input is written once
(cached in WORK), then `prepare --input X --output_dir Y` runs in a fresh process, sampled from outside every
50 ms (bench/outside.py: PSS of the whole process tree), start to exit. The ratio large / small is the table's
point: a reader that held its input would grow ~10x; a streaming one stays near 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for bench.*
from bench.outside import run_sampled

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "train_low_mem.py"
MB = 2**20
FORMATS = ("jsonl", "csv", "parquet", "save_to_disk")
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "north", "south", "river", "stone", "light", "green", "seven"]


def write_inputs(folder: Path, rows: int, seed: int) -> dict[str, Path]:
    """The same rows in every format (written once; reused while the folder exists)."""
    paths = {"jsonl": folder / "rows.jsonl", "csv": folder / "rows.csv", "parquet": folder / "rows.parquet",
             "save_to_disk": folder / "saved"}
    if all(p.exists() for p in paths.values()):
        return paths
    import datasets
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    prompts, responses = [], []
    for i in range(rows):
        prompts.append(f"question {i}: " + " ".join(rng.choices(WORDS, k=3)))
        responses.append(" ".join(rng.choices(WORDS, k=34)))
    table = pa.table({"prompt": prompts, "response": responses})
    pq.write_table(table, paths["parquet"], row_group_size=50_000)
    pcsv.write_csv(table, paths["csv"])
    with paths["jsonl"].open("w", encoding="utf-8") as out:
        for p, r in zip(prompts, responses):
            out.write(json.dumps({"prompt": p, "response": r}) + "\n")
    datasets.Dataset(table).save_to_disk(str(paths["save_to_disk"]))
    return paths


def measure(source: Path, out: Path) -> tuple[int, float]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run = run_sampled([sys.executable, str(ENTRY), "prepare", f"--input={source}", f"--output_dir={out}"],
                      cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=1800)
    if run.returncode != 0:
        raise SystemExit(f"prepare of {source} failed ({run.returncode}): {run.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return run.peak, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the small input; the large one has 10x")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "prepare_memory")
    args = ap.parse_args()
    sizes = {"small": args.rows, "large": 10 * args.rows}
    inputs = {name: write_inputs(args.work / f"{name}_{rows}", rows, seed=1) for name, rows in sizes.items()}
    results = {}
    for fmt in FORMATS:
        for name in sizes:
            source = inputs[name][fmt]
            size = sum(f.stat().st_size for f in source.rglob("*")) if source.is_dir() else source.stat().st_size
            peak, wall = measure(source, args.work / "out")
            results[fmt, name] = (peak, wall, size)
            print(f"  {fmt:12s} {name}: input {size / MB:7.1f} MB, peak tree PSS {peak / MB:6.0f} MB, {wall:5.1f} s",
                  flush=True)
    print()
    print(f"`prepare` (split, no tokenizing), {sizes['small']:,} and {sizes['large']:,} rows of ~240 characters; "
          "peak = PSS of the whole process tree, sampled every 50 ms from outside.\n")
    print("| input format | input MB: small, large | peak tree PSS MB: small, large | peak large / small | "
          "input large / small | seconds: small, large |")
    print("|---|---|---|---|---|---|")
    for fmt in FORMATS:
        (ps, ws, ss), (pl, wl, sl) = results[fmt, "small"], results[fmt, "large"]
        print(f"| {fmt} | {ss / MB:,.1f}, {sl / MB:,.1f} | {ps / MB:,.0f}, {pl / MB:,.0f} | {pl / ps:.2f} | "
              f"{sl / ss:.1f} | {ws:.1f}, {wl:.1f} |")


if __name__ == "__main__":
    main()
