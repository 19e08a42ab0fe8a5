"""A training checkpoint -> a plain Hugging Face model folder (safetensors + tokenizer): the `export` command's work.

The folder loads with `AutoModelForSeq2SeqLM` / `AutoModelForCausalLM` and `AutoTokenizer.from_pretrained`,
without this project, and answers through the plain calls (`model.generate(**tok(prompt, return_tensors="pt"))`):
its tokenizer lays prompts out as training did (files.write_model_folder). The model is rebuilt from the config
saved IN the checkpoint (not from today's presets), and the weights are checked tensor by tensor against it, so
a mismatch is refused instead of half-loaded.

Under DeepSpeed the fp32 weights are spread over the ranks' optimizer shards; DeepSpeed's zero_to_fp32 joins
them offline, in one process, whatever number of processes wrote them. It unpickles those shards
(torch.load(weights_only=False), DeepSpeed's choice): export only checkpoints you trust.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lowmem_train.config.errors import ConfigError, first_line
from lowmem_train.config.shipped import ROOT
from lowmem_train.model import adapt
from lowmem_train.model.pretrained import ARCHITECTURE
from lowmem_train.trainer.files import (CHECKPOINTS, DS_TAG, STATE_FILE, TRAINED_FILE, ResumePoint, newest_intact,
                                        read_checkpoint, write_model_folder)

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    point: ResumePoint
    output: Path
    model_type: str
    parameters: int
    weights: str  # "deepspeed" (ZeRO shards joined) or "safetensors"


def export_checkpoint(checkpoint: Path, output: Path, tokenizer_dir: str = "", overwrite: bool = False,
                      adapter_only: bool = False) -> ExportResult:
    """Export the checkpoint `checkpoint` means (a step_* folder, `latest`, or a run folder) into `output`.
    A LoRA run's adapters are merged into the base weights (a plain model), or written alone (`adapter_only`: peft's
    adapter folder, for PeftModel.from_pretrained(base, folder))."""
    output = check_output(output, overwrite)
    point = find_checkpoint(checkpoint)
    from lowmem_train.config.loader import config_from_dict
    from lowmem_train.model import families
    from lowmem_train.model.build import build_model

    run_cfg = config_from_dict(point.config, where=str(point.path / STATE_FILE))
    run_cfg.gradient_checkpointing = False  # a training-time memory choice; it would turn the KV cache off
    family = families.get(run_cfg.model.type)
    tokenizer, tokenizer_dir = load_saved_tokenizer(run_cfg.tokenizer_dir, tokenizer_dir, point.path, family)
    state_dict, source = read_weights(point.path)
    architecture = point.path / ARCHITECTURE  # a pretrained model's, kept with the checkpoint (pretrained.py)
    model = build_model(run_cfg, tokenizer, architecture if architecture.is_dir() else None)
    if point.trained_only:  # the base from where training took it, then what the run trained
        model = with_trained_parts(model, run_cfg, family, state_dict, point.path)
    else:
        load_weights(model, state_dict, point.path, tokenizer_dir)
    if adapter_only:
        if not run_cfg.lora.r:
            raise ConfigError(f"--adapter_only: {point.path} trained no LoRA adapters (--lora.r was 0)")
        write_adapter_folder(model, tokenizer, family, run_cfg.max_seq_len, output)
        return ExportResult(point, output, run_cfg.model.type, adapt.counts(model)[0], source)
    model = adapt.plain(model)
    provenance = {"checkpoint": str(point.path.resolve()), "step": point.state.step, "epoch": point.state.position.epoch,
                  "model_type": run_cfg.model.type, "weights": source, "tokenizer_dir": str(tokenizer_dir)}
    write_model_folder(model, tokenizer, family, run_cfg.max_seq_len, output, provenance)
    return ExportResult(point, output, run_cfg.model.type, sum(p.numel() for p in model.parameters()), source)


def with_trained_parts(model, run_cfg, family, state_dict: dict, ckpt: Path):
    """A partly trained run's model (--freeze, --lora.*): the pretrained folder's weights (or the seed's, as the run
    began), frozen and wrapped as in training, and the checkpoint's trained parameters, every one of them."""
    if run_cfg.model.name_or_path:
        from lowmem_train.model.pretrained import PretrainedFolder, load_weights as load_pretrained

        load_pretrained(model, PretrainedFolder(run_cfg.model.name_or_path, f"model.name_or_path in {ckpt}"))
    model = adapt.prepare_trained(model, run_cfg, family)
    expected = set(adapt.trained_state(model))
    if set(state_dict) != expected:
        odd = sorted(set(state_dict) ^ expected)
        raise ConfigError(f"--checkpoint: {ckpt} holds other trained tensors than its config trains (e.g. {odd[0]!r})")
    model.load_state_dict(state_dict, strict=False)
    return model


def write_adapter_folder(model, tokenizer, family, max_length: int, output: Path) -> None:
    """peft's adapter folder (adapter_config.json + adapter_model.safetensors) and the tokenizer, atomically."""
    import shutil

    from lowmem_train.model.tokenizer import for_export
    from lowmem_train.trainer.files import fsync_tree

    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for_export(tokenizer, family, max_length).save_pretrained(str(tmp))
    fsync_tree(tmp)
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)


