"""Model families (model/families/): each lays out rows, prompts and exported tokenizers from one description, and
a new family is one new file that everything else picks up."""

from __future__ import annotations

import textwrap

import pytest
import torch

from lowmem_train.model import families
from lowmem_train.model.families.base import IGNORE_INDEX

SHIPPED = ["t5", "gpt", "llama"]


@pytest.fixture(scope="module")
def tok(tiny_task):
    from lowmem_train.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_task["tokenizer"])


def test_names_come_from_the_folder_default_first():
    assert families.names()[: len(SHIPPED)] == SHIPPED
    with pytest.raises(ValueError, match="choose one of t5, gpt, llama"):
        families.get("bert")


@pytest.mark.parametrize("family", SHIPPED)
def test_exported_tokenizer_encodes_prompts_as_training_did(tok, tmp_path, family):
    """One layout: `tok(prompt)` of an exported tokenizer equals the prompt part of the trainer's encoding."""
    from transformers import AutoTokenizer

    from lowmem_train.model.tokenizer import for_export
    from lowmem_train.trainer.data.encode import Encoder

    fam = families.get(family)
    for_export(tok, fam, 32).save_pretrained(tmp_path / "tok")
    exported = AutoTokenizer.from_pretrained(tmp_path / "tok")
    encoder = Encoder(tok, family, max_seq_len=32)
    for prompt, response in [("12345", "一万二千三百四十五"), ("7", "七"), ("20240101", "二千零二十四万零一百零一")]:
        ids, labels = encoder.encode([(prompt, response)])[0]
        assert exported(prompt)["input_ids"] == fam.prompt_of(ids, labels) == fam.prompt(
            tok(prompt, add_special_tokens=False)["input_ids"], fam.specials(tok))
        if not fam.encoder_decoder:  # a causal row is prompt and response as one sequence
            assert exported(prompt, response)["input_ids"] == ids
        else:  # a seq2seq target is the response as the tokenizer encodes a target
            assert exported(text_target=response)["input_ids"] == labels
    assert exported.padding_side == fam.padding_side and exported.model_max_length == 32


@pytest.mark.parametrize("family", SHIPPED)
def test_loss_counts_exactly_the_target_tokens(tok, family):
    """The summed loss of a batch is the sum over its rows: padding and masked labels add nothing."""
    from lowmem_train.config.loader import build_config
    from lowmem_train.model.build import build_model
    from lowmem_train.trainer.data.encode import Encoder, collate

    cfg = build_config(None, {"model.type": family, "model.d_model": "32", "model.d_ff": "64", "model.num_heads": "2"})
    model = build_model(cfg, tok).eval()
    fam = families.get(family)
    pairs = Encoder(tok, family, 32).encode([("7", "七"), ("20240101", "二千零二十四万零一百零一")])
    together = fam.token_loss_sum(model, collate(pairs, tok.pad_token_id, family))
    apart = sum(fam.token_loss_sum(model, collate([p], tok.pad_token_id, family)) for p in pairs)
    assert torch.allclose(together, apart, rtol=1e-5)
    batch = collate(pairs, tok.pad_token_id, family)
    batch["labels"][:] = IGNORE_INDEX
    assert fam.token_loss_sum(model, batch).item() == 0.0


@pytest.mark.parametrize("family", SHIPPED)
def test_target_tokens_are_the_tokens_the_loss_scores(tok, family):
    """The mean loss divides by `target_tokens`: one target token more than the loss scores (GPT with an empty
    prompt: [SEP] at position 0 is a label that nothing predicts) would make every such loss too small. A model
    with all-zero logits gives each scored token a loss of exactly log(vocabulary): the sum counts them."""
    from types import SimpleNamespace

    from lowmem_train.trainer.data.encode import Encoder, collate

    fam, vocab = families.get(family), 64
    batch = collate(Encoder(tok, family, 32).encode([("", "零"), ("7", "七十"), ("", "")]), tok.pad_token_id, family)

    def uniform(input_ids, decoder_input_ids=None, **_):
        return SimpleNamespace(logits=torch.zeros(*(input_ids if decoder_input_ids is None else decoder_input_ids).shape,
                                                  vocab))

    scored = fam.token_loss_sum(uniform, batch) / torch.log(torch.tensor(float(vocab)))
    assert round(float(scored)) == fam.target_tokens(batch["labels"])


LLAMA = '''
"""A Llama-style causal model (RoPE, RMSNorm, SwiGLU): the GPT layout, another network."""

from lowmem_train.model.families.gpt import GptFamily


class PluginFamily(GptFamily):
    name = "plugin"
    hf_model_types = ("plugin",)

    def build(self, cfg, vocab, specials):
        from transformers import LlamaConfig, LlamaForCausalLM

        m = cfg.model
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads, max_position_embeddings=cfg.max_seq_len,
            pad_token_id=specials.pad, eos_token_id=specials.eos, bos_token_id=specials.bos, tie_word_embeddings=True,
            attn_implementation=m.attn_implementation))


FAMILY = PluginFamily()
'''


@pytest.mark.slow
def test_a_new_family_is_one_new_file(tiny_task, tmp_path, monkeypatch):
    """Drop plugin.py next to t5.py and gpt.py (here: a folder added to the families package's path): the config
    accepts it, the trainer trains it, evaluation and the final export go through it, and plain transformers
    loads the export and answers."""
    (tmp_path / "families").mkdir()
    (tmp_path / "families" / "plugin.py").write_text(textwrap.dedent(LLAMA), encoding="utf-8")
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path / "families")])
    from lowmem_train.config.loader import build_config
    from lowmem_train.trainer.trainer import Trainer

    assert "plugin" in families.names()
    out = tmp_path / "run"
    cfg = build_config(None, {"model.type": "plugin", "train_file": str(tiny_task["train"]),
                              "validation_file": str(tiny_task["validation"]), "tokenizer_dir": str(tiny_task["tokenizer"]),
                              "output_dir": str(out), "model.d_model": "64", "model.d_ff": "128",
                              "model.num_heads": "2", "batch_size_per_gpu": "32", "max_steps": "6",
                              "data.eval_max_samples": "16"})
    result = Trainer(cfg).fit()
    assert result.outcome == "finished" and result.steps == 6 and result.last_eval.samples == 16

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    exported = AutoTokenizer.from_pretrained(out / "final")
    assert type(model).__name__ == "LlamaForCausalLM"
    inputs = exported("12", return_tensors="pt")
    assert inputs["input_ids"][0, -1].item() == exported.sep_token_id  # the causal layout, from the family
    assert model.generate(**inputs).shape[1] > inputs["input_ids"].shape[1]
