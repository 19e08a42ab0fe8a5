"""`prepare`: raw parquet / jsonl / csv or a datasets save_to_disk folder -> train/validation parquet with sane row
groups (trainer/data/prepare.py).

    lowmem-train prepare --input raw.jsonl --output_dir data/ [--row_group_size 50000]
        [--validation_fraction 0.01 | --validation_rows N] [--prompt_column q --response_column a]
        [--tokenizer_dir DIR [--vocab_size N] [--tokenize [--model_type t5|gpt --max_seq_len N]]] [--seed S]
"""

from __future__ import annotations

HELP = "turn raw parquet/jsonl/csv into train/validation parquet (row groups, split, optional tokenization)"


def add_arguments(parser) -> None:
    from lowmem_train.config.schema import RunConfig
    from lowmem_train.model import families

    defaults = RunConfig()
    parser.add_argument("--input", required=True,
                        help="raw rows: a .parquet/.jsonl/.csv file (.gz ok), a glob, a folder of parquet, or a folder "
                             "written by Hugging Face datasets' save_to_disk (its train split)")
    parser.add_argument("--output_dir", required=True, help="folder for train.parquet and validation.parquet")
    parser.add_argument("--row_group_size", type=int, default=50_000, help="rows per row group (default 50000)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--validation_fraction", type=float, default=0.01,
                       help="share of rows for validation (default 0.01; 0: none)")
    split.add_argument("--validation_rows", type=int, default=None, help="about this many rows for validation instead")
    parser.add_argument("--prompt_column", default="prompt", help="input column of the prompt text (default prompt)")
    parser.add_argument("--response_column", default="response",
                        help="input column of the response text (default response)")
    parser.add_argument("--tokenizer_dir", default="",
                        help="tokenizer to reuse (a pretrained model's folder too), or to train from the training split")
    parser.add_argument("--vocab_size", type=int, default=defaults.model.vocab_size,
                        help="vocabulary of a trained tokenizer")
    parser.add_argument("--tokenize", action="store_true", help="store token ids (needs --tokenizer_dir)")
    parser.add_argument("--model_type", choices=families.names(), default=defaults.model.type,
                        help="for length statistics")
    parser.add_argument("--max_seq_len", type=int, default=0, help="report rows longer than this for --model_type")
    parser.add_argument("--seed", type=int, default=0, help="key of the split hash (default 0)")


def report(options, result) -> str:
    from lowmem_train.trainer.memory.units import size_text

    writers = result.writers
    total = sum(w.rows for w in writers.values())
    lines = [f"prepared {total:,} rows from {options.input} in {result.seconds:.1f} s "
             f"({total / max(result.seconds, 1e-9):,.0f} rows/s)"]
    for name, w in writers.items():
        where = (f"{w.path}: {w.row_groups} row group(s) of <= {options.row_group_size:,} rows, "
                 f"{size_text(w.path.stat().st_size)}") if w.rows else "not written"
        lines.append(f"  {name:<10} {w.rows:>12,} rows  {where}")
    if result.dropped:
        lines.append(f"  dropped {result.dropped:,} rows with a null {options.prompt_column} or {options.response_column}")
    train = writers["train"]
    if train.tokenizer is not None:
        for name in ("prompt", "response"):
            h = train.lengths[name]
            lines.append(f"  {name} tokens (train): p50 {h.percentile(50)}, p90 {h.percentile(90)}, "
                         f"p99 {h.percentile(99)}, max {len(h.counts) - 1}")
        if options.max_seq_len:
            over = train.lengths["model"].over(options.max_seq_len)
            lines.append(f"  {over:,} training rows ({100 * over / max(train.rows, 1):.2f}%) are longer than "
                         f"--max_seq_len {options.max_seq_len} as {options.model_type} inputs: training truncates or "
                         f"skips them (--data.overlong)")
    flags = [f"--train_file={train.path}"]
    flags.append(f"--validation_file={writers['validation'].path}" if writers["validation"].rows
                 else "--validation_file=''")
    if options.tokenizer_dir:
        flags.append(f"--tokenizer_dir={options.tokenizer_dir}")
    lines.append("  train with: python train_low_mem.py train " + " ".join(flags))
    return "\n".join(lines)


def run(args, cfg) -> int:
    from lowmem_train.trainer.data.prepare import PrepareOptions, prepare

    options = PrepareOptions(**{k: v for k, v in vars(args).items() if k != "command"})
    print(report(options, prepare(options)))
    return 0
