"""Scores of generated answers (trainer/metrics.py) against the libraries that define them."""

from __future__ import annotations

import pytest
import sacrebleu

from lowmem_train.trainer.metrics import METRICS

# A fixture of Chinese answers (the prior art's kind of data) with hits, near misses and misses.
REFERENCES = ["今天天气很好，我们去公园散步。", "一万二千三百四十五", "模型在验证集上的表现很稳定", "请把这份报告翻译成英文",
              "数据并行训练需要同步梯度", "二千零二十四万零一百零一", "他明天早上八点出发", "The model is fine, thanks."]
ANSWERS = ["今天天气很好，我们去公园散步。", "一万二千三百四十", "模型在验证集上表现稳定", "把这份报告翻译成中文",
           "数据并行训练需要同步", "二千零二十四万零一百", "他后天晚上出发", "The model is fine."]


def score(name: str, answers, references, shards: int = 1) -> float:
    metric = METRICS[name]
    total = [0.0] * metric.width
    for i in range(shards):  # as ranks do: each its rows' statistics, summed
        part = metric.stats(answers[i::shards], references[i::shards])
        total = [a + b for a, b in zip(total, part)]
    return metric.score(total)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_bleu_is_sacrebleus_corpus_bleu_with_chinese_tokenisation_however_the_rows_are_split(shards):
    expected = sacrebleu.corpus_bleu(ANSWERS, [REFERENCES], tokenize="zh").score
    assert score("bleu", ANSWERS, REFERENCES, shards) == pytest.approx(expected, abs=0.01)
    assert expected != pytest.approx(sacrebleu.corpus_bleu(ANSWERS, [REFERENCES]).score, abs=1)  # tokenize matters


def test_rouge_l_is_character_level_for_chinese():
    from rouge_score import rouge_scorer

    class Characters:
        def tokenize(self, text):
            return [c for c in text if not c.isspace()]

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Characters())
    expected = sum(scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(ANSWERS, REFERENCES)) / len(ANSWERS)
    assert score("rouge_l", ANSWERS, REFERENCES, shards=2) == pytest.approx(expected, abs=1e-12)
    # rouge-score's own tokenizer keeps [a-z0-9] only: every Chinese pair would score 0
    assert rouge_scorer.RougeScorer(["rougeL"]).score(REFERENCES[0], ANSWERS[0])["rougeL"].fmeasure == 0.0
    assert score("rouge_l", ANSWERS[:1], REFERENCES[:1]) == 1.0


def test_exact_match_ignores_spaces_only():
    assert score("exact_match", ["一 万", "一万"], ["一万", "一万二"]) == 0.5