def check_output(output: Path, overwrite: bool) -> Path:
    """Never replace anything but an earlier export: `--output out/run` must not wipe a run folder."""
    if output.is_file():
        raise ConfigError(f"--output: {output} is a file; name a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise ConfigError(f"--output: {output} exists and is not empty; pass --overwrite to replace an earlier "
                              f"export, or choose another folder")
        if not (output / "config.json").is_file() or (output / "checkpoints").exists():
            raise ConfigError(f"--output: {output} is not an exported model folder (no config.json); refusing to "
                              f"replace it, choose another folder")
    return output


def find_checkpoint(path: Path) -> ResumePoint:
    """A checkpoint, the `latest` file or a run folder -> the intact checkpoint it means."""

    def read(ckpt: Path) -> ResumePoint:
        try:
            return read_checkpoint(ckpt)
        except ValueError as exc:
            raise ConfigError(f"--checkpoint: {ckpt} is corrupt: {exc}; export an older checkpoint") from None

    if not path.exists():
        raise ConfigError(f"--checkpoint: {path} does not exist")
    if path.is_file():  # the `latest` pointer: a text file naming a sibling folder
        name = path.read_text(encoding="utf-8", errors="replace").strip()
        target = path.parent / name
        if not name or "/" in name or not (target / STATE_FILE).is_file():
            raise ConfigError(f"--checkpoint: {path} names {name[:60]!r}, which is not a complete checkpoint in "
                              f"{path.parent}; pass a step_* folder or the run folder")
        return read(target)
    if (path / STATE_FILE).is_file():
        return read(path)
    if path.name.startswith(("step_", ".step_")):
        raise ConfigError(f"--checkpoint: {path} is incomplete (no {STATE_FILE}: its save never finished); pass "
                          f"an older checkpoint or the run folder")
    run_dir = path.parent if path.name == CHECKPOINTS else path
    point = newest_intact(run_dir / CHECKPOINTS)  # a broken one is skipped, loudly
    if point is None:
        raise ConfigError(f"--checkpoint: no complete checkpoint in {run_dir / CHECKPOINTS}; pass a run folder, a "
                          f"checkpoint folder (RUN/checkpoints/step_*) or RUN/checkpoints/latest")
    return point


def load_saved_tokenizer(saved: str, override: str, ckpt: Path, family=None):
    """The tokenizer the run trained with; a relative saved path is tried from here, then from the project root."""
    from lowmem_train.model.tokenizer import load_tokenizer

    if override:
        flag, candidates = "--tokenizer_dir", [Path(override)]
    else:
        flag, candidates = f"tokenizer_dir {saved!r} in {ckpt / STATE_FILE}", [Path(saved)]
        if not Path(saved).is_absolute():
            candidates.append(ROOT / saved)  # a run started in a checkout names it relative to the checkout
    for folder in candidates:
        if (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file():
            try:
                return load_tokenizer(folder, family), folder
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{flag}: cannot use {folder} ({exc})") from None
    where = " or ".join(str(c) for c in candidates)
    raise ConfigError(f"{flag}: no tokenizer.json in {where}; pass the run's tokenizer folder with --tokenizer_dir")


def read_weights(ckpt: Path) -> tuple[dict, str]:
    """(state dict, 'deepspeed'|'safetensors'): fp32 weights of a checkpoint, ZeRO shards joined."""
    model_dir = ckpt / "model"
    try:
        if (model_dir / DS_TAG).is_dir():
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(model_dir), tag=DS_TAG), "deepspeed"
        for name in ("model.safetensors", TRAINED_FILE):  # the whole model, or what a partly trained run trained
            if (model_dir / name).is_file():
                from safetensors.torch import load_file

                return load_file(model_dir / name), "safetensors"
    # The readers raise an open-ended set on damaged files (unpickling, zip, safetensors, DeepSpeed's own
    # checks); whatever it is, the user needs to know which checkpoint, not a traceback.
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"--checkpoint: cannot read the weights in {model_dir} ({type(exc).__name__}: "
                          f"{first_line(exc)[:200]}); "
                          f"the checkpoint is damaged, export an older one") from None
    raise ConfigError(f"--checkpoint: {model_dir} holds neither DeepSpeed shards ({DS_TAG}/) nor model.safetensors")


def tied_groups(model) -> list[list[str]]:
    """Names sharing one tensor (T5: shared / embed_tokens / lm_head; GPT-2: wte / lm_head)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def load_weights(model, state_dict: dict, ckpt: Path, tokenizer_dir: Path) -> None:
    """Load every tensor the model needs; a tied alias may be absent (the plain format stores one name per tensor)."""
    import torch

    expected = model.state_dict()
    for name, tensor in state_dict.items():
        if name in expected and tensor.shape != expected[name].shape:
            raise ConfigError(f"--checkpoint: {ckpt} has {name} of shape {tuple(tensor.shape)} but its config and "
                              f"the tokenizer {tokenizer_dir} give {tuple(expected[name].shape)}; pass the tokenizer "
                              f"it was trained with (--tokenizer_dir)")
    for names in tied_groups(model):  # aliases saved twice must agree, or the export would pick one at random
        present = [n for n in names if n in state_dict]
        if any(not torch.equal(state_dict[present[0]], state_dict[n]) for n in present[1:]):
            raise ConfigError(f"--checkpoint: {ckpt} holds different values for the tied tensors {', '.join(present)}")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    loaded_aliases = {n for names in tied_groups(model) if any(m in state_dict for m in names) for n in names}
    missing = [n for n in missing if n not in loaded_aliases]
    if missing or unexpected:
        raise ConfigError(f"--checkpoint: {ckpt} does not match the model its config describes ({len(missing)} "
                          f"missing, {len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[0]})")
