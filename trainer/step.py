"""One optimizer step: split this rank's share of the global batch into micro-batches, forward, backward,
accumulate, clip, step. Nothing else lives here.

The loss is scaled exactly once, and so that the update does not depend on how the global batch is split
(micro-batch x accumulation x processes) nor on how many target tokens each piece holds: every micro-batch
contributes sum(token losses) / (target tokens of the whole global step). Both backends then divide by the
accumulation count (accelerate in `backward`, DeepSpeed in `engine.backward`) and average over processes,
so we multiply by those two numbers first; the result is the exact mean over the global step's tokens.
(The prior art divided by the accumulation count itself *and* let accelerate do it: loss scaled twice.)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from lowmem_train.config.errors import first_line
from lowmem_train.model.families.base import IGNORE_INDEX
from lowmem_train.trainer import distributed
from lowmem_train.trainer.backend import Backend, accumulation_divisor
from lowmem_train.trainer.compat import set_sync_gradients
from lowmem_train.trainer.faults import OOM_FAULT


@dataclass
class StepResult:
    loss: float  # mean token loss of the global step (all ranks)
    tokens: int  # target tokens of the global step (all ranks)
    grad_norm: float | None
    lr: float
    stop: bool = False  # some rank was asked to stop (a signal): every rank stops after this step
    cells: int = 0  # token positions this rank's micro-batches computed on (each trimmed to its longest row)
    pad_cells: int = 0  # of which padding


def split_micro_batches(batch: dict[str, torch.Tensor], count: int, family) -> list[dict[str, torch.Tensor]]:
    """`count` micro-batches from one rank-step batch: consecutive rows, as views of the batch's own memory (a pinned
    batch stays pinned, so its copy to the GPU is asynchronous; indexing with a tensor would copy every piece into
    pageable memory). Each piece is trimmed to its own longest row once it is on the device (`to_device`).

    Exactly `count` pieces, always: every rank must run the same number of backward passes or the gradient
    collectives hang. A piece with no rows (rows skipped as null/overlong) becomes a fully masked row.
    """
    rows = batch["input_ids"].shape[0]
    pieces = []
    for idx in torch.tensor_split(torch.arange(rows), count):
        if len(idx) == 0:
            pieces.append(masked_row(batch, family))
            continue
        start, stop = int(idx[0]), int(idx[-1]) + 1
        pieces.append({k: batch[k][start:stop] for k in family.model_inputs})
    return pieces


def to_device(piece: dict[str, torch.Tensor], device, family) -> dict[str, torch.Tensor]:
    """A micro-batch on the device, trimmed there (column slices of a pinned view would be copied unpinned)."""
    return family.trim({k: v.to(device, non_blocking=True) for k, v in piece.items()})


def masked_row(batch: dict[str, torch.Tensor], family) -> dict[str, torch.Tensor]:
    """One row that takes part in forward/backward but contributes no loss and no gradient."""
    piece = {k: batch[k][:1].clone() for k in family.model_inputs}
    piece["labels"].fill_(IGNORE_INDEX)
    return piece


def set_lr(optimizer, lr: float) -> None:
    # The schedule is a pure function of the step (schedule.py), so nothing about it needs checkpointing.
    for group in optimizer.param_groups:
        group["lr"] = lr


class StepOutOfMemory(RuntimeError):
    """Some rank ran out of memory in a forward pass; raised on every rank at the same point."""


class OutOfMemoryInCollective(RuntimeError):
    """This rank ran out of memory where the other ranks may already wait in a collective with it: in a backward
    pass (the gradient reduction), in a ZeRO-3 forward pass (which gathers parameters layer by layer), or inside a
    collective's own buffers (NCCL). The step cannot be redone in place (see Trainer.fit)."""


class LoaderFailed(RuntimeError):
    """Some rank could not prepare its batch (a MemoryError while collating); raised on every rank, before any
    backward: the step is redone on a leaner loader (Trainer.one_step)."""


OOM_ERRORS = (torch.OutOfMemoryError, MemoryError)


