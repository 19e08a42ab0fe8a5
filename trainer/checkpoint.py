"""Crash-safe checkpoints: save, find the newest complete one, load, prune, export the final model.

Layout:  output_dir/checkpoints/step_00000123/{train_state.json, config.yaml, model/, rng/rank_*.pt}
                                 latest            (text: the name of the newest complete checkpoint)

A checkpoint is written into `.step_XXXX.tmp/` by every rank, then rank 0 writes `train_state.json` LAST,
fsyncs, and renames the folder into place; only then is `latest` replaced (write + rename). So a folder named
step_* with a readable train_state.json is complete, and anything else is debris from a killed run that the
next save removes. Model and optimizer use DeepSpeed's own format under DeepSpeed (one optimizer shard per
rank), safetensors + a weights_only torch file otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_model

from lowmem_train.config.loader import config_from_dict, config_to_dict, save_config
from lowmem_train.config.schema import ConfigError, RunConfig
from lowmem_train.trainer.backend import Backend, all_reduce, deepspeed_engine
from lowmem_train.trainer.cpu_adam_resume import replay_bias_correction
from lowmem_train.trainer.faults import KILL_IN_SAVE

log = logging.getLogger(__name__)
STATE_FILE = "train_state.json"
DS_TAG = "ds"
DS_UNIVERSAL_TAG = "ds_universal"  # DeepSpeed's layout-free format, for resuming on another number of processes


@dataclass
class TrainState:
    """The loop's own state; with the model/optimizer files it is everything a resume needs."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0  # global samples consumed in `epoch`
    best_loss: float = math.inf
    bad_evals: int = 0
    eval_loss: float | None = None  # validation loss when this checkpoint was written (for "keep best")
    plan: dict = field(default_factory=dict)
    world_size: int = 1
    global_batch: int = 0

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples_seen": self.samples_seen}

    def state_dict(self) -> dict:
        d = asdict(self)
        d["best_loss"] = None if math.isinf(self.best_loss) else self.best_loss
        return d

    @classmethod
    def from_state_dict(cls, d: dict) -> "TrainState":
        d = dict(d)
        d["best_loss"] = math.inf if d.get("best_loss") is None else d["best_loss"]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class ResumePoint:
    path: Path
    state: TrainState
    config: dict
    tokenizer: str | None = None  # fingerprint of the vocabulary the checkpoint was trained with

    @property
    def plan(self) -> dict:
        return self.state.plan


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
    return ResumePoint(path, state, config, meta.get("tokenizer"))


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


