"""The container image, built and run here, and its entrypoint.

Slow (a Docker engine is needed: .ci/run starts one when run as root; in CI as root a missing engine or a build
that cannot start fails these tests, elsewhere they skip with the reason):
`docker/build.sh --cpu` builds lowmem-train:cpu (a local Debian base, the host's CPU torch wheel, DeepSpeed's
ops prebuilt), then real containers run it:
- `--help` runs once, directly, as a non-root user;
- exit codes pass through the entrypoint and the launcher (2: a user error);
- under an arbitrary `--user 12345:12345`, 2 training processes (accelerate launch -> torchrun, DeepSpeed
  ZeRO-2 + CPU offload over gloo: the launcher path a GPU node takes) train a tiny T5 into a mounted /output;
  `docker stop` mid-run ends in exit code 0 with a complete checkpoint (not torchrun's exit 1 after 30 s);
  `docker start -a` of the same container resumes from that checkpoint with no flag and finishes with 0.
The image build is most of the time: ~6 min cold on 2 cores, seconds with the layer cache.

Fast: docker/entrypoint.sh's decisions (what goes through the launcher, with which flags, from Slurm or a
PyTorchJob; exit codes; signals to the workers, not to the launcher), with stand-ins for the trainer and the
launcher.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import signal_tree
from tests.integration.stand_ins import ENTRYPOINT, entrypoint, launched, running_entrypoint, trainer_args

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "lowmem-train:cpu"
BUILD_PREREQUISITE_MISSING = 4  # docker/build.sh's exit code when this machine cannot build (say why, skip)
TINY = [
    "--model.d_model=64", "--model.d_ff=128", "--model.num_heads=2", "--model.num_layers=2",
    "--model.num_decoder_layers=2",
    "--train_file=/data/train.parquet", "--validation_file=/data/validation.parquet",
    "--tokenizer_dir=/data/tokenizer", "--output_dir=/output/run",
]


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {result.returncode}\n{result.stdout}{result.stderr}")
    return result


def engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        return f"no Docker engine answers `docker info` ({last})"
    return None


def cannot_run(reason: str) -> None:
    """In CI (CI=true) as root, .ci/run installs and starts the engine and the build's tools: that they are missing
    is a failure of CI, which must not go green without building the image. Elsewhere (a developer's machine
    without root) the tests skip, saying why."""
    if os.environ.get("CI", "").lower() in ("true", "1") and os.geteuid() == 0:
        pytest.fail(f"{reason} (CI as root: .ci/run should have installed and started it; see /var/log/dockerd.log)")
    pytest.skip(f"{reason}; .ci/run installs and starts one when it runs as root")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """The CPU image, built once per test session. Under `pytest -n 2` each worker has its own module fixtures and
    build.sh is not safe to run twice at once (one base-image folder, one tag): the first worker builds under a
    lock in the workers' shared temporary root, the other waits for it and uses that image."""
    from filelock import FileLock

    problem = engine_problem()
    if problem:
        cannot_run(problem)
    session = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one run; unset without xdist
    root = tmp_path_factory.getbasetemp().parent if session else tmp_path_factory.getbasetemp()
    built = root / f"image-{session}.built"
    with FileLock(str(root / "image.lock")):
        if session and built.exists():
            return IMAGE
        start = time.monotonic()
        result = subprocess.run(["bash", str(ROOT / "docker" / "build.sh"), "--cpu", "--tag", IMAGE], cwd=ROOT,
                                capture_output=True, text=True, timeout=3600)
        if result.returncode == BUILD_PREREQUISITE_MISSING:
            cannot_run(f"docker/build.sh --cpu cannot build here: {result.stderr.strip().splitlines()[-1]}")
        assert result.returncode == 0, f"docker/build.sh --cpu failed:\n{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
        print(f"{IMAGE} built in {time.monotonic() - start:.0f} s")
        built.write_text(IMAGE)
    return IMAGE


@pytest.mark.skipif(os.geteuid() != 0, reason="in CI the container tests run as root; elsewhere they only skip")
def test_without_an_engine_the_container_tests_fail_in_ci_as_root_and_skip_elsewhere(tmp_path):
    """A PATH without the docker client: with CI=true (as .ci/run sets it) the image fixture fails the test; without
    it, the test skips with the reason."""
    test = f"{Path(__file__)}::test_help_runs_once_as_a_non_root_user"
    for ci, code, verdict in (("true", 1, "1 error"), ("", 0, "1 skipped")):  # a fixture that fails: an error
        env = {**os.environ, "PATH": str(tmp_path), "CI": ci}
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
        assert (run.returncode, verdict in run.stdout, "no docker client on PATH" in run.stdout) == (code, True, True), \
            (ci, run.stdout[-3000:])


