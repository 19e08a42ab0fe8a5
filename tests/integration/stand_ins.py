"""Stand-ins for what the cluster scripts call, so that docker/entrypoint.sh and docker/slurm.sbatch run here for
real, in a second and without a scheduler: the trainer, the launcher (`accelerate launch`), and Slurm's srun,
scancel and scontrol. Each records what it was asked to do in a log folder. The `stand_ins` fixture
(tests/integration/conftest.py) puts the trainer and the launcher on PATH.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
SBATCH = ROOT / "docker" / "slurm.sbatch"

# The trainer: records its argv and environment, exits FAKE_EXIT_RANK_<RANK> (default 0); with FAKE_RUN=1 it
# runs until SIGTERM or SIGINT, then "saves" and exits 0 (what the real trainer does on every rank). Ending with 0
# under LOWMEM_EXIT_CODES=kubeflow, the one mode that reads it, it tells the entrypoint "finished" or, after a
# signal, "stopped" through the real trainer's own function (a Python start the other tests need not wait for).
FAKE_TRAINER = """\
#!/bin/sh
rank=${RANK:-none}
printf '%s\\n' "$*" >"$FAKE_LOG/trainer-$rank.args"
env >"$FAKE_LOG/trainer-$rank.env"
outcome() {
    [ "${LOWMEM_EXIT_CODES:-}" = kubeflow ] || return 0
    "$PYTHON" -c 'import sys; from lowmem_train.commands.train import tell_entrypoint; tell_entrypoint(sys.argv[1])' "$1"
}
if [ "${FAKE_RUN:-}" = 1 ]; then
    trap 'echo saved >"$FAKE_LOG/trainer-$rank.stopped"; outcome stopped; exit 0' TERM INT
    : >"$FAKE_LOG/trainer-$rank.ready"
    while :; do sleep 0.1; done
fi
eval "code=\\${FAKE_EXIT_RANK_$rank:-0}"
[ "$code" != 0 ] || outcome finished
exit "$code"
"""

# The launcher: records its argv; like torchrun, starts each worker in a session of its own with RANK set, exits
# 0 when all succeed and 1 otherwise, and, signalled itself, stops its workers (SIGTERM), waits, and exits 1.
FAKE_ACCELERATE = """\
#!PYTHON
import os, signal, subprocess, sys
argv = sys.argv[1:]
log = os.environ["FAKE_LOG"]
with open(os.path.join(log, "accelerate.args"), "w") as f:
    f.write(" ".join(argv) + "\\n")
with open(os.path.join(log, "accelerate.env"), "w") as f:
    f.write("\\n".join(f"{k}={v}" for k, v in os.environ.items()) + "\\n")
value = lambda flag: argv[argv.index(flag) + 1]
total, machines, rank = int(value("--num_processes")), int(value("--num_machines")), int(value("--machine_rank"))
per_node = total // machines
command = argv[argv.index("--no_python") + 1:]
workers, stopped = [], []
def signalled(signum, frame):
    stopped.append(signum)
    with open(os.path.join(log, "accelerate.signalled"), "w") as f:
        f.write(signal.Signals(signum).name)
    for w in workers:
        w.terminate()
signal.signal(signal.SIGTERM, signalled)  # before any worker exists, as torchrun does
signal.signal(signal.SIGINT, signalled)
for i in range(per_node):
    workers.append(subprocess.Popen(command, env=dict(os.environ, RANK=str(rank * per_node + i), LOCAL_RANK=str(i)),
                                    start_new_session=True))
codes = [w.wait() for w in workers]
sys.exit(1 if stopped or any(codes) else 0)
"""

# srun inside an allocation: the command once per task (nodes x --ntasks-per-node), each in a session of its own
# with its task's variables; exits with the highest of the tasks' codes.
FAKE_SRUN = """\
#!PYTHON
import os, subprocess, sys
args, opts = sys.argv[1:], {}
while args and args[0].startswith("-"):
    key, eq, value = args.pop(0).partition("=")
    if not eq:
        sys.exit(f"stand-in srun: give options as --name=value, got {key}")
    opts[key] = value
