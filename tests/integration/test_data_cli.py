"""Bad training data through the real CLI: one line naming file and column, exit code 2, never a traceback;
rows that can be skipped (null text, too long, empty row groups) are skipped and counted in the log."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import TINY_MODEL, run_cli

SCHEMA = pa.schema([("prompt", pa.string()), ("response", pa.string())])


def train(task, train_file, out, *extra):
    return run_cli(["train", f"--train_file={train_file}", "--validation_file=", f"--tokenizer_dir={task['tokenizer']}",
                    f"--output_dir={out}", *TINY_MODEL, "--epochs=1", "--batch_size_per_gpu=16", *extra])


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_missing_file_is_refused_before_anything_heavy_starts(tiny_task, tmp_path):
    missing = tmp_path / "nope.parquet"
    result = train(tiny_task, missing, tmp_path / "out")
    assert_one_line_error(result, "--train_file", str(missing), "not found")
    assert "memory check" not in result.stdout + result.stderr  # a typo costs no process group, model or estimate
    result = train(tiny_task, tmp_path, tmp_path / "out", f"--validation_file={missing}")
    assert_one_line_error(result, "--train_file", str(tmp_path), "holds no *.parquet files")
    result = train(tiny_task, tiny_task["train"], tmp_path / "out", f"--validation_file={missing}")
    assert_one_line_error(result, "--validation_file", str(missing), "not found")
    assert "memory check" not in result.stdout + result.stderr


def test_file_that_is_not_parquet(tiny_task, tmp_path):
    junk = tmp_path / "rows.parquet"
    junk.write_text("prompt,response\n1,一\n")
    assert_one_line_error(train(tiny_task, junk, tmp_path / "out"), str(junk), "not a readable parquet file")


def test_missing_column(tiny_task, tmp_path):
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"prompt": ["1"], "answer": ["一"]}), path)
    assert_one_line_error(train(tiny_task, path, tmp_path / "out"), str(path), "column 'response' is missing",
                          "answer, prompt")


def test_column_name_option_is_honoured_and_named(tiny_task, tmp_path):
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"prompt": ["1"], "answer": [1]}), path)
    assert_one_line_error(train(tiny_task, path, tmp_path / "out", "--data.response_column=answer"), str(path),
                          "column 'answer' has type int64")


def test_empty_file(tiny_task, tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(SCHEMA.empty_table(), path)
    assert_one_line_error(train(tiny_task, path, tmp_path / "out"), str(path), "holds no rows")


def test_token_ids_without_their_tokenizer(tiny_task, tmp_path):
    path = tmp_path / "ids.parquet"
    ids = pa.array([[5, 6]], pa.list_(pa.int32()))
    table = pa.table({"prompt": ids, "response": ids}).replace_schema_metadata({b"lowmem_train": b'{"vocab": "0"}'})
    pq.write_table(table, path)
    assert_one_line_error(train(tiny_task, path, tmp_path / "out"), str(path), "token ids of another tokenizer")


@pytest.mark.slow
@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_null_overlong_and_empty_row_groups_are_skipped_and_counted(tiny_task, tmp_path, overlong):
    """64 rows: one null prompt, one null response, one prompt far over max_seq_len; plus two 0-row row groups."""
    path = tmp_path / "holes.parquet"
    prompts = [str(100 + i) for i in range(64)]
    responses = ["一百"] * 64
    prompts[3], responses[10], prompts[20] = None, None, "9" * 80
    table = pa.table({"prompt": prompts, "response": responses}, schema=SCHEMA)
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for piece in (table.slice(0, 32), SCHEMA.empty_table(), table.slice(32), SCHEMA.empty_table()):
            writer.write_table(piece)
    result = train(tiny_task, path, tmp_path / "out", f"--data.overlong={overlong}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "skipped 2 row group(s) with 0 rows" in result.stderr
    verb = "skipped" if overlong == "skip" else "truncated"
    assert f"epoch 1 data: 64 rows, 2 null skipped, 1 too long {verb}, 0 rows dropped" in result.stderr, \
        result.stderr[-3000:]
