"""The `prepare` command: raw rows (parquet, jsonl, csv) -> train/validation parquet that trains well.

    python train_low_mem.py prepare --input raw.jsonl --output_dir data/ [--row_group_size 50000]
        [--validation_fraction 0.01 | --validation_rows N] [--prompt_column q --response_column a]
        [--tokenizer_dir DIR [--vocab_size N] [--tokenize [--model_type t5|gpt --max_seq_len N]]] [--seed S]

Writes OUT/train.parquet and OUT/validation.parquet, columns `prompt` and `response` (renamed from the
input's, so `train` needs no column options), in row groups of --row_group_size rows: a file written as one
giant row group comes out re-chunked. Rows with a null prompt or response are dropped and counted.

Validation split: a row goes to validation when a keyed hash of its text (key: --seed) falls below the
fraction. Deterministic, streamed, and duplicates of a row always land on the same side (no leakage).
--validation_rows N takes the N smallest hashes (a first pass finds the threshold, memory O(N) integers).

--tokenizer_dir: reused when it holds a tokenizer, else trained from the training split (streamed).
--tokenize stores token ids instead of text: list<int32> columns under the same names, the ids of prompt and
response *without* special tokens, and the tokenizer's vocabulary fingerprint in the file's metadata. The
trainer recognises such files by their column type, checks the fingerprint against --tokenizer_dir, and adds
special tokens, layout (t5 or gpt) and truncation at training time, so one prepared file serves any model
type and max_seq_len; --model_type/--max_seq_len here only report how many rows would be too long.

Everything streams (pyarrow's parquet, json and csv readers; `.gz` inputs too): memory is bounded by
row groups, not by the input. `datasets` would stream as well, but as Python dicts and with its own cache
folders; pyarrow hands over Arrow batches, which is what we write. The streaming pieces live in
convert.py, so that `--help` imports no pyarrow.
"""

from __future__ import annotations

HELP = "turn raw parquet/jsonl/csv into train/validation parquet (row groups, split, optional tokenization)"


def add_arguments(parser) -> None:
    from lowmem_train.config.schema import RunConfig

    defaults = RunConfig()
    parser.add_argument("--input", required=True,
                        help="raw rows: a .parquet/.jsonl/.csv file (.gz ok), a glob, or a folder of parquet")
    parser.add_argument("--output_dir", required=True, help="folder for train.parquet and validation.parquet")
    parser.add_argument("--row_group_size", type=int, default=50_000, help="rows per row group (default 50000)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--validation_fraction", type=float, default=0.01,
                       help="share of rows for validation (default 0.01; 0: none)")
    split.add_argument("--validation_rows", type=int, default=None, help="about this many rows for validation instead")
    parser.add_argument("--prompt_column", default="prompt", help="input column of the prompt text (default prompt)")
    parser.add_argument("--response_column", default="response",
                        help="input column of the response text (default response)")
    parser.add_argument("--tokenizer_dir", default="", help="tokenizer to reuse, or to train from the training split")
    parser.add_argument("--vocab_size", type=int, default=defaults.model.vocab_size,
                        help="vocabulary of a trained tokenizer")
    parser.add_argument("--tokenize", action="store_true", help="store token ids (needs --tokenizer_dir)")
    parser.add_argument("--model_type", choices=("t5", "gpt"), default=defaults.model.type,
                        help="for length statistics")
    parser.add_argument("--max_seq_len", type=int, default=0, help="report rows longer than this for --model_type")
    parser.add_argument("--seed", type=int, default=0, help="key of the split hash (default 0)")


def run(args, cfg) -> int:
    import time
    from pathlib import Path

    import pyarrow as pa

    from lowmem_train.trainer.data import convert as io

    check(args)
    t0 = time.perf_counter()
    source = io.Input(args.input, args.prompt_column, args.response_column)
    split = io.Split(args.seed, args.validation_fraction)
    if args.validation_rows is not None:
        split.keep_smallest(args.validation_rows, source)
    tokenizer = io.tokenizer_for(args, source, split) if args.tokenizer_dir else None
    out = Path(args.output_dir)
    writers = {name: io.SplitWriter(out / f"{name}.parquet", args.row_group_size,
                                    tokenizer if args.tokenize else None, args.model_type)
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
        raise io.DataError(f"--input: {args.input} gives no training rows ({dropped} with a null text, "
                           f"{writers['validation'].total} for validation)")
    for w in writers.values():
        w.close()
    io.report(args, writers, dropped, time.perf_counter() - t0)
    return 0


def check(args) -> None:
    from lowmem_train.config.schema import ConfigError

    if args.row_group_size < 1:
        raise ConfigError(f"--row_group_size must be at least 1 (got {args.row_group_size})")
    if not 0 <= args.validation_fraction < 1:
        raise ConfigError(f"--validation_fraction must be in [0, 1) (got {args.validation_fraction})")
    if args.validation_rows is not None and args.validation_rows < 0:
        raise ConfigError(f"--validation_rows must be 0 or more (got {args.validation_rows})")
    if args.tokenize and not args.tokenizer_dir:
        raise ConfigError("--tokenize needs --tokenizer_dir (an existing tokenizer, or where to train one)")
    if args.max_seq_len < 0 or args.vocab_size < 16:
        raise ConfigError("--max_seq_len must be 0 or more and --vocab_size at least 16")
