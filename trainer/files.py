"""What lowmem-train writes to disk: checkpoint folders and exported model folders. Names, the completion
marker, fsync, reading and finding; checkpoint.py (training) and export.py (the `export` command) both use it.

    output_dir/checkpoints/step_00000123/{train_state.json, config.yaml, model/, rng/rank_*.pt}
                           latest            (text: the name of the newest complete checkpoint)

A folder named step_* with a readable train_state.json is complete: that file is written last (checkpoint.py).
An exported model folder is written into a temporary sibling and renamed into place, so a reader never sees half
a model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lowmem_train.trainer.state import TrainState

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"  # the completion marker, written last
DS_TAG = "ds"  # the tag DeepSpeed state is saved under
DS_UNIVERSAL_TAG = "ds_universal"  # DeepSpeed's layout-free format, for resuming on another number of processes
CHECKPOINTS = "checkpoints"
TRAINED_FILE = "trained.safetensors"  # a partly trained model's checkpoint holds only what it trains (plain path)


@dataclass
class ResumePoint:
    """A complete checkpoint's metadata: where it is, the loop state, the run config, the tokenizer fingerprint."""

    path: Path
    state: TrainState
    config: dict
    tokenizer: str | None = None  # fingerprint of the vocabulary the checkpoint was trained with
    trained_only: bool = False  # it holds the trained parameters only (frozen parts, a LoRA base: not)

    @property
    def plan(self) -> dict:
        return self.state.plan


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (output_dir/checkpoints), newest first (by step, not by file time)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def read_checkpoint(path: Path) -> ResumePoint:
    """Parse and sanity-check a checkpoint's metadata; raises ValueError naming what is wrong."""
    try:
        meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        state = TrainState.from_state_dict(meta["train_state"])
        config = meta["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path / STATE_FILE} is unreadable ({type(exc).__name__}: {exc})") from None
    for name, size in meta.get("files", {}).items():
        if not (path / name).is_file() or (path / name).stat().st_size != size:
            raise ValueError(f"{path / name} is missing or truncated")
    return ResumePoint(path, state, config, meta.get("tokenizer"), bool(meta.get("trained_only", False)))


def newest_intact(root: Path) -> ResumePoint | None:
    """The newest complete checkpoint that reads back; broken ones are skipped with a warning naming them."""
    for path in complete_checkpoints(root):
        try:
            return read_checkpoint(path)
        except ValueError as exc:
            log.warning("skipping checkpoint %s: %s", path.name, exc)
    return None


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "accelerate", "deepspeed", "transformers", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def write_model_folder(model, tokenizer, family, max_length: int, output: Path, provenance: dict,
                       state_dict: dict | None = None) -> None:
    """A folder plain transformers loads and answers from: save_pretrained + a tokenizer that lays prompts out as
    the family's models read them (model/tokenizer.py, for_export), written into a temporary sibling, fsynced and
    renamed: a reader never sees half a model. `state_dict`: the gathered weights when the model's own are
    partitioned (ZeRO-3)."""
    from transformers.utils import logging as hf_logging

    from lowmem_train.model.tokenizer import for_export

    hf_logging.disable_progress_bar()  # one small file: a progress bar is noise
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = output.with_name(f".{output.name}.tmp"), output.with_name(f".{output.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
    for_export(tokenizer, family, max_length).save_pretrained(str(tmp))
    provenance = {**provenance, "versions": library_versions()}
    (tmp / "lowmem_export.json").write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    fsync_tree(tmp)
    if output.exists():  # the caller checked: empty, or an earlier export it may replace
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
    tmp.rename(output)
    fsync_dir(output.parent)
    shutil.rmtree(old, ignore_errors=True)
