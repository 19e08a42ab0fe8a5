"""LowMemDataset: exactly-once sharding over ranks x workers, deterministic order, resume from a sample count.

Rows carry their own id (prompt = "17"); an id encoder turns each row into input_ids [id], so every batch
says which rows it holds. The expected order is rebuilt here from EpochOrder's blocks, independently of
the reader that streams them.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from lowmem_train.trainer.data import dataset as dataset_module
from lowmem_train.trainer.data.dataset import EpochOrder, LowMemDataset
from lowmem_train.trainer.data.encode import EncodeStats
from lowmem_train.trainer.data.packing import LAYOUT, PACKED, pack, unpack
from lowmem_train.trainer.data.source import ParquetIndex


class IdEncoder:
    """Row "17" -> input_ids [17]: batches show exactly which rows they hold."""

    model_type = "gpt"

    def encode(self, rows):
        return [([int(r[0])], [int(r[0])]) for r in rows]

    def take_stats(self):
        return EncodeStats()


def write_files(root: Path, files: list[list[int]]) -> str:
    """One parquet file per entry, each with row groups of the given sizes; row ids run across files."""
    next_id = 0
    for f, sizes in enumerate(files):
        schema = pa.schema([("prompt", pa.string()), ("response", pa.string())])
        with pq.ParquetWriter(root / f"part{f:02d}.parquet", schema) as writer:
            for size in sizes:
                ids = [str(i) for i in range(next_id, next_id + size)]
                writer.write_table(pa.table({"prompt": ids, "response": ids}, schema=schema), row_group_size=max(size, 1))
                next_id += size
    return str(root)


def reference_order(index: ParquetIndex, seed: int, epoch: int, buffer: int) -> list[int]:
    """Row ids in epoch order, from the block plan alone (all rows in memory: tests only)."""
    ids, offset = {}, 0
    for u, unit in enumerate(index.units):
        ids[u] = list(range(offset, offset + unit.num_rows))
        offset += unit.num_rows
    order = EpochOrder(index, seed, epoch, buffer)
    out = []
    for b, (unit, start, rows) in enumerate(order.blocks):
        block = ids[unit][start:start + rows]
        out.extend(block[i] for i in order.permutation(b))
    return out


def run_epoch(index, global_batch, world, workers, seed=0, buffer=16, remainder="drop", state=None, epoch=0):
    """All batches of all ranks, each rank's workers interleaved as the DataLoader's round robin does."""
    out = []
    for rank in range(world):
        ds = LowMemDataset(index, IdEncoder(), 0, global_batch, rank, world, seed, buffer, remainder)
        ds.load_state_dict(state or {"epoch": epoch, "samples_seen": 0})
        streams = [ds.iter_steps(w, max(workers, 1)) for w in range(max(workers, 1))]
        while streams:
            for s in list(streams):
                batch = next(s, None)
                if batch is None:
                    streams.remove(s)
                else:
                    out.append((rank, batch))
    return out


def ids_of(batches) -> list[int]:
    """Row ids in global order: by step, then rank."""
    ordered = sorted(batches, key=lambda rb: (int(rb[1]["step"]), rb[0]))
    return [int(i) for _, b in ordered for i in b["input_ids"][:, 0]]


row_groups = st.lists(st.integers(1, 40), min_size=1, max_size=6)


@st.composite
def data_sets(draw):
    files = draw(st.lists(row_groups, min_size=1, max_size=3))
    if draw(st.booleans()):  # one big row group among small ones
        files[draw(st.integers(0, len(files) - 1))].append(draw(st.integers(150, 400)))
    if draw(st.booleans()):  # an empty row group is skipped, not an error
        files[0].insert(0, 0)
    return files


HYPO = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYPO
@given(files=data_sets(), world=st.integers(1, 4), per_rank=st.integers(1, 6), workers=st.integers(0, 3),
       buffer=st.integers(1, 64), remainder=st.sampled_from(["drop", "pad"]), seed=st.integers(0, 2**16))
def test_every_sample_of_an_epoch_is_seen_exactly_once(files, world, per_rank, workers, buffer, remainder, seed):
    with tempfile.TemporaryDirectory() as tmp:
        index = ParquetIndex.build(write_files(Path(tmp), files), ("prompt", "response"))
        g, n = world * per_rank, index.num_rows
        order = reference_order(index, seed, 0, buffer)
        assert sorted(order) == list(range(n))  # the plan is a permutation of all rows
        batches = run_epoch(index, g, world, workers, seed, buffer, remainder)
        ds = LowMemDataset(index, IdEncoder(), 0, g, 0, world, seed, buffer, remainder)
        steps = ds.steps_per_epoch()
        # every rank makes the same number of steps, steps arrive in order, each row is the order's row
        for rank in range(world):
            assert [int(b["step"]) for r, b in batches if r == rank] == list(range(steps))
        for rank, b in batches:
            assert [int(i) for i in b["input_ids"][:, 0]] == [order[p] for p in b["positions"].tolist()]
        seen = Counter(ids_of(batches))
        if remainder == "drop":
            assert steps == n // g and ds.dropped_per_epoch() == n - steps * g
            assert seen == Counter(order[: steps * g])
        else:
            assert steps == math.ceil(n / g) and ds.dropped_per_epoch() == n - steps * g <= 0
            repeats = steps * g - n
            assert set(seen) == set(range(n)) and sum(seen.values()) == n + repeats
            assert seen == Counter(order) + Counter((order * (repeats // n + 1))[:repeats])


@HYPO
@given(files=data_sets(), seed=st.integers(0, 2**16), buffer=st.integers(1, 64))
def test_order_depends_on_seed_and_epoch_only(files, seed, buffer):
    with tempfile.TemporaryDirectory() as tmp:
        index = ParquetIndex.build(write_files(Path(tmp), files), ("prompt", "response"))
        n = index.num_rows
        first = ids_of(run_epoch(index, 4, 1, 0, seed, buffer, "pad"))[:n]
        assert first == ids_of(run_epoch(index, 4, 2, 2, seed, buffer, "pad"))[:n]  # nor ranks nor workers matter
        assert first == reference_order(index, seed, 0, buffer)
        if n >= 8 and buffer >= 8:
            assert first != ids_of(run_epoch(index, 4, 1, 0, seed, buffer, "pad", epoch=1))[:n]


@HYPO
@given(files=data_sets(), before=st.tuples(st.integers(1, 4), st.integers(0, 3)),
       after=st.tuples(st.integers(1, 4), st.integers(0, 3)), per_rank=st.integers(1, 4),
       batch_change=st.booleans(), cut=st.floats(0, 1), buffer=st.integers(1, 64), remainder=st.sampled_from(["drop", "pad"]))
def test_resume_continues_with_exactly_the_unseen_samples(files, before, after, per_rank, batch_change, cut, buffer,
                                                         remainder):
    """Save at any step under one (world, workers), resume under another; the micro-batch is the trainer's
    business (each item is a whole rank-step), a different global batch rounds the position down."""
    (world_a, workers_a), (world_b, workers_b) = before, after
    g_a = math.lcm(world_a, world_b) * per_rank  # divisible by both world sizes
    g_b = g_a * 2 if batch_change else g_a
    with tempfile.TemporaryDirectory() as tmp:
        index = ParquetIndex.build(write_files(Path(tmp), files), ("prompt", "response"))
        full_a = run_epoch(index, g_a, world_a, workers_a, 5, buffer, remainder)
        steps_a = max(int(b["step"]) for _, b in full_a) + 1 if full_a else 0
        saved = int(cut * steps_a) * g_a  # samples_seen at the checkpoint
        seen = [p for _, b in full_a if int(b["step"]) * g_a < saved for p in b["positions"].tolist()]
        resumed_at = saved // g_b * g_b  # what the trainer does when the global batch changed
        rest = run_epoch(index, g_b, world_b, workers_b, 5, buffer, remainder, {"epoch": 0, "samples_seen": resumed_at})
        later = [p for _, b in rest for p in b["positions"].tolist()]
        steps_b = LowMemDataset(index, IdEncoder(), 0, g_b, 0, world_b, 5, buffer, remainder).steps_per_epoch()
        assert all(int(b["step"]) * g_b >= resumed_at for _, b in rest)
        n = index.num_rows
        expected_after = [p % n for p in range(resumed_at, steps_b * g_b)]
        assert sorted(later) == sorted(expected_after)
        if not batch_change:  # together: the epoch, each position once (padding's repeats included)
            assert sorted(seen + later) == sorted(p % n for p in range(steps_b * g_b))


class DigitsEncoder(IdEncoder):
    """Row "17" -> input_ids [17, 1]: as many tokens as digits, the first one the row's id."""

    def encode(self, rows):
        return [([int(r[0])] + [1] * (len(r[0]) - 1),) * 2 for r in rows]


