"""The pieces of `prepare`: input formats, the hash split, row-group writing, length statistics."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lowmem_train.trainer.data import convert
from lowmem_train.trainer.data.convert import Histogram, Input, Split, SplitWriter, drop_nulls
from lowmem_train.trainer.data.source import DataError

ROWS = [{"q": str(i), "a": f"answer {i % 7}", "extra": i} for i in range(300)]


def write_inputs(tmp_path) -> dict[str, str]:
    paths = {fmt: tmp_path / f"raw.{fmt}" for fmt in ("jsonl", "csv", "parquet")}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["csv"].write_text("q,a,extra\n" + "".join(f"{r['q']},{r['a']},{r['extra']}\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"], row_group_size=len(ROWS))  # one big row group
    paths["jsonl.gz"] = tmp_path / "raw.jsonl.gz"
    paths["jsonl.gz"].write_bytes(gzip.compress(paths["jsonl"].read_bytes()))
    return {k: str(v) for k, v in paths.items()}


def all_rows(source: Input) -> list[tuple]:
    return [row for b in source.batches() for row in zip(*(c.to_pylist() for c in b.columns))]


def saved_datasets(tmp_path) -> dict[str, str]:
    """The rows as Hugging Face users keep them: Dataset.save_to_disk, and a DatasetDict with a train split."""
    import datasets

    table = datasets.Dataset.from_list(ROWS)
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    return {"save_to_disk": str(tmp_path / "saved"), "save_to_disk dict": str(tmp_path / "dict")}


def test_every_format_gives_the_same_string_rows(tmp_path):
    expected = [(r["q"], r["a"]) for r in ROWS]  # csv "7" stays the string "7", not an integer
    for fmt, path in {**write_inputs(tmp_path), **saved_datasets(tmp_path)}.items():
        source = Input(path, "q", "a")
        assert all_rows(source) == expected, fmt
        assert all_rows(source) == expected, fmt  # a second pass restarts the stream
        assert all(b.schema.names == ["prompt", "response"] for b in source.batches())


def test_a_saved_selection_gives_its_own_rows_in_its_own_order(tmp_path):
    """save_to_disk of a shuffled selection: its rows, in its order, whether datasets flattened the selection into
    new Arrow files (read as streams) or kept an indices mapping (read through datasets)."""
    import datasets

    picked = datasets.Dataset.from_list(ROWS).shuffle(seed=3).select([2, 0])
    picked.save_to_disk(str(tmp_path / "picked"))
    assert all_rows(Input(str(tmp_path / "picked"), "q", "a")) == [(r["q"], r["a"]) for r in picked]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_missing_column_names_file_and_column(tmp_path, fmt):
    path = write_inputs(tmp_path)[fmt]
    with pytest.raises(DataError, match=rf"raw.{fmt}: column 'response' is missing \(columns: a, extra, q\)"):
        Input(path, "q", "response")


def test_unreadable_inputs(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown format .txt"):
        Input(str(tmp_path / "x.txt"), "q", "a")
    (tmp_path / "bad.jsonl").write_text("this is not json\n")
    with pytest.raises(DataError, match="bad.jsonl: not readable as json"):
        Input(str(tmp_path / "bad.jsonl"), "q", "a")
    (tmp_path / "late.jsonl").write_text('{"q": "1", "a": "2"}\n{"q": 3, "a": "4"}\n')
    with pytest.raises(DataError, match=r"late.jsonl: JSON parse error"):
        all_rows(Input(str(tmp_path / "late.jsonl"), "q", "a"))
    with pytest.raises(DataError, match="--input: file .*nope.csv not found"):
        Input(str(tmp_path / "nope.csv"), "q", "a")


def test_split_is_a_pure_function_of_text_and_seed():
    batch = pa.RecordBatch.from_pydict({"prompt": [str(i % 500) for i in range(4000)], "response": ["x"] * 4000})
    mask = Split(0, 0.1).mask(batch)
    assert 0.07 < mask.mean() < 0.13
    assert np.array_equal(mask, Split(0, 0.1).mask(batch))
    assert not np.array_equal(mask, Split(1, 0.1).mask(batch))
    by_text = {}
    for text, v in zip(batch.column(0).to_pylist(), mask):  # duplicates never straddle the split
        assert by_text.setdefault(text, v) == v
    assert not Split(0, 0.0).mask(batch).any()


def test_validation_rows_takes_exactly_n_distinct_rows(tmp_path):
    source = Input(write_inputs(tmp_path)["jsonl"], "q", "a")
    split = Split(3, 0.0)
    split.keep_smallest(25, source)
    assert sum(int(split.mask(b).sum()) for b in source.batches()) == 25
    split.keep_smallest(0, source)
    assert sum(int(split.mask(b).sum()) for b in source.batches()) == 0


def test_drop_nulls_counts():
    batch = pa.RecordBatch.from_pydict({"prompt": ["a", None, "c"], "response": ["x", "y", None]})
    kept, dropped = drop_nulls(batch)
    assert kept.to_pylist() == [{"prompt": "a", "response": "x"}] and dropped == 2


def test_split_writer_writes_exact_row_groups_and_holds_at_most_one(tmp_path):
    writer = SplitWriter(tmp_path / "train.parquet", 100)
    peak = 0
    for start in range(0, 1000, 37):
        texts = [str(i) for i in range(start, min(start + 37, 1000))]
        writer.add(pa.RecordBatch.from_pydict({"prompt": texts, "response": texts}))
        peak = max(peak, writer.pending_rows)
    assert peak < 100
    assert not (tmp_path / "train.parquet").exists()  # written atomically, at close
    writer.close()
    meta = pq.ParquetFile(tmp_path / "train.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [100] * 10
    assert pq.read_table(tmp_path / "train.parquet").column("prompt").to_pylist() == [str(i) for i in range(1000)]


def test_empty_split_writes_nothing_and_removes_a_stale_file(tmp_path):
    (tmp_path / "validation.parquet").write_text("old")
    SplitWriter(tmp_path / "validation.parquet", 10).close()
    assert not (tmp_path / "validation.parquet").exists()


def test_histogram_percentiles_are_exact():
    h = Histogram()
    h.add(np.array([1, 2, 3, 4]))
    h.add(np.arange(5, 101))
    assert (h.percentile(50), h.percentile(90), h.percentile(100), len(h.counts) - 1) == (50, 90, 100, 100)
    assert h.over(95) == 5


def mapped_rss_bytes(fragment: str) -> int:
    """Resident bytes of this process's memory mappings of files whose path holds `fragment` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and not head[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
                inside = fragment in line
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def test_a_saved_dataset_is_read_as_a_stream_not_through_its_memory_map(tmp_path):
    """datasets maps a save_to_disk folder's Arrow files, and every page read through the map stays in the
    process's memory until the end (prepare's peak grew with the input: bench/prepare_memory.py). prepare reads
    them as streams instead: the mapped pages stay out of memory however far it has read."""
    import datasets

    folder = tmp_path / "saved_big"
    datasets.Dataset.from_list([{"q": f"{i:012d}" * 4, "a": "answer " * 8} for i in range(60_000)]).save_to_disk(
        str(folder))
    arrow_bytes = sum(f.stat().st_size for f in folder.glob("*.arrow"))
    assert arrow_bytes > 5_000_000
    rows, mapped = 0, []
    for batch in Input(str(folder), "q", "a").batches():
        rows += batch.num_rows
        mapped.append(mapped_rss_bytes(str(folder)))
    assert rows == 60_000
    assert max(mapped) < arrow_bytes / 10, (max(mapped), arrow_bytes)


