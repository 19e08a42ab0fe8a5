"""Cutting a rank's step into micro-batches (trainer/step.py)."""

from __future__ import annotations

import torch

from lowmem_train.model import families
from lowmem_train.trainer.step import split_micro_batches, to_device


def batch_of(rows: int, width: int = 12) -> dict[str, torch.Tensor]:
    lengths = torch.arange(rows) % width + 1
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(3, 60, (rows, width)) * mask
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_input_ids": ids.clone()}


def test_micro_batches_are_views_of_the_batch_so_a_pinned_batch_stays_pinned():
    """DataLoader(pin_memory=True) hands over a batch in page-locked memory; indexing it with a tensor would copy
    every micro-batch into pageable memory before its transfer (pin_memory then costs host RAM and buys nothing)."""
    family = families.get("t5")
    batch = batch_of(10)
    pieces = split_micro_batches(batch, 3, family)
    assert [p["input_ids"].shape[0] for p in pieces] == [4, 3, 3]
    for piece in pieces:
        for key, tensor in piece.items():
            assert tensor.untyped_storage().data_ptr() == batch[key].untyped_storage().data_ptr(), key
    assert torch.equal(torch.cat([p["labels"] for p in pieces]), batch["labels"])  # every row once, in order
    moved = to_device(pieces[1], "cpu", family)  # trimmed on the device, to the piece's own longest row
    assert moved["input_ids"].shape[1] == int(pieces[1]["attention_mask"].sum(1).max())
