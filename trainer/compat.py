"""The private or internal APIs of other libraries that lowmem-train relies on: one function per use, only here.

Each names the version it was checked against and why no public API does the job. tests/unit/test_compat.py
calls every one of them against the installed libraries, so an upgrade that removes one fails loudly there,
not in the middle of a training run.
"""

from __future__ import annotations

import torch

CHECKED_AGAINST = {"python": "3.11", "accelerate": "1.15.0", "deepspeed": "0.19.8"}


def set_sync_gradients(accelerator, sync: bool) -> None:
    """Mark whether the next backward is the last of an optimizer step (accelerate 1.15,
    `GradientState._set_sync_gradients`). `Accelerator.accumulate()` would decide that from its own count of
    micro-batches, but ours can change in the middle of a step (an out-of-memory retry re-splits the rows), and
    under DeepSpeed the flag is what makes backward() also step the optimizer."""
    accelerator.gradient_state._set_sync_gradients(sync)


def stop_forkserver() -> bool:
    """Stop multiprocessing's fork server if it runs and no child of ours is alive (CPython 3.8-3.13,
    `forkserver._forkserver._stop`, which CPython's own tests use); it restarts on demand. Returns True if stopped.

    Every worker holds the server's "alive" pipe, and `_stop` waits for the server to exit: stopping it while a
    worker still lives would block until that worker ends, so such a server is left for a later call."""
    import multiprocessing
    from multiprocessing import forkserver

    if multiprocessing.active_children():
        return False
    server = forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is None or not hasattr(server, "_stop"):
        return False
    server._stop()
    return True


def cpu_adam_step(optimizer, step: int, group: dict, empty: torch.Tensor) -> None:
    """One C++ update of DeepSpeedCPUAdam on empty tensors (deepspeed 0.19.8, `optimizer.ds_opt_adam.adam_update`
    with the optimizer's `opt_id`): it advances the op's internal beta powers and touches no parameter. There is
    no public way to set them (see trainer/cpu_adam_resume.py for why they matter)."""
    beta1, beta2 = group["betas"]
    optimizer.ds_opt_adam.adam_update(optimizer.opt_id, step, group["lr"], beta1, beta2, group["eps"],
                                      group["weight_decay"], group["bias_correction"], empty, empty, empty, empty)


def zero3_local_shard(param: torch.Tensor) -> torch.Tensor | None:
    """This rank's partition of a ZeRO-3 parameter (deepspeed 0.19.8 keeps it in `param.ds_tensor` and leaves an
    empty placeholder in `.data`); None for an ordinary parameter."""
    return getattr(param, "ds_tensor", None)


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also under ZeRO-3 where `numel()` of the placeholder is 0
    (deepspeed 0.19.8: `param.ds_numel`)."""
    return getattr(param, "ds_numel", param.numel())


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Shape of the whole parameter, also under ZeRO-3 where the placeholder is empty (deepspeed 0.19.8:
    `param.ds_shape`)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def instance_attributes(obj) -> dict:
    """Every attribute an object holds, its private ones included (`vars`). The memory snapshot counts the tensors an
    optimizer holds: DeepSpeed's ZeRO optimizers (deepspeed 0.19.8) keep their fp32 partitions, gradient partitions
    and buffers in attributes whose names differ by stage and version, so it reads all of them rather than name
    any; an object without a __dict__ (slots, C types) gives nothing."""
    return dict(vars(obj)) if hasattr(obj, "__dict__") else {}


def has_indices_mapping(dataset) -> bool:
    """datasets 5.2: a Dataset whose rows are a select/shuffle of its Arrow files (`_indices`, no public accessor);
    its cache files then hold more rows, or another order, than the dataset has."""
    return getattr(dataset, "_indices", None) is not None
