#!/bin/sh
# One training process per visible GPU (or NUM_PROCESSES), DeepSpeed ZeRO-2 with the optimizer offloaded to CPU.
set -e
n="${NUM_PROCESSES:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
[ "$n" -ge 1 ] 2>/dev/null || n=1
exec accelerate launch --config_file accelerate_configs/multi_gpu_zero2_offload.yaml --num_processes "$n" \
    train_low_mem.py "$@"
