"""Checkpoints that survive anything: SIGKILL at random moments and in the middle of a save, SIGTERM on one
rank, a new world size, corrupt checkpoints, and resumes that would corrupt a run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ENTRY, REPO, TINY_MODEL, accelerate_launch, run_cli, task_options

pytestmark = pytest.mark.slow
RECORDER = REPO / "tests" / "integration" / "scripts" / "record_run.py"
# 4096 rows / 64 = 64 steps per epoch; a checkpoint every 5 steps; dropout on (RNG restore matters).
CHAOS = [*TINY_MODEL, "--epochs=2", "--batch_size_per_gpu=64", "--save_steps=5", "--keep_latest_n_ckp=2",
         "--model.dropout=0.1", "--data.eval_max_samples=16", "--logging_steps=5"]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def test_chaos_sigkill_at_random_moments_and_mid_save(tiny_task, tmp_path):
    straight = tmp_path / "straight"
    t0 = time.monotonic()
    assert run_cli(["train", *task_options(tiny_task, straight), *CHAOS]).returncode == 0
    # Random kill moments scale with this machine's speed: within the first ~55% of an uninterrupted run (start-up
    # is about half of it), so each random kill lets only a few steps through and the run outlives all 10 kills.
    whole_run = time.monotonic() - t0

    out = tmp_path / "chaos"
    rng = random.Random(7)
    # 10 kills: 7 at random moments (start-up, training, saving, exporting), 3 inside a save on purpose.
    plan = ["random"] * 7 + ["save1", "save2", "save1"]
    rng.shuffle(plan)
    kills = 0
    for attempt in range(40):
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        kind = plan[kills] if kills < len(plan) else None
        if kind and kind.startswith("save"):
            env["LOWMEM_FAULT_KILL_IN_SAVE"] = kind[-1]
        proc = subprocess.Popen([sys.executable, str(ENTRY), "train", *task_options(tiny_task, out), *CHAOS,
                                 "--is_keep_training=True"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kind == "random":
            try:
                proc.wait(timeout=rng.uniform(0.15, 0.55) * whole_run)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err[-3000:]  # killed by us, never failed by itself
        kills += 1
    assert proc.returncode == 0 and kills >= 10, (kills, err[-2000:])

    a, b = final_weights(straight), final_weights(out)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    # debris of killed saves is gone, and what is left is complete
    ckpts = out / "checkpoints"
    assert not list(ckpts.glob(".step_*.tmp"))
    assert all((p / "train_state.json").is_file() for p in ckpts.glob("step_*"))


def children_running(launcher_pid: int, marker: str) -> dict[int, int]:
    """rank -> pid of the training processes under a launcher (read from /proc, RANK in their environment)."""
    import psutil

    ranks = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if marker in " ".join(child.cmdline()):
                rank = child.environ().get("RANK")
                if rank is not None:
                    ranks[int(rank)] = child.pid
        except psutil.Error:
            continue
    return ranks


def test_sigterm_on_one_rank_saves_and_both_exit_zero(tiny_task, tmp_path, deepspeed_ops):
    out = tmp_path / "term"
    args = [*task_options(tiny_task, out), *TINY_MODEL, "--epochs=50", "--batch_size_per_gpu=16", "--save_steps=1000",
            "--data.eval_max_samples=8", "--logging_steps=1"]
    launcher = subprocess.Popen(accelerate_launch("cpu_2proc_deepspeed.yaml", 29731) + [str(ENTRY), "train", *args],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 600
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count('"train"') >= 3):
        time.sleep(0.5)
    ranks = children_running(launcher.pid, "train_low_mem.py")
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGTERM)  # rank 1 only, as a scheduler preempting one node would
    _, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err[-3000:]
    assert "continue with the same command plus --is_keep_training=True" in err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert stopped_at >= 3

    resumed = run_cli(["train", *args, f"--max_steps={stopped_at + 2}", "--is_keep_training=True"],
                      launcher=accelerate_launch("cpu_2proc_deepspeed.yaml", 29732))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {latest}" in resumed.stderr


def records(out: Path) -> list[dict]:
    found = sorted(out.glob("record_rank*.pt"))
    loaded = [torch.load(p, weights_only=False) for p in found]
    for p in found:
        p.unlink()
    return loaded


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_deepspeed_checkpoint_resumes_on_another_number_of_processes(tiny_task, tmp_path, deepspeed_ops, first, second):
    """ZeRO shards belong to a process count; the resume converts to DeepSpeed's universal format (exact)."""
    args = [*task_options(tiny_task, tmp_path / "run"), *TINY_MODEL, "--epochs=1", "--batch_size_per_gpu=16",
            "--save_steps=1000", "--data.eval_max_samples=8", "--deepspeed_config=ds_configs/zero2_offload.json"]
    if first == 1:
        args.append("--batch_size_per_gpu=32")  # the same global batch (32) on one process

    def launch(procs: int, extra: list[str], port: int):
        launcher = accelerate_launch("cpu_2proc_deepspeed.yaml", port) + ["--num_processes", str(procs)]
        return subprocess.run(launcher + [str(RECORDER), *args, *extra], cwd=REPO, capture_output=True, text=True,
                              timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})

    straight = launch(first, ["--max_steps=12", f"--output_dir={tmp_path / 'straight'}"], 29741)
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = records(tmp_path / "straight")
    one = launch(first, ["--max_steps=6"], 29742)
    assert one.returncode == 0, one.stderr[-3000:]
    records(tmp_path / "run")
    two = launch(second, ["--max_steps=12", "--is_keep_training=True"], 29743)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "loading its universal form" in two.stderr and "global batch 32 kept" in two.stderr
    resumed = records(tmp_path / "run")

    # The data position, both ways: every resumed step consumed exactly the samples that step consumed in the
    # uninterrupted run, whatever the process count of either.
    def per_step(ranks: list[dict]) -> dict[int, list[int]]:
        steps: dict[int, list[int]] = {}
        for rank in ranks:
            for _, step, positions in rank["steps"]:
                steps.setdefault(step, []).extend(positions)
        return {step: sorted(p) for step, p in steps.items()}

    expected = {step: p for step, p in per_step(reference).items() if step >= 6}
    assert per_step(resumed) == expected and len(expected) == 6

    # Weights and Adam moments came back exactly: every resumed step's loss equals the uninterrupted run's up to the
    # order of the gradient reduction across processes, and so do the weights at the end, read as `export` reads
    # them (ZeRO shards joined). Measured: losses within 1e-6, weights within 1e-6 (lr 3e-3, 6 steps).
    losses, reference_losses = dict(resumed[0]["losses"]), dict(reference[0]["losses"])
    assert max(abs(losses[s] - reference_losses[s]) for s in range(6, 12)) < 1e-5
    from lowmem_train.trainer.export import read_weights

    ours, theirs = (read_weights(folder / "checkpoints" / "step_00000012")[0]
                    for folder in (tmp_path / "run", tmp_path / "straight"))
    assert ours.keys() == theirs.keys()
    diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    print(f"world size {first} -> {second}: max weight difference after 6 resumed steps {diff:.3g}")
    assert diff < 1e-5


