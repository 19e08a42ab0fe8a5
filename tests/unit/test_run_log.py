"""What a run prints when its stderr is a file (Slurm, Kubernetes, docker logs): plain dated lines, no bar."""

from __future__ import annotations

import logging
import re

from lowmem_train.trainer import run_log


def test_a_log_file_gets_plain_dated_progress_lines_and_no_bar(tmp_path, capsys):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        run_log.setup_logging(is_main=True)  # stderr is captured here: not a terminal
        log = run_log.RunLog(tmp_path, enabled=True, log_every_seconds=1e-9)
        log.start_epoch(epoch=0, epochs=2, steps=3, done=0)
        for _ in range(3):
            log.step(samples=64, loss=0.5, lr=1e-3, grad_norm=1.0)
        log.end_epoch()
        log.close()
    finally:
        root.handlers[:], root.level = handlers, level
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d epoch 1/2 step \d/3", ln) for ln in lines)
    assert "step 3/3 (100%) loss 0.5000" in lines[-1] and "samples/s, ETA 0s" in lines[-1]


def test_durations_read_like_a_clock():
    assert [run_log.duration(s) for s in (5, 185, 3725)] == ["5s", "3m05s", "1h02m"]
