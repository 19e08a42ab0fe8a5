"""The real distributed path on this CPU machine: `accelerate launch`, 2 processes, DeepSpeed ZeRO-2 with
the optimizer offloaded to CPU, gloo. Nothing is mocked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY_MODEL, accelerate_launch, run_cli, task_options

pytestmark = pytest.mark.slow
RECORDER = REPO / "tests" / "integration" / "scripts" / "record_run.py"


def launch_recorded(options: list[str], port: int, env: dict | None = None, launcher: list[str] | None = None,
                    script: Path = RECORDER):
    import os
    import subprocess

    cmd = (launcher or accelerate_launch("cpu_2proc_deepspeed.yaml", port)) + [str(script), *options]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}  # a None value: unset it
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in env.items() if v is not None})


def load_records(out):
    return [torch.load(out / f"record_rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_two_process_deepspeed_zero2_offload(tiny_task, tmp_path, deepspeed_ops):
    out = tmp_path / "ds"
    result = launch_recorded([*task_options(tiny_task, out), *TINY_MODEL, "--epochs=2", "--batch_size_per_gpu=16",
                              "--logging_steps=4", "--data.eval_max_samples=32", "--learn_rate=5e-3"], port=29611)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es)" in result.stderr and "DeepSpeed ZeRO-2 + optimizer offload to CPU" in result.stderr
    ranks = load_records(out)

    # The two ranks saw disjoint samples, and together every sample of every step exactly once.
    for epoch in (0, 1):
        seen = [sorted(p for e, _, ps in rank["steps"] if e == epoch for p in ps) for rank in ranks]
        assert not set(seen[0]) & set(seen[1])
        steps = len([1 for e, _, _ in ranks[0]["steps"] if e == epoch])
        assert sorted(seen[0] + seen[1]) == sorted(set(seen[0] + seen[1]))
        assert len(seen[0]) + len(seen[1]) == steps * 32

    # Loss falls, and both ranks report the same global loss.
    losses = [loss for _, loss in ranks[0]["losses"]]
    assert losses[-1] < 0.6 * losses[0]
    assert ranks[0]["losses"] == ranks[1]["losses"]

    # Gradients were synchronised: the ranks end with identical weights.
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == w1.keys()
    assert max((w0[k] - w1[k]).abs().max().item() for k in w0) == 0.0

    # Checkpoints carry one optimizer shard per rank.
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert len(list((ckpt / "model" / "ds").glob("zero_pp_rank_*_optim_states.pt"))) == 2


def test_ranks_without_a_process_group_are_refused(tiny_task, tmp_path):
    """Several ranks launched but not connected (what `--multi_gpu` gives on a CPU box when the script does not
    ask for gloo) would train separate models in silence: refuse, clearly, with the command that works."""
    out = tmp_path / "refused"
    result = run_cli(["train", *task_options(tiny_task, out), *TINY_MODEL, "--deepspeed_config=none"],
                     env={"WORLD_SIZE": "2", "RANK": "0"}, timeout=300)
    assert result.returncode == 2
    assert "they would train 2 separate models" in result.stderr
    assert "accelerate_configs/cpu_2proc_deepspeed.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_multi_gpu_flag_on_cpu_trains_one_synchronised_model(tiny_task, tmp_path):
    """Plain Accelerate, `--multi_gpu`, no GPU: real DDP over gloo, so both ranks end with the same weights."""
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "29612"]
    result = launch_recorded([*task_options(tiny_task, out), *TINY_MODEL, "--deepspeed_config=none", "--max_steps=6",
                              "--batch_size_per_gpu=8", "--data.eval_max_samples=8", "--model.dropout=0.1"],
                             port=29612, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr and "MULTI_CPU" in result.stderr
    w0, w1 = (r["weights"] for r in load_records(out))
    assert max((w0[k] - w1[k]).abs().max().item() for k in w0) == 0.0


def test_the_train_command_leaves_the_process_group_on_every_rank(tiny_task, tmp_path):
    """A rank that exits with gloo's threads alive can abort at exit (-6) and turn a finished run into a failed one
    (seen in CI): the command tears the group down on every rank once the run ended together."""
    import json

    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "29614"]
    result = launch_recorded(["train", *task_options(tiny_task, out), *TINY_MODEL, "--deepspeed_config=none",
                              "--max_steps=2", "--batch_size_per_gpu=8", "--data.eval_max_samples=8"], port=29614,
                             launcher=launcher, script=REPO / "tests" / "integration" / "scripts" / "train_then_report.py")
    assert result.returncode == 0, result.stderr[-3000:]
    left = [json.loads((tmp_path / f"left_rank{r}.json").read_text()) for r in (0, 1)]
    assert left == [{"code": 0, "process_group": False}] * 2


def test_multi_gpu_flag_keeps_deepspeed_when_the_config_asks_for_it(tiny_task, tmp_path, deepspeed_ops):
    """The prior art's --multi_gpu silently dropped DeepSpeed; here the run config decides."""
    out = tmp_path / "kept"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "29613"]
    result = run_cli(["train", *task_options(tiny_task, out), *TINY_MODEL, "--max_steps=4", "--batch_size_per_gpu=8",
                      "--deepspeed_config=ds_configs/zero2_offload.json", "--data.eval_max_samples=8"],
                     launcher=launcher, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr and "DeepSpeed ZeRO-2" in result.stderr


@pytest.mark.parametrize("deepspeed", ["none", "ds_configs/zero2_offload.json"])
@pytest.mark.parametrize("model_type", ["t5", "gpt"])
def test_micro_batch_split_does_not_change_the_update(tiny_task, tmp_path, deepspeed, model_type, deepspeed_ops):
    """4 x accumulation 2 and 8 x accumulation 1: the same weights after a step (loss scaled exactly once)."""
    import subprocess

    script = REPO / "tests" / "integration" / "scripts" / "one_step.py"
    runs = []
    for micro, accum in [(4, 2), (8, 1)]:
        path = tmp_path / f"w_{micro}_{accum}.pt"
        run = subprocess.run([sys.executable, str(script), f"--train_file={tiny_task['train']}",
                              f"--tokenizer_dir={tiny_task['tokenizer']}", f"--model_type={model_type}",
                              f"--micro={micro}", f"--accum={accum}", f"--deepspeed_config={deepspeed}", f"--out={path}"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        runs.append(torch.load(path))
    # The gradient itself: a loss scaled twice (or not at all) under accumulation changes its norm by 2x.
    # (Weights alone cannot show that: Adam's first step, g / (|g| + eps), ignores the scale of g.)
    assert abs(runs[0]["grad_norm"] - runs[1]["grad_norm"]) <= 1e-5 * runs[1]["grad_norm"]
    assert abs(runs[0]["loss"] - runs[1]["loss"]) <= 1e-5 * runs[1]["loss"]
    # The weights: every parameter moved by ~lr (1e-2); the splits agree far below that. Adam turns fp32
    # summation-order noise into up to ~1e-3 where |g| is near eps, hence this bound and not 1e-6.
    w0, w1 = runs[0]["weights"], runs[1]["weights"]
    diffs = torch.cat([(w0[k] - w1[k]).abs().flatten() for k in w0])
    assert diffs.max().item() < 2e-3 and diffs.median().item() < 1e-6


def test_a_mistake_seen_by_rank_0_alone_reads_as_one_user_error_on_2_processes(tiny_task, tmp_path, deepspeed_ops):
    """Rank 0 reads the data while the others wait for it: a file that is not parquet is its error alone (a
    missing one every rank refuses before the process group exists). Its line must reach
    the user (the launcher stops the other ranks as soon as one fails), and the others must say it was a user
    error, not a lost peer with advice to resume."""
    import json

    out = tmp_path / "mistake"
    junk = tmp_path / "junk.parquet"
    junk.write_text("prompt,response\n1,一\n")
    options = [*task_options(tiny_task, out), *TINY_MODEL, f"--train_file={junk}"]
    result = run_cli(["train", *options], launcher=accelerate_launch("cpu_2proc_deepspeed.yaml", 29631), timeout=600)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line and "torch.distributed" not in line]
    assert any(line.startswith(f"error: {junk}") and "not a readable parquet file" in line for line in errors), errors
    assert not any("resume" in line or "lost another rank" in line for line in errors), errors
    status = json.loads((out / "exit_status.json").read_text())
    assert (status["outcome"], status["exit_code"]) == ("user_error", 2)


@pytest.mark.all_cores
def test_cpu_adam_runs_on_this_ranks_share_of_the_cores_not_the_launchers_one_thread(tiny_task, tmp_path,
                                                                                     deepspeed_ops):
    """`accelerate launch` without --cpu (and torchrun) give every rank OMP_NUM_THREADS=1 when it is unset; under
    ZeRO-2 + CPU offload that made DeepSpeed's CPU Adam single-threaded. The optimizer step now runs with usable
    cores / local processes threads, in torch and in the OpenMP runtime CPU Adam calls. On this 2-core machine two
    ranks get 1 each either way, so one rank is launched with the 1 those launchers write (an accelerate launch of
    one process leaves the variable unset)."""
    import psutil

    launcher = accelerate_launch("cpu_2proc_deepspeed.yaml", 29761) + ["--num_processes", "1"]
    out = tmp_path / "threads"
    run = launch_recorded([*task_options(tiny_task, out), *TINY_MODEL, "--max_steps=2", "--batch_size_per_gpu=8",
                           "--save_steps=1000", "--validation_file=", "--deepspeed_config=zero2_offload"], 0,
                          env={"OMP_NUM_THREADS": "1"}, launcher=launcher)
    assert run.returncode == 0, run.stderr[-3000:]
    cores = len(psutil.Process().cpu_affinity())
    assert cores > 1, "needs a machine with 2+ cores"
    record = torch.load(out / "record_rank0.pt", weights_only=False)
    assert set(record["threads"]) == {(cores, cores)}  # torch's and OpenMP's, in every step
    assert f"{cores} CPU threads per rank ({cores} usable cores / 1 process(es) on this machine)" in run.stderr

