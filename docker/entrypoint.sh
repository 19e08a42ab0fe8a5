#!/bin/sh
# lowmem-train entrypoint: the image's (under tini) and a bare-metal node's alike.
#
#   entrypoint.sh train [--key=value ...]  one training process per visible GPU (1 on a CPU-only node), on this
#                                         node of a Slurm job or Kubernetes PyTorchJob; resumes by itself
#                                         (--is_keep_training=auto unless you pass --is_keep_training or
#                                         --overwrite_output_dir)
#   entrypoint.sh COMMAND [...]           any other command (--help, estimate, export, generate, report,
#                                         prepare, train --help) runs once, directly
#
# Environment it reads:
#   NUM_PROCESSES   training processes on this node (default: torch.cuda.device_count(), which respects MIG and
#                   CUDA_VISIBLE_DEVICES; at least 1)
#   LOWMEM_TRAIN    the program (default: lowmem-train, the console command that `pip install .` provides)
#   LOWMEM_STOP_GRACE  seconds a stop signal leaves before the kill that follows it (default 120: `docker stop
#                   -t 120`, the recipes' Slurm --signal=B:TERM@120 and terminationGracePeriodSeconds); the
#                   launcher waits that long for stopping workers (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, unless set)
#   LOWMEM_EXIT_CODES  plain (default): the codes below; kubeflow: the same, except what a scheduler should
#                   restart, moved into 128-255, the range Kubeflow's restartPolicy ExitCode retries:
#                     0 after a stop signal, the run not finished  -> 143  (as if SIGTERM had ended it)
#                     5 lost a peer, 6 out of memory, step lost    -> 138  (128 + SIGUSR1: older operators retry
#                                                                           only 130, 137, 138 and 143)
#                   A finished run stays 0 and 1-4 stay permanent.
#   PYTHON          the interpreter that counts GPUs (default: python3, the one that has torch)
#   HOME, XDG_CACHE_HOME, HF_HOME, TORCH_EXTENSIONS_DIR, TRITON_CACHE_DIR, MPLCONFIGDIR: still at the image's
#                   shared /tmp defaults, they move under ${TMPDIR:-/tmp}/lowmem-<uid> (per_user_caches below)
#   MASTER_PORT     the main process's port (default: 29500 across nodes, a free port on one machine)
#   Slurm, one task per node: SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST (first host = main process; via
#                   `scontrol show hostnames` when available, else MASTER_ADDR, else parsed)
#   Kubernetes PyTorchJob, one process per pod: MASTER_ADDR, MASTER_PORT (23456), WORLD_SIZE = number of
#                   nodes, RANK = node rank (PET_NNODES / PET_NODE_RANK win when the operator sets them)
#   Recipes: docker/slurm.sbatch (a Slurm batch job) and docker/kubernetes.md (a PyTorchJob).
#
# Exit codes pass through from the trainer (commands/train.py): 0 finished or stopped-and-saved, 1 crash, 2 user
# error, 3 out of memory (retries used up), 4 out of disk, 5 lost another rank, 6 out of memory in backward;
# 128+N killed by signal N (137: SIGKILL). When this node's processes disagree, the node exits with the code
# nearest the cause: 6, then 3 (memory), 4, 2, then any other failure (the first seen), and 5 last: a lost peer
# is what the surviving ranks say when another one dies.
#
# Stopping (docker stop, Kubernetes, Slurm's --signal): SIGTERM or SIGINT to this script is forwarded to the
# training processes themselves, never to the launcher. Every rank finishes its step, saves a checkpoint and
# exits 0, and the launcher, seeing its workers succeed, exits 0 too. (Signalled itself, as by Slurm's scancel,
# torchrun, which `accelerate launch` runs, gives its workers LOWMEM_STOP_GRACE before SIGKILL, 30 s without
# this script, and then exits non-zero whatever they did.) Each worker runs under this same script in "worker
# mode", which records its exit code (and the trainer whether it finished or stopped), so the codes above survive
# the launcher, which reports any failure as 1.
set -eu

prog=${LOWMEM_TRAIN:-lowmem-train}

say() { printf 'entrypoint: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

is_count() {  # a positive decimal integer
    case ${1:-} in '' | *[!0-9]* | 0*) return 1 ;; esac
}

# The state the signal handlers share with the rest of the script.
signalled=0    # set by a handler; tells wait_for that `wait` was cut short rather than finished
target=""      # pid the signals go to (worker mode: the trainer; launcher mode: the launcher's children)
mode=""        # "worker" or "launcher"
pending=""     # a signal that arrived before there was anyone to forward it to

