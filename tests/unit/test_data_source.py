"""ParquetIndex and the streaming reader: kinds of columns, bad files, and memory bounded by one block."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lowmem_train.trainer.data.dataset import LowMemDataset
from lowmem_train.trainer.data.encode import EncodeStats
from lowmem_train.trainer.data.source import DataError, ParquetIndex, iter_rows, read_unit

COLUMNS = ("prompt", "response")


class NoEncoder:
    """Rows are read and dropped: the test measures the reader, not collation."""

    model_type = "gpt"

    def encode(self, rows):
        return []

    def take_stats(self):
        return EncodeStats()


def random_text_file(path, rows: int, row_group_size: int, chars: int = 200) -> None:
    """Incompressible prompts of `chars` characters (short responses)."""
    texts = [os.urandom(chars // 2).hex() for _ in range(rows)]
    pq.write_table(pa.table({"prompt": texts, "response": [t[:8] for t in texts]}), path, row_group_size=row_group_size)


def peak_arrow_bytes_over_an_epoch(path, buffer: int = 1024) -> int:
    index = ParquetIndex.build(str(path), COLUMNS)
    ds = LowMemDataset(index, NoEncoder(), 0, 1024, 0, 1, 0, buffer)
    peak = 0
    for _ in ds:
        peak = max(peak, pa.total_allocated_bytes())
    return peak


def test_one_giant_row_group_is_streamed_not_loaded(tmp_path):
    """pyarrow's defaults (pre_buffer, unbuffered column streams) hold a whole column chunk: here ~65 MB.
    Streamed, the reader holds a few MB whatever the size (dictionary page, buffers, one batch, one block)."""
    path = tmp_path / "giant.parquet"
    random_text_file(path, 300_000, row_group_size=300_000)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    size = path.stat().st_size
    assert peak_arrow_bytes_over_an_epoch(path) < size / 5, size


def test_memory_is_flat_in_the_number_of_row_groups(tmp_path):
    small, big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    random_text_file(small, 8_000, row_group_size=2_000)
    random_text_file(big, 80_000, row_group_size=2_000)
    assert peak_arrow_bytes_over_an_epoch(big) < 1.5 * peak_arrow_bytes_over_an_epoch(small) + (1 << 20)


def test_read_unit_yields_bounded_batches(tmp_path):
    path = tmp_path / "f.parquet"
    random_text_file(path, 5_000, row_group_size=5_000, chars=10)
    index = ParquetIndex.build(str(path), COLUMNS)
    sizes = [b.num_rows for b in read_unit(index.units[0], COLUMNS, 1000)]
    assert sizes == [1000] * 5
    assert len(list(iter_rows(index))) == 5_000


def write(path, table, row_group_size=None):
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def test_index_kinds_and_token_id_columns(tmp_path):
    text = write(tmp_path / "t.parquet", pa.table({"prompt": ["a", "b"], "response": ["c", "d"], "x": [1, 2]}))
    index = ParquetIndex.build(text, COLUMNS)
    assert index.kind == "text" and index.num_rows == 2 and index.vocab is None
    ids = pa.table({"prompt": pa.array([[1, 2], [3]], pa.list_(pa.int32())),
                    "response": pa.array([[4], [5, 6]], pa.list_(pa.int32()))})
    ids = ids.replace_schema_metadata({b"lowmem_train": b'{"vocab": "abc"}'})
    index = ParquetIndex.build(write(tmp_path / "ids.parquet", ids), COLUMNS)
    assert index.kind == "tokens" and index.vocab == "abc"
    assert list(iter_rows(index)) == [([1, 2], [4]), ([3], [5, 6])]


@pytest.mark.parametrize("table, message", [
    (pa.table({"prompt": ["a"], "answer": ["b"]}), "column 'response' is missing (columns: answer, prompt)"),
    (pa.table({"prompt": ["a"], "response": [1]}), "column 'response' has type int64"),
    (pa.table({"prompt": ["a"], "response": [["x"]]}), "column 'response' has type list<element: string>"),
    (pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}), "holds no rows"),
])
def test_bad_files_name_file_and_column(tmp_path, table, message):
    path = write(tmp_path / "bad.parquet", table)
    with pytest.raises(DataError) as err:
        ParquetIndex.build(path, COLUMNS)
    assert message in str(err.value) and path in str(err.value)


def test_missing_and_non_parquet_files(tmp_path):
    with pytest.raises(DataError, match=r"--train_file: file .*nope.parquet not found"):
        ParquetIndex.build(str(tmp_path / "nope.parquet"), COLUMNS)
    junk = tmp_path / "junk.parquet"
    junk.write_text("prompt,response\n1,2\n")
    with pytest.raises(DataError, match=r"junk.parquet: not a readable parquet file"):
        ParquetIndex.build(str(junk), COLUMNS)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"folder .*empty_dir holds no \*.parquet files"):
        ParquetIndex.build(str(tmp_path / "empty_dir"), COLUMNS)


def test_mixed_kinds_across_files_are_refused(tmp_path):
    write(tmp_path / "a.parquet", pa.table({"prompt": ["a"], "response": ["b"]}))
    write(tmp_path / "b.parquet", pa.table({"prompt": pa.array([[1]]), "response": pa.array([[2]])}))
    with pytest.raises(DataError, match="mixes text and token-id columns"):
        ParquetIndex.build(str(tmp_path), COLUMNS)


def test_empty_row_groups_are_skipped_and_counted(tmp_path, caplog):
    schema = pa.schema([("prompt", pa.string()), ("response", pa.string())])
    table = pa.table({"prompt": ["a", "b"], "response": ["c", "d"]}, schema=schema)
    path = tmp_path / "holes.parquet"
    with pq.ParquetWriter(path, schema) as writer:
        for t in (table, table.slice(0, 0), table, table.slice(0, 0)):
            writer.write_table(t)
    with caplog.at_level("WARNING"):
        index = ParquetIndex.build(str(path), COLUMNS)
    assert index.empty_row_groups == 2 and index.num_rows == 4 and len(index.units) == 2
    assert "skipped 2 row group(s) with 0 rows" in caplog.text
