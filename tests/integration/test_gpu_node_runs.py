"""The memory guard on a simulated GPU node (tests/gpu_node.py): real training runs on the CPU, 1 and 2 processes,
whose probe reads a simulated device through the product's GPU seam (trainer/memory/gpu.py) while the simulated
allocator follows the run (tests/integration/scripts/sim_gpu_train.py: model states, gradients, the family's
activation formula per micro-batch). Everything downstream of the reading (all-gather, policy, actuator, the
out-of-memory path) is the real code.

Sizes: a tiny model on a small device, activations scaled x40 so that a micro-batch of 16 is ~385 MB of a 1 GB
device (as a real model's activations are a large share of a real GPU); context 100 MB. A step at micro-batch 16
peaks at 388 MB in 408 MB of the allocator's segments (read from the runs' memory.jsonl).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_train.trainer.data.zh_numerals import write_task
from tests.gpu_node import MiB, uuid_of
from tests.helpers import REPO, TINY_MODEL, accelerate_launch

pytestmark = pytest.mark.slow
SCRIPT = REPO / "tests" / "integration" / "scripts" / "sim_gpu_train.py"
COMMON = [*TINY_MODEL, "--batch_size_per_gpu=16", "--save_steps=100000", "--data.eval_max_samples=8",
          "--memory.probe_every=4", "--logging_steps=4", "--deepspeed_config=none"]
STEPS_PER_EPOCH = 16  # 256 rows / 16


@pytest.fixture(scope="module")
def small_task(tmp_path_factory, tiny_task) -> dict[str, Path]:
    """256 training rows (16 steps of 16): epochs short enough for several decisions of the guard."""
    root = tmp_path_factory.mktemp("gpu_task")
    train, validation = write_task(root, train_rows=256, validation_rows=16, row_group_size=64, seed=3)
    return {"train": train, "validation": validation, "tokenizer": tiny_task["tokenizer"]}


def spec(total_mb: int, others: list[dict] | None = None, gpus: int = 1) -> dict:
    return {"gpus": [{"uuid": uuid_of(i), "total": total_mb * MiB} for i in range(gpus)], "context": 100 * MiB,
            "activation_scale": 40.0, "others": others or []}


def run(tmp_path: Path, task: dict, node: dict, extra: list[str], launcher: list[str] | None = None,
        expect: int = 0) -> tuple[Path, str]:
    out = tmp_path / "run"
    spec_file = tmp_path / "node.json"
    spec_file.write_text(json.dumps(node))
    cmd = (launcher or [sys.executable]) + [
        str(SCRIPT), str(spec_file), "train", f"--train_file={task['train']}",
        f"--validation_file={task['validation']}", f"--tokenizer_dir={task['tokenizer']}", f"--output_dir={out}",
        *COMMON, *extra]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == expect, done.stderr[-4000:]
    return out, done.stderr


def journal(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "memory.jsonl").read_text().splitlines()) if r["kind"] == kind]


def sim(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"sim_rank{rank}.json").read_text())


# At micro-batch 16 the step peaks at 388 MB (states, gradients, activations) in 408 MB of segments: another user's
# job that takes all that is free leaves this rank its own cache, a pressure of 0.95.
CROWD = "all_free"


def test_simulated_gpu_another_process_fills_our_device_the_guard_shrinks_keeps_it_and_grows_back(small_task,
                                                                                                     tmp_path):
    arrive, leave = 20, 52  # steps: during epoch 2 and epoch 4
    node = spec(1024, [{"gpu": 0, "bytes": CROWD, "from_step": arrive, "until_step": leave}])
    out, _ = run(tmp_path, small_task, node, ["--epochs=6"])
    plans = journal(out, "plan")
    shrink, grow = plans[0], plans[-1]
    assert "GPU peak" in shrink["reason"] and shrink["plan"]["micro_batch"] == 8, plans
    assert arrive < shrink["step"] <= arrive + 2 * STEPS_PER_EPOCH
    assert "calm for 2 decisions" in grow["reason"] and grow["plan"]["micro_batch"] == 16, plans
    assert grow["step"] > leave and len(plans) == 2  # nothing in between: the shrink was kept, not undone
    effects = [e["effect"] for e in journal(out, "effect")]
    assert any("micro-batch 16 -> 8" in e and "saved" in e for e in effects) and not any("undone" in e for e in effects)
    # After the shrink the allocator's cache went back to the driver: what nvidia-smi shows fell with it.
    samples = journal(out, "sample")
    before = max(s["gpu_used_gb"] for s in samples if arrive < s["step"] <= shrink["step"])
    after = max(s["gpu_used_gb"] for s in samples if shrink["step"] < s["step"] < leave)
    assert before - after > 0.15, (before, after)
    assert sim(out)["cache_releases"] >= 1 and sim(out)["ooms"] == 0


def test_simulated_gpu_run_sized_to_93_percent_of_its_device_is_left_alone(small_task, tmp_path):
    """Alone on a 546 MB device the run makes nvidia-smi show 93% used (context + cache); its peak is 87% of what
    it can have. The guard must not shrink it (judging NVML's used, it would: 93% > 92%)."""
    out, _ = run(tmp_path, small_task, spec(546), ["--epochs=3"])
    samples = journal(out, "sample")
    assert max(s["gpu_used_gb"] / s["gpu_total_gb"] for s in samples) > 0.92
    assert max(s["gpu_pressure"] for s in samples) < 0.92
    assert journal(out, "plan") == []


def test_simulated_gpu_out_of_memory_from_the_allocator_halves_the_micro_batch_and_the_step_goes_on(small_task,
                                                                                                    tmp_path):
    """A 400 MB device cannot hold a micro-batch of 16: the simulated allocator raises torch.OutOfMemoryError in
    the first forward pass; the real out-of-memory path halves the micro-batch and the same step goes on."""
    out, _ = run(tmp_path, small_task, spec(400), ["--epochs=1"])
    plans = journal(out, "plan")
    assert len(plans) == 1 and "out of memory" in plans[0]["reason"] and plans[0]["step"] == 0
    assert plans[0]["plan"]["micro_batch"] == 8 and plans[0]["plan"]["grad_accum"] == 2
    assert sim(out)["ooms"] == 1 and sim(out)["steps"] == STEPS_PER_EPOCH  # no step lost


def test_simulated_gpu_two_ranks_one_crowded_device_both_shrink_alike(small_task, tmp_path, deepspeed_ops):
    """Rank 1's device gets another user's job; the ranks all-gather their samples, so both take the same plan
    (global batch kept), and rank 0's own figures stay its own."""
    node = spec(1024, [{"gpu": 1, "bytes": CROWD, "from_step": 4}], gpus=2)
    launch = accelerate_launch("cpu_2proc_deepspeed.yaml", 29781)
    out, _ = run(tmp_path, small_task, node, ["--epochs=2", "--batch_size_per_gpu=16",
                                              "--deepspeed_config=zero2_offload"], launcher=launch)
    plans = journal(out, "plan")
    assert plans and "GPU peak" in plans[0]["reason"] and plans[0]["plan"]["micro_batch"] == 8, plans
    assert sim(out, 0)["device"] == uuid_of(0) and sim(out, 1)["device"] == uuid_of(1)
    assert sim(out, 0)["cache_releases"] >= 1 and sim(out, 1)["cache_releases"] >= 1  # every rank applied it
