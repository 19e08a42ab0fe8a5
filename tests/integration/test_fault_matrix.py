"""The fault matrix: every fault on every topology through the real `train` command (definitions, expected
outcomes and the table: fault_matrix.py). Each cell runs the same tiny run (12 steps, a checkpoint every 4) with its
fault, checks what the run ended in and how fast, that nothing saved was lost, and restarts it with
--is_keep_training=auto to the end: its final weights must equal those of one uninterrupted run of that topology.
Dropout is off: after an out-of-memory error the run goes on with a smaller micro-batch, whose dropout masks differ
(a different, equally valid run); without dropout it computes the same math in another order. That a resume
restores the RNG streams exactly is test_resume.py's (dropout on).

`python -m pytest` runs the CI cells (fault_matrix.CI_CELLS); LOWMEM_FAULT_MATRIX=all runs every cell and, when
all pass, writes the table into fault_matrix.md and the README. Seams: LOWMEM_FAULT_KILL_IN_SAVE, LOWMEM_FAULT_OOM;
the full disk is a real tmpfs (root); signals and kills are real.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.helpers import ENTRY, REPO, TINY_MODEL, signal_tree, task_options
from tests.integration import fault_matrix as fm

pytestmark = pytest.mark.slow
STEPS, SAVE_EVERY, FAULT_AFTER = 12, 4, 6
PEER_TIMEOUT = 10  # seconds (--peer_timeout_seconds): the bound of a lost peer follows it
WORKLOAD = [*TINY_MODEL, "--batch_size_per_gpu=16", f"--max_steps={STEPS}", f"--save_steps={SAVE_EVERY}",
            "--keep_latest_n_ckp=3", "--validation_file=", "--logging_steps=1", "--model.dropout=0",
            f"--peer_timeout_seconds={PEER_TIMEOUT}"]
# Seconds from the fault (a signal sent, or the last step before a fault the run makes itself) until every process
# of the run has ended: a step and a save, or the peer watch's timeout, with room for a busy 2-core machine; far
# below what a hang runs into (a collective with a dead peer waits 30 minutes).
BOUNDS = {"started": 30, "stopped": 60, "finished": 90, "out_of_memory": 60, "out_of_disk": 45,
          "lost_peer": PEER_TIMEOUT + 35, "oom_in_backward": 45}
CONFIGS = REPO / "accelerate_configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """One start of the run on a topology: a process, a launcher, or one launcher per machine (each in a session of
    its own, so that a machine can die whole). Their stderr goes to files under `logs`."""

    def __init__(self, topology: str, out: Path, task: dict, extra: list[str], env: dict, logs: Path):
        topo, port = fm.TOPOLOGIES[topology], free_port()
        options = [*task_options(task, out), *WORKLOAD, *topo.options, *extra]
        if topo.processes == 1:
            commands = [[sys.executable, str(ENTRY), "train", *options]]
        elif topo.machines == 1:
            commands = [[sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                         str(CONFIGS / "cpu_2proc_deepspeed.yaml"), "--main_process_port", str(port), str(ENTRY),
                         "train", *options]]
        else:
            commands = [[sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                         str(CONFIGS / "multi_node_zero2_offload.yaml"), "--num_machines", "2", "--num_processes",
                         "2", "--machine_rank", str(m), "--main_process_ip", "127.0.0.1", "--main_process_port",
                         str(port), str(ENTRY), "train", *options] for m in range(2)]
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("*.log")))
        self.logs = [logs / f"{n + i}-machine{i}.log" for i in range(len(commands))]
        self.procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                                       start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore", **env})
                      for cmd, log in zip(commands, self.logs)]

    def wait(self, timeout: float = 900) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]

    def rank_pid(self, rank: int) -> int:
        """The pid of a training process, found by its RANK (the process itself on one process)."""
        if len(self.procs) == 1 and not self.launched:
            return self.procs[0].pid
        for proc in self.procs:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "train_low_mem.py" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                        return child.pid
                except psutil.Error:
                    continue
        raise AssertionError(f"no process of rank {rank}")

    @property
    def launched(self) -> bool:
        return "accelerate.commands.launch" in " ".join(self.procs[0].args)

    def kill_machine(self, machine: int) -> None:
        """Every process of the machine at once, as a power loss would: the launcher and all it started (torch's
        elastic agent starts each worker in a session of its own, so the launcher's process group is not enough)."""
        signal_tree(self.procs[machine].pid, signal.SIGKILL)

    def stop(self) -> None:
        for proc in self.procs:
            signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()

    def log(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs)


def last_step(out: Path) -> tuple[int, float]:
    """(step, time) of the last training step metrics.jsonl holds ((0, 0) before the first)."""
    found = (0, 0.0)
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if record.get("kind") == "train":
            found = (record["step"], record["time"])
    return found


def wait_for_step(launch: Launch, out: Path, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while last_step(out)[0] < step:
        assert all(p.poll() is None for p in launch.procs), f"the run ended before step {step}:\n{launch.log()[-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.2)


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


@dataclass
class Baseline:
    weights: dict
    checkpoint_bytes: int  # one checkpoint of this topology
    other_bytes: int  # everything else in output_dir at the end (logs, config), final/ aside


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def baselines(tiny_task, tmp_path_factory):
    """topology -> its uninterrupted run, made on first use (the cells come topology by topology)."""
    made: dict[str, Baseline] = {}

    def get(topology: str) -> Baseline:
        if topology not in made:
            out = tmp_path_factory.mktemp(f"baseline-{topology}") / "run"
            launch = Launch(topology, out, tiny_task, [], {}, out.parent / "logs")
            codes = launch.wait()
            assert codes == [0] * len(codes), launch.log()[-4000:]
            others = [p for p in out.iterdir() if p.name not in ("checkpoints", "final")]
            made[topology] = Baseline(final_weights(out), folder_bytes(out / "checkpoints" / "step_00000004"),
                                      sum(folder_bytes(p) if p.is_dir() else p.stat().st_size for p in others))
        return made[topology]

    return get


@pytest.fixture(scope="module")
def results():
    """What each cell measured; after a full run in which every cell passed, the table (fault_matrix.md, README)."""
    found: dict[tuple[str, str], dict] = {}
    started = time.monotonic()
    yield found
    if fm.RUN_ALL and set(found) == set(fm.cells()):
        header = (f"Written by `LOWMEM_FAULT_MATRIX=all python -m pytest tests/integration/test_fault_matrix.py` on "
                  f"{time.strftime('%Y-%m-%d')}: {len(found)} cells in {(time.monotonic() - started) / 60:.0f} min on "
                  f"the 2-core development machine. Each cell: a tiny run of {STEPS} steps with a checkpoint every "
                  f"{SAVE_EVERY}, its fault, then a restart with `--is_keep_training=auto` to the end; its weights "
                  "against one uninterrupted run of the same topology. (CI): in `python -m pytest`.")
        fm.write_table(fm.render(found, header), REPO / "README.md")


def cell_params():
    for fault, topology in fm.cells():
        chosen = fm.RUN_ALL or (fault, topology) in fm.CI_CELLS
        marks = [] if chosen else [pytest.mark.skip(reason="not a CI cell (its code path is covered by another); "
                                                           "LOWMEM_FAULT_MATRIX=all runs it")]
        yield pytest.param(fault, topology, id=f"{topology}-{fault}", marks=marks)


class SmallDisk:
    """A tmpfs of `size` bytes at `path` (root only), grown for the restart ("free disk, then resume")."""

    def __init__(self, path: Path, size: int):
        self.path = path
        path.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)

    def grow(self) -> None:
        subprocess.run(["mount", "-o", "remount,size=256m", str(self.path)], check=True)

    def remove(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


def fault_setup(fault: str, topology: str) -> tuple[list[str], dict]:
    """The options and environment that make a fault the run causes itself."""
    rank_1 = ",rank=1" if fm.TOPOLOGIES[topology].processes > 1 else ""
    return {
        "kill_in_save": ([], {"LOWMEM_FAULT_KILL_IN_SAVE": "2"}),
        "disk_full": (["--low_disk=stop"], {}),
        "oom_forward": ([], {"LOWMEM_FAULT_OOM": f"micro_batch_over=0,after={FAULT_AFTER}{rank_1}"}),
        "oom_backward": ([], {"LOWMEM_FAULT_OOM": f"micro_batch_over=0,phase=backward,after={FAULT_AFTER}{rank_1}"}),
    }.get(fault, ([], {}))


def run_with_fault(fault: str, topology: str, out: Path, task: dict, logs: Path) -> tuple[Launch, list[int], float]:
    """Start the run with its fault; (launch, exit codes, seconds from the fault until every process ended)."""
    extra, env = fault_setup(fault, topology)
    launch = Launch(topology, out, task, extra, env, logs)
    try:
        if fault in ("kill9", "sigterm", "lost_node"):
            wait_for_step(launch, out, FAULT_AFTER)
            struck = time.time()
            if fault == "lost_node":
                launch.kill_machine(0)
            else:
                rank = 1 if fm.TOPOLOGIES[topology].processes > 1 else 0
                os.kill(launch.rank_pid(rank), signal.SIGKILL if fault == "kill9" else signal.SIGTERM)
            codes = launch.wait()
        else:
            codes = launch.wait()
            struck = last_step(out)[1]  # the fault comes in the step after the last one logged
        return launch, codes, time.time() - struck
    finally:
        launch.stop()


# The checkpoint that must be `latest` after the fault; where the moment of a signal decides, the least it can be.
# By outcome first: out of memory after the retries saves the step it gave up in; an OOM where the step cannot be
# redone (a backward pass; under ZeRO-3 a forward too) saves only the smaller plan, so the last periodic one stays.
LATEST_BY_OUTCOME = {"out_of_memory": FAULT_AFTER, "oom_in_backward": 4}
LATEST = {"kill_in_save": 4, "disk_full": 4, "corrupt": STEPS}
AT_LEAST = {"sigterm": FAULT_AFTER}  # the stop saves the step it ends
# The corrupt cell runs to the end (a shorter first run would have another LR schedule), then breaks the newest
# checkpoint: the restart must skip it and resume from the one before.
RESUMED_FROM = {"corrupt": STEPS - SAVE_EVERY}


@pytest.mark.parametrize("fault, topology", list(cell_params()))
def test_fault_matrix(fault, topology, tiny_task, tmp_path, baselines, results, request):
    from lowmem_train.trainer.files import read_checkpoint

    topo = fm.TOPOLOGIES[topology]
    if topo.processes > 1:
        request.getfixturevalue("deepspeed_ops")
    base = baselines(topology)
    disk = None
    if fault == "disk_full":
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
        disk = SmallDisk(tmp_path / "disk", base.other_bytes + base.checkpoint_bytes * 3 // 2 + 64 * 1024)
    out = (disk.path if disk else tmp_path) / "run"
    logs = tmp_path / "logs"
    try:
        launch, codes, seconds = run_with_fault(fault, topology, out, tiny_task, logs)
        expected = fm.expected_outcome(fault, topology)
        status = json.loads((out / "exit_status.json").read_text())
        assert status["outcome"] == expected, (status, launch.log()[-4000:])
        code = fm.EXIT_CODES.get(expected)
        assert status["exit_code"] == code, status
        if topo.processes == 1:
            assert codes == [-signal.SIGKILL if code is None else code], codes
        elif fault == "lost_node":
            assert codes[0] == -signal.SIGKILL and codes[1] != 0, codes
        else:  # a launcher says 0 or 1: the status file carries the code
            assert all((c == 0) == (code == 0) for c in codes), codes
        bound = BOUNDS[expected]
        assert seconds <= bound, f"ended {seconds:.0f} s after the fault (bound {bound} s)"

        # Nothing saved is lost: `latest` names a checkpoint that reads back whole.
        latest = (out / "checkpoints" / "latest").read_text().strip()
        read_checkpoint(out / "checkpoints" / latest)
        saved = int(latest.removeprefix("step_"))
        must = LATEST_BY_OUTCOME.get(expected, LATEST.get(fault))
        assert saved == must if must is not None else saved >= AT_LEAST.get(fault, 4), latest
        if fault == "corrupt":  # half of the newest checkpoint's largest weights file goes
            weights = max((out / "checkpoints" / latest / "model").rglob("*"), key=lambda p: p.stat().st_size)
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        if disk:
            disk.grow()

        again = Launch(topology, out, tiny_task, ["--is_keep_training=auto"], {}, logs)
        try:
            assert again.wait() == [0] * len(again.procs), again.log()[-4000:]
        finally:
            again.stop()
        log = again.log()
        resumed_from = RESUMED_FROM.get(fault, saved)
        assert f"resumed from step_{resumed_from:08d}" in log, log[-3000:]
        assert fault != "corrupt" or f"skipping checkpoint step_{saved:08d}" in log
        assert json.loads((out / "exit_status.json").read_text())["outcome"] == "finished"
        assert not list((out / "checkpoints").glob(".step_*.tmp"))  # a killed save's debris is gone
        weights, reference = final_weights(out), base.weights
        assert weights.keys() == reference.keys()
        diff = max((weights[k].float() - reference[k].float()).abs().max().item() for k in weights)
        print(f"{topology} {fault}: {expected} in {seconds:.1f} s, resumed from {resumed_from}, weights {diff:.3g}")
        assert diff <= 1e-6, diff
        results[(fault, topology)] = {"outcome": expected, "seconds": seconds, "bound": bound,
                                      "resumed_from": resumed_from, "weight_diff": diff}
    finally:
        if disk:
            disk.remove()
