"""`generate` does what its strategies are named for, on a trained tiny GPT (model/generate.py, commands/generate.py).

* top_p: nucleus sampling with p -> 0 keeps only the likeliest token, so it must give the greedy answers, even
  at a temperature that makes sampling wander (shown by the same run with p = 1, which is also what a `top_p`
  that got lost on the way to transformers would give).
* beam: beam search with 4 beams must find answers at least as likely (total log-likelihood, what the project's
  beam asks transformers to maximise with length_penalty 0) as greedy's, and strictly likelier for some prompts
  (else beam ran as greedy). With transformers' default length_penalty 1.0 (log-likelihood per token), 7 of these
  60 prompts got a less likely answer than greedy's: a long unfinished answer beat a short likely one.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.helpers import run_cli
from tests.integration.conftest import MEMORISED

pytestmark = pytest.mark.slow
_rng = random.Random(0)
# The memorised numbers (sure answers) and numbers the model never saw (unsure ones: where strategies differ).
PROMPTS = [str(n) for n in MEMORISED] + [str(_rng.randint(0, 10 ** _rng.randint(1, 8))) for _ in range(56)]


def generate_cli(model: Path, prompts_file: Path, *args: str) -> list[tuple[str, str]]:
    """The `generate` command as a user runs it: one `prompt<TAB>answer` line per prompt."""
    result = run_cli(["generate", f"--model={model}", f"--prompts_file={prompts_file}", *args], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [tuple(line.split("\t")) for line in result.stdout.splitlines()]


def test_top_p_near_zero_samples_the_greedy_answers(memorised_gpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    greedy = generate_cli(memorised_gpt, prompts)
    nucleus = generate_cli(memorised_gpt, prompts, "--strategy=top_p", "--top_p=1e-9", "--temperature=2.0")
    wide = generate_cli(memorised_gpt, prompts, "--strategy=top_p", "--top_p=1.0", "--temperature=2.0")
    assert [p for p, _ in greedy] == PROMPTS
    assert nucleus == greedy
    differ = [p for (p, a), (_, b) in zip(greedy, wide) if a != b]
    assert len(differ) >= 5, differ  # the sampling really samples: p is what made the answers greedy


def generated(exported, decoding, prompts: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids up to and including [EOS]) per prompt, from `answer_prompts` as the command
    calls it: the model's generate() is wrapped to keep the token ids it returns."""
    from lowmem_train.model.generate import answer_prompts

    model, calls = exported.model, []
    real_generate = model.generate

    def recording_generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        calls.append((kwargs["input_ids"], out))
        return out

    model.generate = recording_generate
    try:
        answer_prompts(exported, prompts, decoding, batch_size=16)
    finally:
        del model.generate
    pad, eos = exported.tokenizer.pad_token_id, exported.tokenizer.eos_token_id
    rows = []
    for ids, out in calls:
        width = ids.shape[1]
        for prompt, row in zip(ids.tolist(), out.tolist()):
            answer = row[width:]
            if eos in answer:  # a finished row is padded after its [EOS]; an unfinished one ran to the limit
                answer = answer[: answer.index(eos) + 1]
            rows.append(([t for t in prompt if t != pad], answer))  # GPT prompts are left-padded
    assert len(rows) == len(prompts)
    return rows


def log_likelihood(model, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | prompt), one unpadded row."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer))


def test_beam_search_scores_at_least_as_well_as_greedy(memorised_gpt):
    from lowmem_train.model.generate import Decoding, load_exported

    exported = load_exported(memorised_gpt)
    model = exported.model
    assert Decoding("beam").generate_kwargs()["length_penalty"] == 0.0

    def score(prompt, answer):
        return log_likelihood(model, prompt, answer)

    greedy = generated(exported, Decoding("greedy"), PROMPTS)
    beam = generated(exported, Decoding("beam", num_beams=4), PROMPTS)
    assert [p for p, _ in greedy] == [p for p, _ in beam]
    gaps = [score(p, b) - score(p, g) for (p, g), (_, b) in zip(greedy, beam)]
    worst = min(range(len(gaps)), key=gaps.__getitem__)
    assert gaps[worst] >= -1e-4, f"prompt {PROMPTS[worst]}: beam scores {gaps[worst]:.4g} below greedy"
    assert sum(g > 1e-3 for g in gaps) >= 1, gaps  # beam search found a likelier answer than greedy somewhere
    # The memorised numbers: both strategies give the trained answer.
    for i in range(len(MEMORISED)):
        assert beam[i][1] == greedy[i][1]
