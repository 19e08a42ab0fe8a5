"""Parquet files as a list of row groups: resolved, checked and indexed from metadata alone.

Nothing here holds table data. `ParquetIndex` is built from footers (a few KB per file) so it is cheap to
copy into DataLoader workers; `read_unit` streams one row group in bounded record batches, which is the only
way rows are ever read (see NOTES: `read_table` on a 1.5 GB file peaks at 2.7-4 GB, this at ~0.2 GB).
"""

from __future__ import annotations

import bisect
import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from lowmem_train.config.schema import ConfigError

log = logging.getLogger(__name__)


class DataError(ConfigError):
    """Bad input data: printed as one line naming the file and column, exit code 2, no traceback."""


@dataclass(frozen=True)
class Unit:
    """One non-empty row group of one file: the unit of reading and of shuffling."""

    file: str
    row_group: int
    num_rows: int


def resolve_files(spec: str, what: str = "--train_file") -> list[str]:
    """A file, a directory (its *.parquet files) or a glob -> sorted list of files, or a DataError."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        if not files:
            raise DataError(f"{what}: folder {spec} holds no *.parquet files")
        return files
    if any(ch in spec for ch in "*?["):
        files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{what}: no file matches {spec}")
        return files
    if not path.exists():
        raise DataError(f"{what}: file {spec} not found")
    return [str(path)]


def open_parquet(file: str) -> pq.ParquetFile:
    # memory_map=False and no pre_buffer: both make pyarrow hold far more than one row group (NOTES).
    try:
        return pq.ParquetFile(file, memory_map=False)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{file}: not a readable parquet file ({reason})") from None


@dataclass(frozen=True)
class ParquetIndex:
    """All non-empty row groups of a data set, in file order, with cumulative row offsets."""

    files: tuple[str, ...]
    units: tuple[Unit, ...]
    columns: tuple[str, ...]
    empty_row_groups: int

    @property
    def num_rows(self) -> int:
        return sum(u.num_rows for u in self.units)

    @classmethod
    def build(cls, spec: str, columns: Sequence[str], what: str = "--train_file") -> "ParquetIndex":
        files = resolve_files(spec, what)
        units: list[Unit] = []
        empty = 0
        for file in files:
            pf = open_parquet(file)
            names = set(pf.schema_arrow.names)
            for column in columns:
                if column not in names:
                    raise DataError(
                        f"{file}: column {column!r} is missing (columns: {', '.join(sorted(names))}); "
                        f"set --data.prompt_column / --data.response_column or fix the file"
                    )
                kind = pf.schema_arrow.field(column).type
                if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_list(kind)
                        or pa.types.is_large_list(kind)):
                    raise DataError(f"{file}: column {column!r} has type {kind}, expected text (or token id lists)")
            for rg in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(rg).num_rows
                if rows == 0:
                    empty += 1  # legal parquet, nothing to read: counted and reported, never an error
                else:
                    units.append(Unit(file, rg, rows))
        if not units:
            raise DataError(f"{what}: {spec} holds no rows ({len(files)} file(s), all empty)")
        if empty:
            log.warning("%s: skipped %d row group(s) with 0 rows", spec, empty)
        return cls(tuple(files), tuple(units), tuple(columns), empty)


def read_unit(unit: Unit, columns: Sequence[str], batch_rows: int, pf: pq.ParquetFile | None = None) -> Iterator[pa.RecordBatch]:
    """Stream one row group as record batches of at most `batch_rows` rows.

    `iter_batches` decodes page by page, so even a file written as one giant row group never sits in
    memory whole. The caller drops each batch before asking for the next.
    """
    pf = pf or open_parquet(unit.file)
    yield from pf.iter_batches(batch_size=batch_rows, row_groups=[unit.row_group], columns=list(columns), use_threads=False)


def iter_rows(index: ParquetIndex, batch_rows: int = 4096) -> Iterator[tuple]:
    """Every row in file order as a tuple of the index's columns (validation, tokenizer training)."""
    for unit in index.units:
        for batch in read_unit(unit, index.columns, batch_rows):
            yield from zip(*(batch.column(i).to_pylist() for i in range(batch.num_columns)))
        release_arrow_memory()


def release_arrow_memory() -> None:
    """Give pyarrow's freed pool memory back to the OS between row groups (NOTES: halves the peak)."""
    pa.default_memory_pool().release_unused()


def locate(cumulative: Sequence[int], position: int) -> int:
    """Index i such that cumulative[i] <= position < cumulative[i + 1]."""
    return bisect.bisect_right(cumulative, position) - 1
