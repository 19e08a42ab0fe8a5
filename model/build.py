"""Build the configured model (nothing is ever downloaded): new with random weights, sized by cfg.model, or with
the architecture of a pretrained folder, whose weights model/pretrained.py loads into it. Its family does both."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowmem_train.model import families

if TYPE_CHECKING:
    from lowmem_train.config.schema import RunConfig


def build_model(cfg: "RunConfig", tokenizer, architecture: Path | None = None) -> torch.nn.Module:
    """The model of `cfg.model.type`: the architecture of cfg.model.name_or_path (or of `architecture`, a
    checkpoint's copy of it) when set, weights not loaded yet; else sized by cfg.model, vocabulary and special ids
    from the tokenizer."""
    from lowmem_train.config.errors import ConfigError
    from lowmem_train.model.pretrained import PretrainedFolder

    family = families.get(cfg.model.type)
    specials = family.specials(tokenizer)
    torch.manual_seed(cfg.seed)  # same seed, same initial weights on every rank and every run
    source = architecture or cfg.model.name_or_path
    if source:
        model = family.build_pretrained(PretrainedFolder(source), cfg)
        rows = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise ConfigError(f"--tokenizer_dir: {cfg.tokenizer_dir} has {len(tokenizer)} tokens but the model in "
                              f"{source} embeds {rows}; use the tokenizer the model was trained with")
    else:
        model = family.build(cfg, len(tokenizer), specials)
    for key, value in family.generation_defaults(cfg, specials).items():
        setattr(model.generation_config, key, value)
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    return model


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on or off (the memory guard may flip it between epochs)."""
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    else:
        model.gradient_checkpointing_disable()


def gradient_checkpointing_active(model: torch.nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    active = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if active is None else active)
