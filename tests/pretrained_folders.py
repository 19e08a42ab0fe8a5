"""Tiny "pretrained" model folders, as a user brings them: random weights and a tokenizer of the model's own kind,
written with save_pretrained (nothing downloaded). Each tokenizer is trained in seconds on the bundled task's text
and saved through the class real checkpoints name (T5Tokenizer, GPT2Tokenizer, LlamaTokenizer):

    t5        T5 (relu), tied head; Unigram tokenizer <pad>=0 </s>=1 <unk>=2 that appends </s> itself (t5-small's)
    t5_v1_1   T5 v1.1 / Flan-T5 shape: gated-GELU, a head of its own (not tied to the embeddings)
    gpt2      GPT-2; byte-level BPE with only <|endoftext|>: no pad, no separator (gpt2's)
    llama     LlamaForCausalLM; BPE with byte fallback, <unk> <s> </s>, adds <s> itself, no pad (Llama's)
    t5_spiece T5 whose folder holds its tokenizer only as a SentencePiece spiece.model (older T5 checkpoints)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowmem_train.trainer.data.zh_numerals import to_chinese

KINDS = ("t5", "t5_v1_1", "gpt2", "llama")


def corpus() -> list[str]:
    numbers = list(range(0, 2000, 7)) + [10**k + 3 * k for k in range(3, 9)]
    return [text for n in numbers for text in (str(n), to_chinese(n))]


def t5_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    raw = Tokenizer(models.Unigram())
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.train_from_iterator(corpus(), trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                                              unk_token="<unk>"))
    vocab = json.loads(raw.to_str())["model"]["vocab"]
    tok = T5Tokenizer(vocab=[tuple(v) for v in vocab], extra_ids=0)
    tok.save_pretrained(str(folder))
    return tok


def gpt2_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(raw.to_str())["model"]["merges"]]
    tok = GPT2Tokenizer(vocab=raw.get_vocab(), merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                        eos_token="<|endoftext|>", add_prefix_space=False)
    tok.save_pretrained(str(folder))
    return tok


def llama_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import LlamaTokenizer

    raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    raw.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=420, special_tokens=specials))
    model = json.loads(raw.to_str())["model"]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], add_bos_token=True)
    tok.save_pretrained(str(folder))
    return tok


def make(kind: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny pretrained model of `kind` (module docstring) into `folder`; returns the folder."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind in ("t5", "t5_v1_1", "t5_spiece"):
        tok = t5_tokenizer(folder) if kind != "t5_spiece" else None
        vocab = len(tok) if tok is not None else spiece_tokenizer(folder)
        gated = kind == "t5_v1_1"
        config = T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=2, feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.1,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = T5ForConditionalGeneration(config)
        if gated:  # a head of its own, as T5 v1.1 / Flan-T5 checkpoints have (transformers 5 ties it when built)
            model.lm_head = torch.nn.Linear(32, vocab, bias=False)
            model.all_tied_weights_keys.pop("lm_head.weight", None)
    elif kind == "gpt2":
        tok = gpt2_tokenizer(folder)
        eot = tok.eos_token_id
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           bos_token_id=eot, eos_token_id=eot))
    elif kind == "llama":
        tok = llama_tokenizer(folder)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=64, bos_token_id=1, eos_token_id=2))
    else:
        raise ValueError(kind)
    model.save_pretrained(str(folder))
    return folder


def spiece_tokenizer(folder: Path) -> int:
    """Only a SentencePiece model (T5's layout: <pad>=0 </s>=1 <unk>=2, no <s>); returns the vocabulary the T5
    tokenizer class makes of it (the pieces and T5's 100 sentinel tokens)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    text = folder / "corpus.txt"
    text.write_text("\n".join(corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "spiece"), vocab_size=60,
                                   model_type="unigram", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
                                   character_coverage=1.0, minloglevel=2)
    text.unlink()
    (folder / "spiece.vocab").unlink()
    return len(T5Tokenizer.from_pretrained(str(folder)))


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file of a folder and its content hash: what 'nothing was written into it' is checked against."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