def test_grouping_by_length_sorts_each_step_and_changes_nothing_else(tmp_path):
    """Row lengths vary (ids of 1 to 3 digits): a grouped step holds exactly the rows of the plain step, sorted
    by length, so micro-batches cut from it are nearly uniform; order, sharding and positions are untouched."""
    index = ParquetIndex.build(write_files(tmp_path, [[700, 300]]), ("prompt", "response"))
    unsorted = 0
    for rank in range(2):
        plain = LowMemDataset(index, DigitsEncoder(), 0, 32, rank, 2, 3, 256, "drop")
        grouped = LowMemDataset(index, DigitsEncoder(), 0, 32, rank, 2, 3, 256, "drop", group_by_length=True)
        for a, b in zip(plain.iter_steps(), grouped.iter_steps(), strict=True):
            ids_a, ids_b = [int(i) for i in a["input_ids"][:, 0]], [int(i) for i in b["input_ids"][:, 0]]
            assert sorted(ids_a) == sorted(ids_b) and torch.equal(a["positions"], b["positions"])
            assert int(a["step"]) == int(b["step"])
            digits = [len(str(i)) for i in ids_b]
            assert digits == sorted(digits)
            unsorted += [len(str(i)) for i in ids_a] != digits
    assert unsorted > 10  # plain steps mix lengths in random order: the test saw grouping do something


