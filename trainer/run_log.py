"""What a run tells its user: progress, log lines, metrics.jsonl and TensorBoard.

In a terminal: a progress bar per epoch, log lines above it, times as HH:MM:SS. In a file (stderr is not a
terminal: Slurm, Kubernetes, `docker logs`, `> run.log`): no bar, whose carriage returns would make one endless
line, but a plain progress line every `log_every_seconds` (step, loss, samples/s, ETA), and every line carries
the date and the time.

Only rank 0 prints or writes; on other ranks every method is a no-op, so callers never branch on rank.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def to_terminal() -> bool:
    return sys.stderr.isatty()


def setup_logging(is_main: bool) -> None:
    handler = TqdmHandler()
    datefmt = "%H:%M:%S" if to_terminal() else "%Y-%m-%d %H:%M:%S"  # a log file is read days later
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt=datefmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed", "accelerate", "torch", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def open_jsonl(path: Path):
    """Open a JSON-lines file for appending, first cutting a torn last line left by a killed run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size if path.is_file() else 0
    if size:
        with open(path, "rb+") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":  # only the tail is read: the file may be long
                tail_start = max(0, size - (1 << 20))
                f.seek(tail_start)
                tail = f.read()
                f.truncate(tail_start + tail.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def duration(seconds: float) -> str:
    """'1h02m', '3m05s', '42s'."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunLog:
    def __init__(self, out_dir: Path, enabled: bool, log_every_seconds: float = 30.0):
        self.enabled, self.log_every_seconds = enabled, log_every_seconds
        self.bar: tqdm | None = None
        self.metrics = None
        self.tb = None
        self._samples, self.run_samples, self.run_seconds = 0, 0, 0.0
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open_jsonl(out_dir / "metrics.jsonl")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.tb = None

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        if not self.enabled:
            return
        self._epoch, self._steps, self._done = f"epoch {epoch + 1}/{epochs}", steps, done
        self._t0, self._samples, self._last_line = time.perf_counter(), 0, time.perf_counter()
        self._last_step = self._t0
        if to_terminal():
            self.bar = tqdm(total=steps, initial=done, desc=self._epoch, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def step(self, samples: int, loss: float, lr: float, grad_norm: float | None) -> float:
        """Advance the progress; returns samples/s over this epoch so far."""
        if not self.enabled:
            return 0.0
        self._samples += samples
        self._done += 1
        now = self._last_step = time.perf_counter()
        rate = self._samples / max(now - self._t0, 1e-9)
        gn = "-" if grad_norm is None else f"{grad_norm:.2f}"
        numbers = (f"loss {loss:.4f} ppl {min(2.0 ** 60, 2.718281828 ** min(loss, 40)):.2f} lr {lr:.2e} gnorm {gn} "
                   f"{rate:,.0f} samples/s")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(numbers, refresh=False)
        elif now - self._last_line >= self.log_every_seconds or self._done == self._steps:
            self._last_line = now
            steps_per_s = self._samples / max(now - self._t0, 1e-9) / max(samples, 1)
            eta = (self._steps - self._done) / max(steps_per_s, 1e-9)
            log.info("%s step %d/%d (%.0f%%) %s, ETA %s", self._epoch, self._done, self._steps,
                     100 * self._done / max(self._steps, 1), numbers, duration(eta))
        return rate

    def end_epoch(self) -> None:
        if self._samples:  # epoch-end evaluation and checkpoint come after the last step: not counted
            self.run_samples += self._samples
            self.run_seconds += self._last_step - self._t0
            self._samples = 0
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def samples_per_s(self) -> float:
        """Training samples per second over this run's epochs so far (from each epoch's start to its last step)."""
        return self.run_samples / self.run_seconds if self.run_seconds else 0.0

    def write(self, kind: str, step: int, **values: float | int | str | None) -> None:
        """One JSON line `{"kind", "step", ...}` in metrics.jsonl and the numbers in TensorBoard."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self.metrics.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self.end_epoch()
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()
