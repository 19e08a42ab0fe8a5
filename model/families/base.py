"""What lowmem-train needs to know about one kind of transformer, asked of one object (see __init__.py).

A family answers, for its models:
    build(cfg, vocab, specials)    a randomly initialised Hugging Face model sized by cfg.model (nothing downloaded)
    build_pretrained(folder, cfg)  the architecture of a user's save_pretrained folder (hf_model_types), weights
                                   loaded after (model/pretrained.py); model_fields() its shape as config fields
    specials(tokenizer)            the token ids its layout needs, by role, with the family's fallbacks
    layout(prompt, response, ...)  one training row: input ids and the labels aligned to them, from token ids
                                   without special tokens (text rows and `prepare --tokenize` rows alike)
    prompt(prompt_ids, specials)   what the model reads at generation time; `template()` makes the exported
                                   tokenizer add exactly this, so `tok(prompt)` is the training encoding
    collate / trim / loss          the batch tensors, trimming a micro-batch, the summed token loss
    answer(output, input_width)    the generated tokens that are the answer
    activation_elements(cfg, gpu)  saved-activation elements per layer, for the memory estimate

Shared here: the layout rule every family follows (prompt, then the prompt's end; the response ends with the end of
sequence), truncation, and the activation formula of a transformer layer.

Tokens by role, not by spelling: the bundled tokenizer's [PAD] [EOS] [SEP] [BOS] and a user's <pad> </s> or
<|endoftext|> alike. Fallbacks (documented per family): no pad -> the end-of-sequence token, which every padded
position hides behind the attention mask and the loss's ignore index (what GPT-2 and Llama users do); no separator
-> the end-of-sequence token. A role with no fallback (no end-of-sequence token at all) is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lowmem_train.config.schema import RunConfig

IGNORE_INDEX = -100  # a label the loss ignores (Hugging Face's convention)


class TokenizerRoleError(ValueError):
    """The tokenizer has no token for a role the family needs, and the family has no fallback for it."""


@dataclass(frozen=True)
class Specials:
    """Ids of the special tokens a layout uses, by role (the prior art's [PAD], [EOS], [SEP], [BOS])."""

    pad: int
    eos: int
    sep: int | None = None  # what ends a prompt (causal models); None where the family needs none
    bos: int | None = None  # what opens a row, for families whose models expect one (Llama)


@dataclass(frozen=True)
class Row:
    """One training row as the model sees it; `truncated` when the row was cut to fit max_seq_len."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def layer_elements(coefficients: tuple[float, float, float], s: int, h: int, f: int, a: int, fused: bool) -> float:
    """Elements autograd keeps for one layer and one sample: c1*s*h + c2*s*f + c3*a*s^2 (Korthikanti et al. 2022,
    sec. 4.1; coefficients fitted per family, see trainer/memory/activations.py). `fused`: an attention kernel
    that keeps no a*s^2 probabilities (flash / memory-efficient sdpa on a GPU)."""
    c_sh, c_sf, c_as2 = coefficients
    return c_sh * s * h + c_sf * s * f + (0 if fused else c_as2) * a * s * s


class ModelFamily:
    name: str = ""
    hf_model_types: tuple[str, ...] = ()  # config.model_type of the Hugging Face models this family builds
    encoder_decoder: bool = False
    padding_side: str = "right"  # of batched generation prompts
    model_inputs: tuple[str, ...] = ("input_ids", "attention_mask", "labels")
    sentencepiece_tokenizer: str = ""  # the transformers class that converts a folder holding only spiece.model
    freeze_parts: dict[str, list[str]] = {}  # --freeze names -> module name globs (model/adapt.py)
    lora_targets: tuple[str, ...] = ()  # modules that get LoRA adapters by default (peft's own choice for the type)
    # module paths of the layer lists, in the order activation_elements lists their layers (the estimate skips the
    # leading layers that nothing trained feeds: trainer/memory/footprint.py frozen_front_layers)
    layer_stacks: tuple[str, ...] = ()

    # ---- tokens by role ------------------------------------------------------------------------------------------
    def specials(self, tokenizer) -> Specials:
        """The ids this family's layout uses (module docstring: fallbacks). Raises TokenizerRoleError."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise TokenizerRoleError("it has no end-of-sequence token (eos_token), which ends every answer")
        pad = tokenizer.pad_token_id
        return Specials(eos if pad is None else pad, eos, self.prompt_end_id(tokenizer, eos), None)

    def prompt_end_id(self, tokenizer, eos: int) -> int:
        """The token that ends a prompt: the end of sequence (T5's encoder input ends with it)."""
        return eos

    # ---- the model -------------------------------------------------------------------------------------------
    def build(self, cfg: "RunConfig", vocab: int, specials: Specials):
        raise NotImplementedError

    def build_pretrained(self, folder, cfg: "RunConfig"):
        """A model of the folder's architecture (model/pretrained.PretrainedFolder), weights not yet loaded;
        --model.dropout, when given, replaces the pretrained dropout."""
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        config = folder.config
        if cfg.model.dropout is not None:
            self.set_dropout(config, cfg.model.dropout)
        auto = AutoModelForSeq2SeqLM if self.encoder_decoder else AutoModelForCausalLM
        return auto.from_config(config, attn_implementation=cfg.model.attn_implementation)

    def model_fields(self, config) -> dict:
        """--model.* fields (d_model, layers, heads, d_ff, vocab_size) of a pretrained config."""
        raise NotImplementedError

    def pretrained_dropout(self, config) -> float:
        raise NotImplementedError

    def set_dropout(self, config, rate: float) -> None:
        raise NotImplementedError

    def max_positions(self, config) -> int | None:
        """Tokens a pretrained model's positions cover (None: unbounded, relative positions)."""
        return None

    def generation_defaults(self, cfg: "RunConfig", specials: Specials) -> dict:
        """generation_config fields of an exported model: what plain `model.generate(**tok(prompt))` needs."""
        return {"eos_token_id": specials.eos, "pad_token_id": specials.pad}

    # ---- rows and batches ------------------------------------------------------------------------------------
    def layout(self, prompt: list[int], response: list[int], specials: Specials, limit: int,
               overlong: str) -> Row | None:
        """One training row from token ids without specials; None when it is too long and `overlong` is skip."""
        raise NotImplementedError

    def prompt(self, prompt: list[int], specials: Specials) -> list[int]:
        """The model input for a prompt at generation time: the prompt and the token that ends it."""
        return ([] if specials.bos is None else [specials.bos]) + list(prompt) + [specials.sep]

    def prompt_of(self, input_ids: list[int], labels: list[int]) -> list[int]:
        """The generation input inside an encoded training row (what evaluation feeds the model)."""
        raise NotImplementedError

    def template(self, tokenizer):
        """The post-processor that makes `tokenizer(prompt)` add what `prompt()` adds (for exported tokenizers)."""
        from tokenizers.processors import TemplateProcessing

        ids = self.specials(tokenizer)
        token = tokenizer.convert_ids_to_tokens
        end, eos = token(ids.sep), token(ids.eos)
        start = "" if ids.bos is None else f"{token(ids.bos)} "
        used = {end, eos} | (set() if ids.bos is None else {token(ids.bos)})
        return TemplateProcessing(single=f"{start}$A {end}", pair=f"{start}$A {end} $B:1 {eos}:1",
                                  special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in sorted(used)])

    def collate_extra(self, batch: dict[str, torch.Tensor], pad_id: int) -> None:
        """Tensors besides input_ids / attention_mask / labels that a batch needs (added in place)."""

    def padding(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(cells, pad cells) of the token grids the model computes on: the cost of padding, for the log."""
        mask = batch["attention_mask"]
        return mask.numel(), int((mask == 0).sum())

    def trim(self, piece: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drop padding columns no row of this micro-batch uses (batches are padded to the step's longest row)."""
        width = int(piece["attention_mask"].sum(1).max())
        return {**piece, **{key: piece[key][:, :width] for key in ("input_ids", "attention_mask", "labels")}}

    def token_loss_sum(self, model, piece: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of cross-entropy over the target tokens (`target_tokens`) of one micro-batch."""
        raise NotImplementedError

    def target_tokens(self, labels: torch.Tensor) -> int:
        """How many labels `token_loss_sum` scores: the divisor of the mean loss."""
        return int((labels != IGNORE_INDEX).sum())

    # ---- generation ------------------------------------------------------------------------------------------
    def answer(self, output: torch.Tensor, input_width: int) -> torch.Tensor:
        """The answer tokens of generate()'s output."""
        return output

    def generation_room(self, limit: int, input_width: int) -> int:
        """New tokens an answer may take when a training row holds at most `limit` tokens."""
        return limit

    # ---- memory estimate -------------------------------------------------------------------------------------
    def activation_elements(self, cfg: "RunConfig", gpu: bool) -> tuple[list[float], float, int]:
        """(elements kept per layer per sample, elements kept outside the layers, fp32 copies of the logits)."""
        raise NotImplementedError

    # ---- shared by the layouts -------------------------------------------------------------------------------
    def lengths_for_prepare(self, prompt, response):
        """Token length of rows as model inputs (numpy arrays in, out), for `prepare`'s over-long count."""
        raise NotImplementedError
