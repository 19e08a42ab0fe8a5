"""T5: an encoder-decoder (T5ForConditionalGeneration; mT5's MT5ForConditionalGeneration has the same layout).

Layout:  input_ids = prompt [EOS];  labels = response [EOS]. The decoder reads the labels shifted right,
starting from [PAD] (T5's decoder_start_token_id); generation stops at [EOS]. Roles: pad (the decoder's start) and
end of sequence, both required: every T5 tokenizer has them (<pad>, </s>).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowmem_train.model.families.base import (IGNORE_INDEX, ModelFamily, Row, Specials, TokenizerRoleError,
                                              layer_elements)

# (stack, dropout > 0) -> (s*h, s*f, a*s^2) elements autograd keeps per layer per sample (fitted on transformers'
# T5 modules, see trainer/memory/activations.py). Dropout on CPU keeps a float mask as large as its input, so T5's
# feed-forward (relu -> dropout) keeps 3 s*f with dropout; T5 always materialises its relative position bias.
LAYER = {("enc", False): (10, 1, 1), ("enc", True): (12, 3, 3),
         ("dec", False): (17, 1, 2), ("dec", True): (20, 3, 6)}  # + cross-attention
EDGES = {False: (6, 1), True: (9.5, 1)}  # embeddings, final norms, the lm_head input, each stack's position bias
LOGIT_COPIES = 2  # fp32 s x vocab tensors alive at the loss: logits + log_softmax


class T5Family(ModelFamily):
    name = "t5"
    hf_model_types = ("t5", "mt5")
    encoder_decoder = True
    padding_side = "right"  # the encoder reads the attention mask
    model_inputs = ("input_ids", "attention_mask", "labels", "decoder_input_ids")
    sentencepiece_tokenizer = "T5Tokenizer"
    # the prior art froze the shared embeddings and the encoder when fine-tuning: --freeze embeddings,encoder
    freeze_parts = {"embeddings": ["shared", "encoder.embed_tokens", "decoder.embed_tokens"], "encoder": ["encoder"],
                    "decoder": ["decoder"]}
    lora_targets = ("q", "v")
    layer_stacks = ("encoder.block", "decoder.block")

    def specials(self, tokenizer):
        if tokenizer.pad_token_id is None:  # T5 starts the decoder from it: no fallback would match the weights
            raise TokenizerRoleError("it has no pad token, which starts T5's decoder (decoder_start_token_id)")
        return super().specials(tokenizer)

    def build_pretrained(self, folder, cfg):
        """T5 v1.1, Flan-T5 and mT5 have an lm_head of their own, but transformers 5 builds every T5 with the head
        tied to the embeddings (the config forces tie_word_embeddings=True): loading would overwrite one with the
        other. When the folder's two tensors differ, the head is untied first (a new Linear, before any weight is
        loaded; under ZeRO-3 it is partitioned as it is made, like the rest)."""
        model = super().build_pretrained(folder, cfg)
        if folder.head_differs_from_embeddings("lm_head.weight", "shared.weight"):
            config = model.config
            model.lm_head = torch.nn.Linear(config.d_model, config.vocab_size, bias=False)
            model.all_tied_weights_keys.pop("lm_head.weight", None)  # save_pretrained then keeps it
        return model

    def model_fields(self, config) -> dict:
        return {"d_model": config.d_model, "num_layers": config.num_layers, "num_heads": config.num_heads,
                "num_decoder_layers": config.num_decoder_layers, "d_ff": config.d_ff, "vocab_size": config.vocab_size}

    def pretrained_dropout(self, config) -> float:
        return float(config.dropout_rate)

    def set_dropout(self, config, rate: float) -> None:
        config.dropout_rate = rate

    def build(self, cfg, vocab: int, specials: Specials):
        from transformers import T5Config, T5ForConditionalGeneration

        m = cfg.model
        config = T5Config(
            vocab_size=vocab, d_model=m.d_model, d_kv=m.d_model // m.num_heads, d_ff=m.d_ff, num_layers=m.num_layers,
            num_decoder_layers=m.num_decoder_layers, num_heads=m.num_heads, dropout_rate=m.dropout or 0.0,
            feed_forward_proj="relu", decoder_start_token_id=specials.pad, tie_word_embeddings=True,
            pad_token_id=specials.pad, eos_token_id=specials.eos, bos_token_id=specials.bos,
            attn_implementation=m.attn_implementation,
        )
        return T5ForConditionalGeneration(config)

    def generation_defaults(self, cfg, specials: Specials) -> dict:
        # An answer is a training label: at most max_seq_len tokens, [EOS] included.
        return {**super().generation_defaults(cfg, specials), "decoder_start_token_id": specials.pad,
                "max_new_tokens": cfg.max_seq_len}

    def layout(self, prompt, response, specials, limit, overlong) -> Row | None:
        too_long = len(prompt) + 1 > limit or len(response) + 1 > limit
        if too_long:
            if overlong == "skip":
                return None
            prompt, response = prompt[: limit - 1], response[: limit - 1]
        return Row(self.prompt(prompt, specials), list(response) + [specials.eos], too_long)

    def prompt_of(self, input_ids, labels):
        return list(input_ids)

    def collate_extra(self, batch, pad_id) -> None:
        shifted = batch["labels"].roll(1, dims=1)
        shifted[:, 0] = pad_id
        batch["decoder_input_ids"] = shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)

    def padding(self, batch):
        cells, pad = super().padding(batch)  # the encoder's grid, plus the decoder's (as wide as the labels)
        labels = batch["labels"]
        return cells + labels.numel(), pad + int((labels == IGNORE_INDEX).sum())

    def trim(self, piece):
        width = int(piece["attention_mask"].sum(1).max())
        target = int((piece["labels"] != IGNORE_INDEX).sum(1).max().clamp(min=1))  # labels have their own length
        return {**piece, "input_ids": piece["input_ids"][:, :width], "attention_mask": piece["attention_mask"][:, :width],
                "labels": piece["labels"][:, :target], "decoder_input_ids": piece["decoder_input_ids"][:, :target]}

    def token_loss_sum(self, model, piece) -> torch.Tensor:
        logits = model(input_ids=piece["input_ids"], attention_mask=piece["attention_mask"],
                       decoder_input_ids=piece["decoder_input_ids"], use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), piece["labels"].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    def activation_elements(self, cfg, gpu: bool):
        m, s, dropout = cfg.model, cfg.max_seq_len, (cfg.model.dropout or 0) > 0
        enc = layer_elements(LAYER[("enc", dropout)], s, m.d_model, m.d_ff, m.num_heads, fused=False)
        dec = layer_elements(LAYER[("dec", dropout)], s, m.d_model, m.d_ff, m.num_heads, fused=False)
        c_sh, c_as2 = EDGES[dropout]
        return [enc] * m.num_layers + [dec] * m.num_decoder_layers, c_sh * s * m.d_model + c_as2 * m.num_heads * s * s, \
            LOGIT_COPIES

    def lengths_for_prepare(self, prompt, response):
        import numpy as np

        return np.maximum(prompt, response) + 1


FAMILY = T5Family()
