"""ZeRO-3 with parameters and optimizer offloaded to CPU, two processes over gloo: it trains, resumes exactly, and
its checkpoint exports to a folder plain transformers loads and answers from."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, TINY_MODEL, accelerate_launch, run_cli, task_options

pytestmark = pytest.mark.slow
RECORDER = REPO / "tests" / "integration" / "scripts" / "record_run.py"
OPTIONS = [*TINY_MODEL, "--deepspeed_config=zero3_offload", "--batch_size_per_gpu=16", "--save_steps=6",
           "--data.eval_max_samples=16", "--model.dropout=0.1", "--logging_steps=2", "--learn_rate=3e-3"]
# Measured: resumed vs uninterrupted, ZeRO-3 offload on 2 CPU processes: losses and weights agree to 0.0 (bitwise);
# the bound leaves room for a reduction order that a future DeepSpeed might change.
TOLERANCE = 1e-6


def recorded(tiny_task, out, extra: list[str], port: int) -> dict:
    run = subprocess.run(accelerate_launch("cpu_2proc_deepspeed.yaml", port) + [str(RECORDER),
                         *task_options(tiny_task, out), *OPTIONS, *extra], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert "DeepSpeed ZeRO-3" in run.stderr or "--is_keep_training" in " ".join(extra)
    record = torch.load(out / "record_rank0.pt", weights_only=False)
    for path in out.glob("record_rank*.pt"):
        path.unlink()
    return record


def test_zero3_offload_trains_resumes_exactly_and_exports(tiny_task, tmp_path, deepspeed_ops):
    straight = recorded(tiny_task, tmp_path / "straight", ["--max_steps=12"], 29781)
    first = recorded(tiny_task, tmp_path / "run", ["--max_steps=6"], 29782)
    second = recorded(tiny_task, tmp_path / "run", ["--max_steps=12", "--is_keep_training=True"], 29783)
    losses = dict(first["losses"] + second["losses"])
    assert sorted(losses) == [s for s, _ in straight["losses"]]
    assert losses[11] < losses[0]  # it trains
    loss_diff = max(abs(losses[s] - loss) for s, loss in straight["losses"])
    print(f"ZeRO-3 resume: max loss difference {loss_diff:.3g}")
    assert loss_diff <= TOLERANCE
    assert [p for _, _, p in first["steps"] + second["steps"]] == [p for _, _, p in straight["steps"]]
    weights, reference = second["weights"], straight["weights"]
    assert weights.keys() == reference.keys() and all(w.numel() for w in weights.values())  # gathered, not shards
    weight_diff = max((weights[k] - reference[k]).abs().max().item() for k in weights)
    print(f"ZeRO-3 resume: max weight difference {weight_diff:.3g}")
    assert weight_diff <= TOLERANCE

    model = tmp_path / "export"
    done = run_cli(["export", f"--checkpoint={tmp_path / 'run'}", f"--output={model}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((model / "lowmem_export.json").read_text())["weights"] == "deepspeed"
    check = ("import sys, torch; from transformers import AutoModelForSeq2SeqLM, AutoTokenizer; "
             "m = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
             "sd = {k: v for k, v in m.state_dict().items()}; torch.save(sd, sys.argv[2]); "
             "print(len(m.generate(**t('12', return_tensors='pt'))[0]))")
    loaded = subprocess.run([sys.executable, "-c", check, str(model), str(tmp_path / "sd.pt")], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert loaded.returncode == 0 and int(loaded.stdout.split()[-1]) > 1, loaded.stderr[-2000:]
    exported = torch.load(tmp_path / "sd.pt")
    assert max((exported[k] - weights[k]).abs().max().item() for k in weights if k in exported) <= TOLERANCE


def test_zero3_out_of_memory_in_a_forward_pass_on_one_rank_ends_every_rank_promptly_with_the_halved_plan(
        tiny_task, tmp_path, deepspeed_ops):
    """Under ZeRO-3 a forward pass gathers parameters layer by layer: rank 1 running out of memory inside one (the
    OOM seam, step 5) leaves rank 0 waiting in a gather that rank 1 never joins. Rank 1 records the halved plan and
    announces its end; both are gone within 60 s with exit code 6, as after an OOM in backward. (Before, rank 1
    went to the step's agreement and both waited in mismatched collectives until the process group timed out.)"""
    import time

    out = tmp_path / "run"
    t0 = time.monotonic()
    run = subprocess.run(accelerate_launch("cpu_2proc_deepspeed.yaml", 29784) + [
        str(REPO / "train_low_mem.py"), "train", *task_options(tiny_task, out), *OPTIONS, "--max_steps=8"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "LOWMEM_FAULT_OOM": "micro_batch_over=8,rank=1,after=5"})
    assert run.returncode != 0
    status = json.loads((out / "exit_status.json").read_text())
    assert status["exit_code"] == 6, status
    failed_at = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["time"]
    assert time.time() - failed_at < 60 and time.monotonic() - t0 < 300, "the ranks did not end promptly"
    pending = json.loads((out / "oom_plan.json").read_text())
    assert (pending["plan"]["micro_batch"], pending["plan"]["grad_accum"], pending["step"]) == (8, 2, 5)
    assert "out of memory in a ZeRO-3 forward pass" in run.stderr


def test_zero3_a_loader_failure_on_one_rank_is_agreed_before_the_forward_and_the_step_is_redone(
        tiny_task, tmp_path, deepspeed_ops):
    """Rank 1 cannot collate the batch of step 3 (the collate seam): under ZeRO-3 the step's agreement comes before
    the forward (whose gathers rank 1 would not join), so both shed loader memory and redo step 3 together."""
    run = subprocess.run(accelerate_launch("cpu_2proc_deepspeed.yaml", 29785) + [
        str(RECORDER), *task_options(tiny_task, tmp_path / "run"), *OPTIONS, "--max_steps=6",
        "--data.num_workers=2"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore",
             "LOWMEM_FAULT_COLLATE_OOM": f"step=3,rank=1,marker={tmp_path / 'fired'}"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "fired").exists()
    record = torch.load(tmp_path / "run" / "record_rank0.pt", weights_only=False)
    assert [s for _, s, _ in record["steps"]] == list(range(6))  # step 3 once, after the retry
    assert "host MemoryError while preparing a batch" in run.stderr
