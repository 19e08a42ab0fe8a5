"""The memory guard on real training runs. Out-of-memory errors and one-rank host pressure cannot be produced on
this CPU machine, so those tests inject them through trainer/faults.py (their names say so); the all-gather,
the policy and the actuator are the real ones."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY_MODEL, accelerate_launch, metric_records, task_options

pytestmark = pytest.mark.slow
RECORDER = REPO / "tests" / "integration" / "scripts" / "record_run.py"
BASE = [*TINY_MODEL, "--save_steps=1000", "--data.eval_max_samples=8", "--logging_steps=1"]


def recorded(out: Path, tiny_task, extra: list[str], env: dict | None = None, launcher: list[str] | None = None,
             expect: int = 0) -> list[dict]:
    cmd = (launcher or [sys.executable]) + [str(RECORDER), *task_options(tiny_task, out), *BASE, *extra]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    assert run.returncode == expect, run.stderr[-4000:]
    found = sorted(out.glob("record_rank*.pt"))
    return [torch.load(p, weights_only=False) for p in found], run.stderr


def journal(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "memory.jsonl").read_text().splitlines()) if r["kind"] == kind]


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_injected_oom_single_process_finishes_the_step_like_a_smaller_micro_batch(tiny_task, tmp_path):
    (hit,), _ = recorded(tmp_path / "oom", tiny_task, ["--batch_size_per_gpu=64", "--max_steps=6"],
                         env={"LOWMEM_FAULT_OOM": "micro_batch_over=16"})
    (small,), _ = recorded(tmp_path / "small", tiny_task, ["--batch_size_per_gpu=16", "--gradient_accumulation_steps=4",
                                                           "--max_steps=6"])
    assert hit["plan"]["micro_batch"] == 16 and hit["plan"]["grad_accum"] == 4  # global batch 64 kept
    assert [s for s, _ in hit["losses"]] == [s for s, _ in small["losses"]]  # no step lost or repeated
    assert max(abs(a - b) for (_, a), (_, b) in zip(hit["losses"], small["losses"])) < 1e-5
    assert max_diff(hit["weights"], small["weights"]) < 1e-4
    reasons = [p["reason"] for p in journal(tmp_path / "oom", "plan")]
    assert len(reasons) == 2 and all("out of memory" in r for r in reasons)  # 64 -> 32 -> 16, in the first step


def test_injected_oom_on_one_of_two_ranks_both_shrink_and_stay_in_step(tiny_task, tmp_path, deepspeed_ops):
    launch = accelerate_launch("cpu_2proc_deepspeed.yaml", 29751)
    ranks, _ = recorded(tmp_path / "oom2", tiny_task, ["--batch_size_per_gpu=16", "--max_steps=5"],
                        env={"LOWMEM_FAULT_OOM": "micro_batch_over=8,rank=1"}, launcher=launch)
    assert ranks[0]["plan"] == ranks[1]["plan"] and ranks[0]["plan"]["micro_batch"] == 8
    assert max_diff(ranks[0]["weights"], ranks[1]["weights"]) == 0.0  # still one model
    small, _ = recorded(tmp_path / "small2", tiny_task, ["--batch_size_per_gpu=8", "--gradient_accumulation_steps=2",
                                                         "--max_steps=5"], launcher=accelerate_launch("cpu_2proc_deepspeed.yaml", 29752))
    assert max(abs(a - b) for (_, a), (_, b) in zip(ranks[0]["losses"], small[0]["losses"])) < 1e-5
    assert max_diff(ranks[0]["weights"], small[0]["weights"]) < 1e-4


def test_injected_oom_gives_up_after_max_retries_with_a_checkpoint(tiny_task, tmp_path):
    out = tmp_path / "giveup"
    _, err = recorded(out, tiny_task, ["--batch_size_per_gpu=64", "--max_steps=3", "--memory.max_oom_retries=2"],
                      env={"LOWMEM_FAULT_OOM": "micro_batch_over=0"}, expect=3)
    assert "out of memory again after 2 retries" in err and "resume with --is_keep_training=True" in err
    assert (out / "checkpoints" / "step_00000000" / "train_state.json").is_file()


def test_injected_host_pressure_on_one_rank_both_ranks_switch_at_the_epoch_boundary(tiny_task, tmp_path, deepspeed_ops):
    args = ["--epochs=2", "--batch_size_per_gpu=32", "--data.num_workers=2", "--memory.probe_every=2"]
    pressured, _ = recorded(tmp_path / "pressure", tiny_task, args, launcher=accelerate_launch("cpu_2proc_deepspeed.yaml", 29753),
                            env={"LOWMEM_FAULT_HOST_AVAILABLE": "gb=1.0,rank=1,from_step=4"})
    calm, _ = recorded(tmp_path / "calm", tiny_task, args, launcher=accelerate_launch("cpu_2proc_deepspeed.yaml", 29754))
    steps_per_epoch = 4096 // 64
    plans = journal(tmp_path / "pressure", "plan")
    assert plans and plans[0]["when"] == "for the next epoch" and plans[0]["step"] == steps_per_epoch
    assert plans[0]["plan"]["num_workers"] == 1 and "job available 1.00 GB at peak" in plans[0]["reason"]
    assert pressured[0]["plan"] == pressured[1]["plan"]  # the same plan on both ranks
    assert pressured[0]["plan"]["micro_batch"] * pressured[0]["plan"]["grad_accum"] * 2 == 64  # global batch kept
    assert not (tmp_path / "calm" / "memory.jsonl").read_text().count('"kind": "plan"')
    # Fewer workers change nothing in the data order or the math: the loss curves coincide.
    assert max(abs(a - b) for (_, a), (_, b) in zip(pressured[0]["losses"], calm[0]["losses"])) < 1e-6


def test_injected_oom_in_backward_on_one_rank_ends_both_fast_and_the_restart_takes_the_smaller_plan(
        tiny_task, tmp_path, deepspeed_ops):
    """Rank 1 runs out of memory in backward at step 5, when rank 0 already waits in the gradient all-reduce (where
    it would wait until the process-group timeout). Rank 1 records the halved micro-batch and leaves; rank 0 hears
    it from the peer watch; both are gone within 60 s with exit code 6. The next start resumes from the last
    checkpoint (step 3) with micro-batch 8."""
    import time

    out = tmp_path / "run"
    cmd = accelerate_launch("cpu_2proc_deepspeed.yaml", 29755) + [str(REPO / "train_low_mem.py"), "train",
                                                                   *task_options(tiny_task, out), *BASE,
                                                                   "--batch_size_per_gpu=16", "--save_steps=3"]
    t0 = time.monotonic()
    run = subprocess.run(cmd + ["--max_steps=8"], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "ignore",
                              "LOWMEM_FAULT_OOM": "micro_batch_over=8,rank=1,phase=backward,after=5"})
    assert run.returncode != 0
    status = json.loads((out / "exit_status.json").read_text())
    assert status["exit_code"] == 6 and status["outcome"] == "oom_in_backward", status
    failed_at = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["time"]
    assert time.time() - failed_at < 60 and time.monotonic() - t0 < 600, "the ranks did not end promptly"
    pending = json.loads((out / "oom_plan.json").read_text())
    assert pending["plan"]["micro_batch"] == 8 and pending["plan"]["grad_accum"] == 2 and pending["step"] == 5
    assert "out of memory in backward" in run.stderr and not re.search(r"\[rank\d\]: Traceback", run.stderr)

    again = subprocess.run(cmd + ["--max_steps=8", "--is_keep_training=auto"], cwd=REPO, capture_output=True,
                           text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step_00000003" in again.stderr and "taking the plan recorded after out of memory" in again.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed_at = max(i for i, r in enumerate(records) if r["kind"] == "resume")
    assert [r["micro_batch"] for r in records[resumed_at:] if r["kind"] == "train"] == [8] * 5
    assert not (out / "oom_plan.json").exists()  # a checkpoint holds the plan now


def test_injected_memory_error_while_collating_on_one_rank_sheds_the_loader_and_redoes_the_step(
        tiny_task, tmp_path, deepspeed_ops):
    """Rank 1 cannot prepare the batch of step 3 (the collate seam, once): its step's agreement tells rank 0 before
    anyone enters backward; both shed loader memory, rebuild the loader at the same position and redo step 3. The
    run is then step for step the one without the fault."""
    args = ["--epochs=1", "--max_steps=8", "--batch_size_per_gpu=16", "--data.num_workers=2"]
    faulty, err = recorded(tmp_path / "faulty", tiny_task, args, launcher=accelerate_launch("cpu_2proc_deepspeed.yaml",
                           29756), env={"LOWMEM_FAULT_COLLATE_OOM": f"step=3,rank=1,marker={tmp_path / 'fired'}"})
    clean, _ = recorded(tmp_path / "clean", tiny_task, args, launcher=accelerate_launch("cpu_2proc_deepspeed.yaml",
                        29757))
    assert (tmp_path / "fired").exists()
    plans = journal(tmp_path / "faulty", "plan")
    assert len(plans) == 1 and "host MemoryError while preparing a batch: workers 2 -> 1" in plans[0]["reason"]
    assert plans[0]["step"] == 3 and faulty[0]["plan"] == faulty[1]["plan"]
    assert [s for _, s, _ in faulty[0]["steps"]] == list(range(8))  # step 3 once, after the retry
    assert [p for _, _, p in faulty[1]["steps"]] == [p for _, _, p in clean[1]["steps"]]
    assert max(abs(a - b) for (_, a), (_, b) in zip(faulty[0]["losses"], clean[0]["losses"])) < 1e-6


def test_evaluation_batch_follows_the_memory_plan(tiny_task, tmp_path):
    """An OOM (seam) made training halve its micro-batch 16 -> 8: evaluation, twice the micro-batch in force, runs
    with 16 rows, not the 32 of the starting plan (which is where a GPU that just ran out of memory fails next)."""
    recorded(tmp_path / "run", tiny_task, ["--batch_size_per_gpu=16", "--max_steps=4", "--eval_steps=2"],
             env={"LOWMEM_FAULT_OOM": "micro_batch_over=8"})
    assert [r["batch_size"] for r in metric_records(tmp_path / "run", "eval")] == [16, 16]


def test_injected_oom_in_evaluation_halves_its_batch_and_scores_the_same_rows(tiny_task, tmp_path):
    """Evaluation batches of more than 8 rows run out of memory (the seam, phase=eval): 32 -> 16 -> 8, the same rows
    scored again, the same figures as an evaluation that fitted; the smaller batch holds for the later evaluations."""
    args = ["--batch_size_per_gpu=16", "--max_steps=4", "--eval_steps=2", "--data.eval_max_samples=40"]
    recorded(tmp_path / "oom", tiny_task, args, env={"LOWMEM_FAULT_OOM": "micro_batch_over=8,phase=eval"})
    recorded(tmp_path / "fits", tiny_task, args)
    hit, fits = metric_records(tmp_path / "oom", "eval"), metric_records(tmp_path / "fits", "eval")
    assert [r["batch_size"] for r in hit] == [8, 8] and [r["batch_size"] for r in fits] == [32, 32]
    for a, b in zip(hit, fits):
        assert a["samples"] == b["samples"] == 40 and a["exact_match"] == b["exact_match"]
        assert abs(a["loss"] - b["loss"]) < 1e-5
