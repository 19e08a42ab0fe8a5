"""torchtitan's data-resume test, on real rows, the real Encoder and real DataLoader workers: read N batches,
save the state, build a new dataset and loader, load the state, and get the batches an uninterrupted loader
gives next, tensor for tensor."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lowmem_train.model.tokenizer import load_tokenizer
from lowmem_train.trainer.data.dataset import LowMemDataset
from lowmem_train.trainer.data.encode import Encoder
from lowmem_train.trainer.data.packing import unpack
from lowmem_train.trainer.data.source import ParquetIndex

GLOBAL_BATCH = 32


def make_dataset(task, model_type="t5", rank=0, world=1):
    tok = load_tokenizer(task["tokenizer"])
    index = ParquetIndex.build(str(task["train"]), ("prompt", "response"))  # 8 row groups of 512 rows
    return LowMemDataset(index, Encoder(tok, model_type, 32), tok.pad_token_id, GLOBAL_BATCH, rank, world, seed=7,
                         shuffle_buffer=200, remainder="drop")


def loader(ds, workers):
    """Batches as the trainer sees them (workers hand each over packed into one tensor: data/packing.py)."""
    return map(unpack, DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


@pytest.mark.parametrize("model_type, workers_before, workers_after", [("t5", 2, 2), ("gpt", 0, 2), ("t5", 2, 0)])
def test_resumed_loader_gives_the_same_next_batches(tiny_task, model_type, workers_before, workers_after):
    n, m = 40, 12
    uninterrupted = loader(make_dataset(tiny_task, model_type), workers_before)
    reference = [b for _, b in zip(range(n + m), uninterrupted)]

    first = make_dataset(tiny_task, model_type)
    consumed = [b for _, b in zip(range(n), loader(first, workers_before))]
    for a, b in zip(consumed, reference):
        assert_same(a, b)
    state = {"epoch": 0, "samples_seen": (int(consumed[-1]["step"]) + 1) * GLOBAL_BATCH}  # what the trainer saves

    resumed = make_dataset(tiny_task, model_type)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state and resumed.first_step() == n
    following = [b for _, b in zip(range(m), loader(resumed, workers_after))]
    assert len(following) == m
    for a, b in zip(following, reference[n:]):
        assert_same(a, b)


def test_two_ranks_resume_into_one_rank_sees_the_same_rows(tiny_task):
    """World size 2 -> 1 at the same position: rank 0 + rank 1 of a step are the single rank's step."""
    two = [make_dataset(tiny_task, rank=r, world=2) for r in range(2)]
    one = make_dataset(tiny_task)
    for ds in (*two, one):
        ds.load_state_dict({"epoch": 0, "samples_seen": 50 * GLOBAL_BATCH})
    halves = [next(iter(ds)) for ds in two]
    whole = next(iter(one))
    assert torch.equal(torch.cat([h["positions"] for h in halves]), whole["positions"])
    assert int(whole["step"]) == 50