def rng_state() -> dict[str, torch.Tensor]:
    """Tensors only, so that loading needs no pickle (torch.load(weights_only=True))."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "accelerate", "deepspeed", "transformers", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's converter, into a temporary folder renamed when complete (a crash leaves no half target)."""
    import subprocess
    import sys

    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # --inject_missing_state: plain HF models lack the metadata the converter asks for (it is only
    # written for tensor-parallel models); the converter can infer it for data parallelism.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
           "--output_folder", str(tmp), "--inject_missing_state"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"{source}: conversion to a universal checkpoint failed ({tail}); resume with the "
                          "original number of processes instead")
    tmp.rename(target)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Checkpointer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.root = Path(cfg.output_dir) / "checkpoints"
        self.backend: Backend | None = None
        self.vocab: str | None = None  # fingerprint of the run's tokenizer, saved with every checkpoint

    def attach(self, backend: Backend) -> None:
        self.backend = backend

    # ---- finding ---------------------------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.root)

    def read(self, path: Path) -> ResumePoint:
        return read_checkpoint(path)

    def find_resume(self) -> ResumePoint | None:
        """The newest complete, intact checkpoint; broken ones are skipped with a warning naming them."""
        for path in self.complete_checkpoints():
            try:
                return self.read(path)
            except ValueError as exc:
                log.warning("skipping checkpoint %s: %s", path.name, exc)
        log.warning("--is_keep_training: no complete checkpoint in %s, starting from scratch", self.root)
        return None

    # ---- saving ----------------------------------------------------------------------------------------------
    def save(self, state: TrainState, model, optimizer, last_eval) -> Path | None:
        backend = self.backend
        acc = backend.accelerator
        name = f"step_{state.step:08d}"
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        if final.exists():
            return final  # already saved at this step (e.g. epoch end right after a save_steps save)
        if not self.has_disk_space():
            return None
        state.eval_loss = None if last_eval is None else last_eval.loss
        if backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        acc.wait_for_everyone()
        engine = deepspeed_engine(backend)
        if engine is not None:  # every rank writes its optimizer shard
            engine.save_checkpoint(str(tmp / "model"), tag=DS_TAG, client_state={}, save_latest=False)
        elif backend.is_main:
            (tmp / "model").mkdir()
            save_model(acc.unwrap_model(model), str(tmp / "model" / "model.safetensors"))  # handles tied weights
            torch.save(optimizer.state_dict(), tmp / "model" / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng" / f"rank_{backend.rank:05d}.pt")
        KILL_IN_SAVE.after_files_written()
        acc.wait_for_everyone()
        if backend.is_main:
            self._commit(tmp, final, state)
        acc.wait_for_everyone()
        return final

    def _commit(self, tmp: Path, final: Path, state: TrainState) -> None:
        save_config(self.cfg, tmp / "config.yaml")
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
        meta = {"train_state": state.state_dict(), "config": config_to_dict(self.cfg), "files": files,
                "versions": library_versions(), "deepspeed": self.backend.uses_deepspeed, "tokenizer": self.vocab}
        fsync_tree(tmp)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:  # the completion marker, written last
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(final)
        fsync_dir(self.root)
        latest_tmp = self.root / ".latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        latest_tmp.replace(self.root / "latest")
        fsync_dir(self.root)
        log.info("checkpoint %s saved (%.1f MB)", final, dir_size(final) / 2**20)
        self.prune()

    def has_disk_space(self) -> bool:
        """Refuse to start a checkpoint the disk cannot hold (measured against the previous one)."""
        previous = self.complete_checkpoints()
        if not previous:
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        need = int(dir_size(previous[0]) * 1.1)
        free = shutil.disk_usage(self.root).free
        ok = free >= need
        ok = bool(all_reduce(self.backend, [float(ok)], "min")[0])  # every rank must take the same branch
        if ok:
            return True
        message = f"free disk {free / 2**30:.2f} GB in {self.root} < {need / 2**30:.2f} GB needed for a checkpoint"
        if self.cfg.low_disk == "stop":
            raise SystemExit(f"error: {message}; stopping (--low_disk=stop). Free space and resume with --is_keep_training=True")
        log.warning("%s: NOT saved, training on (--low_disk=warn)", message)
        return False

    def prune(self) -> None:
        """Keep the newest keep_latest_n_ckp and the best by validation loss; remove debris of killed saves."""
        ckpts = self.complete_checkpoints()
        keep = set(ckpts[: self.cfg.keep_latest_n_ckp])
        scored = []
        for p in ckpts:
            try:
                scored.append((self.read(p).state.eval_loss, p))
            except ValueError:
                continue
        scored = [(loss, p) for loss, p in scored if loss is not None]
        if scored:
            keep.add(min(scored, key=lambda lp: lp[0])[1])
        for p in ckpts:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
        newest = ckpts[0].name if ckpts else ""
        for debris in [*self.root.glob(".step_*.tmp"), *self.root.glob(".ds_universal.tmp")]:
            shutil.rmtree(debris, ignore_errors=True)
        for half in self.root.glob("step_*"):  # a killed prune can leave a folder without its marker
            if half.is_dir() and not (half / STATE_FILE).is_file() and half.name < newest:
                shutil.rmtree(half, ignore_errors=True)

    # ---- loading ---------------------------------------------------------------------------------------------
    def load(self, point: ResumePoint, model, optimizer) -> TrainState:
        backend = self.backend
        state = point.state
        engine = deepspeed_engine(backend)
        saved_with_ds = (point.path / "model" / DS_TAG).is_dir()
        if saved_with_ds != (engine is not None):
            raise ConfigError(f"{point.path} was saved {'with' if saved_with_ds else 'without'} DeepSpeed; resume "
                              f"with the same --deepspeed_config, or export it and use --is_finetune")
        if engine is not None:
            tag = DS_UNIVERSAL_TAG if state.world_size != backend.world_size else DS_TAG
            engine.load_checkpoint(str(point.path / "model"), tag=tag, load_optimizer_states=True,
                                   load_lr_scheduler_states=False, load_module_strict=True)
            replay_bias_correction(engine)
        else:  # full (unsharded) states: any number of processes can load them
            load_model(backend.accelerator.unwrap_model(model), str(point.path / "model" / "model.safetensors"))
            optimizer.load_state_dict(torch.load(point.path / "model" / "optimizer.pt", weights_only=True,
                                                 map_location="cpu"))
        rng = point.path / "rng" / f"rank_{backend.rank:05d}.pt"
        if state.world_size == backend.world_size and rng.is_file():
            set_rng_state(torch.load(rng, weights_only=True))
        else:  # another world size: fresh but deterministic streams per rank
            torch.manual_seed(self.cfg.seed + 1000 * state.step + backend.rank)
        log.info("resumed from %s: epoch %d, step %d, %d samples into the epoch", point.path.name, state.epoch + 1,
                 state.step, state.samples_seen)
        return state

    def prepare_world_size_change(self, point: ResumePoint) -> None:
        """Before the engine exists: a DeepSpeed checkpoint from another number of processes is converted once
        to DeepSpeed's universal format (ZeRO shards are tied to the process count), and the engine is told
        to load that format. Exact for weights and Adam moments (checked 2->1 and 1->2 on ZeRO-2 offload)."""
        backend = self.backend
        if not backend.uses_deepspeed or point.state.world_size == backend.world_size:
            return
        if backend.zero_stage not in (1, 2, 3):
            raise ConfigError(f"{point.path}: resuming on {backend.world_size} processes needs ZeRO stage 1-3")
        target = point.path / "model" / DS_UNIVERSAL_TAG
        if backend.is_main and not target.is_dir():
            convert_to_universal(point.path / "model" / DS_TAG, target)
        backend.accelerator.wait_for_everyone()
        backend.accelerator.state.deepspeed_plugin.deepspeed_config["checkpoint"] = {"load_universal": True}
        log.info("checkpoint %s was written by %d process(es); loading its universal form on %d",
                 point.path.name, point.state.world_size, backend.world_size)

    def check_compatible(self, point: ResumePoint) -> None:
        """Fields that would silently corrupt a resumed run must match the checkpoint's; the rest may change."""
        saved = config_from_dict(point.config, where=str(point.path / STATE_FILE))
        now = self.cfg
        frozen = {f"model.{k}": (getattr(saved.model, k), getattr(now.model, k)) for k in vars(now.model)
                  if k != "attn_implementation"}
        fingerprinted = bool(point.tokenizer and self.vocab)  # older checkpoints carry none: the path must match
        if not fingerprinted:
            frozen["tokenizer_dir"] = (saved.tokenizer_dir, now.tokenizer_dir)
        frozen.update({"max_seq_len": (saved.max_seq_len, now.max_seq_len),
                       "seed": (saved.seed, now.seed)})
        changed = [f"--{k} ({a!r} -> {b!r})" for k, (a, b) in frozen.items() if a != b]
        if fingerprinted and point.tokenizer != self.vocab:  # e.g. the same folder, retrained
            changed.append(f"the tokenizer in {now.tokenizer_dir} (vocabulary {point.tokenizer} -> {self.vocab})")
        if changed:
            raise ConfigError(f"cannot resume {point.path}: {', '.join(changed)} differ from the checkpoint; "
                              f"use the checkpoint's values or start a new --output_dir")

    def load_finetune_weights(self, model) -> None:
        source = Path(self.cfg.finetune_from or Path(self.cfg.output_dir) / "final")
        weights = source / "model.safetensors"
        if not weights.is_file():
            raise ConfigError(f"--is_finetune: no model.safetensors in {source}; set --finetune_from to an exported model")
        missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
        if missing or unexpected:
            raise ConfigError(f"--is_finetune: {source} does not match the configured model "
                              f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. "
                              f"{(missing + unexpected)[0]}); use the same --model.* options it was trained with")
        log.info("fine-tuning from %s (fresh optimizer and schedule)", source)

    # ---- the final model ---------------------------------------------------------------------------------------
    def export_final(self, model, tokenizer, step: int) -> Path:
        """The trained model as a plain HF folder (safetensors) + tokenizer in output_dir/final, atomically."""
        from lowmem_train.trainer.export import write_folder

        acc = self.backend.accelerator
        state_dict = acc.get_state_dict(model)  # a collective under ZeRO-3: every rank calls it
        final = Path(self.cfg.output_dir) / "final"
        if self.backend.is_main:
            write_folder(acc.unwrap_model(model), tokenizer, final, {"run": str(self.cfg.output_dir), "step": step,
                         "weights": "end of training"}, state_dict=state_dict)
        acc.wait_for_everyone()
        return final
