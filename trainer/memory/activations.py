"""Activation memory of one training sample, counted analytically for T5 and GPT-2 shaped transformers.

Per layer, autograd keeps c1*s*h + c2*s*f + c3*a*s^2 elements (s = tokens, h = d_model, f = d_ff, a = heads),
as in Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1).
The coefficients below were not copied from the paper (which assumes Megatron's fused layers): they were fitted
on the HuggingFace modules we train, by counting the storages autograd saves (torch.autograd.graph.
saved_tensors_hooks) while varying s, h, f and a one at a time (torch 2.13 CPU, transformers 5.23). Why they
differ from the paper:
  - dropout on CPU keeps a float mask as large as its input (CUDA keeps a 1-byte mask): with dropout > 0
    every dropout site costs a full tensor, so T5's feed-forward (relu -> dropout) keeps 3 s*f, not 1;
  - GPT-2's gelu_new is a chain of element-wise ops that keeps ~4 copies of s*f besides the projection input;
  - on CPU, sdpa falls back to a kernel that keeps the a*s^2 probabilities like eager attention does, and
    T5 always materialises its relative position bias; only GPT-2 with sdpa on a GPU (flash / memory-
    efficient kernels) drops the a*s^2 terms.
Checked against saved tensors of real models in tests/unit/test_memory_estimate.py.
"""

from __future__ import annotations

from lowmem_train.config.schema import RunConfig

# (kind, dropout > 0) -> (s*h, s*f, a*s^2) elements kept per layer per sample.
LAYER = {
    ("t5_enc", False): (10, 1, 1), ("t5_enc", True): (12, 3, 3),
    ("t5_dec", False): (17, 1, 2), ("t5_dec", True): (20, 3, 6),  # + cross-attention
    ("gpt", False): (8, 5, 1), ("gpt", True): (12, 5, 3),
}
# Outside the layers: embeddings, final norms, the lm_head input; T5's position bias of each stack.
EDGES = {("t5", False): (6, 1), ("t5", True): (9.5, 1), ("gpt", False): (2, 0), ("gpt", True): (3, 0)}
# fp32 copies of the s x vocab logits alive at the loss: logits + log_softmax (GPT's shift adds a copy).
LOGITS = {"t5": 2, "gpt": 3}


def layer_elements(kind: str, dropout: bool, s: int, h: int, f: int, a: int, fused_attention: bool) -> float:
    c_sh, c_sf, c_as2 = LAYER[(kind, dropout)]
    return c_sh * s * h + c_sf * s * f + (0 if fused_attention else c_as2) * a * s * s


def activation_bytes_per_sample(cfg: RunConfig, vocab: int, checkpointing: bool, elem_bytes: int = 4,
                                gpu: bool = False) -> int:
    """Bytes kept for backward by one sample at max_seq_len (the worst case: real batches are trimmed to their
    longest row). With gradient checkpointing (non-reentrant) each layer keeps its input only; backward
    recomputes one layer at a time, which needs that layer's activations and as much again for their gradients."""
    m, s = cfg.model, cfg.max_seq_len
    dropout = m.dropout > 0
    fused = gpu and m.type == "gpt" and m.attn_implementation == "sdpa"
    if m.type == "t5":
        layers = ([layer_elements("t5_enc", dropout, s, m.d_model, m.d_ff, m.num_heads, fused)] * m.num_layers
                  + [layer_elements("t5_dec", dropout, s, m.d_model, m.d_ff, m.num_heads, fused)]
                  * m.num_decoder_layers)
    else:
        layers = [layer_elements("gpt", dropout, s, m.d_model, m.d_ff, m.num_heads, fused)] * m.num_layers
    c_sh, c_as2 = EDGES[(m.type, dropout)]
    edges = (c_sh * s * m.d_model + c_as2 * m.num_heads * s * s) * elem_bytes + LOGITS[m.type] * s * vocab * 4
    full = edges + sum(layers) * elem_bytes
    if checkpointing:  # with one or two layers the recomputation can cost what it saves: never more than without
        return int(min(full, edges + (len(layers) * s * m.d_model + 2 * max(layers)) * elem_bytes))
    return int(full)
