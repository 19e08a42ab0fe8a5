"""The streaming pieces of `prepare` (prepare.py): read raw rows, split them, write row groups.

Every piece holds at most one input batch (8192 rows) or one output row group; nothing grows with the input.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from lowmem_train.config.errors import first_line
from lowmem_train.model import families
from lowmem_train.trainer.compat import has_indices_mapping
from lowmem_train.trainer.data.encode import vocab_fingerprint
from lowmem_train.trainer.data.source import METADATA_KEY, DataError, column_kind, open_parquet, resolve_files

BATCH_ROWS = 8192
NAMES = ("prompt", "response")
TOKENIZER_ROWS = 2_000_000  # rows a tokenizer is trained on at most (as `train` does)
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv"}
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")


def is_saved_dataset(spec: str) -> bool:
    """A folder written by Hugging Face datasets' save_to_disk (a Dataset, or a DatasetDict of splits)."""
    path = Path(spec)
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def input_format(file: str) -> str:
    if is_saved_dataset(file):
        return "datasets"
    path = Path(file)
    suffix = path.with_suffix("").suffix if path.suffix in COMPRESSED else path.suffix
    if suffix.lower() not in FORMATS:
        raise DataError(f"--input: {file}: unknown format {suffix or '(no suffix)'}; use .parquet, .jsonl or .csv")
    return FORMATS[suffix.lower()]


class Input:
    """The raw rows as a stream (restartable: one pass per call) of (prompt, response) string batches."""

    def __init__(self, spec: str, prompt_column: str, response_column: str):
        self.columns = (prompt_column, response_column)
        files = [spec] if is_saved_dataset(spec) else resolve_files(spec, "--input")
        self.files = [(f, input_format(f)) for f in files]
        for file, fmt in self.files:
            names = self.column_names(file, fmt)
            for column in self.columns:
                if column not in names:
                    raise DataError(f"{file}: column {column!r} is missing (columns: {', '.join(sorted(names))}); "
                                    f"set --prompt_column / --response_column")

    def column_names(self, file: str, fmt: str) -> list[str]:
        try:
            if fmt == "datasets":
                return saved_dataset(file).column_names
            if fmt == "parquet":
                schema = open_parquet(file).schema_arrow
                for column in self.columns:
                    if column in schema.names and column_kind(file, column, schema.field(column).type) != "text":
                        raise DataError(f"{file}: column {column!r} holds token ids already; `prepare` wants text")
                return schema.names
            if fmt == "csv":
                return pcsv.open_csv(pa.input_stream(file, compression="detect")).schema.names
            with pa.input_stream(file, compression="detect") as stream:
                head = b""
                while b"\n" not in head and (chunk := stream.read(1 << 16)):
                    head += chunk
            line = next((ln for ln in head.splitlines() if ln.strip()), b"")
            if not line:
                raise DataError(f"{file}: no rows")
            return list(json.loads(line))
        except (pa.ArrowException, OSError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{file}: not readable as {fmt} ({first_line(exc)})") from None

    def batches(self) -> Iterator[pa.RecordBatch]:
        for file, fmt in self.files:
            try:
                for batch in self.read(file, fmt):
                    yield pa.RecordBatch.from_arrays([batch.column(c).cast(pa.string()) for c in self.columns], names=NAMES)
            except pa.ArrowException as exc:
                raise DataError(f"{file}: {first_line(exc)}") from None

    def read(self, file: str, fmt: str) -> Iterator[pa.RecordBatch]:
        if fmt == "datasets":  # save_to_disk's Arrow files, read as streams a batch at a time (not mapped)
            return _saved_batches(file, self.columns)
        if fmt == "parquet":  # buffered, one page at a time: a giant row group comes out as batches
            return open_parquet(file).iter_batches(batch_size=BATCH_ROWS, columns=list(self.columns), use_threads=False)
        stream = pa.input_stream(file, compression="detect")
        if fmt == "csv":
            return pcsv.open_csv(stream, read_options=pcsv.ReadOptions(use_threads=False, block_size=1 << 20),
                                 convert_options=pcsv.ConvertOptions(include_columns=list(self.columns),
                                                                     column_types={c: pa.string() for c in self.columns}))
        schema = pa.schema([(c, pa.string()) for c in self.columns])
        return pjson.open_json(stream, read_options=pjson.ReadOptions(use_threads=False, block_size=1 << 20),
                               parse_options=pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))


def _saved_batches(folder: str, columns: tuple[str, str]) -> Iterator[pa.RecordBatch]:
    """The saved Arrow files read as streams, one record batch at a time. Not through the Dataset, whose files are
    memory-mapped: every page it touches stays in the process's PSS until the end, so its peak grew with the input
    (bench/prepare_memory.py: 375 -> 583 MB for 23 -> 231 MB of input; read as streams, the map closed: 380 -> 381)."""
    saved = saved_dataset(folder)
    if has_indices_mapping(saved):  # a select/shuffle not flattened by save_to_disk: let datasets apply it
        for rows in saved.select_columns(list(columns)).iter(batch_size=BATCH_ROWS):
            yield pa.RecordBatch.from_pydict({c: pa.array(rows[c], pa.string()) for c in columns})
        return
    files = [cached["filename"] for cached in saved.cache_files]
    del saved  # its memory map holds every page datasets touched to read the batches' headers (~60 % of a file)
    for file in files:
        with pa.OSFile(file) as source:  # buffered reads, no mmap
            for batch in pa.ipc.open_stream(source):
                yield pa.RecordBatch.from_arrays([batch.column(c) for c in columns], names=list(columns))


