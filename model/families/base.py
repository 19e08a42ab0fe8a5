"""What lowmem-train needs to know about one kind of transformer, asked of one object (see __init__.py).

A family answers, for its models:
    build(cfg, vocab, specials)    a randomly initialised Hugging Face model sized by cfg.model (nothing downloaded)
    layout(prompt, response, ...)  one training row: input ids and the labels aligned to them, from token ids
                                   without special tokens (text rows and `prepare --tokenize` rows alike)
    prompt(prompt_ids, specials)   what the model reads at generation time; `template()` makes the exported
                                   tokenizer add exactly this, so `tok(prompt)` is the training encoding
    collate / trim / loss          the batch tensors, trimming a micro-batch, the summed token loss
    answer(output, input_width)    the generated tokens that are the answer
    activation_elements(cfg, gpu)  saved-activation elements per layer, for the memory estimate

Shared here: the layout rule every family follows (prompt, then `prompt_end`; the response ends with [EOS]),
truncation, and the activation formula of a transformer layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lowmem_train.config.schema import RunConfig

IGNORE_INDEX = -100  # a label the loss ignores (Hugging Face's convention)


@dataclass(frozen=True)
class Specials:
    """Ids of the special tokens a layout uses (the prior art's [PAD], [EOS], [SEP], [BOS])."""

    pad: int
    eos: int
    sep: int | None = None
    bos: int | None = None

    @classmethod
    def of(cls, tokenizer) -> "Specials":
        return cls(tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None),
                   getattr(tokenizer, "bos_token_id", None))

    def id_of(self, token: str) -> int | None:
        """'eos_token' -> self.eos: the id of a special token named as a tokenizer attribute."""
        return getattr(self, token.removesuffix("_token"))


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
    prompt_end: str = "eos_token"  # the special token (a tokenizer attribute) that ends a prompt
    padding_side: str = "right"  # of batched generation prompts
    model_inputs: tuple[str, ...] = ("input_ids", "attention_mask", "labels")

    # ---- the model -------------------------------------------------------------------------------------------
    def build(self, cfg: "RunConfig", vocab: int, specials: Specials):
        raise NotImplementedError

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
        return list(prompt) + [specials.id_of(self.prompt_end)]

    def prompt_of(self, input_ids: list[int], labels: list[int]) -> list[int]:
        """The generation input inside an encoded training row (what evaluation feeds the model)."""
        raise NotImplementedError

    def template(self, tokenizer):
        """The post-processor that makes `tokenizer(prompt)` add what `prompt()` adds (for exported tokenizers)."""
        from tokenizers.processors import TemplateProcessing

        end = getattr(tokenizer, self.prompt_end)
        eos = tokenizer.eos_token
        specials = sorted({end, eos})
        return TemplateProcessing(single=f"$A {end}", pair=f"$A {end} $B:1 {eos}:1",
                                  special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in specials])

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