def test_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(tiny_task, tmp_path):
    out = tmp_path / "corrupt"
    args = ["train", *task_options(tiny_task, out), *TINY_MODEL, "--batch_size_per_gpu=64", "--save_steps=4",
            "--data.eval_max_samples=8"]
    assert run_cli([*args, "--max_steps=8"]).returncode == 0
    newest = out / "checkpoints" / "step_00000008"
    weights = newest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated tensor file
    resumed = run_cli([*args, "--max_steps=10", "--is_keep_training=True"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping checkpoint step_00000008" in resumed.stderr and "resumed from step_00000004" in resumed.stderr

    bad_json = out / "checkpoints" / "step_00000010" / "train_state.json"
    bad_json.write_text("{not json")
    again = run_cli([*args, "--max_steps=11", "--is_keep_training=True"])
    assert again.returncode == 0 and "skipping checkpoint step_00000010" in again.stderr


def test_resume_refuses_changes_that_would_corrupt_the_run(tiny_task, tmp_path):
    out = tmp_path / "refuse"
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_task["tokenizer"], tokenizer)
    args = ["train", *task_options({**tiny_task, "tokenizer": tokenizer}, out), *TINY_MODEL, "--batch_size_per_gpu=64",
            "--data.eval_max_samples=8"]
    assert run_cli([*args, "--max_steps=2"]).returncode == 0
    changed = run_cli([*args, "--max_steps=4", "--is_keep_training=True", "--model.d_model=128"])
    assert changed.returncode == 2
    assert "--model.d_model (64 -> 128)" in changed.stderr and "Traceback" not in changed.stderr

    # The same --tokenizer_dir, retrained in between with another vocabulary (two ids swapped): every token id
    # would now mean another token. The saved fingerprint catches it; the path alone could not.
    spec = json.loads((tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]
    (tokenizer / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    swapped = run_cli([*args, "--max_steps=4", "--is_keep_training=True"])
    assert swapped.returncode == 2 and "Traceback" not in swapped.stderr, swapped.stderr[-2000:]
    assert f"the tokenizer in {tokenizer} (vocabulary" in swapped.stderr, swapped.stderr[-2000:]
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]
    (tokenizer / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")

    # The same vocabulary in another folder is the same tokenizer: moving it does not block a resume.
    moved = tmp_path / "moved_tokenizer"
    tokenizer.rename(moved)
    args = [a.replace(f"--tokenizer_dir={tokenizer}", f"--tokenizer_dir={moved}") for a in args]
    fine = run_cli([*args, "--max_steps=4", "--is_keep_training=True", "--epochs=3", "--logging_steps=1"])
    assert fine.returncode == 0, fine.stderr[-2000:]
    state = json.loads((out / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert state["train_state"]["step"] == 4
