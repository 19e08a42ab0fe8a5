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
import torch.nn.functional as F

from lowmem_train.trainer.backend import Backend, accumulation_divisor, all_reduce, deepspeed_engine
from lowmem_train.trainer.data.encode import IGNORE_INDEX
from lowmem_train.trainer.faults import OOM_FAULT

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "decoder_input_ids")


@dataclass
class StepResult:
    loss: float  # mean token loss of the global step (all ranks)
    tokens: int  # target tokens of the global step (all ranks)
    grad_norm: float | None
    lr: float


def split_micro_batches(batch: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """`count` micro-batches from one rank-step batch, each trimmed to its own longest row.

    Exactly `count` pieces, always: every rank must run the same number of backward passes or the gradient
    collectives hang. A piece with no rows (rows skipped as null/overlong) becomes a fully masked row.
    """
    rows = batch["input_ids"].shape[0]
    pieces = []
    for idx in torch.tensor_split(torch.arange(rows), count):
        if len(idx) == 0:
            pieces.append(masked_row(batch))
            continue
        piece = {k: batch[k][idx] for k in MODEL_INPUTS if k in batch}
        pieces.append(trim(piece))
    return pieces


def masked_row(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One row that takes part in forward/backward but contributes no loss and no gradient."""
    piece = trim({k: batch[k][:1].clone() for k in MODEL_INPUTS if k in batch})
    piece["labels"].fill_(IGNORE_INDEX)
    return piece


def trim(piece: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop padding columns that no row of this micro-batch uses (batches are padded to the step's longest row)."""
    width = int(piece["attention_mask"].sum(1).max())
    out = dict(piece)
    out["input_ids"], out["attention_mask"] = piece["input_ids"][:, :width], piece["attention_mask"][:, :width]
    if "decoder_input_ids" in piece:  # t5: labels have their own length
        target = int((piece["labels"] != IGNORE_INDEX).sum(1).max().clamp(min=1))
        out["labels"], out["decoder_input_ids"] = piece["labels"][:, :target], piece["decoder_input_ids"][:, :target]
    else:
        out["labels"] = piece["labels"][:, :width]
    return out


def token_loss_sum(model: torch.nn.Module, piece: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of cross-entropy over target tokens (labels != -100) of one micro-batch."""
    labels = piece["labels"]
    if "decoder_input_ids" in piece:
        logits = model(input_ids=piece["input_ids"], attention_mask=piece["attention_mask"],
                       decoder_input_ids=piece["decoder_input_ids"], use_cache=False).logits
    else:  # causal: position t predicts token t+1
        logits = model(input_ids=piece["input_ids"], attention_mask=piece["attention_mask"], use_cache=False).logits
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def set_lr(optimizer, lr: float) -> None:
    # The schedule is a pure function of the step (schedule.py), so nothing about it needs checkpointing.
    for group in optimizer.param_groups:
        group["lr"] = lr


class StepOutOfMemory(RuntimeError):
    """Some rank ran out of memory in a forward pass; raised on every rank at the same point."""


OOM_ERRORS = (torch.OutOfMemoryError, MemoryError)


def forward_agreed(backend: Backend, model, piece: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward one micro-batch, then agree with all ranks that nobody ran out of memory.

    The agreement sits between forward and backward on purpose: backward is where gradient collectives
    run, so a rank that failed its forward must be known to all before anyone enters backward.
    """
    try:
        OOM_FAULT.before_forward(piece["input_ids"].shape[0], backend.rank)
        loss, failed = token_loss_sum(model, piece), 0.0
    except OOM_ERRORS:
        loss, failed = None, 1.0
    if all_reduce(backend, [failed], "max")[0] if backend.world_size > 1 else failed:
        raise StepOutOfMemory
    return loss


def train_step(backend: Backend, model, optimizer, batch: dict[str, torch.Tensor], grad_accum: int, lr: float,
               max_grad_norm: float, on_oom: Callable[[], int] | None = None) -> StepResult:
    """One optimizer step over this rank's rows of the global batch.

    On an out-of-memory error in a forward pass, `on_oom()` (the memory guard) returns the new, smaller
    micro-batch; the rows not yet processed are cut finer and the SAME step goes on. Rows already through
    backward keep their exact gradients, so the update equals that of a run that used the smaller
    micro-batch from the start. Every rank cuts the same number of pieces, so collectives stay matched.
    """
    accelerator = backend.accelerator
    pending = split_micro_batches(batch, grad_accum)
    micro = -(-batch["input_ids"].shape[0] // grad_accum)
    tokens = all_reduce(backend, [sum(int((p["labels"] != IGNORE_INDEX).sum()) for p in pending)])[0]
    set_lr(optimizer, lr)
    loss_sum = 0.0
    while pending:
        piece = {k: v.to(accelerator.device, non_blocking=True) for k, v in pending[0].items()}
        last = len(pending) == 1
        # DeepSpeed steps inside backward() on the piece marked as the accumulation boundary.
        accelerator.gradient_state._set_sync_gradients(last)
        sync = contextlib.nullcontext() if last or backend.uses_deepspeed else accelerator.no_sync(model)
        with sync:
            try:
                loss = forward_agreed(backend, model, piece)
            except StepOutOfMemory:
                del piece
                if on_oom is None:
                    raise
                new_micro = on_oom()
                pending = [sub for old in pending for sub in split_micro_batches(old, max(1, micro // new_micro))]
                micro = new_micro
                continue
            # The backend divides by its accumulation count, whatever it is now (the guard may change it).
            accelerator.backward(loss * (accumulation_divisor(backend) * backend.world_size / max(tokens, 1.0)))
        loss_sum += float(loss.detach())
        pending.pop(0)
    grad_norm = finish_step(backend, model, optimizer, max_grad_norm)
    return StepResult(loss=all_reduce(backend, [loss_sum])[0] / max(tokens, 1.0), tokens=int(tokens), grad_norm=grad_norm, lr=lr)


def finish_step(backend: Backend, model, optimizer, max_grad_norm: float) -> float | None:
    """Clip and step on the plain path; DeepSpeed already did both in the last backward."""
    engine = deepspeed_engine(backend)
    if engine is not None:
        norm = engine.get_global_grad_norm()
        return None if norm is None else float(norm)
    limit = max_grad_norm if max_grad_norm > 0 else math.inf
    norm = backend.accelerator.clip_grad_norm_(model.parameters(), limit)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)
