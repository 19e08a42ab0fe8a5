"""`train_low_mem.py prepare` as a user runs it, and `train` on what it writes."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from tests.helpers import TINY_MODEL, metric_records, run_cli


def raw_jsonl(path, rows=3000, nulls=(5, 77)):
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(rows):
            n = rng.randrange(1, 10**6)
            row = {"question": str(n), "answer": " ".join(str(n)), "id": i}
            if i in nulls:
                row["answer"] = None
            f.write(json.dumps(row) + "\n")
    return path


def row_groups(path) -> list[int]:
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def test_prepare_splits_rechunks_and_reports(tmp_path):
    raw = raw_jsonl(tmp_path / "raw.jsonl")
    args = ["prepare", f"--input={raw}", "--row_group_size=500", "--validation_fraction=0.05",
            "--prompt_column=question", "--response_column=answer"]
    first = run_cli([*args, f"--output_dir={tmp_path / 'a'}"], timeout=120)
    assert first.returncode == 0, first.stderr
    assert "dropped 2 rows with a null question or answer" in first.stdout
    assert "train with: python train_low_mem.py train --train_file=" in first.stdout
    train, validation = pq.read_table(tmp_path / "a" / "train.parquet"), pq.read_table(tmp_path / "a" / "validation.parquet")
    assert train.schema.names == ["prompt", "response"]
    assert train.num_rows + validation.num_rows == 2998 and 90 < validation.num_rows < 210
    assert row_groups(tmp_path / "a" / "train.parquet") == [500] * (train.num_rows // 500) + [train.num_rows % 500]
    assert not set(train.column("prompt").to_pylist()) & set(validation.column("prompt").to_pylist())
    again = run_cli([*args, f"--output_dir={tmp_path / 'b'}"], timeout=120)  # deterministic
    assert pq.read_table(tmp_path / "b" / "validation.parquet").equals(validation)
    assert f"{train.num_rows:,} rows" in first.stdout and again.stdout.count("row group(s)") == 2


def test_prepare_bad_input_is_one_line(tmp_path):
    raw = raw_jsonl(tmp_path / "raw.jsonl", rows=10)
    result = run_cli(["prepare", f"--input={raw}", f"--output_dir={tmp_path / 'out'}"], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {raw}: column 'prompt' is missing (columns: answer, id, question); "
        "set --prompt_column / --response_column")
    result = run_cli(["prepare", f"--input={raw}", f"--output_dir={tmp_path / 'out'}", "--tokenize"], timeout=120)
    assert result.returncode == 2 and "--tokenize needs --tokenizer_dir" in result.stderr


@pytest.mark.slow
def test_train_on_prepared_token_ids(tiny_task, tmp_path):
    """prepare trains a tokenizer and stores token ids; train reads them (no tokenizer work) and learns."""
    raw = raw_jsonl(tmp_path / "raw.jsonl")
    out, tok = tmp_path / "data", tmp_path / "tok"
    prepared = run_cli(["prepare", f"--input={raw}", f"--output_dir={out}", "--row_group_size=400",
                        "--prompt_column=question", "--response_column=answer", "--tokenize",
                        f"--tokenizer_dir={tok}", "--vocab_size=32", "--max_seq_len=12"], timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    assert "prompt tokens (train): p50" in prepared.stdout and "longer than --max_seq_len 12" in prepared.stdout
    assert str(pq.read_schema(out / "train.parquet").field("prompt").type) == "list<element: int32>"
    run = tmp_path / "run"
    result = run_cli(["train", f"--train_file={out / 'train.parquet'}", f"--validation_file={out / 'validation.parquet'}",
                      f"--tokenizer_dir={tok}", f"--output_dir={run}", *TINY_MODEL, "--batch_size_per_gpu=32",
                      "--max_steps=30", "--logging_steps=5", "--data.num_workers=2", "--max_seq_len=16"])
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["loss"] for r in metric_records(run, "train")]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    wrong = run_cli(["train", f"--train_file={out / 'train.parquet'}", "--validation_file=",
                     f"--tokenizer_dir={tiny_task['tokenizer']}", f"--output_dir={tmp_path / 'wrong'}", *TINY_MODEL])
    assert wrong.returncode == 2 and "token ids of another tokenizer" in wrong.stderr and "Traceback" not in wrong.stderr


def test_prepare_tokenizes_with_a_pretrained_models_own_tokenizer(tmp_path):
    """`prepare --tokenize --tokenizer_dir` of a user's GPT-2 folder (byte-level BPE, no pad): the ids are the
    tokenizer's own, and `train` from that pretrained folder takes the token-id parquet."""
    from transformers import AutoTokenizer

    from tests.pretrained_folders import make

    model = make("gpt2", tmp_path / "gpt2")
    raw = raw_jsonl(tmp_path / "raw.jsonl", rows=400, nulls=())
    done = run_cli(["prepare", f"--input={raw}", f"--output_dir={tmp_path / 'data'}", "--prompt_column=question",
                    "--response_column=answer", f"--tokenizer_dir={model}", "--tokenize", "--model_type=gpt"],
                   timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = pq.read_table(tmp_path / "data" / "train.parquet").to_pylist()
    tok = AutoTokenizer.from_pretrained(model)
    first = json.loads(raw.read_text().splitlines()[0])
    match = [r for r in table if r["prompt"] == tok(first["question"], add_special_tokens=False)["input_ids"]]
    assert match and match[0]["response"] == tok(first["answer"], add_special_tokens=False)["input_ids"]
    trained = run_cli(["train", f"--model.name_or_path={model}", f"--train_file={tmp_path / 'data' / 'train.parquet'}",
                       f"--validation_file={tmp_path / 'data' / 'validation.parquet'}",
                       f"--output_dir={tmp_path / 'run'}", "--max_steps=2", "--batch_size_per_gpu=16"], timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]

