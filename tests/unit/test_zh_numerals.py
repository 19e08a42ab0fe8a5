"""Tests for the bundled Arabic -> Chinese numerals demo task."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_train.trainer.data import zh_numerals
from lowmem_train.trainer.data.zh_numerals import (
    is_validation_number,
    sample_numbers,
    to_chinese,
    write_task,
)

MAX_N = 10**12 - 1
ALLOWED_CHARS = set("零一二三四五六七八九十百千万亿")

EXAMPLES = {
    0: "零",
    1: "一",
    9: "九",
    10: "十",
    11: "十一",
    15: "十五",
    20: "二十",
    99: "九十九",
    100: "一百",
    101: "一百零一",
    110: "一百一十",
    200: "二百",
    222: "二百二十二",
    1000: "一千",
    1001: "一千零一",
    1010: "一千零一十",
    1100: "一千一百",
    10_000: "一万",
    10_001: "一万零一",
    10_010: "一万零一十",
    10_100: "一万零一百",
    11_000: "一万一千",
    100_000: "十万",
    100_010: "十万零一十",
    150_000: "十五万",
    1_000_000: "一百万",
    1_010_000: "一百零一万",
    99_999_999: "九千九百九十九万九千九百九十九",
    1_0000_0000: "一亿",
    1_0000_0001: "一亿零一",
    1_0001_0000: "一亿零一万",
    1_0010_0000: "一亿零一十万",
    1_1000_0000: "一亿一千万",
    1_0000_1000: "一亿零一千",
    10_0000_0000: "十亿",
    10_0000_1000: "十亿零一千",
    15_0000_0000: "十五亿",
    101_0101_0101: "一百零一亿零一百零一万零一百零一",
    2000_2000_2000: "二千亿二千万二千",
    MAX_N: "九千九百九十九亿九千九百九十九万九千九百九十九",
}


@pytest.mark.parametrize(("n", "expected"), EXAMPLES.items())
def test_examples(n: int, expected: str) -> None:
    assert to_chinese(n) == expected


@pytest.mark.parametrize("n", [-1, 10**12, 10**20])
def test_out_of_range_raises(n: int) -> None:
    with pytest.raises(ValueError):
        to_chinese(n)


# --- independent parser: the round trip checks the reading without re-implementing it ---

_DIGIT = {c: i for i, c in enumerate("零一二三四五六七八九")}
_SMALL_UNIT = {"十": 10, "百": 100, "千": 1000}


def from_chinese(text: str) -> int:
    """Parse a reading back to an int: digits multiply the following 十/百/千, which accumulate
    into a section; 万 scales the section, 亿 scales everything so far. 零 is a placeholder."""
    total = section = digit = 0
    for ch in text:
        if ch in _DIGIT:
            digit = _DIGIT[ch]
        elif ch in _SMALL_UNIT:
            section += (digit or 1) * _SMALL_UNIT[ch]  # bare leading 十 means 一十
            digit = 0
        elif ch == "万":
            total += (section + digit) * 10**4
            section = digit = 0
        elif ch == "亿":
            total = (total + section + digit) * 10**8
            section = digit = 0
        else:
            raise ValueError(f"unexpected character {ch!r} in {text!r}")
    return total + section + digit


def test_parser_sanity() -> None:
    assert from_chinese("十") == 10
    assert from_chinese("一亿零一十万") == 1_0010_0000
    assert from_chinese("二千亿二千万二千") == 2000_2000_2000


# Zero-heavy numbers hit the 零 rules far more often than uniform integers do.
_zero_heavy = st.lists(
    st.sampled_from("0000000123456789"), min_size=1, max_size=12
).map(lambda ds: int("".join(ds)))
_numbers = st.one_of(st.integers(0, MAX_N), _zero_heavy, st.integers(0, 10**5))


@settings(max_examples=1000, deadline=None)
@given(_numbers)
def test_structural_properties(n: int) -> None:
    reading = to_chinese(n)
    assert set(reading) <= ALLOWED_CHARS
    assert "零零" not in reading
    assert "两" not in reading
    if n != 0:
        assert not reading.endswith("零")
        assert not reading.startswith("零")
        assert not reading.startswith("一十")
    assert from_chinese(reading) == n


# --- split and sampling ---


def test_validation_split_is_about_two_percent() -> None:
    share = sum(is_validation_number(n) for n in range(100_000)) / 100_000
    assert 0.015 < share < 0.025
    assert is_validation_number(12345) == is_validation_number(12345)


def test_sample_numbers_respects_split_cap_and_digit_mix() -> None:
    numbers = sample_numbers(random.Random(1), 20_000, validation=False, max_value=10**8)
    assert all(0 <= n <= 10**8 and not is_validation_number(n) for n in numbers)
    lengths = Counter(len(str(n)) for n in numbers)
    # 9-digit draws are rejected by the cap, so lengths 1..8 are each ~1/8 of the rows.
    assert set(lengths) <= set(range(1, 10))
    for k in range(1, 9):
        assert 0.10 < lengths[k] / len(numbers) < 0.15, lengths


def test_sample_numbers_validation_distinct_and_deterministic() -> None:
    a = sample_numbers(random.Random(7), 500, validation=True, max_value=10**6)
    b = sample_numbers(random.Random(7), 500, validation=True, max_value=10**6)
    assert a == b
    assert len(set(a)) == 500
    assert all(is_validation_number(n) and n <= 10**6 for n in a)


def test_sample_numbers_small_cap() -> None:
    numbers = sample_numbers(random.Random(0), 200, validation=False, max_value=37)
    assert all(0 <= n <= 37 for n in numbers)
    assert max(numbers) > 29  # the partial top digit count is still reachable


def test_sample_numbers_impossible_request_raises() -> None:
    with pytest.raises(ValueError):
        sample_numbers(random.Random(0), 50, validation=True, max_value=100)


# --- parquet files ---


def _write(out_dir: Path) -> tuple[Path, Path]:
    return write_task(out_dir, train_rows=5000, validation_rows=300, row_group_size=1000)


def test_write_task_files(tmp_path: Path) -> None:
    train_path, validation_path = _write(tmp_path)
    assert (train_path, validation_path) == (tmp_path / "train.parquet", tmp_path / "validation.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.parquet", "validation.parquet"]

    train_file, validation_file = pq.ParquetFile(train_path), pq.ParquetFile(validation_path)
    assert train_file.metadata.num_row_groups >= 5
    assert train_file.metadata.row_group(0).column(0).compression == "ZSTD"
    train, validation = train_file.read(), validation_file.read()
    for table, rows in ((train, 5000), (validation, 300)):
        assert table.column_names == ["prompt", "response", "case"]
        assert table.num_rows == rows
        assert all(str(f.type) == "string" for f in table.schema)
        for prompt, response, case in zip(*(table[c].to_pylist() for c in ("prompt", "response", "case"))):
            assert prompt == str(int(prompt))
            assert response == to_chinese(int(prompt))
            assert case == zh_numerals.number_case(int(prompt))
        # Every split holds each case in the stated proportion, exactly.
        assert Counter(table["case"].to_pylist()) == zh_numerals.case_counts(rows, zh_numerals.CASE_SHARES)

    train_prompts = set(train["prompt"].to_pylist())
    validation_prompts = validation["prompt"].to_pylist()
    assert train_prompts.isdisjoint(validation_prompts)
    assert len(set(validation_prompts)) == len(validation_prompts)
    assert all(is_validation_number(int(p)) for p in validation_prompts)
    assert not any(is_validation_number(int(p)) for p in train_prompts)


def test_write_task_is_deterministic(tmp_path: Path) -> None:
    first = _write(tmp_path / "a")
    second = _write(tmp_path / "b")
    for p, q in zip(first, second):
        assert pq.read_table(p).equals(pq.read_table(q))
        assert p.read_bytes() == q.read_bytes()


def test_write_task_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fail in the middle of train.parquet, after some row groups were written: neither the
    # final name nor the temp file may be left behind.
    calls = 0

    def flaky(n: int) -> str:
        nonlocal calls
        calls += 1
        if calls > 2500:
            raise RuntimeError("simulated crash")
        return to_chinese(n)

    monkeypatch.setattr(zh_numerals, "to_chinese", flaky)
    with pytest.raises(RuntimeError):
        _write(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n, case", [(12345, "no zero"), (7, "no zero"), (305, "inner zero"), (1203040, "inner zero"), (1020304, "zero after 万/亿"),
                                     (1200, "trailing zero"), (10000, "trailing zero"), (0, "trailing zero"),
                                     (10010, "zero after 万/亿"), (20240101, "zero after 万/亿"),
                                     (100000001, "zero after 万/亿"), (120000034, "zero after 万/亿")])
def test_number_case_names_the_hardest_rule(n: int, case: str) -> None:
    assert zh_numerals.number_case(n) == case


def test_task_numbers_come_in_the_stated_case_proportions() -> None:
    numbers = zh_numerals.sample_task_numbers(random.Random(3), 10_000, validation=False)
    counts = Counter(map(zh_numerals.number_case, numbers))
    assert counts == zh_numerals.case_counts(10_000, zh_numerals.CASE_SHARES)
    assert all(not is_validation_number(n) and n <= 10**8 for n in numbers)
    # Shapes uniform digits almost never produce are there: three zeros after 万 (12340005 -> 一千二百三十四万零五).
    assert sum(len(str(n)) >= 5 and str(n)[-4:-1] == "000" and n % 10 for n in numbers) > 50
    small = zh_numerals.sample_task_numbers(random.Random(3), 200, validation=False, max_value=999)
    assert "zero after 万/亿" not in set(map(zh_numerals.number_case, small))  # impossible below 10**4: left out
