"""Llama-shaped causal decoders: LlamaForCausalLM and the configs transformers builds the same way (Mistral: the same
layout, a sliding window; Qwen2: the same layout with q/k/v biases). A pretrained folder is built with its own
class (AutoModelForCausalLM picks it from config.model_type), so each keeps its exact layout and weights.

Layout (gpt.py's, with the row opened by the tokenizer's beginning-of-sequence token when it has one, as these
models were pretrained):  input_ids = [BOS] prompt [SEP] response [EOS];  the loss scores [SEP] response [EOS].
Roles: end of sequence (required); separator -> end of sequence when the tokenizer has none (Llama's has <s>,
</s>, <unk> only); pad -> end of sequence (base.py); beginning of sequence -> none when the tokenizer has none
(Qwen2's). Rotary positions: batched prompts are left-padded and transformers derives positions from the mask.
"""

from __future__ import annotations

from lowmem_train.model.families.base import Specials, layer_elements
from lowmem_train.model.families.gpt import GptFamily

# (s*h, s*f, a*s^2) elements autograd keeps per layer per sample, dropout off and on, fitted on transformers 5.25's
# LlamaDecoderLayer by least squares over 6-8 shapes (s, h, f, a, layers varied; saved_tensors_hooks, torch 2.13
# CPU; worst residual 3%): two RMSNorms keep their input and its normalised copy, q/k/v and the rotary embedding
# keep s*h each, SwiGLU keeps the gate, the up projection and their product (~4 s*f). Llama calls sdpa with
# is_causal, so without dropout even the CPU kernel keeps no a*s^2 probabilities (eager keeps 1 a*s^2); with
# attention dropout the CPU falls back to a kernel that keeps them and their mask (2.6 a*s^2).
LAYER = {False: (10, 4, 1), True: (10.5, 4, 2.6)}
EDGES = {False: (2, 0), True: (2, 0)}  # embeddings, the final norm, the lm_head input
LOGIT_COPIES = 3  # logits, log_softmax, and the shifted copy


class LlamaFamily(GptFamily):
    name = "llama"
    hf_model_types = ("llama", "mistral", "qwen2")
    sentencepiece_tokenizer = "LlamaTokenizer"
    freeze_parts = {"embeddings": ["model.embed_tokens"]}
    lora_targets = ("q_proj", "v_proj")
    layer_stacks = ("model.layers",)

    def specials(self, tokenizer) -> Specials:
        base = super().specials(tokenizer)
        return Specials(base.pad, base.eos, base.sep, tokenizer.bos_token_id)

    def build(self, cfg, vocab: int, specials: Specials):
        from transformers import LlamaConfig, LlamaForCausalLM

        m = cfg.model
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads, max_position_embeddings=cfg.max_seq_len,
            attention_dropout=m.dropout or 0.0, pad_token_id=specials.pad, eos_token_id=specials.eos,
            bos_token_id=specials.bos, attn_implementation=m.attn_implementation))

    def model_fields(self, config) -> dict:
        return {"d_model": config.hidden_size, "num_layers": config.num_hidden_layers,
                "num_heads": config.num_attention_heads, "num_decoder_layers": 0, "d_ff": config.intermediate_size,
                "vocab_size": config.vocab_size}

    def pretrained_dropout(self, config) -> float:
        return float(getattr(config, "attention_dropout", 0.0) or 0.0)

    def set_dropout(self, config, rate: float) -> None:
        config.attention_dropout = rate

    def max_positions(self, config) -> int | None:
        return config.max_position_embeddings

    def activation_elements(self, cfg, gpu: bool):
        m, s, dropout = cfg.model, cfg.max_seq_len, (cfg.model.dropout or 0) > 0
        fused = m.attn_implementation == "sdpa" and (gpu or not dropout)  # see LAYER
        layer = layer_elements(LAYER[dropout], s, m.d_model, m.d_ff, m.num_heads, fused)
        c_sh, c_as2 = EDGES[dropout]
        return [layer] * m.num_layers, c_sh * s * m.d_model + c_as2 * m.num_heads * s * s, LOGIT_COPIES

    def lengths_for_prepare(self, prompt, response):
        return prompt + response + 3  # [BOS] prompt [SEP] response [EOS]


FAMILY = LlamaFamily()
