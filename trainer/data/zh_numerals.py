"""Bundled demo task: Arabic number -> Chinese numerals.

The model reads a decimal number ("10010") and writes its standard simplified Chinese reading
("一万零一十"). It is a good smoke test for a seq2seq trainer: no download, unlimited data, an exact
answer to score, and rules (4-digit groups with 万/亿, collapsed 零, leading 十) that a model must
actually learn rather than copy.

Split: whether a number is held out is a pure function of the number (`is_validation_number`, a
splitmix64 hash, ~2% of all integers), not of the draw order. So no seed, row count or max_value
can ever put a validation number into training, and validation accuracy measures generalisation to
numbers the model has never seen.

Cases: the hard part of the task is zeros, which uniform random digits rarely produce where they matter (a zero
right after 万 or 亿, as in 20240101 -> 二千零二十四万零一百零一, comes up in ~5% of numbers; an all-zero group
almost never). So both splits are drawn case by case in fixed proportions (CASE_SHARES), each number labelled
with its case (`number_case`, a function of the number alone) in a `case` column, and the evaluation reports
exact match per case.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_DIGITS = "零一二三四五六七八九"
_IN_GROUP_UNITS = ("千", "百", "十", "")  # thousands .. ones inside one 4-digit group
_GROUP_UNITS = ("亿", "万", "")  # 10**8, 10**4, 1
_MAX_N = 10**12 - 1  # three 4-digit groups; 万亿 would need a fourth unit we do not model

_MASK64 = (1 << 64) - 1
_VALIDATION_MODULUS = 50  # 1 in 50 numbers (~2%) is held out

_SCHEMA = pa.schema([("prompt", pa.string()), ("response", pa.string()), ("case", pa.string())])

NO_ZERO, INNER_ZERO, TRAILING_ZERO, ZERO_AFTER_UNIT = "no zero", "inner zero", "trailing zero", "zero after 万/亿"
# Share of each case in both splits. A zero after 万/亿 and inner zeros (零 collapsing) are where a model fails
# first, trailing zeros (silent, 一万 not 一万零) next; uniform digits without any zero are the easy rest.
CASE_SHARES = {NO_ZERO: 0.4, INNER_ZERO: 0.2, TRAILING_ZERO: 0.2, ZERO_AFTER_UNIT: 0.2}


def _read_group(group: int) -> str:
    """Read 1..9999 without its group unit; zeros between digits collapse into one 零,
    trailing zeros are silent. Leading zeros are handled by the caller, since whether they
    are spoken depends on a higher group."""
    digits = f"{group:04d}"
    parts: list[str] = []
    zero_pending = False
    for digit, unit in zip(digits, _IN_GROUP_UNITS):
        if digit == "0":
            zero_pending = bool(parts)  # only zeros *after* a spoken digit matter
            continue
        if zero_pending:
            parts.append("零")
            zero_pending = False
        parts.append(_DIGITS[int(digit)] + unit)
    return "".join(parts)


def to_chinese(n: int) -> str:
    """Standard simplified Chinese reading of 0 <= n <= 10**12 - 1 (二, never 两)."""
    if not 0 <= n <= _MAX_N:
        raise ValueError(f"to_chinese supports 0 <= n <= {_MAX_N}, got {n}")
    if n == 0:
        return "零"
    groups = (n // 10**8, n // 10**4 % 10**4, n % 10**4)
    parts: list[str] = []
    zero_pending = False
    for group, unit in zip(groups, _GROUP_UNITS):
        if group == 0:
            # An all-zero group between spoken groups is one 零, said before the next group.
            zero_pending = bool(parts)
            continue
        # A group starting with zeros after a spoken group also gets one 零 (一万零一).
        if parts and (zero_pending or group < 1000):
            parts.append("零")
        zero_pending = False
        parts.append(_read_group(group) + unit)
    reading = "".join(parts)
    # Only the very first 一十 drops its 一 (十五, 十万); elsewhere it stays (一百一十).
    return reading[1:] if reading.startswith("一十") else reading


def _splitmix64(x: int) -> int:
    """splitmix64 finaliser: a well-mixed 64-bit hash, stable across Python versions and
    processes (unlike hash(), which is fine for ints today but is not a documented contract)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def is_validation_number(n: int) -> bool:
    """True if n belongs to the held-out validation split (~2% of integers, fixed forever)."""
    return _splitmix64(n & _MASK64) % _VALIDATION_MODULUS == 0