@pytest.mark.slow
def test_help_runs_once_as_a_non_root_user(image):
    config = docker("image", "inspect", "--format",
                    "{{.Config.User}}|{{json .Config.Entrypoint}}|{{.Config.StopSignal}}", image).stdout.strip()
    user, entrypoint, stop_signal = config.split("|")
    assert user not in ("", "0", "root"), config
    assert "tini" in entrypoint and stop_signal == "SIGTERM", config
    assert docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() != "0"

    result = docker("run", "--rm", image, "--help", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_user_error_exits_2_through_the_entrypoint_and_the_launcher(image, processes):
    result = docker("run", "--rm", "-e", f"NUM_PROCESSES={processes}", image, "train", "--learning_rate=3e-4",
                    check=False, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    if processes == "1":  # (with 2, the rank that prints may be stopped by the launcher first: a race of its own)
        assert "error:" in result.stderr  # the trainer's own one-line message


def excerpt(text: str, lines: int = 150) -> str:
    """The end of a container's log, without progress-bar redraws and blank lines."""
    kept = [line for line in text.replace("\r", "\n").splitlines()
            if line.strip() and not re.match(r"\s*epoch \d+/\d+:", line)]
    return "\n".join(kept[-lines:])


def wait_for(what: str, condition, container: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        state = docker("inspect", "--format", "{{.State.Status}}", container).stdout.strip()
        if state != "running" or time.monotonic() > deadline:
            logs = docker("logs", container, check=False)
            raise AssertionError(f"waiting for {what}: container {state}\n{excerpt(logs.stdout + logs.stderr)}")
        time.sleep(0.2)


def complete_checkpoints(run: Path) -> list[Path]:
    return sorted(p.parent for p in (run / "checkpoints").glob("step_*/train_state.json"))


@pytest.mark.slow
def test_stop_saves_exit_0_and_a_restart_resumes_by_itself(image, tmp_path):
    from lowmem_train.trainer.data.zh_numerals import write_task

    data, out = tmp_path / "data", tmp_path / "output"
    write_task(data, train_rows=4096, validation_rows=128, row_group_size=512, seed=1)
    out.mkdir()
    for folder in (data, out):  # the container's uid below owns nothing here: the tokenizer and the run go here
        folder.chmod(0o777)
    name = f"lowmem-test-{uuid.uuid4().hex[:12]}"
    run = out / "run"
    try:
        docker("run", "-d", "--name", name, "--user", "12345:12345", "-e", "NUM_PROCESSES=2",
               "-v", f"{data}:/data", "-v", f"{out}:/output", image,
               "train", *TINY, "--epochs=3", "--save_steps=10", timeout=60)
        wait_for("the first complete checkpoint", lambda: complete_checkpoints(run), name, timeout=600)

        docker("stop", "-t", "120", name, timeout=180)
        exit_code = docker("wait", name, timeout=60).stdout.strip()
        logs = docker("logs", name)
        first = logs.stdout + logs.stderr
        assert exit_code == "0", excerpt(first)
        assert "SIGTERM forwarded to the training processes" in first, excerpt(first)
        assert not (run / "final").exists(), "the run finished before it was stopped: make it longer"
        saved = complete_checkpoints(run)[-1]
        assert saved.stat().st_uid == 12345  # written by the --user uid
        assert "Building extension module" not in first  # DeepSpeed's ops came prebuilt: nothing compiled

        restart = docker("start", "-a", name, check=False, timeout=900)
        second = restart.stdout + restart.stderr
        assert restart.returncode == 0, excerpt(second)
        assert docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
        assert re.search(rf"resumed from {saved.name}\b", second), excerpt(second)
        assert (run / "final").is_dir(), excerpt(second)
    finally:
        docker("rm", "-f", name, check=False)
        # hand the files the container's uid wrote back to whoever runs the tests, so tmp_path can be cleaned
        docker("run", "--rm", "--user", "0", "--entrypoint", "chown", "-v", f"{tmp_path}:/t", image,
               "-R", f"{os.getuid()}:{os.getgid()}", "/t", check=False)


# ---- the entrypoint alone, with stand-ins -------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["estimate", "--config", "t5_base"], ["train", "--help"],
                                  ["export", "--checkpoint", "c", "--output", "o"]])
def test_entrypoint_runs_everything_but_train_once_and_directly(stand_ins, args):
    env, log = stand_ins
    result = entrypoint(env, *args, NUM_PROCESSES="4")
    assert result.returncode == 0, result.stderr
    assert launched(log) is None
    assert trainer_args(log) == " ".join(args)  # unchanged: no --is_keep_training=auto


def test_entrypoint_trains_one_process_directly_and_resumes_by_default(stand_ins):
    env, log = stand_ins
    fake_python = log.parent / "bin" / "python-no-gpu"  # what `python3 -c "...device_count()"` says on a CPU node
    fake_python.write_text("#!/bin/sh\necho 0\n")
    fake_python.chmod(0o755)
    result = entrypoint(env, "train", "--epochs=1", PYTHON=str(fake_python))
    assert result.returncode == 0, result.stderr
    assert launched(log) is None
    assert trainer_args(log) == "train --epochs=1 --is_keep_training=auto"

    for given in ("--is_keep_training=False", "--is_keep_training", "--overwrite_output_dir=True"):
        entrypoint(env, "train", given, NUM_PROCESSES="1")
        assert trainer_args(log) == f"train {given}"  # the user's choice stands


def test_entrypoint_launches_one_process_per_gpu_on_one_machine(stand_ins):
    env, log = stand_ins
    result = entrypoint(env, "train", "--config", "t5_base", NUM_PROCESSES="2")
    assert result.returncode == 0, result.stderr
    args = launched(log)
    assert args.startswith("launch --multi_gpu --num_processes 2 --num_machines 1 --machine_rank 0 "
                           "--main_process_ip 127.0.0.1 --main_process_port "), args
    assert args.endswith(f"--no_python {ENTRYPOINT} --lowmem-worker train --config t5_base --is_keep_training=auto")
    assert trainer_args(log, "0") == trainer_args(log, "1") == "train --config t5_base --is_keep_training=auto"


def test_entrypoint_takes_nodes_from_slurm(stand_ins):
    env, log = stand_ins
    result = entrypoint(env, "train", NUM_PROCESSES="1", SLURM_JOB_ID="7", SLURM_NNODES="4", SLURM_NODEID="2",
                        SLURM_JOB_NODELIST="gpu[07-09,12],login1")
    assert result.returncode == 0, result.stderr
    assert ("--num_processes 4 --num_machines 4 --machine_rank 2 --main_process_ip gpu07 --main_process_port 29500"
            in launched(log))
    assert trainer_args(log, "2").endswith("--is_keep_training=auto")


def test_entrypoint_takes_nodes_from_a_pytorchjob_and_hides_its_node_level_variables(stand_ins):
    env, log = stand_ins
    result = entrypoint(env, "train", NUM_PROCESSES="2", MASTER_ADDR="job-master-0", MASTER_PORT="23456",
                        WORLD_SIZE="3", RANK="1")
    assert result.returncode == 0, result.stderr
    assert ("--num_processes 6 --num_machines 3 --machine_rank 1 --main_process_ip job-master-0 "
            "--main_process_port 23456") in launched(log)
    launcher_env = (log / "accelerate.env").read_text().splitlines()
    assert not [line for line in launcher_env if line.startswith(("RANK=", "WORLD_SIZE=", "MASTER_ADDR="))]


@pytest.mark.parametrize("codes, expected", [
    ({"0": "3", "1": "143"}, 3), ({"0": "0", "1": "2"}, 2), ({"0": "137", "1": "0"}, 137), ({"0": "0", "1": "0"}, 0),
    # the code nearest the cause: 6, 3 (memory), 4, 2, any other failure (the first), and a lost peer (5) last
    ({"0": "5", "1": "6"}, 6), ({"0": "3", "1": "6"}, 6), ({"0": "4", "1": "3"}, 3), ({"0": "2", "1": "4"}, 4),
    ({"0": "1", "1": "2"}, 2), ({"0": "5", "1": "1"}, 1), ({"0": "1", "1": "137"}, 1), ({"0": "5", "1": "5"}, 5),
    ({"0": "5", "1": "137", "2": "0"}, 137),
])
def test_entrypoint_exits_with_the_workers_code_not_the_launchers_1(stand_ins, codes, expected):
    env, log = stand_ins
    extra = {f"FAKE_EXIT_RANK_{rank}": code for rank, code in codes.items()}
    result = entrypoint(env, "train", NUM_PROCESSES=str(len(codes)), **extra)
    assert result.returncode == expected, result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda sig: sig.name)
def test_entrypoint_hands_a_stop_signal_to_the_workers_not_to_the_launcher(stand_ins, sig):
    env, log = stand_ins
    proc = running_entrypoint(env, log)
    try:
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert (log / "trainer-0.stopped").exists() and (log / "trainer-1.stopped").exists()
    assert not (log / "accelerate.signalled").exists(), "the launcher was signalled"
    assert f"SIG{sig.name[3:]} forwarded to the training processes" in stderr


def test_entrypoint_exits_0_when_every_process_gets_the_signal_and_the_workers_saved(stand_ins):
    """Slurm signals every process of a job step, the launcher too; torchrun then exits 1 whatever its workers did
    (after giving them 30 s). The workers' own 0 wins."""
    env, log = stand_ins
    proc = running_entrypoint(env, log)
    try:
        signal_tree(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert (log / "accelerate.signalled").exists()
    assert proc.returncode == 0, stderr
    # The launcher said 1; the shell reports 143 when its `wait` was cut short by the same signal and the launcher
    # was reaped meanwhile. Either way the workers' 0 decides.
    assert re.search(r"every worker on this node exited 0 \(the launcher said (1|143)\)", stderr), stderr