def saved_dataset(folder: str):
    """datasets.load_from_disk of a save_to_disk folder (memory-mapped: nothing is read until iterated); of a
    DatasetDict, its "train" split (or its only one)."""
    import datasets

    try:
        saved = datasets.load_from_disk(folder)
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"--input: {folder} is not a readable save_to_disk folder ({first_line(exc)})") from None
    if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved and len(saved) != 1:
            raise DataError(f"--input: {folder} holds the splits {', '.join(saved)} and none is 'train'; pass the "
                            f"split's own folder ({folder}/SPLIT)")
        saved = saved["train"] if "train" in saved else next(iter(saved.values()))
    return saved


def drop_nulls(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, int]:
    keep = pc.and_(pc.is_valid(batch.column(0)), pc.is_valid(batch.column(1)))
    kept = batch.filter(keep)
    return kept, batch.num_rows - kept.num_rows


class Split:
    """Validation iff a keyed 64-bit hash of the row's text < limit: a pure function of (text, seed)."""

    def __init__(self, seed: int, fraction: float):
        self.key = hashlib.sha256(str(seed).encode()).digest()[:16]
        self.limit = min(int(fraction * 2**64), 2**64 - 1)

    def hashes(self, batch: pa.RecordBatch) -> np.ndarray:
        rows = zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
        digest = (hashlib.blake2b(f"{p}\x1f{r}".encode(), digest_size=8, key=self.key).digest() for p, r in rows)
        return np.fromiter((int.from_bytes(d, "little") for d in digest), dtype=np.uint64, count=batch.num_rows)

    def mask(self, batch: pa.RecordBatch) -> np.ndarray:
        return self.hashes(batch) < np.uint64(self.limit)

    def keep_smallest(self, n: int, source: Input) -> None:
        """Set the limit so that the n rows with the smallest hashes (and their duplicates) are validation."""
        best = np.empty(0, dtype=np.uint64)
        for batch in source.batches():
            best = np.concatenate([best, self.hashes(drop_nulls(batch)[0])])
            if len(best) > n:
                best = np.partition(best, n - 1)[:n] if n else best[:0]
        self.limit = min(int(best.max()) + 1, 2**64 - 1) if len(best) else 0


def tokenizer_for(args, source: Input, split: Split):
    """Reuse --tokenizer_dir, or train one there from the training split's texts (streamed)."""
    from lowmem_train.model.tokenizer import load_or_train_tokenizer

    def texts() -> Iterator[str]:
        rows = 0
        for batch in source.batches():
            batch = drop_nulls(batch)[0]
            train = batch.filter(pa.array(~split.mask(batch)))
            for column in train.columns:
                yield from column.to_pylist()
            rows += train.num_rows
            if rows >= TOKENIZER_ROWS:
                return

    return load_or_train_tokenizer(Path(args.tokenizer_dir), texts(), args.vocab_size)


class Histogram:
    """Counts of integer lengths: exact percentiles in memory O(longest row), not O(rows)."""

    def __init__(self):
        self.counts = np.zeros(1, dtype=np.int64)

    def add(self, lengths: np.ndarray) -> None:
        counts = np.bincount(lengths)
        if len(counts) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(counts) - len(self.counts)))
        self.counts[: len(counts)] += counts

    def percentile(self, q: float) -> int:
        cumulative = np.cumsum(self.counts)
        return int(np.searchsorted(cumulative, q / 100 * cumulative[-1]))

    def over(self, limit: int) -> int:
        return int(self.counts[limit + 1:].sum())


class SplitWriter:
    """Writes one split in row groups of exactly `row_group_size` rows (the last one shorter), atomically."""

    def __init__(self, path: Path, row_group_size: int, tokenizer=None, model_type: str = families.DEFAULT):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.row_group_size, self.tokenizer, self.model_type = row_group_size, tokenizer, model_type
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = self.rows = self.row_groups = 0
        self.writer: pq.ParquetWriter | None = None
        self.lengths = {name: Histogram() for name in ("prompt", "response", "model")}

    @property
    def total(self) -> int:
        """Rows written plus rows waiting for the next row group."""
        return self.rows + self.pending_rows

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        if self.tokenizer is not None:
            batch = self.tokenize(batch)
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        while self.pending_rows >= self.row_group_size:
            self.flush(self.row_group_size)

    def tokenize(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        ids = [self.tokenizer(col.to_pylist(), add_special_tokens=False)["input_ids"] for col in batch.columns]
        prompt, response = (np.fromiter(map(len, x), dtype=np.int64, count=len(x)) for x in ids)
        model = families.get(self.model_type).lengths_for_prepare(prompt, response)
        for name, lengths in zip(("prompt", "response", "model"), (prompt, response, model)):
            self.lengths[name].add(lengths)
        return pa.RecordBatch.from_arrays([pa.array(x, pa.list_(pa.int32())) for x in ids], names=NAMES)

    def flush(self, n: int) -> None:
        table = pa.Table.from_batches(self.pending)
        if self.writer is None:
            schema = table.schema
            if self.tokenizer is not None:
                schema = schema.with_metadata({METADATA_KEY: json.dumps({"vocab": vocab_fingerprint(self.tokenizer)})})
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, schema)
        self.writer.write_table(table.slice(0, n), row_group_size=n)
        self.rows, self.row_groups = self.rows + n, self.row_groups + 1
        rest = table.slice(n)
        self.pending, self.pending_rows = rest.to_batches(), rest.num_rows

    def close(self) -> None:
        if self.pending_rows:
            self.flush(self.pending_rows)
        if self.writer is not None:
            self.writer.close()
            os.replace(self.tmp, self.path)
        elif self.path.exists():  # an older split there would no longer match the new train split
            self.path.unlink()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.tmp.unlink(missing_ok=True)
