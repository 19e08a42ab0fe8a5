"""How a run on a cluster stops and comes back: the launcher's stop window, which failures a scheduler restarts.

Slow: a real 2-process run through docker/entrypoint.sh (bare mode: this checkout's program, accelerate launch,
DeepSpeed ZeRO-2 over gloo), whose checkpoint saves take 40 s longer (LOWMEM_FAULT_SLOW_SAVE). Every process of
it gets SIGTERM at once, as `scancel --signal=TERM` delivers it to a Slurm step: torchrun's agent, signalled
itself, kills its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (30 by default), so the save must still
complete, and the run exit 0, because the entrypoint gives the launcher the whole stop grace.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TINY_MODEL, signal_tree, task_options
from tests.integration.stand_ins import (ENTRYPOINT, FAKE_SCANCEL, FAKE_SCONTROL, FAKE_SRUN, SBATCH, entrypoint, free_port,
                                         install, launched, running_entrypoint)

SLOW_SAVE = 40  # seconds: longer than torchrun's default 30 s window, as short as that allows


def tail(path: Path, lines: int = 60) -> str:
    kept = [line for line in path.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


@pytest.mark.slow
def test_a_save_longer_than_30_s_completes_when_every_process_gets_sigterm(tiny_task, tmp_path, deepspeed_ops):
    program = Path(sys.executable).parent / "lowmem-train"
    if not program.is_file():
        pytest.skip(f"no {program}: pip install -e . provides it")
    out, log = tmp_path / "run", tmp_path / "entrypoint.log"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "PET_", "LOWMEM_")) and key not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}
    env.update(PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin", PYTHONWARNINGS="ignore", TMPDIR=str(tmp_path),
               LOWMEM_TRAIN=str(program), PYTHON=sys.executable, NUM_PROCESSES="2", MASTER_PORT=str(free_port()),
               LOWMEM_FAULT_SLOW_SAVE=str(SLOW_SAVE))
    # 128 steps an epoch: neither an epoch end nor max_steps saves (40 s each) before the signal
    args = [*task_options(tiny_task, out), *TINY_MODEL, "--batch_size_per_gpu=16", "--data.eval_max_samples=8",
            "--logging_steps=1", "--save_steps=1000", "--max_steps=100"]
    with log.open("w") as sink:
        run = subprocess.Popen(["sh", str(ENTRYPOINT), "train", *args], env=env, stdout=sink,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.jsonl"
        while not metrics.exists() or metrics.read_text().count('"train"') < 2:
            assert run.poll() is None, f"the run ended before training (exit {run.returncode})\n{tail(log)}"
            assert time.monotonic() < deadline, f"no training within 300 s\n{tail(log)}"
            time.sleep(0.2)
        signalled = time.monotonic()
        signalled_processes = signal_tree(run.pid, signal.SIGTERM)  # entrypoint, launcher, workers: as scancel --signal=TERM does
        code = run.wait(timeout=SLOW_SAVE + 90)
        took = time.monotonic() - signalled
    finally:
        if run.poll() is None:
            signal_tree(run.pid, signal.SIGKILL)
    assert code == 0, f"exit {code} after {took:.0f} s\n{tail(log)}"
    assert took >= SLOW_SAVE, f"the run ended {took:.0f} s after the signal: the slow save did not happen"
    saved = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / saved / "train_state.json").is_file(), tail(log)
    assert not (out / "final").exists(), "the run finished before the signal"
    print(f"stopped, saved {saved} and exited 0 {took:.0f} s after SIGTERM to {signalled_processes} processes")


# ---- the entrypoint and the sbatch script alone, with stand-ins (tests/integration/stand_ins.py) -------------

@pytest.mark.parametrize("given, expected", [({}, "120"), ({"LOWMEM_STOP_GRACE": "300"}, "300"),
                                             ({"LOWMEM_STOP_GRACE": "300", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "45"}, "45")])
def test_entrypoint_gives_the_launcher_the_stop_grace(stand_ins, given, expected):
    env, log = stand_ins
    result = entrypoint(env, "train", NUM_PROCESSES="2", **given)
    assert result.returncode == 0, result.stderr
    launcher_env = (log / "accelerate.env").read_text().splitlines()
    assert f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={expected}" in launcher_env
    assert f"stop window {expected} s" in result.stderr


def test_entrypoint_refuses_a_stop_grace_that_is_not_a_number(stand_ins):
    env, log = stand_ins
    result = entrypoint(env, "train", NUM_PROCESSES="2", LOWMEM_STOP_GRACE="2m")
    assert result.returncode == 2
    assert result.stderr.strip() == "entrypoint: LOWMEM_STOP_GRACE must be a positive number of seconds, got '2m'"
    assert launched(log) is None


# The entrypoint as the sbatch script runs it in bare mode (LOWMEM_REPO/docker/entrypoint.sh), on every node:
# records its environment, exits FAKE_CODE; with FAKE_RUN=1 it runs until SIGTERM, then "saves" and exits 0.
FAKE_ENTRYPOINT = """\
#!/bin/sh
env >"$FAKE_SLURM_LOG/entrypoint-$SLURM_NODEID.env"
if [ "${FAKE_RUN:-}" = 1 ]; then
    trap 'exit 0' TERM
    : >"$FAKE_SLURM_LOG/ready-$SLURM_NODEID"
    while :; do sleep 0.1; done