def forward(backend: Backend, model, family, piece: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The summed token loss of one micro-batch, or None when this rank ran out of memory doing it."""
    try:
        OOM_FAULT.before_forward(piece["input_ids"].shape[0], backend.rank)
        return family.token_loss_sum(model, piece)
    except OOM_ERRORS:
        return None


def train_step(backend: Backend, model, optimizer, family, batch: dict[str, torch.Tensor] | None, micro_batch: int,
               grad_accum: int, lr: float, max_grad_norm: float, on_oom: Callable[[], int] | None = None,
               stop_asked: bool = False) -> StepResult:
    """One optimizer step over this rank's rows of the global batch, cut into `grad_accum` micro-batches of
    `micro_batch` rows. `batch` is None when this rank's loader failed; `stop_asked`: a signal reached this rank.

    After each forward pass, before its backward, the ranks make ONE small all-reduce (distributed.agree_step)
    that carries everything they must agree on: whether any rank ran out of memory in it (backward is where the
    gradient collectives run, so that must be known before anyone enters one), and with the first micro-batch the
    target tokens of the global step (every loss is scaled by them), a stop request and a failed loader, with the
    last one the summed loss. With gradient accumulation 1, that is one collective per step.

    On an out-of-memory error in a forward pass, `on_oom()` (the memory guard) returns the new, smaller
    micro-batch; the rows not yet processed are cut finer and the SAME step goes on. Rows already through
    backward keep their exact gradients, so the update equals that of a run that used the smaller
    micro-batch from the start. Every rank cuts the same number of pieces, so collectives stay matched.

    Under ZeRO-3 on several ranks a forward pass is itself a collective (each layer's parameters are gathered as
    it runs): a rank that raised inside one, or skipped it, would wait in the agreement while the others wait in a
    gather, until the process group timed out. There the agreement comes before the first forward (tokens, stop,
    loader), an out-of-memory error in a forward ends the run like one in backward (OutOfMemoryInCollective: every
    rank stops within seconds, the next start takes the halved plan), and the loss is summed after the step.
    """
    accelerator = backend.accelerator
    gathers_in_forward = backend.zero_stage == 3 and backend.world_size > 1
    if batch is None and not gathers_in_forward:  # the others learn it at the agreement after their first forward
        distributed.agree_step(backend, loader_failed=True, stop=stop_asked)
        raise LoaderFailed
    pending = [] if batch is None else split_micro_batches(batch, grad_accum, family)
    micro = micro_batch
    local_tokens = float(sum(family.target_tokens(p["labels"]) for p in pending))
    tokens, stop = None, False  # of the global step, once agreed
    if gathers_in_forward:
        agreed = distributed.agree_step(backend, loader_failed=batch is None, tokens=local_tokens, stop=stop_asked)
        if agreed.loader_failed:
            raise LoaderFailed
        tokens, stop = agreed.tokens, agreed.stop
    cells, pad_cells = map(sum, zip(*(family.padding(family.trim(p)) for p in pending)))
    set_lr(optimizer, lr)
    loss_sum = 0.0
    while pending:
        piece = to_device(pending[0], accelerator.device, family)
        last = len(pending) == 1
        # DeepSpeed steps inside backward() on the piece marked as the accumulation boundary.
        set_sync_gradients(accelerator, last)
        sync = contextlib.nullcontext() if last or backend.uses_deepspeed else accelerator.no_sync(model)
        with sync:
            loss = forward(backend, model, family, piece)
            mine = 0.0 if loss is None else float(loss.detach())
            if gathers_in_forward:
                if loss is None:  # the others may be inside this forward's parameter gathers
                    raise OutOfMemoryInCollective(f"out of memory in a ZeRO-3 forward pass with a micro-batch of {micro}")
            else:
                first = tokens is None
                agreed = distributed.agree_step(backend, oom=loss is None, tokens=local_tokens if first else 0.0,
                                                stop=stop_asked if first else False,
                                                loss=loss_sum + mine if last else 0.0)
                if first:
                    tokens, stop = agreed.tokens, agreed.stop
                    if agreed.loader_failed:
                        raise LoaderFailed
                if agreed.oom:
                    del piece, loss
                    if on_oom is None:
                        raise StepOutOfMemory
                    new_micro = on_oom()
                    pending = [sub for old in pending
                               for sub in split_micro_batches(old, max(1, micro // new_micro), family)]
                    micro = new_micro
                    continue
            # The backend divides by its accumulation count, whatever it is now (the guard may change it).
            try:
                OOM_FAULT.before_backward(piece["input_ids"].shape[0], backend.rank)
                accelerator.backward(loss * (accumulation_divisor(backend) * backend.world_size / max(tokens, 1.0)))
            except OOM_ERRORS as exc:
                raise OutOfMemoryInCollective(f"out of memory in backward with a micro-batch of {micro}") from exc
            except RuntimeError as exc:  # NCCL's own buffers: "Cuda failure 'out of memory'", "Failed to CUDA calloc"
                if distributed.classify_collective_error(exc) == "out_of_memory":
                    raise OutOfMemoryInCollective(f"out of memory in a gradient collective with a micro-batch of "
                                                  f"{micro} ({first_line(exc)[:120]})") from exc
                raise
        loss_sum += mine
        pending.pop(0)
    grad_norm = finish_step(backend, model, optimizer, max_grad_norm)
    total_loss = distributed.sum_(backend, [loss_sum])[0] if gathers_in_forward else agreed.loss
    return StepResult(loss=total_loss / max(tokens, 1.0), tokens=int(tokens), grad_norm=grad_norm, lr=lr, stop=stop,
                      cells=cells, pad_cells=pad_cells)


def finish_step(backend: Backend, model, optimizer, max_grad_norm: float) -> float | None:
    """Clip and step on the plain path; DeepSpeed already did both in the last backward."""
    if backend.engine is not None:
        norm = backend.engine.get_global_grad_norm()
        return None if norm is None else float(norm)
    limit = max_grad_norm if max_grad_norm > 0 else math.inf
    norm = backend.accelerator.clip_grad_norm_(model.parameters(), limit)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)
