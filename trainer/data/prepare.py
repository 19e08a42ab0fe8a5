"""`prepare`: raw rows (parquet, jsonl, csv) -> train/validation parquet that trains well.

Writes OUT/train.parquet and OUT/validation.parquet, columns `prompt` and `response` (renamed from the
input's, so `train` needs no column options), in row groups of `row_group_size` rows: a file written as one
giant row group comes out re-chunked. Rows with a null prompt or response are dropped and counted.

Validation split: a row goes to validation when a keyed hash of its text (key: `seed`) falls below the
fraction. Deterministic, streamed, and duplicates of a row always land on the same side (no leakage).
`validation_rows` N takes the N smallest hashes (a first pass finds the threshold, memory O(N) integers).

`tokenizer_dir`: reused when it holds a tokenizer, else trained from the training split (streamed).
`tokenize` stores token ids instead of text: list<int32> columns under the same names, the ids of prompt and
response *without* special tokens, and the tokenizer's vocabulary fingerprint in the file's metadata. The
trainer recognises such files by their column type, checks the fingerprint against --tokenizer_dir, and adds
special tokens, layout and truncation at training time (the model family's), so one prepared file serves any
model type and max_seq_len; `model_type`/`max_seq_len` here only report how many rows would be too long.

Everything streams (pyarrow's parquet, json and csv readers; `.gz` inputs too): memory is bounded by
row groups, not by the input. `datasets` would stream as well, but as Python dicts and with its own cache
folders; pyarrow hands over Arrow batches, which is what we write. The streaming pieces live in convert.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lowmem_train.config.errors import ConfigError
from lowmem_train.model import families


@dataclass(frozen=True)
class PrepareOptions:
    input: str
    output_dir: str
    row_group_size: int = 50_000
    validation_fraction: float = 0.01
    validation_rows: int | None = None
    prompt_column: str = "prompt"
    response_column: str = "response"
    tokenizer_dir: str = ""
    vocab_size: int = 64
    tokenize: bool = False
    model_type: str = families.DEFAULT
    max_seq_len: int = 0
    seed: int = 0

    def check(self) -> None:
        if self.row_group_size < 1:
            raise ConfigError(f"--row_group_size must be at least 1 (got {self.row_group_size})")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"--validation_fraction must be in [0, 1) (got {self.validation_fraction})")
        if self.validation_rows is not None and self.validation_rows < 0:
            raise ConfigError(f"--validation_rows must be 0 or more (got {self.validation_rows})")
        if self.tokenize and not self.tokenizer_dir:
            raise ConfigError("--tokenize needs --tokenizer_dir (an existing tokenizer, or where to train one)")
        if self.max_seq_len < 0 or self.vocab_size < 16:
            raise ConfigError("--max_seq_len must be 0 or more and --vocab_size at least 16")


@dataclass
class PrepareResult:
    writers: dict  # "train" / "validation" -> convert.SplitWriter (rows, row groups, path, length histograms)
    dropped: int  # rows with a null prompt or response
    seconds: float


def prepare(options: PrepareOptions) -> PrepareResult:
    import pyarrow as pa

    from lowmem_train.trainer.data import convert as io

    options.check()
    t0 = time.perf_counter()
    source = io.Input(options.input, options.prompt_column, options.response_column)
    split = io.Split(options.seed, options.validation_fraction)
    if options.validation_rows is not None:
        split.keep_smallest(options.validation_rows, source)
    tokenizer = io.tokenizer_for(options, source, split) if options.tokenizer_dir else None
    out = Path(options.output_dir)
    writers = {name: io.SplitWriter(out / f"{name}.parquet", options.row_group_size,
                                    tokenizer if options.tokenize else None, options.model_type)
               for name in ("train", "validation")}
    dropped = 0
    for batch in source.batches():
        batch, nulls = io.drop_nulls(batch)
        dropped += nulls
        is_validation = split.mask(batch)
        writers["train"].add(batch.filter(pa.array(~is_validation)))
        writers["validation"].add(batch.filter(pa.array(is_validation)))
    if writers["train"].total == 0:
        for w in writers.values():
            w.abort()
        raise io.DataError(f"--input: {options.input} gives no training rows ({dropped} with a null text, "
                           f"{writers['validation'].total} for validation)")
    for w in writers.values():
        w.close()
    return PrepareResult(writers, dropped, time.perf_counter() - t0)