def sample_numbers(
    rng: random.Random, count: int, validation: bool, max_value: int = 10**8
) -> list[int]:
    """Draw `count` numbers from one split, digit count uniform over 1..len(str(max_value)).

    Uniform-in-value sampling would make almost every number 8 digits long and the model would
    rarely see 7 or 十五; uniform digit count keeps short numbers common. The cap is applied by
    rejection (draw over the full k-digit range, drop values > max_value), not clamping, so
    max_value itself is not over-represented; with max_value=10**8 the 9-digit draws are thus
    almost all rejected and the effective lengths are 1..8 (plus 10**8 with negligible odds).
    Validation numbers are distinct; training numbers may repeat (short ones must).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 0 <= max_value <= _MAX_N:
        raise ValueError(f"max_value must be in 0..{_MAX_N}, got {max_value}")
    max_digits = len(str(max_value))
    # Bounds of each digit count over the full range; 1 digit includes 0.
    ranges = [(0 if k == 1 else 10 ** (k - 1), 10**k - 1) for k in range(1, max_digits + 1)]
    out: list[int] = []
    seen: set[int] = set()
    # If the split has fewer than `count` distinct numbers <= max_value we would loop forever;
    # ~56 draws per validation number are expected, so this budget only trips on that mistake.
    budget = 1000 * (count + 100)
    randrange, randint = rng.randrange, rng.randint  # local aliases: this is the hot loop
    while len(out) < count:
        budget -= 1
        if budget < 0:
            raise ValueError(
                f"could not draw {count} {'validation' if validation else 'training'} "
                f"numbers <= {max_value}; the split is too small"
            )
        lo, hi = ranges[randrange(max_digits)]
        n = randint(lo, hi)
        if n > max_value or is_validation_number(n) != validation:
            continue
        if validation:
            if n in seen:
                continue
            seen.add(n)
        out.append(n)
    return out


def number_case(n: int) -> str:
    """The case a number belongs to, the hardest rule it exercises first (see CASE_SHARES)."""
    digits = str(n)
    for unit_digits in (4, 8):  # the first digit after 万 (10**4) and after 亿 (10**8) is 0, and a digit follows
        if len(digits) > unit_digits and digits[-unit_digits] == "0" and int(digits[-unit_digits:]) != 0:
            return ZERO_AFTER_UNIT
    if "0" in digits.rstrip("0"):
        return INNER_ZERO
    return TRAILING_ZERO if digits.endswith("0") else NO_ZERO


def _candidate(rng: random.Random, case: str, max_digits: int) -> int | None:
    """A number likely to be of `case` (the caller checks), or None when the case needs more digits."""
    shortest = {NO_ZERO: 1, INNER_ZERO: 3, TRAILING_ZERO: 1, ZERO_AFTER_UNIT: 5}[case]
    if max_digits < shortest:
        return None
    length = rng.randint(shortest, max_digits)
    digits = [rng.randint(1, 9)] + [rng.randint(0 if case != NO_ZERO else 1, 9) for _ in range(length - 1)]
    if case == INNER_ZERO:
        digits[rng.randint(1, length - 2)], digits[-1] = 0, rng.randint(1, 9)
    elif case == TRAILING_ZERO:
        if length == 1:
            return 0
        zeros = rng.randint(1, length - 1)
        digits = [d or rng.randint(1, 9) for d in digits[: length - zeros]] + [0] * zeros
    elif case == ZERO_AFTER_UNIT:
        unit = rng.choice([u for u in (4, 8) if u < length])
        for k in range(rng.randint(1, 4)):  # 1 to 4 zeros from the top of the group after the unit
            digits[length - unit + k] = 0
        if not any(digits[length - unit:]):
            digits[-1] = rng.randint(1, 9)
    return int("".join(map(str, digits)))


def case_counts(count: int, shares: dict[str, float]) -> dict[str, int]:
    """`count` split into the shares exactly (largest remainders), so every split holds the stated proportions."""
    raw = {case: count * share / sum(shares.values()) for case, share in shares.items()}
    counts = {case: int(value) for case, value in raw.items()}
    for case in sorted(raw, key=lambda c: counts[c] - raw[c])[: count - sum(counts.values())]:
        counts[case] += 1
    return counts


def sample_task_numbers(rng: random.Random, count: int, validation: bool, max_value: int = 10**8) -> list[int]:
    """`count` numbers of one split, case by case in CASE_SHARES (cases that need more digits than max_value has
    are left out), in random order. Validation numbers are distinct."""
    max_digits = len(str(max_value))
    shares = {case: share for case, share in CASE_SHARES.items() if _candidate(random.Random(0), case, max_digits)
              is not None}
    cases = [case for case, n in case_counts(count, shares).items() for _ in range(n)]
    rng.shuffle(cases)
    out: list[int] = []
    seen: set[int] = set()
    budget = 1000 * (count + 100)  # as in sample_numbers: only an impossible request runs out
    for case in cases:
        while True:
            budget -= 1
            if budget < 0:
                raise ValueError(f"could not draw {count} {'validation' if validation else 'training'} numbers "
                                 f"<= {max_value}; the split is too small")
            n = _candidate(rng, case, max_digits)
            if n > max_value or is_validation_number(n) != validation or number_case(n) != case:
                continue
            if validation and n in seen:
                continue
            seen.add(n)
            out.append(n)
            break
    return out


def _write_parquet_atomically(path: Path, batches: Iterable[list[int]]) -> None:
    """Write row groups to a hidden temp file in the same directory, fsync, then rename.

    Same directory so os.replace is an atomic rename on one filesystem; a killed run leaves
    only a `.tmp` file, never a truncated `*.parquet` that a loader would trust.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with pq.ParquetWriter(tmp, _SCHEMA, compression="zstd") as writer:
            for numbers in batches:
                prompts = [str(n) for n in numbers]
                responses = [to_chinese(n) for n in numbers]
                cases = [number_case(n) for n in numbers]
                table = pa.Table.from_arrays(
                    [pa.array(prompts, pa.string()), pa.array(responses, pa.string()), pa.array(cases, pa.string())],
                    schema=_SCHEMA,
                )
                writer.write_table(table, row_group_size=len(numbers))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # contents durable before the name says "complete"
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_task(
    out_dir: Path,
    train_rows: int = 200_000,
    validation_rows: int = 2_000,
    row_group_size: int = 20_000,
    seed: int = 0,
    max_value: int = 10**8,
) -> tuple[Path, Path]:
    """Write out_dir/train.parquet and out_dir/validation.parquet (columns prompt, response, case).

    Training rows are drawn and written one row group at a time so memory stays bounded by
    row_group_size. Validation must be distinct, so it is drawn whole (it is small) and then
    written in row groups too. Each split has its own rng derived from seed, so changing
    train_rows does not change the validation set.
    """
    if train_rows < 0 or validation_rows < 0:
        raise ValueError("row counts must be >= 0")
    if row_group_size <= 0:
        raise ValueError(f"row_group_size must be > 0, got {row_group_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, validation_path = out_dir / "train.parquet", out_dir / "validation.parquet"

    train_rng = random.Random(f"zh_numerals/train/{seed}")  # str seeds hash deterministically
    train_batches = (
        sample_task_numbers(train_rng, min(row_group_size, train_rows - start), False, max_value)
        for start in range(0, train_rows, row_group_size)
    )
    _write_parquet_atomically(train_path, train_batches)

    validation_rng = random.Random(f"zh_numerals/validation/{seed}")
    numbers = sample_task_numbers(validation_rng, validation_rows, validation=True, max_value=max_value)
    validation_batches = [
        numbers[start : start + row_group_size] for start in range(0, validation_rows, row_group_size)
    ]
    _write_parquet_atomically(validation_path, validation_batches)
    return train_path, validation_path
