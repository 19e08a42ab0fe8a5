"""The estimate against the real thing: t5_small's host-RAM figure within 25% of the peak PSS of its process tree.

The launched command's whole process tree is sampled from outside every 0.2 s (trainer/memory/outside.py).
The runs stay in their first epoch, so they are compared with the estimate's first-epoch figure (workers forked
before the optimizer state exists; see footprint.py for why later epochs need more).
"""

from __future__ import annotations

import os
import sys

import pytest

from lowmem_train.trainer.memory.outside import run_sampled
from tests.helpers import ENTRY, REPO, accelerate_launch, task_options

pytestmark = pytest.mark.slow


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
    result = run_sampled(launcher + [str(ENTRY), "train", "--config=t5_small", *options], interval=0.2, timeout=1800,
                         cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    peak = result.peak
    print(f"t5_small, {processes} process(es): estimate {predicted / 2**30:.2f} GB, peak tree PSS {peak / 2**30:.2f} GB")
    assert abs(predicted / peak - 1) < 0.25, f"estimate {predicted / 2**30:.2f} GB, measured {peak / 2**30:.2f} GB"
