"""Rows -> model inputs, laid out by the model's family (model/families/), and padding into one batch.

Rows whose text is null are skipped, rows too long are truncated or skipped (cfg.data.overlong); both are
counted in `EncodeStats` and reported by the trainer, never dropped silently.

Rows of token ids (written by `prepare --tokenize`: prompt and response ids without special tokens) skip the
tokenizer and take the same path from there on: special tokens, layout and truncation are applied here, at
training time, so one prepared file serves every model family and any max_seq_len.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from itertools import chain
from typing import Sequence

import numpy as np
import torch

from lowmem_train.model import families
from lowmem_train.model.families.base import IGNORE_INDEX


@dataclass
class EncodeStats:
    rows: int = 0
    skipped_null: int = 0
    skipped_overlong: int = 0
    truncated: int = 0

    def add(self, other: "EncodeStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Encoder:
    """Tokenizes (prompt, response) rows for one model family. Picklable: it travels into DataLoader workers."""

    tokenizer: object
    model_type: str
    max_seq_len: int
    overlong: str = "truncate"
    stats: EncodeStats = field(default_factory=EncodeStats)

    def __post_init__(self) -> None:
        self.family = families.get(self.model_type)
        self.specials = self.family.specials(self.tokenizer)

    def encode(self, rows: Sequence[tuple]) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) per kept row; token-id rows (from `prepare`) skip the tokenizer."""
        self.stats.rows += len(rows)
        kept = [r for r in rows if r[0] is not None and r[1] is not None]
        self.stats.skipped_null += len(rows) - len(kept)
        if not kept:
            return []
        if isinstance(kept[0][0], str):
            prompts, responses = self.token_ids([r[0] for r in kept]), self.token_ids([r[1] for r in kept])
        else:
            prompts, responses = [list(r[0]) for r in kept], [list(r[1]) for r in kept]
        pairs = [self._build(p, r) for p, r in zip(prompts, responses)]
        out = [p for p in pairs if p is not None]
        self.stats.skipped_overlong += len(pairs) - len(out)
        return out

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Ids without special tokens. A fast tokenizer's Rust backend directly when it neither truncates nor pads
        by itself (then the two give the same ids; tests/unit/test_data_encode.py): transformers' wrapper around
        it costs as much again in Python, every step, beside the training thread."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _build(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]] | None:
        row = self.family.layout(prompt, response, self.specials, self.max_seq_len, self.overlong)
        if row is None:
            return None
        self.stats.truncated += row.truncated
        return row.input_ids, row.labels

    def take_stats(self) -> EncodeStats:
        stats, self.stats = self.stats, EncodeStats()
        return stats


def vocab_fingerprint(tokenizer) -> str:
    """Identifies a vocabulary: token ids written with one tokenizer are only valid with the same one."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Rows of ids -> one (rows, longest row) tensor, `value` after each row's end. One numpy fill, not a
    tensor per row: collating runs every step, beside the training thread (a tensor per row cost ~3 ms a step)."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    out = np.full((len(seqs), max(int(lengths.max(initial=0)), 1)), value, dtype=np.int64)
    total = int(lengths.sum())
    if total:
        # a boolean mask selects in row-major order: row 0's cells, then row 1's, ... as chain() yields them
        out[np.arange(out.shape[1]) < lengths[:, None]] = np.fromiter(chain.from_iterable(seqs), np.int64, total)
    return torch.from_numpy(out)


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, model_type: str) -> dict[str, torch.Tensor]:
    """Pad to the longest row of this batch (not to max_seq_len: short tasks stay cheap).

    No rows at all (every row of a step skipped) gives one fully masked row: every rank must still run
    its forward/backward passes, and a masked row adds nothing to loss or gradients.
    """
    if not pairs:
        pairs = [([pad_id], [IGNORE_INDEX])]
    batch = {
        "input_ids": pad([p[0] for p in pairs], pad_id),
        "attention_mask": pad([(1,) * len(p[0]) for p in pairs], 0),
        "labels": pad([p[1] for p in pairs], IGNORE_INDEX),
    }
    families.get(model_type).collate_extra(batch, pad_id)
    return batch
