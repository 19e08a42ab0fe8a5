"""Answers from a trained model, with transformers' `generate` alone: shared by evaluation and the `generate` command.

Prompts are laid out by the model's family exactly as training laid them out (families/*.py: T5 reads
prompt [EOS], GPT prompt [SEP]); a batch is padded on the family's side (GPT: left, so that every row continues
from its own last token) and only the answer part of the output is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lowmem_train.config.errors import ConfigError, first_line
from lowmem_train.model import families

EXPORT_HINT = "python train_low_mem.py export --checkpoint RUN/checkpoints/latest --output DIR"
STRATEGIES = ("greedy", "top_k", "top_p", "beam")


@dataclass(frozen=True)
class Decoding:
    """How answers are chosen (the `generate` command's options)."""

    strategy: str = "greedy"
    max_new_tokens: int = 32
    top_k: int = 50
    top_p: float = 0.9
    temperature: float = 1.0
    num_beams: int = 4

    def generate_kwargs(self) -> dict:
        """`generate` options of the strategy; only the ones it uses, so transformers warns about nothing unused."""
        if self.strategy == "greedy":
            return {"do_sample": False, "num_beams": 1}
        if self.strategy == "beam":  # early_stopping=True would end on the first num_beams finished, often short, answers
            # length_penalty 0: rank beams by total log-likelihood (the most likely answer); transformers' default
            # 1.0 divides by the length, and lets a long, unfinished answer beat a short likely one.
            return {"do_sample": False, "num_beams": self.num_beams, "length_penalty": 0.0}
        if self.strategy == "top_k":  # top_p=1.0 so that only k limits the choice
            return {"do_sample": True, "top_k": self.top_k, "top_p": 1.0, "temperature": self.temperature}
        return {"do_sample": True, "top_p": self.top_p, "top_k": 0, "temperature": self.temperature}


def prompt_ids(tokenizer, family, text: str) -> list[int]:
    """Token ids of one prompt as the model saw prompts in training."""
    return family.prompt(tokenizer(text, add_special_tokens=False)["input_ids"], family.specials(tokenizer))


def pad_prompts(prompts: list[list[int]], pad_id: int, side: str):
    """(input_ids, attention_mask) of a batch of prompts, padded on `side` ("right" or "left")."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, cols] = torch.as_tensor(p, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def decode_answers(tokenizer, family, output, input_width: int) -> list[str]:
    """Decoded answers: the answer part of each output row (a causal model's output starts with its input)."""
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in family.answer(output, input_width).tolist()]


def generate_batch(model, tokenizer, family, prompts: list[list[int]], max_new_tokens: int, **options) -> list[str]:
    """Answers to encoded prompts, one generate() call."""
    import torch

    ids, mask = pad_prompts(prompts, tokenizer.pad_token_id, family.padding_side)
    device = next(model.parameters()).device
    # A causal model's exported generation_config caps the whole row (max_length); asking for max_new_tokens on top
    # makes transformers warn on every call, so give it the same limit as a length.
    length = ({"max_new_tokens": max_new_tokens} if model.config.is_encoder_decoder
              else {"max_length": ids.shape[1] + max_new_tokens})
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **length,
                             pad_token_id=tokenizer.pad_token_id, **options)
    return decode_answers(tokenizer, family, out, ids.shape[1])


@dataclass
class Exported:
    """A model folder written by `export` (or a run's final/), loaded with plain transformers."""

    model: object
    tokenizer: object
    family: object

    @property
    def positions(self) -> int | None:
        """Positions of a causal model (prompt + answer must fit), None for an encoder-decoder."""
        if self.family.encoder_decoder:
            return None
        config = self.model.config
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def load_exported(folder: Path) -> Exported:
    """Load an exported folder, nothing downloaded; a folder that is not one is refused naming what it is."""
    if not folder.exists():
        raise ConfigError(f"--model: {folder} does not exist; export a checkpoint first: {EXPORT_HINT}")
    has_weights = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    if not folder.is_dir() or not (folder / "config.json").is_file() or not has_weights:
        if (folder / "final" / "config.json").is_file():
            raise ConfigError(f"--model: {folder} is a run folder; its final model is {folder / 'final'}")
        if (folder / "train_state.json").is_file() or (folder / "checkpoints").is_dir():
            raise ConfigError(f"--model: {folder} is a training checkpoint or run folder, not a model; export it "
                              f"first: {EXPORT_HINT}")
        raise ConfigError(f"--model: {folder} holds no model (config.json + model.safetensors); point it at a folder "
                          f"written by `export` or a run's final/")
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"--model: {folder} has no tokenizer (tokenizer.json); re-export it with `export`")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load is noise next to the answers
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        family = families.for_hf_config(config)
        model_cls = AutoModelForSeq2SeqLM if family.encoder_decoder else AutoModelForCausalLM
        model = model_cls.from_pretrained(folder, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # corrupt or foreign files: say which folder
        raise ConfigError(f"--model: cannot load {folder} ({type(exc).__name__}: {first_line(exc)[:200]})") from None
    from lowmem_train.model.families.base import TokenizerRoleError

    try:
        family.specials(tokenizer)
    except TokenizerRoleError as exc:
        raise ConfigError(f"--model: the tokenizer in {folder} cannot lay out {family.name} prompts: {exc}") from None
    return Exported(model, tokenizer, family)


@dataclass
class Answers:
    answers: list[str]
    unknown_characters: bool  # some prompt holds characters the tokenizer reads as [UNK]
    clipped: bool  # some answers were cut to fit a causal model's positions


def answer_prompts(exported: Exported, prompts: list[str], decoding: Decoding, batch_size: int) -> Answers:
    """Answers to `prompts`, in order, `batch_size` prompts per generate() call."""
    tok, family = exported.tokenizer, exported.family
    encoded = [prompt_ids(tok, family, p) for p in prompts]
    positions = exported.positions
    for text, ids in zip(prompts, encoded):
        if positions and len(ids) >= positions:
            raise ConfigError(f"prompt {text[:40]!r} is {len(ids)} tokens; this model holds {positions} (prompt + answer)")
    answers, clipped = [], False
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        room = decoding.max_new_tokens
        width = max(len(p) for p in batch)
        if positions and width + room > positions:
            room, clipped = positions - width, True
        answers += generate_batch(exported.model, tok, family, batch, room, **decoding.generate_kwargs())
    return Answers(answers, any(tok.unk_token_id in ids for ids in encoded), clipped)
