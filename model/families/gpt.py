"""GPT: a causal decoder (GPT2LMHeadModel).

Layout:  input_ids = prompt [SEP] response [EOS];  labels = input_ids with the prompt masked, so the model learns
[SEP] response [EOS]. Learning the [SEP] means the model also answers a bare prompt (what
`pipeline("text-generation")` sends: it adds no special tokens), while `tok(prompt)` of the exported tokenizer
ends the prompt with [SEP] itself. The model shifts labels left internally: position t predicts token t+1.
Prompts of a batch are left-padded for generation, so that every row continues from its own last token.
Roles: end of sequence (required); separator -> the end-of-sequence token when the tokenizer has none (GPT-2's
has only <|endoftext|>: prompt <|endoftext|> response <|endoftext|>); pad -> end of sequence (base.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowmem_train.model.families.base import IGNORE_INDEX, ModelFamily, Row, Specials, layer_elements

# dropout > 0 -> (s*h, s*f, a*s^2) elements kept per layer per sample (fitted, see trainer/memory/activations.py):
# gelu_new is a chain of element-wise ops that keeps ~4 copies of s*f besides the projection input.
LAYER = {False: (8, 5, 1), True: (12, 5, 3)}
EDGES = {False: (2, 0), True: (3, 0)}  # embeddings, final norm, the lm_head input
LOGIT_COPIES = 3  # logits, log_softmax, and the shifted copy


class GptFamily(ModelFamily):
    name = "gpt"
    hf_model_types = ("gpt2",)
    encoder_decoder = False
    padding_side = "left"
    freeze_parts = {"embeddings": ["transformer.wte", "transformer.wpe"]}
    lora_targets = ("c_attn",)
    layer_stacks = ("transformer.h",)

    def prompt_end_id(self, tokenizer, eos: int) -> int:
        sep = getattr(tokenizer, "sep_token_id", None)
        return eos if sep is None else sep

    def model_fields(self, config) -> dict:
        return {"d_model": config.n_embd, "num_layers": config.n_layer, "num_heads": config.n_head,
                "num_decoder_layers": 0, "d_ff": config.n_inner or 4 * config.n_embd, "vocab_size": config.vocab_size}

    def pretrained_dropout(self, config) -> float:
        return float(config.resid_pdrop)

    def set_dropout(self, config, rate: float) -> None:
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = rate

    def max_positions(self, config) -> int | None:
        return config.n_positions

    def build(self, cfg, vocab: int, specials: Specials):
        from transformers import GPT2Config, GPT2LMHeadModel

        m = cfg.model
        config = GPT2Config(
            vocab_size=vocab, n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.d_ff,
            n_positions=cfg.max_seq_len, resid_pdrop=m.dropout or 0.0, embd_pdrop=m.dropout or 0.0,
            attn_pdrop=m.dropout or 0.0,
            pad_token_id=specials.pad, eos_token_id=specials.eos, bos_token_id=specials.bos,
            attn_implementation=m.attn_implementation,
        )
        return GPT2LMHeadModel(config)

    def generation_defaults(self, cfg, specials: Specials) -> dict:
        # The model has max_seq_len positions: prompt and answer together must fit in them.
        return {**super().generation_defaults(cfg, specials), "max_length": cfg.max_seq_len}

    def layout(self, prompt, response, specials, limit, overlong) -> Row | None:
        lead = [] if specials.bos is None else [specials.bos]  # families whose models open a row with one (Llama)
        fixed = len(lead) + 2
        too_long = len(prompt) + len(response) + fixed > limit
        if too_long:
            if overlong == "skip":
                return None
            # Keep the end of the prompt and the start of the response, at least one response token.
            keep_prompt = min(len(prompt), max(1, limit // 2 - 1))
            prompt = prompt[len(prompt) - keep_prompt:]
            response = response[: max(1, limit - keep_prompt - fixed)]
        target = [specials.sep] + list(response) + [specials.eos]
        ids = lead + list(prompt) + target
        labels = [IGNORE_INDEX] * (len(lead) + len(prompt)) + target
        return Row(ids[:limit], labels[:limit], too_long)

    def prompt_of(self, input_ids, labels):
        first_target = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
        return list(input_ids[: first_target + 1])  # the prompt and its [SEP]

    def token_loss_sum(self, model, piece) -> torch.Tensor:
        logits = model(input_ids=piece["input_ids"], attention_mask=piece["attention_mask"], use_cache=False).logits
        logits, labels = logits[:, :-1], piece["labels"][:, 1:]  # position t predicts token t+1
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    def target_tokens(self, labels):
        # Position t predicts token t+1: the label at position 0 is never scored (it is a target only when the
        # prompt is empty, where [SEP] opens the row).
        return int((labels[:, 1:] != IGNORE_INDEX).sum())

    def answer(self, output, input_width):
        return output[:, input_width:]  # generate() returns the (padded) prompt first

    def generation_room(self, limit, input_width):
        return max(1, limit - input_width)  # positions end at max_seq_len

    def activation_elements(self, cfg, gpu: bool):
        m, s, dropout = cfg.model, cfg.max_seq_len, (cfg.model.dropout or 0) > 0
        # Only on a GPU does sdpa pick a kernel (flash / memory-efficient) that keeps no a*s^2 probabilities.
        fused = gpu and m.attn_implementation == "sdpa"
        layer = layer_elements(LAYER[dropout], s, m.d_model, m.d_ff, m.num_heads, fused)
        c_sh, c_as2 = EDGES[dropout]
        return [layer] * m.num_layers, c_sh * s * m.d_model + c_as2 * m.num_heads * s * s, LOGIT_COPIES

    def lengths_for_prepare(self, prompt, response):
        return prompt + response + 2


FAMILY = GptFamily()
