"""Encoder: text and prepared token ids take the same path; null and over-long rows are counted, never lost."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowmem_train.model.tokenizer import load_tokenizer, train_tokenizer
from lowmem_train.trainer.data.encode import IGNORE_INDEX, Encoder, collate, pad, vocab_fingerprint

ROWS = [("123", "一百二十三"), ("7", "七"), ("10010", "一万零一十" * 5), ("", "零")]


@pytest.fixture(scope="module")
def tok(tiny_task):
    return load_tokenizer(tiny_task["tokenizer"])


def as_ids(tok, rows):
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [(ids(p), ids(r)) for p, r in rows]


@pytest.mark.parametrize("model_type", ["t5", "gpt"])
@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_token_id_rows_encode_exactly_like_text_rows(tok, model_type, overlong):
    text = Encoder(tok, model_type, 12, overlong)
    ids = Encoder(tok, model_type, 12, overlong)
    assert text.encode(ROWS) == ids.encode(as_ids(tok, ROWS))
    assert text.take_stats() == ids.take_stats()


def test_layouts(tok):
    eos, sep = tok.eos_token_id, tok.sep_token_id
    p, r = as_ids(tok, [("12", "十二")])[0]
    assert Encoder(tok, "t5", 32).encode([("12", "十二")]) == [(p + [eos], r + [eos])]
    ids, labels = Encoder(tok, "gpt", 32).encode([("12", "十二")])[0]
    assert ids == p + [sep] + r + [eos]
    assert labels == [IGNORE_INDEX] * len(p) + [sep] + r + [eos]  # the model learns to end a bare prompt


def test_null_and_overlong_rows_are_counted(tok):
    rows = [("1", None), (None, "一"), ("2", "二"), ("3" * 40, "三")]
    skip = Encoder(tok, "t5", 8, "skip")
    assert len(skip.encode(rows)) == 1
    assert skip.take_stats().as_dict() == {"rows": 4, "skipped_null": 2, "skipped_overlong": 1, "truncated": 0}
    truncate = Encoder(tok, "gpt", 8, "truncate")
    pairs = truncate.encode(rows)
    assert len(pairs) == 2 and all(len(ids) <= 8 and len(labels) <= 8 for ids, labels in pairs)
    assert truncate.take_stats().as_dict() == {"rows": 4, "skipped_null": 2, "skipped_overlong": 0, "truncated": 1}
    assert truncate.take_stats().rows == 0  # taking resets


def test_vocab_fingerprint_tells_tokenizers_apart(tok, tiny_task, tmp_path):
    assert vocab_fingerprint(tok) == vocab_fingerprint(load_tokenizer(tiny_task["tokenizer"]))
    other = train_tokenizer(["abcdefg hij", "klmnop"], 40, tmp_path / "other")
    assert vocab_fingerprint(other) != vocab_fingerprint(tok)


def test_collate_pads_and_shifts(tok):
    pad = tok.pad_token_id
    batch = collate([([5, 6, 7], [8, 9]), ([5], [8])], pad, "t5")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 9], [8, IGNORE_INDEX]]
    assert batch["decoder_input_ids"].tolist() == [[pad, 8], [pad, 8]]
    empty = collate([], pad, "gpt")
    assert empty["labels"].tolist() == [[IGNORE_INDEX]] and "decoder_input_ids" not in empty


TEXTS = ["123", "", " ", "四十三万零四十七", "a b  c", "1 2\t3\n", "零" * 50, "unknown ✓ symbols 🙂", "１２３"]


def test_the_rust_backend_gives_the_ids_of_the_transformers_call(tok, tiny_task):
    """Encoder.token_ids calls the fast tokenizer's backend directly; it must give transformers' ids exactly,
    also for a tokenizer whose post-processor appends a special token (T5's own tokenizer appends </s>)."""
    from tokenizers.processors import TemplateProcessing

    assert Encoder(tok, "t5", 32).token_ids(TEXTS) == tok(TEXTS, add_special_tokens=False)["input_ids"]
    appends = load_tokenizer(tiny_task["tokenizer"])
    appends.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {appends.eos_token}", special_tokens=[(appends.eos_token, appends.eos_token_id)])
    assert appends(["12"])["input_ids"] != appends(["12"], add_special_tokens=False)["input_ids"]  # it does append
    assert Encoder(appends, "t5", 32).token_ids(TEXTS) == tok(TEXTS, add_special_tokens=False)["input_ids"]


def test_a_tokenizer_that_truncates_by_itself_goes_through_transformers(tok, tiny_task):
    """A tokenizer.json with its own truncation: transformers' call ignores it unless asked, so the backend's
    direct call (which would truncate) must not be used."""
    own = load_tokenizer(tiny_task["tokenizer"])
    own.backend_tokenizer.enable_truncation(max_length=2)
    assert Encoder(own, "t5", 32).token_ids(["12345"]) == [tok("12345", add_special_tokens=False)["input_ids"]]
    assert len(Encoder(own, "t5", 32).token_ids(["12345"])[0]) == 5


@given(st.lists(st.lists(st.integers(0, 2**40), max_size=9), max_size=12), st.integers(-100, 100))
def test_pad_equals_row_by_row_padding(rows, value):
    width = max([len(r) for r in rows] + [1])
    expected = [list(r) + [value] * (width - len(r)) for r in rows]
    out = pad(rows, value)
    assert out.dtype == torch.long and out.shape == (len(rows), width) and out.tolist() == expected
