"""LowMemDataset: one deterministic global order per epoch, streamed row group by row group.

The order of epoch e is fixed by (seed, e) alone: row groups are permuted, cut into blocks of at most
`shuffle_buffer` rows, and each block is permuted. Global step k is positions [k*G, (k+1)*G) of that
order (G = global batch); rank r takes the r-th of W equal slices; DataLoader worker w of n makes the
steps k with (k - first) % n == w, in the order the DataLoader's round robin asks for them. Hence:

* every sample of an epoch goes to exactly one (rank, worker), and every rank makes the same number of steps;
* the position is one number, `samples_seen` (= k*G), meaningful whatever the world size, worker count or
  micro-batch was when it was saved; resuming opens the row group holding position k*G (a metadata lookup)
  and skips at most one row group's rows, never replays batches;
* memory is one block of decoded rows and one record batch per reader, whatever the file size.

Each item is a whole per-rank step (G/W samples); the trainer cuts it into micro-batches, so a change of
micro-batch (memory guard, OOM retry) never touches the loader and an OOM retry re-uses the very same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lowmem_train.trainer.data.encode import Encoder, collate
from lowmem_train.trainer.data.source import ParquetIndex, locate, open_parquet, read_unit, release_arrow_memory


@dataclass
class DataPosition:
    """Where the next unseen sample is: the one piece of data state a checkpoint needs."""

    epoch: int = 0
    samples_seen: int = 0  # global samples consumed in this epoch (a multiple of the global batch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.samples_seen = int(state["epoch"]), int(state["samples_seen"])


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
    """Holds one decoded, permuted block; moves forward through a row group by streaming it."""

    def __init__(self, order: EpochOrder, block_rows: int):
        self.order, self.block_rows = order, block_rows
        self.files: dict[str, object] = {}
        self.block = -1
        self.rows: list[tuple] = []
        self._stream: Iterator[tuple] | None = None
        self._stream_at: tuple[int, int] = (-1, -1)  # (unit, next row) the stream would yield

    def row(self, position: int) -> tuple:
        block = self.order.block_of(position)
        if block != self.block:
            self._load(block)
        return self.rows[position - self.order.block_starts[block]]

    def _load(self, block: int) -> None:
        unit, start, length = self.order.blocks[block]
        if self._stream_at != (unit, start):  # not the next block of the open row group: (re)open it
            release_arrow_memory()
            self._stream, self._stream_at = self._rows_of(unit), (unit, 0)
        to_skip = start - self._stream_at[1]
        for _ in range(to_skip):  # at most one row group, only after a seek (resume, padding wrap)
            next(self._stream)
        rows = [next(self._stream) for _ in range(length)]
        self._stream_at = (unit, start + length)
        perm = self.order.permutation(block)
        self.rows = [rows[i] for i in perm]
        self.block = block

    def _rows_of(self, unit_idx: int) -> Iterator[tuple]:
        unit = self.order.index.units[unit_idx]
        pf = self.files.get(unit.file) or self.files.setdefault(unit.file, open_parquet(unit.file))
        for batch in read_unit(unit, self.order.index.columns, self.block_rows, pf):
            yield from zip(*(batch.column(i).to_pylist() for i in range(batch.num_columns)))


class LowMemDataset(IterableDataset):
    """Yields this rank's share of each global step of one epoch, from `position` on."""

    def __init__(self, index: ParquetIndex, encoder: Encoder, pad_id: int, global_batch: int, rank: int,
                 world_size: int, seed: int, shuffle_buffer: int, remainder: str = "drop"):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.index, self.encoder, self.pad_id = index, encoder, pad_id
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.seed, self.shuffle_buffer, self.remainder = seed, shuffle_buffer, remainder
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
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = EpochOrder(self.index, self.seed, self.position.epoch, self.shuffle_buffer)
        reader = BlockReader(order, self.shuffle_buffer)
        for step in range(self.first_step() + worker, self.steps_per_epoch(), workers):
            positions = self.rank_positions(step)
            pairs = self.encoder.encode([reader.row(p) for p in positions])
            batch = collate(pairs, self.pad_id, self.encoder.model_type)
            batch["positions"] = torch.tensor(positions, dtype=torch.long)
            batch["step"] = torch.tensor(step)
            batch["epoch"] = torch.tensor(self.position.epoch)
            batch["stats"] = torch.tensor(list(self.encoder.take_stats().as_dict().values()))
            yield batch
