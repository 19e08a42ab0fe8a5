"""LowMemDataset: one deterministic global order per epoch, streamed row group by row group.

The order of epoch e is fixed by (seed, e) alone: row groups are permuted, cut into blocks of at most
`shuffle_buffer` rows, and each block is permuted. Global step k is positions [k*G, (k+1)*G) of that
order (G = global batch); rank r takes the r-th of W equal slices; DataLoader worker w of n makes the
steps k with (k - first) % n == w, in the order the DataLoader's round robin asks for them. Hence:

* every sample of an epoch goes to exactly one (rank, worker), and every rank makes the same number of steps;
* the position is one number, `samples_seen` (= k*G), meaningful whatever the world size, worker count or
  micro-batch was when it was saved; resuming opens the row group holding position k*G (a metadata lookup)
  and skips at most one row group's rows (decoded by Arrow, not turned into Python), never replays batches;
* memory is one block of Arrow rows and one record batch per reader, whatever the file or row group size;
* with `group_by_length`, the rows of a rank-step are sorted by token length before they are padded: the
  micro-batches the trainer cuts from it then hold rows of similar length and carry little padding, and the
  optimizer step is the same (its loss is a sum over the step's tokens, in whatever order they come);
* nothing is read or opened before `__iter__`, i.e. before the DataLoader forks its workers. Each worker
  decodes every block it touches but converts only its own rows (decoding is the cheap part).

Each item is a whole per-rank step (G/W samples); the trainer cuts it into micro-batches, so a change of
micro-batch (memory guard, OOM retry) never touches the loader and an OOM retry re-uses the very same rows.
An item: input_ids, attention_mask, labels (+ decoder_input_ids for t5), positions (tensors), stats (a tensor
of EncodeStats' fields), step and epoch (ints).
"""

from __future__ import annotations

import gc
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lowmem_train.trainer.data.encode import Encoder, collate
from lowmem_train.trainer.data.packing import pack
from lowmem_train.trainer.data.source import (DataError, ParquetIndex, batch_rows, locate, open_parquet, read_unit,
                                               release_arrow_memory)
from lowmem_train.trainer.faults import COLLATE_FAULT
from lowmem_train.trainer.state import DataPosition

READ_ROWS = 4096  # rows per record batch read from parquet


class EpochOrder:
    """The global sample order of one epoch as blocks; position -> (unit, row) without reading any data."""

    def __init__(self, index: ParquetIndex, seed: int, epoch: int, block_rows: int):
        self.index, self.seed, self.epoch = index, seed, epoch
        unit_order = np.random.default_rng([seed, epoch, 0]).permutation(len(index.units))
        blocks = []  # (unit index, first row in the unit, rows)
        for u in unit_order:
            rows = index.units[u].num_rows
            blocks.extend((int(u), start, min(block_rows, rows - start)) for start in range(0, rows, block_rows))
        self.blocks = blocks
        self.block_starts = np.concatenate([[0], np.cumsum([b[2] for b in blocks])]).tolist()
        self.num_rows = self.block_starts[-1]

    def block_of(self, position: int) -> int:
        return locate(self.block_starts, position)

    def permutation(self, block: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, 1, block]).permutation(self.blocks[block][2])


class BlockReader:
    """Holds one permuted block as Arrow data, and a stream of record batches inside one row group.

    The next block of the same row group continues the stream. Any other move (the first read, a resume,
    a worker passing over blocks that belong to other workers, padding wrapping to the epoch's start) opens
    the row group again and skips forward at the Arrow level: at most one row group is decoded, and only
    the rows this reader yields become Python objects. Memory: one block plus one record batch.
    """

    def __init__(self, order: EpochOrder):
        self.order = order
        self.file, self.pf = None, None  # the one open file, opened here, i.e. inside the worker
        self.block, self.table, self.perm = -1, None, None
        self.stream, self.pending, self.at = None, None, (-1, 0)  # at: (unit, next row of the stream)

    def rows(self, positions: Sequence[int]) -> list[tuple]:
        """The rows at these global positions, in this order (a step may span two blocks)."""
        out, starts, i = [], self.order.block_starts, 0
        while i < len(positions):
            block = self.order.block_of(positions[i])
            j = i + 1
            while j < len(positions) and starts[block] <= positions[j] < starts[block + 1]:
                j += 1
            self._load(block)
            local = self.perm[np.asarray(positions[i:j]) - starts[block]]
            out.extend(batch_rows(self.table.take(local)))
            i = j
        return out

    def _load(self, block: int) -> None:
        if block == self.block:
            return
        unit, start, length = self.order.blocks[block]
        if self.at[0] != unit or self.at[1] > start:
            self._open(unit)
        self._read(start - self.at[1])  # skipped rows are decoded, never converted
        self.table = pa.Table.from_batches(self._read(length)).combine_chunks()  # take() on chunks copies them all
        self.perm, self.block = self.order.permutation(block), block

    def _open(self, unit_idx: int) -> None:
        self.block, self.table, self.stream, self.pending = -1, None, None, None
        release_arrow_memory()
        unit = self.order.index.units[unit_idx]
        if unit.file != self.file:
            self.file, self.pf = unit.file, open_parquet(unit.file)
        self.stream = read_unit(unit, self.order.index.columns, READ_ROWS, self.pf)
        self.at = (unit_idx, 0)

    def _read(self, n: int) -> list[pa.RecordBatch]:
        out = []
        self.at = (self.at[0], self.at[1] + n)
        while n > 0:
            if self.pending is None or self.pending.num_rows == 0:
                self.pending = next(self.stream, None)
                if self.pending is None:  # the footer promised more rows than the row group holds
                    unit = self.order.index.units[self.at[0]]
                    raise DataError(f"{unit.file}: row group {unit.row_group} holds fewer rows than its metadata says")
            piece = self.pending.slice(0, n)
            self.pending = self.pending.slice(piece.num_rows)
            out.append(piece)
            n -= piece.num_rows
        return out


