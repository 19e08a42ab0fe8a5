"""What the real `train` command leaves in OUTPUT_DIR/exit_status.json, on the paths the fault matrix does not
take (test_fault_matrix.py has codes 3, 4, 5 and 6): a crash (1), a second Ctrl-C (130), a process killed
outright, and a user error in a folder of its own. The status never outlives the start it describes.

Seams (trainer/faults.py): LOWMEM_FAULT_CRASH (an unexpected error in a given step), LOWMEM_FAULT_SLOW_SAVE (a
save that lasts long enough for a second Ctrl-C to land in it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ENTRY, REPO, TINY_MODEL, run_cli, task_options

pytestmark = pytest.mark.slow
COMMON = [*TINY_MODEL, "--batch_size_per_gpu=16", "--save_steps=3", "--data.eval_max_samples=8", "--logging_steps=1"]


def status(out: Path) -> dict:
    return json.loads((out / "exit_status.json").read_text())


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def steps_logged(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count('"train"') if metrics.is_file() else 0


def start(tiny_task, out: Path, extra: list[str], env: dict | None = None, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ENTRY), "train", *task_options(tiny_task, out), *COMMON, *extra],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def test_a_crash_writes_1_over_a_stale_0_and_a_killed_run_leaves_started(tiny_task, tmp_path):
    """A finished run leaves 0; a resumed start that crashes (the crash seam, step 8) replaces it with 1 and the
    error, keeping its checkpoints; a start killed with SIGKILL mid-run leaves "started", not that stale 1."""
    out = tmp_path / "run"
    first = run_cli(["train", *task_options(tiny_task, out), *COMMON, "--max_steps=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert (status(out)["exit_code"], status(out)["outcome"]) == (0, "finished")

    crashed = run_cli(["train", *task_options(tiny_task, out), *COMMON, "--max_steps=12", "--is_keep_training=auto"],
                      env={"LOWMEM_FAULT_CRASH": "step=8"})
    assert crashed.returncode == 1 and "InjectedCrash" in crashed.stderr, crashed.stderr[-3000:]
    assert "Traceback" in crashed.stderr  # a bug says where it is
    seen = status(out)
    assert (seen["exit_code"], seen["outcome"]) == (1, "crashed"), seen
    assert "InjectedCrash: injected by LOWMEM_FAULT_CRASH in step 8" in seen["message"], seen
    assert latest(out) == "step_00000006" and (out / "checkpoints" / "step_00000006" / "train_state.json").is_file()

    proc = start(tiny_task, out, ["--max_steps=1000", "--is_keep_training=auto"], stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: steps_logged(out) >= 10, proc, "steps after 6")  # 7 logged by the two runs before
    finally:
        proc.kill()
        proc.wait()
    seen = status(out)
    assert (seen["exit_code"], seen["outcome"]) == (None, "started"), seen


def test_a_second_ctrl_c_quits_at_once_with_130_and_a_user_error_leaves_no_trace_that_refuses_the_fix(
        tiny_task, tmp_path):
    """A user error in a new folder records 2 there, and the corrected command starts in that folder (a status alone
    is no trace of a run). In its stop's save, made to last 120 s (the slow-save seam), a second Ctrl-C ends the
    process at once: 130, and the status says so."""
    out = tmp_path / "run"
    wrong = run_cli(["train", *task_options({**tiny_task, "train": tmp_path / "missing.parquet"}, out), *COMMON])
    assert wrong.returncode == 2 and "missing.parquet" in wrong.stderr, wrong.stderr[-3000:]
    assert (status(out)["exit_code"], status(out)["outcome"]) == (2, "user_error")

    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = start(tiny_task, out, ["--epochs=50", "--save_steps=100000"], env={"LOWMEM_FAULT_SLOW_SAVE": "120"},
                     stderr=err)
        try:
            wait_until(lambda: steps_logged(out) >= 2, proc, "two steps")
            proc.send_signal(signal.SIGINT)
            wait_until(lambda: "SIGINT received" in log.read_text(), proc, "the first Ctrl-C's answer")
            time.sleep(1)  # the step ends and the save begins (it lasts 120 s)
            proc.send_signal(signal.SIGINT)
            asked = time.monotonic()
            code = proc.wait(timeout=60)
        finally:
            proc.kill()
            proc.wait()
    assert code == 130 and time.monotonic() - asked < 30, (code, log.read_text()[-3000:])
    seen = status(out)
    assert (seen["exit_code"], seen["outcome"]) == (130, "interrupted"), seen
