"""What a run tells its user: a progress bar per epoch, log lines, metrics.jsonl and TensorBoard.

Only rank 0 prints or writes; on other ranks every method is a no-op, so callers never branch on rank.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


class TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(is_main: bool) -> None:
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed", "accelerate", "torch.distributed", "transformers"):
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


class RunLog:
    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.metrics = None
        self.tb = None
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
        if self.enabled:
            self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
            self._t0, self._samples = time.perf_counter(), 0

    def step(self, samples: int, loss: float, lr: float, grad_norm: float | None) -> float:
        """Advance the bar; returns samples/s over this epoch so far."""
        if not self.enabled:
            return 0.0
        self._samples += samples
        rate = self._samples / max(time.perf_counter() - self._t0, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            gn = "-" if grad_norm is None else f"{grad_norm:.2f}"
            self.bar.set_postfix_str(f"loss {loss:.4f} ppl {min(2.0 ** 60, 2.718281828 ** min(loss, 40)):.2f} "
                                     f"lr {lr:.2e} gnorm {gn} {rate:,.0f} samples/s", refresh=False)
        return rate

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

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
