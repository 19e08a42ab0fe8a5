"""The `export` command: a training checkpoint -> a plain Hugging Face model folder (safetensors + tokenizer).

The folder loads with `AutoModelForSeq2SeqLM` / `AutoModelForCausalLM` and `AutoTokenizer.from_pretrained`,
without this project. The model is rebuilt from the config saved IN the checkpoint (not from today's presets),
and the weights are checked tensor by tensor against it, so a mismatch is refused instead of half-loaded.

Under DeepSpeed the fp32 weights are spread over the ranks' optimizer shards; DeepSpeed's zero_to_fp32 joins
them offline, in one process, whatever number of processes wrote them. It unpickles those shards
(torch.load(weights_only=False), DeepSpeed's choice): export only checkpoints you trust.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from lowmem_train.config.schema import ConfigError

log = logging.getLogger(__name__)

HELP = "export a checkpoint as a Hugging Face model folder (safetensors + tokenizer) for from_pretrained"
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # relative tokenizer_dir values are usually relative to it
STATE_FILE = "train_state.json"  # a checkpoint's completion marker (see checkpoint.py)
DS_TAG = "ds"  # the tag checkpoint.py saves DeepSpeed state under


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint folder (RUN/checkpoints/step_*), the RUN/checkpoints/latest file, or a run "
                             "folder (its newest complete checkpoint)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write the model and tokenizer to")
    parser.add_argument("--tokenizer_dir", default="", metavar="DIR",
                        help="tokenizer folder (default: the tokenizer_dir saved in the checkpoint's config)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it holds an earlier export")


def run(args, cfg) -> int:
    output = check_output(Path(args.output), args.overwrite)
    point = find_checkpoint(Path(args.checkpoint))
    from lowmem_train.config.loader import config_from_dict
    from lowmem_train.model.build import build_model, count_parameters

    run_cfg = config_from_dict(point.config, where=str(point.path / STATE_FILE))
    run_cfg.gradient_checkpointing = False  # a training-time memory choice; it would turn the KV cache off
    tokenizer, tokenizer_dir = load_saved_tokenizer(run_cfg.tokenizer_dir, args.tokenizer_dir, point.path)
    state_dict, source = read_weights(point.path)
    model = build_model(run_cfg, tokenizer)
    load_weights(model, state_dict, point.path, tokenizer_dir)
    provenance = {"checkpoint": str(point.path.resolve()), "step": point.state.step, "epoch": point.state.epoch,
                  "model_type": run_cfg.model.type, "weights": source, "tokenizer_dir": str(tokenizer_dir)}
    write_folder(model, tokenizer, output, provenance)
    log.info("exported %s (%s, %.2f M parameters, step %d, %s) to %s; try: python train_low_mem.py generate --model %s "
             "--prompt 12345", point.path, run_cfg.model.type, count_parameters(model) / 1e6, point.state.step, source,
             output, output)
    return 0


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


def find_checkpoint(path: Path):
    """A checkpoint, the `latest` file or a run folder -> the intact checkpoint it means (a ResumePoint)."""

    # read_checkpoint and complete_checkpoints define "intact", for resume and export alike; imported late (slow)
    from lowmem_train.trainer.checkpoint import complete_checkpoints, read_checkpoint

    def read(ckpt: Path):
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
    run_dir = path.parent if path.name == "checkpoints" else path
    for ckpt in complete_checkpoints(run_dir / "checkpoints"):  # newest first; a broken one is skipped, loudly
        try:
            return read_checkpoint(ckpt)
        except ValueError as exc:
            log.warning("skipping checkpoint %s: %s", ckpt.name, exc)
    raise ConfigError(f"--checkpoint: no complete checkpoint in {run_dir / 'checkpoints'}; pass a run folder, a "
                      f"checkpoint folder (RUN/checkpoints/step_*) or RUN/checkpoints/latest")


def load_saved_tokenizer(saved: str, override: str, ckpt: Path):
    """The tokenizer the run trained with; a relative saved path is tried from here, then from the project root."""
    from lowmem_train.model.tokenizer import load_tokenizer

    if override:
        flag, candidates = "--tokenizer_dir", [Path(override)]
    else:
        flag, candidates = f"tokenizer_dir {saved!r} in {ckpt / STATE_FILE}", [Path(saved)]
        if not Path(saved).is_absolute():
            candidates.append(PROJECT_ROOT / saved)
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            try:
                return load_tokenizer(folder), folder
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
        if (model_dir / "model.safetensors").is_file():
            from safetensors.torch import load_file

            return load_file(model_dir / "model.safetensors"), "safetensors"
    # The readers raise an open-ended set on damaged files (unpickling, zip, safetensors, DeepSpeed's own
    # checks); whatever it is, the user needs to know which checkpoint, not a traceback.
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"--checkpoint: cannot read the weights in {model_dir} ({type(exc).__name__}: {first}); "
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


def write_folder(model, tokenizer, output: Path, provenance: dict, state_dict: dict | None = None) -> None:
    """save_pretrained + tokenizer into a temporary sibling, fsync, rename: a reader never sees half a model.
    `state_dict`: the gathered weights when the model's own are partitioned (ZeRO-3)."""
    from transformers.utils import logging as hf_logging

    from lowmem_train.trainer.checkpoint import fsync_dir, fsync_tree, library_versions

    hf_logging.disable_progress_bar()  # one small file: a progress bar is noise
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = output.with_name(f".{output.name}.tmp"), output.with_name(f".{output.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    provenance = {**provenance, "versions": library_versions()}
    (tmp / "lowmem_export.json").write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    fsync_tree(tmp)
    if output.exists():  # checked by check_output: empty, or an earlier export with --overwrite
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
    tmp.rename(output)
    fsync_dir(output.parent)
    shutil.rmtree(old, ignore_errors=True)
