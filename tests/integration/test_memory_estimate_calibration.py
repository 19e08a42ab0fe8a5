"""The estimate against the real thing: t5_small's host-RAM figure within 25% of the peak PSS of its process tree.

A sampler thread reads the PSS (smaps_rollup) of the launched command and all its descendants every 0.2 s.
The runs stay in their first epoch, so they are compared with the estimate's first-epoch figure (workers forked
before the optimizer state exists; see footprint.py for why later epochs need more).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.helpers import ENTRY, REPO, accelerate_launch, task_options

pytestmark = pytest.mark.slow


def tree_pss(root: psutil.Process) -> int:
    total = 0
    for proc in [root] + root.children(recursive=True):
        try:
            with open(f"/proc/{proc.pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, psutil.NoSuchProcess):
            continue  # a worker that exited between the listing and the read
    return total


def peak_tree_pss(cmd: list[str], env: dict) -> tuple[int, subprocess.CompletedProcess]:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], tree_pss(root))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate(timeout=1800)
    done.set()
    sampler.join()
    return peak[0], subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("processes", [1, 2])
def test_t5_small_host_estimate_within_25_percent(tiny_task, tmp_path, processes, request):
    from lowmem_train.config.loader import build_config
    from lowmem_train.trainer.memory.footprint import estimate

    if processes == 2:
        request.getfixturevalue("deepspeed_ops")
    options = [*task_options(tiny_task, tmp_path / "run"), "--validation_file=", "--max_steps=8",
               "--save_steps=1000000", "--force=true"]
    cfg = build_config("t5_small", {o[2:].split("=", 1)[0]: o.split("=", 1)[1] for o in options})
    predicted = estimate(cfg, processes).host_first_epoch
    launcher = [sys.executable] if processes == 1 else accelerate_launch("cpu_2proc_deepspeed.yaml", 29700)
    # One thread per process: the sampled memory is the same, the run is far faster on a busy 2-core machine.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    peak, result = peak_tree_pss(launcher + [str(ENTRY), "train", "--config=t5_small", *options], env)
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"t5_small, {processes} process(es): estimate {predicted / 2**30:.2f} GB, peak tree PSS {peak / 2**30:.2f} GB")
    assert abs(predicted / peak - 1) < 0.25, f"estimate {predicted / 2**30:.2f} GB, measured {peak / 2**30:.2f} GB"
