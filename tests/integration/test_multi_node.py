"""Two "machines" of one process each, on loopback: the launcher preset for several nodes, DeepSpeed ZeRO-2 with
CPU offload over gloo. They train, checkpoint and resume; a machine that dies (or goes silent) ends the other
within 60 s with one clear line instead of a hang; machines that do not share the output folder are refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ENTRY, REPO, TINY_MODEL, signal_tree, task_options

pytestmark = pytest.mark.slow
CONFIG = REPO / "accelerate_configs" / "multi_node_zero2_offload.yaml"
COMMON = [*TINY_MODEL, "--batch_size_per_gpu=16", "--data.eval_max_samples=8", "--logging_steps=1"]


def machine(rank: int, port: int, options: list[str]) -> subprocess.Popen:
    """One machine: its own launcher (and the rank it starts), in a session of its own so that it can die whole."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_machines", "2",
           "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(port), str(ENTRY), "train", *options]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def both(port: int, options: list[str], options_1: list[str] | None = None, timeout: float = 900):
    machines = [machine(0, port, options), machine(1, port, options_1 or options)]
    return [(m.communicate(timeout=timeout)[1], m.returncode) for m in machines]


def signal_machine(launcher: subprocess.Popen, sig: int) -> None:
    """What a dead (SIGKILL) or frozen (SIGSTOP) node looks like: the launcher and every process under it."""
    signal_tree(launcher.pid, sig)


def our_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.match(r"(\[rank \d+\] )?error: ", line)]


def wait_for(path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.5)


def test_two_machines_train_survive_a_dead_one_and_resume(tiny_task, tmp_path, deepspeed_ops):
    out = tmp_path / "run"
    options = [*task_options(tiny_task, out), *COMMON, "--epochs=50", "--save_steps=5"]
    machines = [machine(0, 29771, options), machine(1, 29771, options)]
    wait_for(out / "checkpoints" / "latest")
    time.sleep(2)
    signal_machine(machines[1], signal.SIGKILL)  # machine 1 dies mid-run
    dead_at = time.monotonic()
    _, err = machines[0].communicate(timeout=120)
    assert time.monotonic() - dead_at < 60, "the survivor did not give up within 60 s"
    machines[1].wait()
    errors = our_errors(err)
    assert len(errors) == 1 and "lost another rank" in errors[0] and "--is_keep_training=auto" in errors[0], err[-3000:]
    assert not re.search(r"\[rank\d\]: Traceback", err), err[-3000:]
    status = json.loads((out / "exit_status.json").read_text())
    assert (status["exit_code"], status["outcome"]) == (5, "lost_peer")
    saved = int((out / "checkpoints" / "latest").read_text().strip()[5:])
    assert saved >= 5
    assert len(list((out / "checkpoints" / f"step_{saved:08d}" / "model" / "ds").glob("zero_pp_rank_*"))) == 2

    # Both machines come back with the same command (auto: the container's default) and finish from there.
    runs = both(29772, [*options, f"--max_steps={saved + 3}", "--is_keep_training=auto"])
    for stderr, code in runs:
        assert code == 0, stderr[-3000:]
    assert f"resumed from step_{saved:08d}" in runs[0][0]
    assert (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "exit_status.json").read_text())["exit_code"] == 0


def test_a_silent_machine_is_given_up_on_by_the_peer_watch(tiny_task, tmp_path, deepspeed_ops):
    """A frozen node (or a broken network) resets no connection: a collective would wait 30 minutes. The peer watch
    notices that the other rank's heartbeat stopped and ends this one after --peer_timeout_seconds."""
    out = tmp_path / "run"
    options = [*task_options(tiny_task, out), *COMMON, "--epochs=50", "--save_steps=1000", "--peer_timeout_seconds=10"]
    machines = [machine(0, 29773, options), machine(1, 29773, options)]
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.is_file() and metrics.read_text().count('"train"') >= 3):
        assert time.time() < deadline
        time.sleep(0.5)
    signal_machine(machines[1], signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        _, err = machines[0].communicate(timeout=120)
        assert time.monotonic() - frozen_at < 40, "the peer watch did not notice within 40 s"
    finally:
        signal_machine(machines[1], signal.SIGKILL)
        machines[1].wait()
    errors = our_errors(err)
    assert len(errors) == 1 and "no sign of life from rank(s) 1 for 10 s" in errors[0], err[-3000:]
    assert json.loads((out / "exit_status.json").read_text())["exit_code"] == 5


def test_machines_that_do_not_share_the_output_folder_are_refused(tiny_task, tmp_path, deepspeed_ops):
    """Machine 1 names a folder of its own disk: its part of every checkpoint would be lost. Refused at start."""
    options = [*TINY_MODEL, "--max_steps=2", "--data.eval_max_samples=8"]
    task = {k: v for k, v in tiny_task.items()}
    runs = both(29774, [*task_options(task, tmp_path / "node0" / "run"), *options],
                [*task_options(task, tmp_path / "node1" / "run"), *options], timeout=600)
    assert all(code != 0 for _, code in runs)
    errors = our_errors(runs[0][0])
    assert len(errors) == 1 and "checkpoints need storage every node shares" in errors[0], runs[0][0][-3000:]
    assert "rank(s) 1 do not see" in errors[0]
    assert not (tmp_path / "node0" / "run" / "checkpoints").exists()