log = os.environ["FAKE_SLURM_LOG"]
with open(os.path.join(log, "srun.args"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
nodes = int(opts.get("--nodes", os.environ["SLURM_NNODES"]))
per_node = int(opts.get("--ntasks-per-node", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))
tasks = [subprocess.Popen(args, start_new_session=True, env=dict(
    os.environ, SLURM_STEP_ID="0", SLURM_NODEID=str(i // per_node), SLURM_PROCID=str(i),
    SLURM_LOCALID=str(i % per_node), SLURM_NTASKS=str(nodes * per_node))) for i in range(nodes * per_node)]
with open(os.path.join(log, "srun.pids"), "w") as f:
    f.write(" ".join(str(t.pid) for t in tasks))
codes = [t.wait() for t in tasks]
sys.exit(max(c if c >= 0 else 128 - c for c in codes))
"""

# scancel --signal=SIG JOB: the signal to every process of the job's steps, never to the batch script.
FAKE_SCANCEL = """\
#!PYTHON
import os, signal, sys
import psutil
log = os.environ["FAKE_SLURM_LOG"]
with open(os.path.join(log, "scancel.args"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
sig = getattr(signal, "SIG" + next(a for a in sys.argv[1:] if a.startswith("--signal=")).split("=", 1)[1])
with open(os.path.join(log, "srun.pids")) as f:
    pids = [int(pid) for pid in f.read().split()]
for pid in pids:
    try:
        task = psutil.Process(pid)
        members = [task, *task.children(recursive=True)]
    except psutil.Error:
        continue
    for member in members:
        try:
            member.send_signal(sig)
        except psutil.Error:
            pass
"""

# scontrol: `show hostnames` of a plain comma list; `requeue JOB` recorded.
FAKE_SCONTROL = """\
#!/bin/sh
case "$1 $2" in
    "show hostnames") printf '%s\\n' "$3" | tr ',' '\\n' ;;
    "requeue "*) echo "$*" >>"$FAKE_SLURM_LOG/scontrol.args" ;;
    *) exit 1 ;;
esac
"""


def install(bin_dir: Path, python: str, **commands: str) -> None:
    """Write each stand-in as an executable named after its keyword (`srun=FAKE_SRUN`)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in commands.items():
        (bin_dir / name).write_text(text.replace("#!PYTHON", f"#!{python}"))
        (bin_dir / name).chmod(0o755)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entrypoint(env, *args, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=dict(env, **extra_env), capture_output=True,
                          text=True, timeout=60)


def launched(log: Path) -> str | None:
    path = log / "accelerate.args"
    return path.read_text().strip() if path.exists() else None


def trainer_args(log: Path, rank: str = "none") -> str:
    return (log / f"trainer-{rank}.args").read_text().strip()


def trainer_env(log: Path, rank: str = "none") -> dict[str, str]:
    lines = (log / f"trainer-{rank}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def running_entrypoint(env, log, processes: int = 2, **extra_env) -> subprocess.Popen:
    """The entrypoint training with stand-in trainers (FAKE_RUN=1) that run until a signal; returned once every
    trainer runs. SIGINT at its default, as a container runtime or a terminal starts the entrypoint: a test session
    started as a background job inherits SIGINT ignored, and a shell cannot trap a signal ignored on entry."""
    proc = subprocess.Popen(["sh", str(ENTRYPOINT), "train"],
                            env=dict(env, NUM_PROCESSES=str(processes), FAKE_RUN="1", **extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ranks = [str(rank) for rank in range(processes)] if processes > 1 else ["none"]
    deadline = time.monotonic() + 30
    while not all((log / f"trainer-{rank}.ready").exists() for rank in ranks):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"the stand-in trainers did not start: {proc.communicate()}")
        time.sleep(0.05)
    return proc
