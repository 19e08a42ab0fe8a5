"""Activation memory of one training sample, counted analytically; each model family supplies its layers.

Per layer, autograd keeps c1*s*h + c2*s*f + c3*a*s^2 elements (s = tokens, h = d_model, f = d_ff, a = heads),
as in Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1).
The coefficients (in each family's module, model/families/*.py) were not copied from the paper, which assumes
Megatron's fused layers: they were fitted on the HuggingFace modules we train, by counting the storages autograd
saves (torch.autograd.graph.saved_tensors_hooks) while varying s, h, f and a one at a time (torch 2.13 CPU,
transformers 5.23). Why they differ from the paper:
  - dropout on CPU keeps a float mask as large as its input (CUDA keeps a 1-byte mask): with dropout > 0
    every dropout site costs a full tensor;
  - element-wise activation chains (GPT-2's gelu_new) keep several copies of s*f;
  - on CPU, sdpa falls back to a kernel that keeps the a*s^2 probabilities like eager attention does.
Checked against saved tensors of real models in tests/unit/test_memory_estimate.py.
"""

from __future__ import annotations

from lowmem_train.config.schema import RunConfig
from lowmem_train.model import families


def activation_bytes_per_sample(cfg: RunConfig, vocab: int, checkpointing: bool, elem_bytes: int = 4,
                                gpu: bool = False, frozen_front: int = 0) -> int:
    """Bytes kept for backward by one sample at max_seq_len (the worst case: real batches are trimmed to their
    longest row). With gradient checkpointing (non-reentrant) each layer keeps its input only; backward
    recomputes one layer at a time, which needs that layer's activations and as much again for their gradients.
    The first `frozen_front` layers keep nothing: no parameter in them or before them is trained (--freeze
    embeddings,encoder), so autograd does not record them at all."""
    s = cfg.max_seq_len
    layers, edge_elements, logit_copies = families.get(cfg.model.type).activation_elements(cfg, gpu)
    layers = layers[frozen_front:] or [0.0]
    edges = edge_elements * elem_bytes + logit_copies * s * vocab * 4  # the loss runs in fp32
    full = edges + sum(layers) * elem_bytes
    if checkpointing:  # with one or two layers the recomputation can cost what it saves: never more than without
        return int(min(full, edges + (len(layers) * s * cfg.model.d_model + 2 * max(layers)) * elem_bytes))
    return int(full)
