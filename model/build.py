"""Build a T5 or GPT model from the config tree with random weights (nothing is ever downloaded)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration

from lowmem_train.config.schema import RunConfig


def build_model(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """T5ForConditionalGeneration or GPT2LMHeadModel sized by cfg.model, vocabulary from the tokenizer."""
    m = cfg.model
    vocab = len(tokenizer)
    common = dict(
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if m.type == "t5":
        config = T5Config(
            d_model=m.d_model,
            d_kv=m.d_model // m.num_heads,
            d_ff=m.d_ff,
            num_layers=m.num_layers,
            num_decoder_layers=m.num_decoder_layers,
            num_heads=m.num_heads,
            dropout_rate=m.dropout,
            feed_forward_proj="relu",
            # T5 starts decoding from the pad token; generation stops at [EOS].
            decoder_start_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            **common,
        )
        model_cls = T5ForConditionalGeneration
    else:
        config = GPT2Config(
            n_embd=m.d_model,
            n_layer=m.num_layers,
            n_head=m.num_heads,
            n_inner=m.d_ff,
            n_positions=cfg.max_seq_len,
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=m.dropout,
            **common,
        )
        model_cls = GPT2LMHeadModel
    config._attn_implementation = m.attn_implementation
    torch.manual_seed(cfg.seed)  # same seed, same initial weights on every rank and every run
    model = model_cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    return model


def set_gradient_checkpointing(model: PreTrainedModel, enabled: bool) -> None:
    """Turn activation checkpointing on or off (the memory guard may flip it between epochs)."""
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    else:
        model.gradient_checkpointing_disable()


def count_parameters(model: torch.nn.Module) -> int:
    # Under ZeRO-3 a parameter is partitioned and numel() is 0 here; DeepSpeed keeps the real size in ds_numel.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