class LowMemDataset(IterableDataset):
    """Yields this rank's share of each global step of one epoch, from `position` on."""

    def __init__(self, index: ParquetIndex, encoder: Encoder, pad_id: int, global_batch: int, rank: int,
                 world_size: int, seed: int, shuffle_buffer: int, remainder: str = "drop",
                 group_by_length: bool = False):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if remainder not in ("drop", "pad"):
            raise ValueError(f"remainder must be 'drop' or 'pad', not {remainder!r}")
        self.index, self.encoder, self.pad_id = index, encoder, pad_id
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.seed, self.shuffle_buffer, self.remainder = seed, shuffle_buffer, remainder
        self.group_by_length = group_by_length
        self.position = DataPosition()

    # ---- sizes -------------------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        n, g = self.index.num_rows, self.global_batch
        return n // g if self.remainder == "drop" else -(-n // g)

    def dropped_per_epoch(self) -> int:
        """Rows of an epoch no step uses (drop) or, negative, rows repeated to fill the last step (pad)."""
        return self.index.num_rows - self.steps_per_epoch() * self.global_batch

    # ---- position ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position.load_state_dict(state)
        if self.position.samples_seen % self.global_batch:
            raise ValueError(
                f"data position {self.position.samples_seen} is not a multiple of the global batch {self.global_batch}"
            )

    def first_step(self) -> int:
        return self.position.samples_seen // self.global_batch

    # ---- iteration -----------------------------------------------------------------------------------------
    def rank_positions(self, step: int) -> list[int]:
        """Global positions of this rank's slice of `step` (wrapped into the epoch when padding)."""
        share = self.global_batch // self.world_size
        lo = step * self.global_batch + self.rank * share
        n = self.index.num_rows
        return [p % n for p in range(lo, lo + share)]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()  # inside a DataLoader worker: its id; in the main process: None
        if info is None:
            return self.iter_steps()
        # A forked worker shares the parent's pages until it writes to them, and every garbage collection
        # writes to every object it visits: freezing the inherited objects keeps them shared (~40 MB a worker).
        gc.freeze()
        return map(pack, self.iter_steps(info.id, info.num_workers))  # one tensor through the process boundary

    def iter_steps(self, worker: int = 0, workers: int = 1) -> Iterator[dict]:
        """The batches of worker `worker` of `workers`: steps first+worker, first+worker+workers, ..."""
        reader = BlockReader(EpochOrder(self.index, self.seed, self.position.epoch, self.shuffle_buffer))
        for step in range(self.first_step() + worker, self.steps_per_epoch(), workers):
            positions = self.rank_positions(step)
            COLLATE_FAULT.before_collate(step, self.rank)
            pairs = self.encoder.encode(reader.rows(positions))
            if self.group_by_length:  # stable: rows of one length keep their shuffled order
                pairs = sorted(pairs, key=lambda pair: len(pair[0]) + len(pair[1]))
            batch = collate(pairs, self.pad_id, self.encoder.model_type)
            batch["positions"] = torch.tensor(positions, dtype=torch.long)
            batch["step"], batch["epoch"] = step, self.position.epoch  # ints: each tensor costs a worker IPC
            batch["stats"] = torch.tensor(list(self.encoder.take_stats().as_dict().values()))
            yield batch
