"""`train`: every option comes from the config tree; the heavy imports wait until it runs.

Exit codes (README, "Exit codes"), also written with the reason to OUTPUT_DIR/exit_status.json, because a
launcher (`accelerate launch`, torchrun) turns every failure of a rank into its own exit code 1; the container's
entrypoint reads the file back:
    0  finished, or stopped by a signal after saving a checkpoint     requeue: only if stopped (it resumes)
    1  crashed (a bug: the traceback says where)                      no
    2  a user mistake: config, data, launch (one line says which)     no: fix the command
    3  out of memory after every retry (a checkpoint is saved)        after freeing memory or on a bigger node
    4  out of disk for a checkpoint (--low_disk=stop)                 after freeing disk
    5  lost another rank (its node died, the network failed)          yes: it resumes from the last checkpoint
    6  out of memory where the step cannot be redone in place          yes: it resumes with the smaller plan
       (a backward pass; a ZeRO-3 forward pass; NCCL's buffers)
  130  quit at once by a second Ctrl-C (nothing saved since the last checkpoint)

The status file never outlives the start it describes: once the run has passed every check and trains, rank 0
replaces it with {"outcome": "started", "exit_code": null}, and every ending above writes its own. A process killed
outright (SIGKILL, the kernel's OOM killer, a lost machine) leaves "started" behind: true, since nothing ended it.
Only a start refused for a user error (or quit by Ctrl-C) before it trains leaves a folder that holds a run as it
found it, byte for byte.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HELP = "train a model (resume with --is_keep_training=True, or auto)"
USES_RUN_CONFIG = True
EXIT_CODES = {"finished": 0, "stopped": 0, "crashed": 1, "user_error": 2, "out_of_memory": 3, "out_of_disk": 4,
              "lost_peer": 5, "oom_in_backward": 6, "interrupted": 130}
STARTED = "started"  # the status while a run trains: no exit code yet
STATUS_FILE = "exit_status.json"


def add_arguments(parser) -> None:
    """No options of its own: `train` takes the whole config tree (added by commands/main.py)."""


def write_status(out: Path, outcome: str, message: str = "") -> int | None:
    """Record the outcome for whoever launched us (atomic: a reader never sees half a file); returns its code."""
    code = EXIT_CODES.get(outcome) if outcome != STARTED else None
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{STATUS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"exit_code": code, "outcome": outcome, "message": message,
                                   "rank": int(os.environ.get("RANK", "0")), "time": time.time()}) + "\n")
        os.replace(tmp, out / STATUS_FILE)
    except OSError:  # the status is a courtesy: the exit code below is what counts
        pass
    return code


def tell_entrypoint(outcome: str) -> None:
    """Tell the container's entrypoint (docker/entrypoint.sh, which sets LOWMEM_STATUS_DIR, a folder of its own on
    this node) how this rank ended: exit code 0 is a finished run and a stopped one alike, and a scheduler must
    restart only the second (LOWMEM_EXIT_CODES=kubeflow)."""
    folder = os.environ.get("LOWMEM_STATUS_DIR")
    if not folder:
        return
    try:
        Path(folder, f"outcome-rank-{os.environ.get('RANK', '0')}").write_text(outcome + "\n")
    except OSError:  # a courtesy, as the status file is
        pass


def run(args, cfg) -> int:
    import logging

    import torch

    if not torch.cuda.is_available():  # say so up front, or DeepSpeed warns that it "was unable to detect" a GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from lowmem_train.commands.main import is_main_process, say_error
    from lowmem_train.config.errors import ConfigError, first_line
    from lowmem_train.trainer.checkpoint import OutOfDisk
    from lowmem_train.trainer.distributed import (classify_collective_error, leave_process_group,
                                                  misconfiguration_hint)
    from lowmem_train.trainer.trainer import Trainer

    out = Path(cfg.output_dir)
    # A start refused for a user error leaves a folder that holds a run exactly as it was: no status file there,
    # until the run trains (and the status says "started").
    held_a_run = out.is_dir() and any(out.iterdir())
    started = []

    def on_started() -> None:
        started.append(True)
        if is_main_process():
            write_status(out, STARTED, f"training since {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()})")

    def untouched_status(outcome: str, message: str) -> int:
        """The status of a start that may have left its folder as it was: written only if that folder is ours."""
        return EXIT_CODES[outcome] if held_a_run and not started else write_status(out, outcome, message)

    def user_error_status(message: str) -> int:
        return untouched_status("user_error", message)

    def peer_lost(message: str, announced: str | None) -> None:
        """Another rank is gone and this one may be stuck in a collective: say so, record it, leave now."""
        outcome = announced if announced in EXIT_CODES else "lost_peer"
        if outcome == "user_error":  # its own message says what to fix
            say_error("another rank stopped on a user error (its message is above or in its log); fix it and start "
                      "again", every_rank=True)
        elif outcome == "crashed":  # a bug: a restart would most likely meet it again
            say_error(f"{message} (its traceback is above or in its log)", every_rank=True)
        else:
            say_error(f"{message}; restart with --is_keep_training=auto to resume from the last complete checkpoint",
                      every_rank=True)
        code = user_error_status(message) if outcome == "user_error" else write_status(out, outcome, message)
        logging.shutdown()
        os._exit(code)

    trainer = Trainer(cfg, on_peer_lost=peer_lost, on_started=on_started)
    try:
        result = trainer.fit()
    except ConfigError as exc:  # commands/main.py prints it; the launcher reports any failure as 1, this says 2
        user_error_status(str(exc))
        raise
    except OutOfDisk as exc:
        say_error(str(exc))
        return write_status(out, "out_of_disk", str(exc))
    except KeyboardInterrupt:  # a second Ctrl-C (trainer/stop.py), or a first one before the handler was set
        code = untouched_status("interrupted", "quit by Ctrl-C; nothing saved since the last checkpoint")
        logging.shutdown()
        os._exit(code)  # at once: threads, workers and collectives are not waited for
    except RuntimeError as exc:  # a collective failed: what NCCL / gloo say decides what it means
        kind = classify_collective_error(exc) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        if kind == "lost_peer":
            why = trainer.peers.announced() if trainer.peers is not None else None
            peer_lost(f"rank stopped: {why}" if why else f"lost another rank ({first_line(exc)[:160]})", why)
        if kind == "misconfigured":  # a restart would fail the same way: a user error, not "lost a peer"
            message = f"the process group failed: {misconfiguration_hint(exc)} ({first_line(exc)[:160]})"
            say_error(message, every_rank=True)
            code = user_error_status(message)
            logging.shutdown()
            os._exit(code)  # the others may wait in a collective with this rank
        write_status(out, "crashed", f"{type(exc).__name__}: {first_line(exc)[:300]}")
        raise
    except Exception as exc:  # a bug: the traceback (commands/main.py lets it through) says where
        write_status(out, "crashed", f"{type(exc).__name__}: {first_line(exc)[:300]}")
        raise
    if result.outcome == "oom_in_backward":  # the rank that failed (backward, a ZeRO-3 forward, NCCL's buffers); the
        # others may be stuck in a collective
        code = write_status(out, result.outcome, "out of memory in backward")
        logging.shutdown()
        os._exit(code)  # leave now: an orderly shutdown would wait for those collectives
    if result.outcome in ("finished", "stopped"):  # every rank is here, after the same step
        leave_process_group()
        tell_entrypoint(result.outcome)
    return write_status(out, result.outcome) if is_main_process() else EXIT_CODES[result.outcome]