# wait_for PID: the exit status of PID, however many trapped signals interrupt `wait` on the way.
wait_for() {
    while :; do
        signalled=0
        status=0
        wait "$1" || status=$?
        if [ "$signalled" = 1 ] && kill -0 "$1" 2>/dev/null; then
            continue  # a trapped signal ended the wait, the process still runs
        fi
        if [ "$signalled" = 1 ] && [ "$status" -gt 128 ]; then
            again=0   # interrupted, and the process has gone meanwhile: its status is still to be collected
            wait "$1" || again=$?
            [ "$again" = 127 ] || status=$again
        fi
        return "$status"
    done
}

# children_of PID: the pids whose parent is PID, from /proc (no procps needed).
children_of() {
    for stat in /proc/[0-9]*/stat; do
        { read -r line <"$stat"; } 2>/dev/null || continue
        rest=${line##*) }         # "S PPID ..." after "PID (COMM) "; COMM may hold spaces and parentheses
        ppid=${rest#* }
        ppid=${ppid%% *}
        [ "$ppid" = "$1" ] || continue
        pid=${stat#/proc/}
        printf '%s\n' "${pid%/stat}"
    done
}

forward() {  # forward SIGNAL: to the trainer (worker mode) or to every worker of the launcher (launcher mode)
    signalled=1
    if [ -z "$target" ]; then
        pending=$1
        return 0
    fi
    if [ "$mode" = worker ]; then
        kill -s "$1" "$target" 2>/dev/null || :
        return 0
    fi
    sent=0
    for child in $(children_of "$target"); do
        kill -s "$1" "$child" 2>/dev/null && sent=1
    done
    if [ "$sent" = 0 ]; then  # no worker started yet: nothing to save, so the launcher itself may stop
        kill -s "$1" "$target" 2>/dev/null || :
    fi
    say "SIG$1 forwarded to the training processes (they finish the step, save a checkpoint and exit 0)"
}

# background COMMAND...: start it in the background, with SIGINT back at its default. (A script's background
# commands start with SIGINT ignored, and what they start inherits that: Ctrl-C would never reach a trainer.)
background() {
    if env --default-signal=INT true 2>/dev/null; then
        env --default-signal=INT "$@" &
    else
        "$@" &
    fi
}

# The image points HOME and the caches at /tmp so that any uid can write them (docker run --user, Kubernetes'
# runAsUser). That /tmp is the container's own under Docker and Kubernetes, but Apptainer binds the host's: there
# every user of a node would share /tmp/.cache, the first one's folders unwritable to the next, their compiled
# kernels loaded by the next. So a variable still holding the image's value (the list below, the Dockerfile's
# ENV) moves under a folder of this uid's; values anyone else chose (bare metal, Apptainer's own HOME) stay.
per_user_caches() {
    base=${TMPDIR:-/tmp}
    [ -d "$base" ] || base=/tmp  # a host's TMPDIR that the container does not have
    root=$base/lowmem-$(id -u)
    moved=""
    for pair in HOME=/tmp XDG_CACHE_HOME=/tmp/.cache HF_HOME=/tmp/.cache/huggingface \
        TORCH_EXTENSIONS_DIR=/tmp/.cache/torch_extensions TRITON_CACHE_DIR=/tmp/.cache/triton \
        MPLCONFIGDIR=/tmp/.cache/matplotlib; do
        name=${pair%%=*}
        shared=${pair#*=}
        value=""
        eval "value=\${$name:-}"
        [ "$value" = "$shared" ] || continue
        eval "$name=\$root\${shared#/tmp}"
        export "${name?}"
        moved=1
    done
    [ -n "$moved" ] || return 0
    # chmod fails unless the folder is ours: one another user made first is never used
    { mkdir -p "$root" && chmod 700 "$root"; } 2>/dev/null ||
        die "cannot make $root, this user's cache folder (another user's?); set TMPDIR to a folder of yours"
}
per_user_caches

# ---- worker mode: one training process under the launcher; records its exit code for the launcher mode.
if [ "${1:-}" = --lowmem-worker ]; then
    shift
    mode=worker
    trap 'forward TERM' TERM
    trap 'forward INT' INT
    background "$prog" "$@"
    target=$!
    [ -z "$pending" ] || kill -s "$pending" "$target" 2>/dev/null || :
    code=0
    wait_for "$target" || code=$?
    if [ -n "${LOWMEM_STATUS_DIR:-}" ]; then
        echo "$code" >"$LOWMEM_STATUS_DIR/rank-${RANK:-0}" || :
    fi
    exit "$code"
fi

# ---- everything but `train` runs once, directly (so does `train --help`).
if [ "$#" = 0 ] || [ "$1" != train ]; then
    exec "$prog" "$@"
fi
keep=auto
for arg in "$@"; do
    case $arg in
        -h | --help) exec "$prog" "$@" ;;
        --is_keep_training | --is_keep_training=*) keep="" ;;
        --overwrite_output_dir | --overwrite_output_dir=*) keep="" ;;  # the user decides about the folder
    esac
done
[ -z "$keep" ] || set -- "$@" --is_keep_training=auto

# The launcher's stop window. torchrun's agent SIGKILLs its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by
# default) after a SIGTERM of its own (torch/distributed/launcher/api.py, LaunchConfig.shutdown_timeout), and
# the agent gets one whenever every process of a job is signalled (Slurm's scancel, a terminal's Ctrl-C): a step
# plus a checkpoint save longer than 30 s would die half-way, with no checkpoint and no requeue. It waits as long
# as the scheduler does instead. (PET_SHUTDOWN_TIMEOUT, torchrun's own variable, wins over both.)
grace=${LOWMEM_STOP_GRACE:-120}
is_count "$grace" || die "LOWMEM_STOP_GRACE must be a positive number of seconds, got '$grace'"
if [ -z "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-}" ]; then
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$grace
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT
fi
exit_codes=${LOWMEM_EXIT_CODES:-plain}
case $exit_codes in
    plain | kubeflow) ;;
    *) die "LOWMEM_EXIT_CODES must be plain or kubeflow, got '$exit_codes'" ;;
