"""Run the real Trainer with the real CLI options, and record per rank what a test needs to check:
the global sample positions each step consumed, the loss of each step, the final weights, and the CPU threads
the step ran with (torch's, and OpenMP's for this thread: what DeepSpeed's CPU Adam uses).

    [accelerate launch ...] record_run.py --output_dir OUT [train options...]
writes OUT/record_rank{R}.pt on every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for train_low_mem

from lowmem_train.config.cli import parse_run_config
from lowmem_train.trainer import distributed
from lowmem_train.trainer import trainer as trainer_module
from lowmem_train.trainer.run_log import setup_logging
from train_low_mem import build_parser


def openmp_threads() -> int:
    """omp_get_max_threads() of the OpenMP runtime torch ships (CPU Adam calls the same one), in this thread."""
    import ctypes

    runtime = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return ctypes.CDLL(str(runtime[0])).omp_get_max_threads() if runtime else -1


class RecordingTrainer(trainer_module.Trainer):
    def setup(self) -> None:
        super().setup()
        self.record = {"steps": [], "losses": [], "threads": []}
        original = trainer_module.train_step

        def recording_step(*args, **kwargs):
            result = original(*args, **kwargs)
            self.record["losses"].append((self.state.step, result.loss))
            self.record["threads"].append((torch.get_num_threads(), openmp_threads()))
            return result

        trainer_module.train_step = recording_step

    def one_step(self, batch: dict | None) -> None:
        epoch, step = self.state.position.epoch, self.state.step
        super().one_step(batch)
        if self.state.step > step:  # a step that was redone (its loader failed) is recorded once, when it is done
            self.record["steps"].append((epoch, int(batch["step"]), batch["positions"].tolist()))


def main() -> int:
    cfg, _ = parse_run_config(build_parser(), ["train", *sys.argv[1:]])  # exactly as the CLI would
    setup_logging(True)
    trainer = RecordingTrainer(cfg)
    result = trainer.fit()
    state = trainer.backend.accelerator.get_state_dict(trainer.model)
    trainer.record["weights"] = {k: v.detach().float().cpu().clone() for k, v in (state or {}).items()}
    if not trainer.record["weights"]:  # non-zero ranks get no state dict from accelerate: read the module
        net = trainer.backend.accelerator.unwrap_model(trainer.model)
        trainer.record["weights"] = {k: v.detach().float().cpu().clone() for k, v in net.state_dict().items()}
    trainer.record["plan"] = trainer.guard.plan.state_dict()
    trainer.record["outcome"] = result.outcome
    torch.save(trainer.record, Path(cfg.output_dir) / f"record_rank{trainer.backend.rank}.pt")
    distributed.leave_process_group()  # as the train command does: a rank exiting with gloo alive may abort
    return 0 if result.outcome in ("finished", "stopped") else 3


if __name__ == "__main__":
    sys.exit(main())
