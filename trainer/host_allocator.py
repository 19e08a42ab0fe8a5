"""Freed large host blocks go back to the system at once (glibc's malloc), so what a run holds is what it uses.

Why: glibc serves a request of M_MMAP_THRESHOLD bytes or more (128 KiB at start) with an mmap of its own, returned
to the system when freed. The threshold is dynamic, though: freeing such a block raises it to that block's size (up
to 32 MiB on 64-bit Linux), so from then on blocks of that size come from the heap, and a freed one stays in the
process unless it lies at the heap's top (mallopt(3), M_MMAP_THRESHOLD: "dynamic mmap threshold"). An optimizer that
makes and frees temporaries the size of a weight matrix at every step, as transformers' Adafactor does for each
parameter, thereby keeps hundreds of MB it no longer uses. Measured on t5_small (bench/optimizer_memory.py, same
round): Adafactor's peak was 0.196 GB below AdamW's instead of the ~0.37 GB its missing moments save; with the
threshold fixed, 0.338 GB below, AdamW's own peak unchanged.

Setting the threshold (what MALLOC_MMAP_THRESHOLD_ does at process start) turns the dynamic adjustment off. 1 MiB:
smaller blocks stay in the heap; a block of 1 MiB or more costs one mmap and a page fault per page on first touch,
and a training step allocates many such blocks anew (activations, and gradients after zero_grad(set_to_none)):
on t5_small with AdamW this made the step ~25% slower (bench/peers.py --preset t5_small: 0.68-0.91x the bare
torch loop in three rounds; 1.02-1.18x without it). So the trainer sets it for Adafactor runs only, where the memory
is the point; AdamW's fused step frees little. A user's MALLOC_MMAP_THRESHOLD_ wins either way (33554432 gives an
Adafactor run its speed back). The setting cannot be read back, so it is not restored when training ends; it changes
where blocks come from, never what a program computes. Nothing on a C library other than glibc.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 1 << 20
ENV = "MALLOC_MMAP_THRESHOLD_"


def return_large_blocks(environ=os.environ) -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process; whether it was set (False: not glibc, or the user's
    own MALLOC_MMAP_THRESHOLD_ rules)."""
    if ENV in environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD))
