"""Scores of generated answers against references, as plain functions of (predictions, references).

Each metric returns sufficient statistics, numbers that add up across batches and ranks (the evaluator sums them
with one all-reduce), and turns the summed statistics into its score; so 2 processes score exactly what 1 does.

    exact_match  the answer equals the reference, spaces aside (the bundled task's figure)          0-1
    bleu         corpus BLEU-4 by sacrebleu with its Chinese tokenisation (tokenize="zh": CJK characters one
                 by one, other text 13a), smoothing "exp" as sacrebleu's BLEU() defaults to: the n-gram
                 matches and totals of every answer (sacrebleu's BLEUScore.counts / .totals, public) are summed
                 and BLEU.compute_bleu makes the corpus score of them, which is sacrebleu's corpus_score        0-100
    rouge_l      mean over answers of ROUGE-L F1 by Google's rouge-score, on characters (its default tokenizer
                 keeps only [a-z0-9] and would score any two Chinese texts 0)                                 0-1
A new metric is one entry in METRICS.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

NGRAMS = 4


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # in log lines
    stats: Callable[[Sequence[str], Sequence[str]], list[float]]  # summable statistics of a batch
    score: Callable[[Sequence[float]], float]  # the score of summed statistics
    width: int  # how many statistics
    percent: bool  # logged as a percentage


def normalised(text: str) -> str:
    return text.replace(" ", "")


def exact_match_stats(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    return [float(sum(normalised(p) == normalised(r) for p, r in zip(predictions, references))), float(len(references))]


@lru_cache(maxsize=1)
def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="zh", max_ngram_order=NGRAMS, effective_order=True)


def bleu_stats(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """[hypothesis length, reference length, matches 1..4, totals 1..4], summed over the answers."""
    total = [0.0] * (2 + 2 * NGRAMS)
    for prediction, reference in zip(predictions, references):
        s = _bleu().sentence_score(prediction, [reference])
        for i, value in enumerate([s.sys_len, s.ref_len, *s.counts, *s.totals]):
            total[i] += value
    return total


def bleu_score(stats: Sequence[float]) -> float:
    from sacrebleu.metrics import BLEU

    sys_len, ref_len = int(stats[0]), int(stats[1])
    counts = [int(v) for v in stats[2:2 + NGRAMS]]
    totals = [int(v) for v in stats[2 + NGRAMS:]]
    return float(BLEU.compute_bleu(counts, totals, sys_len, ref_len, smooth_method="exp").score)


class Characters:
    """rouge-score's tokenizer protocol: every character but spaces is a token."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=Characters())


def rouge_l_stats(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    scores = [_rouge().score(reference, prediction)["rougeL"].fmeasure for prediction, reference in
              zip(predictions, references)]  # rouge-score's order: (target, prediction)
    return [float(sum(scores)), float(len(scores))]


def mean(stats: Sequence[float]) -> float:
    return stats[0] / stats[1] if stats[1] else 0.0


METRICS = {m.name: m for m in (
    Metric("exact_match", "exact match", exact_match_stats, mean, 2, True),
    Metric("bleu", "BLEU", bleu_stats, bleu_score, 2 + 2 * NGRAMS, False),
    Metric("rouge_l", "ROUGE-L", rouge_l_stats, mean, 2, True),
)}
# How a figure of an evaluation is judged when it picks the best checkpoint: the loss falls, scores rise.
LOWER_IS_BETTER = {"loss": True, **{name: False for name in METRICS}}


def describe(name: str, value: float) -> str:
    """'exact match 98.55%', 'BLEU 71.20', 'ROUGE-L 91.3%'."""
    metric = METRICS[name]
    return f"{metric.label} {100 * value:.2f}%" if metric.percent else f"{metric.label} {value:.2f}"
