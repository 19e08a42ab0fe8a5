"""The estimate against the real thing: t5_small's host-RAM figure against the peak PSS of its process tree, with and
without DataLoader workers, one process and two (ZeRO-2 + CPU offload).

The launched command's whole process tree is sampled from outside every 0.2 s (bench/outside.py). Runs of 8 steps:
the AdamW moments exist from the first step, and workers start from a fork server, so a later epoch holds nothing
more (checked once over 3 epochs, README "Measured"). Tolerances come from the spread measured over repeated runs
on the development machine (README): the estimate is a bound that errs on the high side (activations at
max_seq_len, where real batches are trimmed to their longest row).
"""

from __future__ import annotations

import os
import sys

import pytest

from bench.outside import run_sampled
from tests.helpers import ENTRY, REPO, accelerate_launch, task_options

pytestmark = pytest.mark.slow
GB = 2**30
# measured/estimate ratios (README): 1 process 0.85-0.92 with 2 workers, 0.85-0.90 with none; 2 processes
# 0.93-0.97. Accepted: 0.75 to 1.05 (never more than 5% under: an estimate must not promise what does not fit).
LOW, HIGH = 0.75, 1.05


def peak_of(tiny_task, out, processes: int, *extra: str) -> tuple[int, object]:
    from lowmem_train.config.loader import build_config
    from lowmem_train.trainer.memory.footprint import estimate

    options = [*task_options(tiny_task, out), "--validation_file=", "--max_steps=8", "--save_steps=1000000",
               "--force=true", *extra]
    cfg = build_config("t5_small", {o[2:].split("=", 1)[0]: o.split("=", 1)[1] for o in options})
    launcher = [sys.executable] if processes == 1 else accelerate_launch("cpu_2proc_deepspeed.yaml", 29700)
    # One thread per process: the sampled memory is the same, the run is far faster on a busy 2-core machine.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = run_sampled(launcher + [str(ENTRY), "train", "--config=t5_small", *options], interval=0.2, timeout=1800,
                         cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.peak, estimate(cfg, processes)


def assert_in_band(peak: int, est, label: str) -> None:
    ratio = peak / est.host_node
    print(f"t5_small, {label}: estimate {est.host_node / GB:.3f} GB, peak tree PSS {peak / GB:.3f} GB, "
          f"measured/estimate {ratio:.2f}")
    assert LOW < ratio < HIGH, f"estimate {est.host_node / GB:.2f} GB, measured {peak / GB:.2f} GB"


@pytest.mark.parametrize("processes", [1, 2])
def test_t5_small_host_estimate_holds_the_measured_peak(tiny_task, tmp_path, processes, request):
    if processes == 2:
        request.getfixturevalue("deepspeed_ops")
    peak, est = peak_of(tiny_task, tmp_path / "run", processes)  # the preset's 2 workers per rank
    assert_in_band(peak, est, f"{processes} process(es), 2 workers")


def test_t5_small_worker_cost_matches_what_workers_add(tiny_task, tmp_path):
    """What 2 workers (and their fork server) add to the peak, measured against none, is what the estimate charges."""
    with_workers, est_with = peak_of(tiny_task, tmp_path / "w2", 1, "--data.num_workers=2")
    without, est_without = peak_of(tiny_task, tmp_path / "w0", 1, "--data.num_workers=0")
    measured, estimated = with_workers - without, est_with.host_node - est_without.host_node
    print(f"t5_small, 2 workers add {measured / 2**20:.0f} MB measured, {estimated / 2**20:.0f} MB estimated; "
          f"0 workers: estimate {est_without.host_node / GB:.3f} GB, peak {without / GB:.3f} GB")
    assert 0.7 < measured / estimated < 1.3, (measured / 2**20, estimated / 2**20)
    assert LOW < without / est_without.host_node < HIGH


@pytest.mark.parametrize("lean", ["--optimizer=adafactor", "--freeze=embeddings,encoder", "--lora.r=8"])
def test_t5_small_host_estimate_holds_what_a_lean_run_trains(tiny_task, tmp_path, lean):
    """The estimate counts what is trained (optimizer state by optimizer, nothing for frozen parameters or adapted
    base weights, no activations for frozen layers that nothing trained feeds): the measured peak stays in the same
    band as AdamW's. An estimate that charged AdamW's 8 bytes per parameter everywhere would be 1.3-2x high here."""
    peak, est = peak_of(tiny_task, tmp_path / "run", 1, "--data.num_workers=0", lean)
    assert_in_band(peak, est, f"{lean}, 0 workers")
