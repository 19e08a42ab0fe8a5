"""docker/slurm.sbatch, run as Slurm would run it, on one machine: a 2-node job whose "nodes" are two tasks on
loopback (bare-metal mode: this checkout's docker/entrypoint.sh and program). The Slurm commands are stand-ins:
srun starts the step's command once per task with that task's SLURM_NODEID (and exits with the highest code, as
srun does), scancel signals every process of the step (what slurmstepd does), scontrol records a requeue.

The script itself runs, so the test goes red when the script and the entrypoint disagree (the task layout, the
variables, the flags, the time-limit handling). First job: it trains until the batch script gets the time-limit
SIGTERM (--signal=B:TERM@...), then every rank saves and exits 0 and the script requeues the job. The requeued
job, started with the same command, resumes from that checkpoint by itself and finishes on 2 processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_MODEL, signal_tree
from tests.integration.stand_ins import FAKE_SCANCEL, FAKE_SCONTROL, FAKE_SRUN, SBATCH, free_port, install

pytestmark = pytest.mark.slow
JOB_ID = "4242"
MAX_STEPS = 20


@pytest.fixture
def cluster(tmp_path):
    """The stand-in Slurm commands on PATH, and the environment a batch script of a 2-node job starts with."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm"
    log.mkdir()
    install(bin_dir, sys.executable, srun=FAKE_SRUN, scancel=FAKE_SCANCEL, scontrol=FAKE_SCONTROL)
    program = Path(sys.executable).parent / "lowmem-train"  # this checkout's program (installed editable)
    if not program.is_file():
        pytest.skip(f"no {program}: pip install -e . provides it")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "PET_")) and key not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NUM_PROCESSES", "RUNTIME", "MOUNTS")}
    env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", FAKE_SLURM_LOG=str(log),
               PYTHONWARNINGS="ignore", TMPDIR=str(tmp_path), LOWMEM_TRAIN=str(program), PYTHON=sys.executable,
               NUM_PROCESSES="1",  # a CPU node: one process (without it, the entrypoint asks torch, same answer)
               OUTPUT_DIR=str(tmp_path / "shared" / "run"), SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME="lowmem-train",
               SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="localhost", SLURM_NTASKS_PER_NODE="1",
               SLURM_CPUS_PER_TASK="1", SLURM_SUBMIT_DIR=str(REPO))
    return env, log


def submit(env: dict, args: list[str], output: Path, **extra: str) -> subprocess.Popen:
    """The batch script, as slurmd starts it: bash, in a working folder of the job's, its output to a file."""
    with output.open("a") as out:  # --open-mode=append: a requeued job's lines follow the first one's
        return subprocess.Popen(["bash", str(SBATCH), *args], cwd=output.parent, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(env, MASTER_PORT=str(free_port()), **extra), start_new_session=True)


def finish(job: subprocess.Popen, output: Path, timeout: float) -> int:
    try:
        return job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_tree(job.pid, signal.SIGKILL)
        raise AssertionError(f"the job did not end within {timeout:.0f} s\n{tail(output)}") from None


def tail(output: Path, lines: int = 80) -> str:
    kept = [line for line in output.read_text().replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_a_two_node_job_stops_at_the_time_limit_requeues_and_resumes(cluster, tiny_task, tmp_path, deepspeed_ops):
    env, log = cluster
    out = Path(env["OUTPUT_DIR"])
    output = tmp_path / f"lowmem-train-{JOB_ID}.out"
    args = [f"--train_file={tiny_task['train']}", f"--validation_file={tiny_task['validation']}",
            f"--tokenizer_dir={tiny_task['tokenizer']}", *TINY_MODEL, "--batch_size_per_gpu=16",
            "--data.eval_max_samples=8", "--logging_steps=1", "--save_steps=1000", f"--max_steps={MAX_STEPS}"]

    # ---- the first job: trains until the time-limit signal, then saves, exits 0 and requeues itself
    start = time.monotonic()
    job = submit(env, args, output)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while read(metrics).count('"train"') < 2:
        assert job.poll() is None, f"the job ended before training (exit {job.returncode})\n{tail(output)}"
        assert time.monotonic() < deadline, f"no training within 600 s\n{tail(output)}"
        time.sleep(0.3)
    job.send_signal(signal.SIGTERM)  # --signal=B:TERM@120: to the batch script alone
    code = finish(job, output, timeout=300)
    first = output.read_text()
    assert code == 0, tail(output)
    assert read(log / "srun.args").startswith("--ntasks-per-node=1 ")  # one task per node
    assert read(log / "scancel.args").split() == ["--signal=TERM", JOB_ID]
    assert read(log / "scontrol.args").split() == ["requeue", JOB_ID], tail(output)
    for node in (0, 1):  # each task ran the entrypoint with its own node rank, the first node as the main one
        assert re.search(rf"2 processes \(1 per node x 2 nodes, this is node {node}; main localhost:\d+\) on Slurm "
                         rf"job {JOB_ID}", first), tail(output)
    assert re.search(r"stopped by (SIGTERM|a signal on another rank) at step", first), tail(output)
    assert not (out / "final").exists(), "the run finished before the signal: give it more steps"
    saved = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(saved[5:])
    assert 0 < stopped_at < MAX_STEPS
    state = json.loads((out / "checkpoints" / saved / "train_state.json").read_text())["train_state"]
    assert state["world_size"] == 2
    print(f"first job: stopped and saved at step {stopped_at} after {time.monotonic() - start:.0f} s")

    # ---- the requeued job: the same script and arguments; resumes by itself and finishes
    start = time.monotonic()
    job = submit(env, args, output, SLURM_RESTART_COUNT="1")
    code = finish(job, output, timeout=600)
    second = output.read_text()[len(first):]
    assert code == 0, tail(output)
    assert f"resumed from {saved}" in second, tail(output)
    assert (out / "final" / "model.safetensors").is_file(), tail(output)
    newest = (out / "checkpoints" / "latest").read_text().strip()
    assert newest == f"step_{MAX_STEPS:08d}"
    assert json.loads((out / "checkpoints" / newest / "train_state.json").read_text())["train_state"]["world_size"] == 2
    assert read(log / "scontrol.args").count("requeue") == 1, "a finished job was requeued"
    print(f"requeued job: resumed at step {stopped_at}, finished in {time.monotonic() - start:.0f} s")