esac

# ---- how many processes, on how many nodes.
if [ -n "${NUM_PROCESSES:-}" ]; then
    is_count "$NUM_PROCESSES" || die "NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'"
    per_node=$NUM_PROCESSES
else
    per_node=$("${PYTHON:-python3}" -c 'import torch; print(torch.cuda.device_count())') ||
        die "could not count GPUs with ${PYTHON:-python3} and torch; set NUM_PROCESSES"
    case $per_node in '' | *[!0-9]*) die "could not count GPUs (got '$per_node'); set NUM_PROCESSES" ;; esac
    [ "$per_node" -ge 1 ] || per_node=1  # no GPU: one process on the CPU
fi

# first_host_of LIST: the first host of a Slurm node list ("gpu[07-08,10],login1" -> gpu07).
first_host_of() {
    rest=$1
    host=""
    while [ -n "$rest" ]; do
        part=${rest%%[,[]*}
        host=$host$part
        rest=${rest#"$part"}
        case $rest in
            "["*)
                inner=${rest#?}
                inner=${inner%%]*}
                host=$host${inner%%[,-]*}
                rest=${rest#*]}
                ;;
            *) break ;;
        esac
    done
    printf '%s\n' "$host"
}

nodes=1
node_rank=0
main_addr=127.0.0.1
main_port=${MASTER_PORT:-}
where="this machine"
if [ -n "${SLURM_NNODES:-}" ] && [ -n "${SLURM_NODEID:-}" ]; then
    nodes=$SLURM_NNODES
    node_rank=$SLURM_NODEID
    where="Slurm job ${SLURM_JOB_ID:-?}"
    is_count "$nodes" || die "SLURM_NNODES must be a positive integer, got '$nodes'"
    if [ "$nodes" -gt 1 ]; then
        list=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
        main_addr=""
        if command -v scontrol >/dev/null 2>&1 && [ -n "$list" ]; then
            main_addr=$(scontrol show hostnames "$list" | sed -n 1p) || main_addr=""
        fi
        [ -n "$main_addr" ] || main_addr=${MASTER_ADDR:-}
        [ -n "$main_addr" ] || [ -z "$list" ] || main_addr=$(first_host_of "$list")
        [ -n "$main_addr" ] || die "Slurm job on $nodes nodes but no node list (SLURM_JOB_NODELIST) or MASTER_ADDR"
    fi
elif [ -n "${MASTER_ADDR:-}" ] && [ -n "${PET_NNODES:-${WORLD_SIZE:-}}" ] && [ -n "${PET_NODE_RANK:-${RANK:-}}" ]; then
    nodes=${PET_NNODES:-$WORLD_SIZE}
    node_rank=${PET_NODE_RANK:-$RANK}
    main_addr=$MASTER_ADDR
    main_port=${MASTER_PORT:-23456}
    where="PyTorchJob"
fi
is_count "$nodes" || die "node count must be a positive integer, got '$nodes'"
case $node_rank in '' | *[!0-9]*) die "node rank must be an integer, got '$node_rank'" ;; esac
[ "$node_rank" -lt "$nodes" ] || die "node rank $node_rank is not below the node count $nodes"
# The scheduler's variables describe nodes, not processes: the launcher sets the per-process ones itself.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT PET_NNODES PET_NODE_RANK

