"""The training loop's own state, with the model/optimizer files everything a resume needs.

`DataPosition` is the one piece of data state: where the next unseen sample of the epoch is. The loop owns it
(`TrainState.position`); the dataset is told where to start from it (LowMemDataset.load_state_dict).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class DataPosition:
    """Where the next unseen sample is: epoch and global samples consumed in it (a multiple of the global batch)."""

    epoch: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.samples_seen = int(state["epoch"]), int(state["samples_seen"])


@dataclass
class TrainState:
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    best_score: float = math.inf  # the best --eval.best_metric so far, as a loss (a score that rises is negated)
    bad_evals: int = 0
    eval_score: float | None = None  # that figure when this checkpoint was written (pruning keeps the best)
    plan: dict = field(default_factory=dict)  # the memory guard's state
    world_size: int = 1
    global_batch: int = 0

    def state_dict(self) -> dict:
        """JSON-ready; the position's fields sit at the top level (the layout of train_state.json)."""
        d = asdict(self)
        d.update(d.pop("position"))
        d["best_score"] = None if math.isinf(self.best_score) else self.best_score
        return d

    @classmethod
    def from_state_dict(cls, d: dict) -> "TrainState":
        d = dict(d)
        for old, new in (("best_loss", "best_score"), ("eval_loss", "eval_score")):  # checkpoints before 2026-12
            if old in d:
                d.setdefault(new, d.pop(old))
        d["best_score"] = math.inf if d.get("best_score") is None else d["best_score"]
        position = DataPosition(int(d.pop("epoch", 0)), int(d.pop("samples_seen", 0)))
        return cls(position=position, **{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
