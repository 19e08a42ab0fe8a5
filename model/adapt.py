"""What a run trains of its model: all of it, all but the frozen parts (--freeze), or LoRA adapters on a frozen base
(--lora.r, through peft, the library users know). Only this module and the export know adapters exist: peft's
get_peft_model returns a module the rest of the loop treats like any other, whose trained parameters are the
adapters'. A frozen parameter gets no gradient and no optimizer state (trainer/optim.py groups trained ones only).

--freeze takes module name globs matched against every prefix of a parameter's name ("encoder" freezes
encoder.block.0.layer.0.SelfAttention.q.weight and the rest of the encoder; "decoder.block.*.layer.1" the
decoders' cross-attention), or a family's named parts (families/*.py, FREEZE_PARTS): embeddings, encoder, decoder.
A pattern that matches nothing is refused in one line (a typo would otherwise train what it meant to freeze).
A tied weight is one tensor: freezing T5's embeddings freezes its tied head too.
"""

from __future__ import annotations

import warnings
from fnmatch import fnmatchcase

import torch

from lowmem_train.config.errors import ConfigError
from lowmem_train.trainer.compat import full_numel


def prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def freeze(model: torch.nn.Module, patterns: list[str], family) -> int:
    """Freeze the parameters the patterns name; returns how many elements were frozen."""
    globs: list[tuple[str, str]] = []  # (glob, the pattern the user wrote)
    for pattern in patterns:
        globs += [(g, pattern) for g in family.freeze_parts.get(pattern, [pattern])]
    used, frozen = set(), 0
    for name, param in model.named_parameters():
        hits = {pattern for glob, pattern in globs if any(fnmatchcase(p, glob) for p in prefixes(name))}
        if hits:
            used |= hits
            if param.requires_grad:
                param.requires_grad_(False)
                frozen += param.numel()
    unmatched = [p for p in patterns if p not in used]
    if unmatched:
        parts = ", ".join(family.freeze_parts) or "none"
        raise ConfigError(f"--freeze: {unmatched[0]!r} matches no module of this {family.name} model (named parts: "
                          f"{parts}; or a glob of module names such as encoder.block.0*)")
    return frozen


def add_adapters(model: torch.nn.Module, cfg, family) -> torch.nn.Module:
    """LoRA adapters on cfg.lora.target_modules (default: the family's attention projections) of a frozen base."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = list(cfg.lora.target_modules) or list(family.lora_targets)
    config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                        target_modules=targets, bias="none",
                        task_type=TaskType.SEQ_2_SEQ_LM if family.encoder_decoder else TaskType.CAUSAL_LM)
    try:
        with warnings.catch_warnings():  # peft reads transformers 5's deprecated is_gradient_checkpointing: a
            # FutureWarning in every LoRA run's log that the user can do nothing about
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"--lora.target_modules: {exc}".splitlines()[0]) from None


def prepare_trained(model: torch.nn.Module, cfg, family) -> torch.nn.Module:
    """The model with what the run does not train frozen, and adapters when asked for."""
    if cfg.freeze:
        freeze(model, cfg.freeze, family)
    if cfg.lora.r:
        model = add_adapters(model, cfg, family)
    return model


def counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trained, frozen) parameter elements, each tensor counted once (ZeRO-3: its full size)."""
    trained = frozen = 0
    for param in model.parameters():
        n = full_numel(param)
        trained, frozen = (trained + n, frozen) if param.requires_grad else (trained, frozen + n)
    return trained, frozen


def trains_everything(model: torch.nn.Module) -> bool:
    return all(p.requires_grad for p in model.parameters())


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by name: what a checkpoint of a partly trained model holds."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def plain(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model: adapters merged into the base weights (peft's merge_and_unload)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
