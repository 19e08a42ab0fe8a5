"""lowmem-train: train T5 / GPT models without running out of memory and without losing progress.

    python train_low_mem.py train [--config t5_tiny] [--key=value ...]
    accelerate launch --config_file accelerate_configs/multi_gpu_zero2_offload.yaml train_low_mem.py train
    python train_low_mem.py COMMAND --help

The same as the `lowmem-train` console command; the commands live in commands/.
"""

import sys

from lowmem_train.commands.main import build_parser, main  # noqa: F401  (build_parser: for scripts that parse alike)

if __name__ == "__main__":
    sys.exit(main())
