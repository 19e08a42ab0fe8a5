"""The `train` command: every option comes from the config tree; the heavy imports wait until it runs."""

from __future__ import annotations

HELP = "train a model (resume with --is_keep_training=True)"
USES_RUN_CONFIG = True


def add_arguments(parser) -> None:
    """No options of its own: `train` takes the whole config tree (added by the entrypoint)."""


def run(args, cfg) -> int:
    import os

    import torch

    if not torch.cuda.is_available():  # say so up front, or DeepSpeed warns that it "was unable to detect" a GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from lowmem_train.trainer.trainer import Trainer

    return Trainer(cfg).fit().exit_code
