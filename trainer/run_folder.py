"""The output directory contract: one run per folder, never two runs mixed in one.

    --is_keep_training   the folder holds a complete checkpoint    only other traces of a run       nothing of ours
    true                 resume from the newest                    move them aside, start fresh     start fresh
                                                                    (with a warning: nothing to resume)
    auto                 resume from the newest                    move them aside, start fresh     start fresh
    false                refuse, in one line naming the newest checkpoint and the ways out      start fresh
    false + --overwrite_output_dir:  move the old run aside, start fresh

"Moved aside" means renamed into output_dir/previous_runs/<date-time>/, never deleted; inside the folder, so the
rename is instant and works when output_dir is a mount point (a container's /output). Only names this project
writes are moved (RUN_ITEMS): other files a user keeps there stay where they are.

Every rank decides from the folder as it finds it at start; rank 0 alone moves things, after the process group
exists (so every rank has decided before anything moves), then all check they see the same folder
(`check_shared_storage`): checkpoints of a multi-node run need storage every node sees.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from lowmem_train.config.errors import ConfigError
from lowmem_train.config.schema import RunConfig
from lowmem_train.trainer import distributed
from lowmem_train.trainer.files import CHECKPOINTS, ResumePoint, complete_checkpoints, newest_intact

log = logging.getLogger(__name__)

# Everything a run writes into its output_dir.
STATUS_FILE = "exit_status.json"  # written by the train command (commands/train.py)
RUN_ITEMS = (CHECKPOINTS, "final", "metrics.jsonl", "memory.jsonl", "config.yaml", "tensorboard", "memory_report.png",
             STATUS_FILE, "oom_plan.json")
PREVIOUS_RUNS = "previous_runs"
SHARED_TOKEN = ".shared_storage_check"


@dataclass
class StartPlan:
    """How this run starts in its folder."""

    resume: ResumePoint | None  # the checkpoint to continue from, or None for a fresh run
    move_aside: list[Path] = field(default_factory=list)  # traces of an earlier run to move away first
    note: str = ""  # what to log about it


def run_items(out: Path) -> list[Path]:
    """The traces of a run in `out` (an empty checkpoints/ folder is no trace). A status file alone is none either:
    a start refused for a user error writes one into a folder that held nothing, and the corrected command must
    not be refused for it (it is replaced when the run starts)."""
    found = [out / name for name in RUN_ITEMS if (out / name).exists()]
    found = [p for p in found if not (p.name == CHECKPOINTS and p.is_dir() and not any(p.iterdir()))]
    return [] if [p.name for p in found] == [STATUS_FILE] else found


def plan_start(cfg: RunConfig) -> StartPlan:
    """Decide from the folder alone (no collective): resume, start fresh, move an old run aside, or refuse."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file; name a folder for the run")
    traces = run_items(out)
    mode = cfg.is_keep_training
    if cfg.is_finetune and not cfg.finetune_from and traces:
        raise ConfigError(f"--is_finetune reads {out / 'final'} by default, but a fine-tuning run needs a folder of its "
                          f"own: pass --finetune_from={out / 'final'} and another --output_dir")
    if mode is False:
        if not traces:
            return StartPlan(None)
        if cfg.overwrite_output_dir:
            return StartPlan(None, traces, f"--overwrite_output_dir: the earlier run in {out} goes to "
                                           f"{out / PREVIOUS_RUNS}/")
        newest = complete_checkpoints(out / CHECKPOINTS)
        what = f"a run (newest checkpoint {newest[0].name})" if newest else \
            f"traces of a run ({', '.join(p.name for p in traces)})"
        raise ConfigError(f"--output_dir {out} holds {what}; continue it with --is_keep_training=True (or auto), "
                          f"train into another --output_dir, or pass --overwrite_output_dir=True to move it aside "
                          f"into {out / PREVIOUS_RUNS}/")
    point = newest_intact(out / CHECKPOINTS)
    if point is not None:
        return StartPlan(point)
    note = "" if mode == "auto" else f"--is_keep_training: no complete checkpoint in {out / CHECKPOINTS}, starting fresh"
    if traces:
        note = (note + "; " if note else "") + (f"traces of an earlier run without a complete checkpoint "
                                                f"({', '.join(p.name for p in traces)}) go to {out / PREVIOUS_RUNS}/")
    return StartPlan(None, traces, note)


def move_aside(out: Path, items: list[Path]) -> Path:
    """Rename `items` into out/previous_runs/<date-time>/ and return that folder."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    target = out / PREVIOUS_RUNS / stamp
    n = 1
    while target.exists():  # two moves in one second
        n += 1
        target = out / PREVIOUS_RUNS / f"{stamp}.{n}"
    target.mkdir(parents=True)
    for item in items:
        item.rename(target / item.name)
    return target


def enter(plan: StartPlan, cfg: RunConfig, backend) -> None:
    """Act on the plan (rank 0 moves, everyone waits), then check that every rank sees the same folder."""
    out = Path(cfg.output_dir)
    if backend.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if plan.move_aside:
            where = move_aside(out, plan.move_aside)
            log.warning("%s (moved to %s)", plan.note, where)
        elif plan.note:
            log.warning("%s", plan.note)
    distributed.barrier(backend)
    check_shared_storage(backend, out)


def check_shared_storage(backend, out: Path) -> None:
    """Rank 0 writes a random token into output_dir; every rank reads it back. A rank that does not see it is on
    storage of its own, where its part of every checkpoint would be lost: refuse now, in one line, rather than
    fail in the middle of the first save."""
    if backend.world_size == 1:
        return
    token = out / SHARED_TOKEN
    if backend.is_main:
        value = secrets.randbits(48)  # exact in a float64
        tmp = token.with_name(token.name + ".tmp")
        tmp.write_text(str(value))
        os.replace(tmp, token)
    distributed.barrier(backend)
    try:
        seen = float(token.read_text())
    except (OSError, ValueError):
        seen = -1.0
    views = distributed.collect(backend, [seen, float(backend.rank)])
    expected = views[0][0]
    blind = [int(rank) for value, rank in views if value != expected]
    distributed.barrier(backend)
    if backend.is_main:
        token.unlink(missing_ok=True)
    if blind:
        raise ConfigError(f"rank(s) {', '.join(map(str, blind))} do not see {out} as rank 0 on {socket.gethostname()} "
                          f"writes it: checkpoints need storage every node shares (NFS, Lustre, a shared volume); "
                          f"point --output_dir at it on every node")
