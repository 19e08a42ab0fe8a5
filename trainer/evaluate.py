"""Validation over the whole validation split, sharded across ranks and summed: loss and perplexity, and the
scores (--eval.metrics: exact match, BLEU, ROUGE-L; trainer/metrics.py) of greedy answers, exact match per case
too. (The prior art scored BLEU on the last batch only.) --eval.generate=false skips generation: loss only.

Rank r scores rows r, r+W, r+2W, ...; every rank runs the same number of batches (short ranks pad with
zero-weight rows) because under ZeRO-3 a forward pass is a collective. A validation file with a `case` column
(data.case_column; the bundled task has one) gets exact match per case too.

Memory: an evaluation batch is twice the training micro-batch in force (the memory guard's plan: where training
had to shrink, evaluation shrinks with it). An out-of-memory error halves it and scores the same rows again, down
to one row; the smaller size holds for the rest of the run. Under ZeRO-3 on several ranks a forward pass is a
collective, so there the error ends the run as one in training does (step.OutOfMemoryInCollective).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from itertools import islice

import torch

from lowmem_train.model.families.base import IGNORE_INDEX
from lowmem_train.model.generate import generate_batch
from lowmem_train.trainer import distributed
from lowmem_train.trainer.backend import Backend
from lowmem_train.trainer.data.encode import Encoder, collate
from lowmem_train.trainer.data.source import ParquetIndex, iter_rows
from lowmem_train.trainer.faults import OOM_FAULT
from lowmem_train.trainer.memory.policy import OutOfMemoryGiveUp
from lowmem_train.trainer.metrics import METRICS, describe, normalised
from lowmem_train.trainer.step import OOM_ERRORS, OutOfMemoryInCollective

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    loss: float
    samples: int
    scores: dict[str, float] = field(default_factory=dict)  # metric name -> score (metrics.py), when generated
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, expected, predicted)
    by_case: dict[str, tuple[int, int]] = field(default_factory=dict)  # case -> (correct, scored)
    batch_size: int = 0  # rows per forward pass it ran with

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def exact_match(self) -> float | None:
        return self.scores.get("exact_match")

    def value(self, name: str) -> float:
        """`loss` or a score, by name (--eval.best_metric)."""
        return self.loss if name == "loss" else self.scores[name]

    def describe_scores(self) -> str:
        """'exact match 98.55%, BLEU 97.10'; '' when nothing was generated."""
        return ", ".join(describe(name, value) for name, value in self.scores.items())

    def describe_cases(self) -> str:
        """'no zero 99.8% (812), inner zero 97.1% (410), ...', or '' without cases."""
        return ", ".join(f"{case} {100 * c / max(n, 1):.1f}% ({n})" for case, (c, n) in self.by_case.items())


class Evaluator:
    def __init__(self, backend: Backend, index: ParquetIndex, encoder: Encoder, max_samples: int = 0,
                 metrics: tuple[str, ...] = ("exact_match",), generate: bool = True):
        self.backend, self.index, self.encoder = backend, index, encoder
        self.max_samples = max_samples
        self.metrics = [METRICS[name] for name in metrics] if generate else []
        self.batch_cap: int | None = None  # the largest batch that fitted after an out-of-memory error
        self.tokenizer, self.family = encoder.tokenizer, encoder.family
        self.has_cases = len(index.columns) > 2  # (prompt, response, case)

    def rows_of_this_rank(self) -> tuple[list[tuple], int, list[str]]:
        """This rank's rows, padded to the same count on every rank; (rows, real row count, every case name in
        order of first appearance: the same list on every rank)."""
        total = self.index.num_rows if not self.max_samples else min(self.max_samples, self.index.num_rows)
        rank, world = self.backend.rank, self.backend.world_size
        mine, cases = [], {}
        for i, row in enumerate(islice(iter_rows(self.index), total)):
            if self.has_cases:
                cases.setdefault(str(row[2]), None)
            if i % world == rank:
                mine.append(row)
        per_rank = -(-total // world)
        real = len(mine)
        while mine and len(mine) < per_rank:
            mine.append(mine[-1])
        return mine, real, list(cases)

    @torch.no_grad()
    def run(self, model, batch_size: int) -> EvalResult:
        """Score the validation split; `batch_size` rows per forward pass at most (module docstring)."""
        backend = self.backend
        net = backend.accelerator.unwrap_model(model)
        was_training = net.training
        net.eval()
        rows, real, cases = self.rows_of_this_rank()
        size = max(1, min(batch_size, self.batch_cap or batch_size))
        loss_sum = tokens = counted = 0.0
        stats = {m.name: [0.0] * m.width for m in self.metrics}
        case_correct, case_counted = dict.fromkeys(cases, 0.0), dict.fromkeys(cases, 0.0)
        examples: list[tuple[str, str, str]] = []
        start = 0
        while start < len(rows):
            chunk = rows[start:start + size]
            weights = [1.0 if start + i < real else 0.0 for i in range(len(chunk))]
            try:
                scored = self.score(net, chunk, weights)
            except OOM_ERRORS:
                size = self.after_out_of_memory(size)
                continue
            start += len(chunk)
            if scored is None:
                continue
            chunk_loss, chunk_tokens, predicted, weights = scored
            loss_sum += chunk_loss
            tokens += chunk_tokens
            kept = [(row, pred) for row, pred, w in zip(chunk, predicted, weights) if w]
            counted += len(kept)
            answers, expected = [pred for _, pred in kept], [self.reference(row[1]) for row, _ in kept]
            for metric in self.metrics:
                stats[metric.name] = [a + b for a, b in zip(stats[metric.name], metric.stats(answers, expected))]
            for (row, pred), ref in zip(kept, expected):
                if self.has_cases:
                    case_correct[str(row[2])] += normalised(pred) == normalised(ref)
                    case_counted[str(row[2])] += 1
                if len(examples) < 3 and backend.is_main and self.metrics:  # loss only: nothing was generated
                    examples.append((str(row[0]), ref, pred))
        self.encoder.take_stats()  # validation rows are not training statistics
        if was_training:
            net.train()
        flat = [v for m in self.metrics for v in stats[m.name]]
        totals = distributed.sum_(backend, [loss_sum, tokens, counted, *case_correct.values(), *case_counted.values(),
                                            *flat])
        loss_sum, tokens, counted = totals[:3]
        per_case, flat = totals[3:3 + 2 * len(cases)], totals[3 + 2 * len(cases):]
        scores = {}
        for metric in self.metrics:
            scores[metric.name], flat = metric.score(flat[:metric.width]), flat[metric.width:]
        by_case = {case: (int(per_case[i]), int(per_case[len(cases) + i])) for i, case in enumerate(cases)}
        if not self.metrics:
            by_case = {}
        return EvalResult(loss=loss_sum / max(tokens, 1), samples=int(counted), scores=scores, examples=examples,
                          by_case=by_case, batch_size=size)

    def score(self, net, chunk: list[tuple], weights: list[float]):
        """(summed token loss, target tokens, greedy answers, weights) of one batch; None when no row encodes."""
        pairs = self.encoder.encode(chunk)
        if len(pairs) != len(chunk):  # null rows in validation: score what is there
            weights = weights[: len(pairs)]
        if not pairs:
            return None
        device = self.backend.accelerator.device
        batch = {k: v.to(device) for k, v in collate(pairs, self.tokenizer.pad_token_id,
                                                      self.encoder.model_type).items()}
        keep = torch.tensor(weights, device=batch["labels"].device).bool()
        batch["labels"] = batch["labels"].masked_fill(~keep[:, None], IGNORE_INDEX)
        OOM_FAULT.before_eval(len(chunk), self.backend.rank)
        loss = float(self.family.token_loss_sum(net, batch))
        answers = self.generate(net, pairs) if self.metrics else [""] * len(pairs)
        return loss, self.family.target_tokens(batch["labels"]), answers, weights

    def after_out_of_memory(self, size: int) -> int:
        """The batch size to score the same rows with after an out-of-memory error (module docstring)."""
        if self.backend.zero_stage == 3 and self.backend.world_size > 1:
            raise OutOfMemoryInCollective(f"out of memory in a ZeRO-3 evaluation batch of {size} rows")
        if size == 1:
            raise OutOfMemoryGiveUp("out of memory evaluating one validation row; lower --max_seq_len or the model "
                                    "size, or set --validation_file= to train without validation")
        self.batch_cap = size // 2
        log.warning("memory: out of memory in evaluation: batch %d -> %d rows (for the rest of this run)", size,
                    self.batch_cap)
        return self.batch_cap

    def reference(self, text) -> str:
        """The expected answer as the tokenizer gives it back (NFKC and the like), token-id rows decoded."""
        if not isinstance(text, str):
            return self.tokenizer.decode([t for t in text if t >= 0], skip_special_tokens=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, net, pairs: list[tuple[list[int], list[int]]]) -> list[str]:
        """Greedy answers for a batch of encoded rows (prompts laid out and padded as `generate` does it)."""
        prompts = [self.family.prompt_of(ids, labels) for ids, labels in pairs]
        room = self.family.generation_room(self.encoder.max_seq_len, max(len(p) for p in prompts))
        synced = self.backend.zero_stage == 3 and self.backend.world_size > 1
        return generate_batch(net, self.tokenizer, self.family, prompts, room, do_sample=False, num_beams=1,
                              synced_gpus=synced)
