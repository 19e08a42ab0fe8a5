"""Helpers shared by tests: tiny-model options, task options, and running the real CLI / launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "train_low_mem.py"

# A 2-layer, d_model 64 model: trains in seconds, still a real T5/GPT.
TINY_MODEL = [
    "--model.d_model=64", "--model.d_ff=128", "--model.num_heads=2", "--model.num_layers=2",
    "--model.num_decoder_layers=2",
]


def task_options(task: dict[str, Path], out: Path) -> list[str]:
    return [f"--train_file={task['train']}", f"--validation_file={task['validation']}",
            f"--tokenizer_dir={task['tokenizer']}", f"--output_dir={out}"]


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600, env: dict | None = None,
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run train_low_mem.py as a user would (optionally under `accelerate launch ...`)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    cmd = (launcher or [sys.executable]) + [str(ENTRY), *args]
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def accelerate_launch(config: str, port: int) -> list[str]:
    """The launcher prefix for a 2-process DeepSpeed-on-gloo run (a distinct port per test avoids clashes)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / config),
            "--main_process_port", str(port)]


def metric_records(out: Path, kind: str) -> list[dict]:
    """The records of one kind ("eval", "train", ...) in a run folder's metrics.jsonl, in order."""
    import json

    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def memorisable_task(root: Path, numbers: list[int]) -> Path:
    """A training file of a few numbers repeated: a tiny model memorises them in a couple of hundred steps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lowmem_train.trainer.data.zh_numerals import to_chinese

    rows = [(str(n), to_chinese(n)) for n in numbers] * 64
    table = pa.table({"prompt": [r[0] for r in rows], "response": [r[1] for r in rows]})
    path = root / "memorise.parquet"
    pq.write_table(table, path, row_group_size=256)
    return path


def signal_tree(pid: int, sig: int) -> int:
    """Send `sig` to a process and all its descendants, as a node's power loss (SIGKILL) or Slurm's scancel does:
    torch's elastic agent starts each worker in a session of its own, so a process group is not enough. Whatever has
    exited by then is skipped. Returns how many processes the tree held."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in tree:
        try:
            member.send_signal(sig)
        except psutil.Error:
            pass
    return len(tree)