def test_input_reads_in_bounded_batches(tmp_path):
    big = [{"q": str(i), "a": "y"} for i in range(50_000)]
    pq.write_table(pa.Table.from_pylist(big), tmp_path / "one_group.parquet", row_group_size=50_000)
    sizes = [b.num_rows for b in Input(str(tmp_path / "one_group.parquet"), "q", "a").batches()]
    assert max(sizes) <= convert.BATCH_ROWS and sum(sizes) == 50_000


def run_prepare(*argv) -> int:
    from lowmem_train.config.cli import OneLineParser
    from lowmem_train.commands import prepare

    parser = OneLineParser()
    prepare.add_arguments(parser)
    return prepare.run(parser.parse_args(list(argv)), None)


def test_prepare_run_on_a_tiny_input_smaller_than_one_row_group(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"prompt": str(i), "response": "x" * i}) + "\n" for i in range(20)))
    assert run_prepare("--input", str(raw), "--output_dir", str(tmp_path / "out"), "--validation_rows", "3") == 0
    assert pq.read_table(tmp_path / "out" / "train.parquet").num_rows == 17
    assert pq.read_table(tmp_path / "out" / "validation.parquet").num_rows == 3
    assert "train with: python train_low_mem.py train" in capsys.readouterr().out
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"prompt": "1", "response": null}\n')
    with pytest.raises(DataError, match="gives no training rows \\(1 with a null text"):
        run_prepare("--input", str(nulls), "--output_dir", str(tmp_path / "out2"))
    assert not (tmp_path / "out2" / "train.parquet.tmp").exists()
