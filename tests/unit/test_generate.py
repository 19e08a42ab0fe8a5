"""Prompt encoding for generation (model/generate.py): the format the trainer trained on, padding, decoding,
and the command's option checks. No model is trained here."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from lowmem_train.commands import generate as command
from lowmem_train.config.errors import ConfigError
from lowmem_train.model import families, generate
from lowmem_train.trainer.data.encode import Encoder


@pytest.fixture(scope="module")
def tokenizer(tiny_task):
    from lowmem_train.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_task["tokenizer"])


def options(**overrides) -> Namespace:
    defaults = dict(prompt=[], prompts_file=None, max_new_tokens=32, strategy="greedy", top_k=50, top_p=0.9,
                    temperature=1.0, num_beams=4, seed=0, batch_size=16)
    return Namespace(**{**defaults, **overrides})


@pytest.mark.parametrize("kind", ["t5", "gpt"])
def test_prompt_ids_match_what_the_trainer_encodes(tokenizer, kind):
    """Generation must feed the model the prompt exactly as training did, or a trained model answers badly."""
    ids, labels = Encoder(tokenizer, kind, max_seq_len=32).encode([("10010", "一万零一十")])[0]
    family = families.get(kind)
    assert generate.prompt_ids(tokenizer, family, "10010") == family.prompt_of(ids, labels)


def test_prompt_ends_with_eos_for_t5_and_sep_for_gpt(tokenizer):
    digits = tokenizer("42", add_special_tokens=False)["input_ids"]
    assert generate.prompt_ids(tokenizer, families.get("t5"), "42") == digits + [tokenizer.eos_token_id]
    assert generate.prompt_ids(tokenizer, families.get("gpt"), "42") == digits + [tokenizer.sep_token_id]


def test_t5_batches_are_right_padded_and_gpt_batches_left_padded():
    prompts = [[5, 6, 7], [8]]
    ids, mask = generate.pad_prompts(prompts, pad_id=0, side=families.get("t5").padding_side)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = generate.pad_prompts(prompts, pad_id=0, side=families.get("gpt").padding_side)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_a_causal_answer_is_the_continuation_only(tokenizer):
    gpt = families.get("gpt")
    prompt = generate.prompt_ids(tokenizer, gpt, "7")
    answer = tokenizer("七", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    out = torch.tensor([prompt + answer])
    assert generate.decode_answers(tokenizer, gpt, out, len(prompt)) == ["七"]
    t5_out = torch.tensor([[tokenizer.pad_token_id] + answer])  # T5 starts its output at [PAD]
    assert generate.decode_answers(tokenizer, families.get("t5"), t5_out, 99) == ["七"]


def test_family_follows_the_config():
    assert families.for_hf_config(Namespace(model_type="t5")).encoder_decoder
    assert not families.for_hf_config(Namespace(model_type="gpt2")).encoder_decoder


def test_each_strategy_passes_only_its_own_options():
    kwargs = lambda **o: command.decoding(options(**o)).generate_kwargs()  # noqa: E731
    assert kwargs() == {"do_sample": False, "num_beams": 1}
    assert kwargs(strategy="beam", num_beams=3) == {"do_sample": False, "num_beams": 3, "length_penalty": 0.0}
    assert kwargs(strategy="top_k", top_k=5, temperature=0.7) == {
        "do_sample": True, "top_k": 5, "top_p": 1.0, "temperature": 0.7}
    assert kwargs(strategy="top_p", top_p=0.5) == {
        "do_sample": True, "top_p": 0.5, "top_k": 0, "temperature": 1.0}


def test_prompts_come_from_flags_then_the_file_without_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("12\n\n  \n345\r\n", encoding="utf-8")
    assert command.read_prompts(options(prompt=["7"], prompts_file=str(path))) == ["7", "12", "345"]


@pytest.mark.parametrize("args, message", [
    (options(), "no prompt given"),
    (options(prompt=["1", " "]), "--prompt #2 is empty"),
    (options(prompts_file="/nonexistent/prompts.txt"), "does not exist"),
])
def test_prompt_mistakes_are_named(args, message):
    with pytest.raises(ConfigError, match=message):
        command.read_prompts(args)


def test_an_empty_prompts_file_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="has no prompts"):
        command.read_prompts(options(prompts_file=str(path)))


@pytest.mark.parametrize("flag, value", [("max_new_tokens", 0), ("batch_size", 0), ("top_k", 0), ("num_beams", 0),
                                         ("top_p", 0.0), ("top_p", 1.5), ("temperature", 0.0)])
def test_out_of_range_options_are_refused(flag, value):
    with pytest.raises(ConfigError, match=f"--{flag} must be"):
        command.check_options(options(**{flag: value}))


def test_answers_stay_on_one_line():
    assert command.one_line("a\tb\nc\\d") == "a\\tb\\nc\\\\d"