fi
exit "${FAKE_CODE:-0}"
"""
JOB_ID = "77"


@pytest.fixture
def slurm_job(tmp_path):
    """docker/slurm.sbatch, run to its end with stand-ins for srun, scancel, scontrol and the entrypoint (2 nodes);
    returns run(time_limit=False, **env) -> (exit code, stderr), and the stand-ins' log folder. With time_limit,
    the script gets its --signal=B:TERM once every node runs."""
    bin_dir, log, repo = tmp_path / "bin", tmp_path / "slurm", tmp_path / "repo"
    log.mkdir()
    install(bin_dir, sys.executable, srun=FAKE_SRUN, scancel=FAKE_SCANCEL, scontrol=FAKE_SCONTROL)
    install(repo / "docker", sys.executable, **{"entrypoint.sh": FAKE_ENTRYPOINT})
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "LOWMEM_", "FAKE_"))}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", FAKE_SLURM_LOG=str(log), OUTPUT_DIR=str(tmp_path / "run"),
               LOWMEM_REPO=str(repo), SLURM_JOB_ID=JOB_ID, SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="1")

    def run(time_limit: bool = False, **extra: str) -> tuple[int, str]:
        for ready in log.glob("ready-*"):
            ready.unlink()
        job = subprocess.Popen(["bash", str(SBATCH)], env=dict(env, FAKE_RUN="1" if time_limit else "", **extra),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        if time_limit:
            deadline = time.monotonic() + 30
            while not ((log / "ready-0").exists() and (log / "ready-1").exists()):
                assert job.poll() is None and time.monotonic() < deadline, job.communicate()
                time.sleep(0.05)
            job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=60)
        return job.returncode, stderr

    return run, log


def entrypoint_env(log: Path, node: int = 0) -> dict[str, str]:
    lines = (log / f"entrypoint-{node}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def test_sbatch_gives_the_launcher_the_time_slurm_leaves(slurm_job):
    run, log = slurm_job
    code, stderr = run()
    assert code == 0, stderr
    signal_time = int(re.search(r"^#SBATCH --signal=B:TERM@(\d+)$", SBATCH.read_text(), re.M).group(1))
    # Slurm may signal up to 60 s before --signal's time (sbatch(1)): the launcher never kills before Slurm would
    assert entrypoint_env(log, 0)["LOWMEM_STOP_GRACE"] == entrypoint_env(log, 1)["LOWMEM_STOP_GRACE"] == \
        str(signal_time + 60)
    run(LOWMEM_STOP_GRACE="600")
    assert entrypoint_env(log, 0)["LOWMEM_STOP_GRACE"] == "600"  # the user's own stands


def requeues(log: Path) -> int:
    path = log / "scontrol.args"
    return path.read_text().split().count("requeue") if path.exists() else 0


@pytest.mark.parametrize("code", [5, 6])
def test_sbatch_requeues_a_lost_peer_and_an_oom_up_to_the_limit(slurm_job, code):
    run, log = slurm_job
    for restarts in range(3):  # this job's restarts 0, 1, 2: below LOWMEM_MAX_RESTARTS' default 3
        exit_code, stderr = run(FAKE_CODE=str(code), SLURM_RESTART_COUNT=str(restarts))
        assert exit_code == code, stderr
        assert requeues(log) == restarts + 1, stderr
    exit_code, stderr = run(FAKE_CODE=str(code), SLURM_RESTART_COUNT="3")
    assert exit_code == code and requeues(log) == 3
    assert f"exit {code} (" in stderr and "after 3 restarts (LOWMEM_MAX_RESTARTS=3): not requeued" in stderr
    run(FAKE_CODE=str(code), SLURM_RESTART_COUNT="3", LOWMEM_MAX_RESTARTS="4")
    assert requeues(log) == 4


@pytest.mark.parametrize("code", [1, 2, 3, 4, 137])
def test_sbatch_never_requeues_what_would_end_the_same_way(slurm_job, code):
    run, log = slurm_job
    exit_code, stderr = run(FAKE_CODE=str(code))
    assert exit_code == code, stderr
    assert requeues(log) == 0, stderr


def test_sbatch_time_limit_requeues_leave_the_failure_restarts_alone(slurm_job, tmp_path):
    run, log = slurm_job
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".slurm_time_limit_requeues").write_text("76\n76\n")  # another job's: not this one's
    for restarts in range(2):  # two time limits, each stopped, saved and requeued
        exit_code, stderr = run(time_limit=True, SLURM_RESTART_COUNT=str(restarts))
        assert exit_code == 0 and requeues(log) == restarts + 1, stderr
    # restart 2 came from time limits only: a lost peer still has its one restart, and then none
    exit_code, stderr = run(FAKE_CODE="5", SLURM_RESTART_COUNT="2", LOWMEM_MAX_RESTARTS="1")
    assert exit_code == 5 and requeues(log) == 3, stderr
    exit_code, stderr = run(FAKE_CODE="5", SLURM_RESTART_COUNT="3", LOWMEM_MAX_RESTARTS="1")
    assert exit_code == 5 and requeues(log) == 3, stderr


def test_sbatch_refuses_a_restart_limit_that_is_not_a_number(slurm_job):
    run, log = slurm_job
    exit_code, stderr = run(LOWMEM_MAX_RESTARTS="three")
    assert exit_code == 2
    assert stderr.strip() == "slurm.sbatch: LOWMEM_MAX_RESTARTS must be a whole number, got 'three'"


# ---- LOWMEM_EXIT_CODES=kubeflow: what a PyTorchJob's restartPolicy ExitCode should restart lands in 128-255 ----

@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("code, expected", [
    ("0", 0),                                 # finished: the pod succeeds
    ("5", 138), ("6", 138),                   # lost a peer, out of memory with the step lost: restart
    ("1", 1), ("2", 2), ("3", 3), ("4", 4),   # crash, user error, out of memory, out of disk: fail the job
    ("137", 137),                             # killed: retried by the operator already
])
def test_kubeflow_exit_codes_move_restartable_failures_into_128_to_255(stand_ins, processes, code, expected):
    env, log = stand_ins
    result = entrypoint(env, "train", NUM_PROCESSES=str(processes), LOWMEM_EXIT_CODES="kubeflow",
                        **{"FAKE_EXIT_RANK_none" if processes == 1 else "FAKE_EXIT_RANK_1": code})
    assert result.returncode == expected, result.stderr
    assert (launched(log) is None) == (processes == 1)  # one process: no launcher, still mapped


@pytest.mark.parametrize("processes", [1, 2])
def test_kubeflow_exit_codes_make_a_stop_143_so_the_pod_is_restarted_not_succeeded(stand_ins, processes):
    env, log = stand_ins
    proc = running_entrypoint(env, log, processes, LOWMEM_EXIT_CODES="kubeflow")
    try:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "exit 143 for 0 (LOWMEM_EXIT_CODES=kubeflow: restart it)" in stderr
    assert "SIGTERM forwarded to the training processes" in stderr


def test_entrypoint_refuses_an_unknown_exit_code_mapping(stand_ins):
    env, log = stand_ins
    result = entrypoint(env, "train", NUM_PROCESSES="2", LOWMEM_EXIT_CODES="k8s")
    assert result.returncode == 2
    assert result.stderr.strip() == "entrypoint: LOWMEM_EXIT_CODES must be plain or kubeflow, got 'k8s'"


@pytest.mark.parametrize("outcome", ["finished", "stopped"])
def test_the_trainer_tells_the_entrypoint_a_stop_from_a_finish(tmp_path, monkeypatch, outcome):
    """The real `train` command's end, with a stand-in Trainer: what the entrypoint reads back above."""
    from types import ModuleType, SimpleNamespace

    from lowmem_train.commands import train

    class FakeTrainer:
        peers = None

        def __init__(self, cfg, on_peer_lost, on_started=None):
            pass

        def fit(self):
            return SimpleNamespace(outcome=outcome)

    fake = ModuleType("lowmem_train.trainer.trainer")
    fake.Trainer = FakeTrainer
    monkeypatch.setitem(sys.modules, "lowmem_train.trainer.trainer", fake)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # run() sets it on a machine without a GPU
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOWMEM_STATUS_DIR", str(tmp_path))
    assert train.run(None, SimpleNamespace(output_dir=str(tmp_path / "run"))) == 0
    assert (tmp_path / "outcome-rank-1").read_text() == f"{outcome}\n"