def test_real_dataloader_workers_match_the_simulated_round_robin(tmp_path):
    index = ParquetIndex.build(write_files(tmp_path, [[30, 7, 64], [5]]), ("prompt", "response"))
    ds = LowMemDataset(index, IdEncoder(), 0, 8, 1, 2, 3, 16, "pad")
    packed = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert all(set(b) == {"step", "epoch", PACKED, LAYOUT} for b in packed)  # one tensor per batch crosses over
    real = [unpack(b) for b in packed]
    simulated = [b for rank, b in run_epoch(index, 8, 2, 2, 3, 16, "pad") if rank == 1]
    assert [int(b["step"]) for b in real] == list(range(ds.steps_per_epoch()))
    assert len(real) == len(simulated)
    for a, b in zip(real, simulated):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["positions"], b["positions"])


def test_nothing_is_opened_or_cached_before_iteration(tmp_path, monkeypatch):
    """The dataset object travels into forked workers: it must hold the index (metadata), nothing read."""
    index = ParquetIndex.build(write_files(tmp_path, [[50, 50]]), ("prompt", "response"))
    opened = []
    monkeypatch.setattr(dataset_module, "open_parquet", lambda f: opened.append(f) or pq.ParquetFile(f))
    ds = LowMemDataset(index, IdEncoder(), 0, 4, 0, 1, 0, 16)
    ds.load_state_dict({"epoch": 1, "samples_seen": 40})
    ds.steps_per_epoch(), ds.dropped_per_epoch(), ds.first_step()
    assert opened == [] and set(vars(ds)) == {"index", "encoder", "pad_id", "global_batch", "rank", "world_size",
                                              "seed", "shuffle_buffer", "remainder", "group_by_length", "position"}
    next(iter(ds))
    assert opened and set(vars(ds)) == {"index", "encoder", "pad_id", "global_batch", "rank", "world_size",
                                        "seed", "shuffle_buffer", "remainder", "group_by_length", "position"}


def test_resume_decodes_at_most_one_row_group_not_the_epoch(tmp_path, monkeypatch):
    """O(1) resume: the first batch after a resume deep in the epoch reads one row group, not all before it."""
    index = ParquetIndex.build(write_files(tmp_path, [[100] * 40]), ("prompt", "response"))
    decoded = []
    real_read_unit = dataset_module.read_unit

    def counting_read_unit(*args, **kwargs):
        for batch in real_read_unit(*args, **kwargs):
            decoded.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(dataset_module, "read_unit", counting_read_unit)
    ds = LowMemDataset(index, IdEncoder(), 0, 8, 0, 1, 0, 32)
    ds.load_state_dict({"epoch": 0, "samples_seen": 3000})
    batch = next(iter(ds))
    assert int(batch["step"]) == 375 and sum(decoded) <= 100


def test_bad_state_and_arguments_are_refused(tmp_path):
    index = ParquetIndex.build(write_files(tmp_path, [[10]]), ("prompt", "response"))
    ds = LowMemDataset(index, IdEncoder(), 0, 4, 0, 1, 0, 16)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        ds.load_state_dict({"epoch": 0, "samples_seen": 6})
    with pytest.raises(ValueError, match="divisible"):
        LowMemDataset(index, IdEncoder(), 0, 6, 0, 4, 0, 16)
    with pytest.raises(ValueError, match="remainder"):
        LowMemDataset(index, IdEncoder(), 0, 4, 0, 1, 0, 16, "wrap")


@given(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.lists(st.integers(0, 5), min_size=0, max_size=3),
                       min_size=1))
def test_pack_then_unpack_gives_the_batch_back(shapes):
    batch = {name: torch.randint(-100, 100, tuple(shape)) for name, shape in shapes.items()}
    batch["step"] = 7
    back = unpack(pack(batch))
    assert back.keys() == batch.keys() and back["step"] == 7
    for name in shapes:
        assert back[name].shape == batch[name].shape and torch.equal(back[name], batch[name])