total=$((per_node * nodes))
if [ "$total" = 1 ] && [ "$exit_codes" = plain ]; then
    say "1 process on $where: $prog $*"
    exec "$prog" "$@"
fi

# ---- several processes: accelerate launch (torchrun) in the background, signals forwarded to its workers. (One
# process whose exit code is to be mapped runs the same way, without the launcher: its worker mode records how it
# ended.)
self=$0
case $self in /*) ;; *) self=$(cd "$(dirname "$self")" && pwd)/$(basename "$self") ;; esac
LOWMEM_STATUS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/lowmem-launch.XXXXXX")
export LOWMEM_STATUS_DIR
if [ "$total" = 1 ]; then
    say "1 process on $where: $prog $*"
    set -- "$self" --lowmem-worker "$@"
else
    if [ -z "$main_port" ] && [ "$nodes" = 1 ]; then  # one machine: any free port (a shared node may run others)
        free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
        main_port=$("${PYTHON:-python3}" -c "$free_port") || main_port=""
    fi
    main_port=${main_port:-29500}
    is_count "$main_port" || die "main process port must be a positive integer, got '$main_port'"
    say "$total processes ($per_node per node x $nodes nodes, this is node $node_rank; main $main_addr:$main_port)" \
        "on $where; stop window ${TORCH_ELASTIC_SHUTDOWN_TIMEOUT} s"
    # --mixed_precision/--dynamo_backend only quiet the launcher's "defaults used" warning: the run config
    # decides the precision and passes it to Accelerator itself.
    set -- accelerate launch --multi_gpu --num_processes "$total" --num_machines "$nodes" \
        --machine_rank "$node_rank" --main_process_ip "$main_addr" --main_process_port "$main_port" \
        --mixed_precision no --dynamo_backend no --no_python "$self" --lowmem-worker "$@"
fi
mode=launcher
trap 'forward TERM' TERM
trap 'forward INT' INT
# In a session of its own when setsid is there: a terminal's Ctrl-C then reaches this script only (which
# forwards it), not the launcher, which would start the kill described at the top.
if command -v setsid >/dev/null 2>&1; then
    background setsid "$@"
else
    background "$@"
fi
target=$!
[ -z "$pending" ] || forward "$pending"
code=0
wait_for "$target" || code=$?

# weight CODE: how near a worker's exit code is to the cause of the run's end (the top of this file).
weight() {
    case $1 in
        0) echo 0 ;;
        5) echo 1 ;;   # lost peer: a consequence of another rank's end
        6) echo 6 ;;   # out of memory in backward (the smaller plan waits in output_dir for the restart)
        3) echo 5 ;;   # out of memory, retries used up
        4) echo 4 ;;   # out of disk
        2) echo 3 ;;   # user error
        *) echo 2 ;;   # crash (1) or killed by a signal (128+N)
    esac
}

# The launcher reports any worker failure as 1: prefer what the workers themselves said.
reported=0
worst=""
for file in "$LOWMEM_STATUS_DIR"/rank-*; do
    [ -f "$file" ] || continue
    reported=$((reported + 1))
    read -r rank_code <"$file" || rank_code=1
    [ "$rank_code" != 0 ] || continue
    if [ -z "$worst" ] || [ "$(weight "$rank_code")" -gt "$(weight "$worst")" ]; then
        worst=$rank_code
    fi
done
stopped=""  # exit 0 is a finished run and a stopped one alike: the trainer says which (commands/train.py)
for file in "$LOWMEM_STATUS_DIR"/outcome-rank-*; do
    [ -f "$file" ] || continue
    read -r outcome <"$file" || outcome=""
    [ "$outcome" != stopped ] || stopped=1
done
rm -rf "$LOWMEM_STATUS_DIR"
if [ -n "$worst" ]; then
    [ "$worst" = "$code" ] || say "exit $worst, the training processes' own code (the launcher said $code)"
    code=$worst
elif [ "$reported" = "$per_node" ] && [ "$code" != 0 ]; then
    say "every worker on this node exited 0 (the launcher said $code): exit 0"
    code=0
fi
if [ "$exit_codes" = kubeflow ]; then  # the table at the top of this file
    mapped=$code
    if [ "$code" = 0 ] && [ -n "$stopped" ]; then
        mapped=143
    elif [ "$code" = 5 ] || [ "$code" = 6 ]; then
        mapped=138
    fi
    [ "$mapped" = "$code" ] || say "exit $mapped for $code (LOWMEM_EXIT_CODES=kubeflow: restart it)"
    code=$mapped
fi
exit "$code"
