"""Validation over the whole validation split, sharded across ranks and summed: loss, perplexity and
exact-match accuracy of greedy generation. (The prior art scored the last batch only.)

Rank r scores rows r, r+W, r+2W, ...; every rank runs the same number of batches (short ranks pad with
zero-weight rows) because under ZeRO-3 a forward pass is a collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import islice

import torch

from lowmem_train.trainer.backend import Backend, all_reduce
from lowmem_train.model.generate import decode_answers, pad_prompts
from lowmem_train.trainer.data.encode import IGNORE_INDEX, Encoder, collate
from lowmem_train.trainer.data.source import ParquetIndex, iter_rows
from lowmem_train.trainer.step import token_loss_sum


@dataclass
class EvalResult:
    loss: float
    exact_match: float
    samples: int
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, expected, predicted)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def prompt_length(labels: list[int]) -> int:
    """Causal rows: the prompt and [SEP] are the leading masked labels."""
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


class Evaluator:
    def __init__(self, backend: Backend, index: ParquetIndex, encoder: Encoder, batch_size: int, max_samples: int = 0):
        self.backend, self.index, self.encoder = backend, index, encoder
        self.batch_size, self.max_samples = max(1, batch_size), max_samples
        self.tokenizer = encoder.tokenizer

    def rows_of_this_rank(self) -> tuple[list[tuple], int]:
        """This rank's rows, padded to the same count on every rank; returns (rows, real row count)."""
        total = self.index.num_rows if not self.max_samples else min(self.max_samples, self.index.num_rows)
        rank, world = self.backend.rank, self.backend.world_size
        mine = [row for i, row in enumerate(islice(iter_rows(self.index), total)) if i % world == rank]
        per_rank = -(-total // world)
        real = len(mine)
        while mine and len(mine) < per_rank:
            mine.append(mine[-1])
        return mine, real

    @torch.no_grad()
    def run(self, model) -> EvalResult:
        backend, tok = self.backend, self.tokenizer
        net = backend.accelerator.unwrap_model(model)
        was_training = net.training
        net.eval()
        rows, real = self.rows_of_this_rank()
        loss_sum = tokens = correct = counted = 0.0
        examples: list[tuple[str, str, str]] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            weights = [1.0 if start + i < real else 0.0 for i in range(len(chunk))]
            pairs = self.encoder.encode(chunk)
            if len(pairs) != len(chunk):  # null rows in validation: score what is there
                weights = weights[: len(pairs)]
            if not pairs:
                continue
            batch = {k: v.to(backend.accelerator.device) for k, v in collate(pairs, tok.pad_token_id, self.encoder.model_type).items()}
            keep = torch.tensor(weights, device=batch["labels"].device).bool()
            batch["labels"] = batch["labels"].masked_fill(~keep[:, None], IGNORE_INDEX)
            loss_sum += float(token_loss_sum(net, batch))
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
            predicted = self.generate(net, pairs)
            for (prompt, expected), pred, w in zip(((r[0], r[1]) for r in chunk), predicted, weights):
                if w:
                    hit = pred.replace(" ", "") == self.normalise(expected)
                    correct += hit
                    counted += 1
                    if len(examples) < 3 and backend.is_main:
                        examples.append((str(prompt), str(expected), pred))
        self.encoder.take_stats()  # validation rows are not training statistics
        if was_training:
            net.train()
        loss_sum, tokens, correct, counted = all_reduce(backend, [loss_sum, tokens, correct, counted])
        return EvalResult(loss=loss_sum / max(tokens, 1), exact_match=correct / max(counted, 1), samples=int(counted),
                          examples=examples)

    def normalise(self, text) -> str:
        """The expected answer as the tokenizer would give it back (NFKC, no spaces)."""
        if not isinstance(text, str):
            text = self.tokenizer.decode([t for t in text if t >= 0], skip_special_tokens=True)
            return text.replace(" ", "")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "")

    def generate(self, net, pairs: list[tuple[list[int], list[int]]]) -> list[str]:
        """Greedy answers for a batch of encoded rows (prompts padded as the `generate` command pads them)."""
        tok, device = self.tokenizer, self.backend.accelerator.device
        kind, limit = self.encoder.model_type, self.encoder.max_seq_len
        synced = self.backend.zero_stage == 3 and self.backend.world_size > 1
        prompts = [ids if kind == "t5" else ids[: prompt_length(labels)] for ids, labels in pairs]
        inputs, mask = pad_prompts(prompts, tok.pad_token_id, kind)
        room = limit if kind == "t5" else max(1, limit - inputs.shape[1])  # gpt: positions end at max_seq_len
        out = net.generate(input_ids=inputs.to(device), attention_mask=mask.to(device), max_new_tokens=room,
                           do_sample=False, num_beams=1, synced_gpus=synced)
        return [a.replace(" ", "") for a in decode_answers(tok, out, inputs.shape[1], kind)]
