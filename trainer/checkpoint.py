"""Crash-safe checkpoints: save, find the newest complete one, load, prune, export the final model.

A checkpoint (layout in files.py) is written into `.step_XXXX.tmp/` by every rank, then rank 0 writes
`train_state.json` LAST, fsyncs, and renames the folder into place; only then is `latest` replaced (write +
rename). So a folder named step_* with a readable train_state.json is complete, and anything else is debris from
a killed run that the next save removes. Model and optimizer use DeepSpeed's own format under DeepSpeed (one
optimizer shard per rank), safetensors + a weights_only torch file otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from lowmem_train.config.errors import ConfigError
from lowmem_train.config.loader import config_from_dict, config_to_dict, save_config
from lowmem_train.config.schema import RunConfig
from lowmem_train.model import families
from lowmem_train.model.adapt import plain, trained_state, trains_everything
from lowmem_train.model.pretrained import ARCHITECTURE, save_architecture
from lowmem_train.trainer import distributed
from lowmem_train.trainer.backend import Backend
from lowmem_train.trainer.compat import zero3_local_shard
from lowmem_train.trainer.cpu_adam_resume import replay_bias_correction
from lowmem_train.trainer.faults import KILL_IN_SAVE, SLOW_SAVE
from lowmem_train.trainer.metrics import LOWER_IS_BETTER
from lowmem_train.trainer.files import (CHECKPOINTS, DS_TAG, DS_UNIVERSAL_TAG, STATE_FILE, TRAINED_FILE, ResumePoint,
                                        checkpoint_name, complete_checkpoints, dir_size, fsync_dir, fsync_tree,
                                        library_versions, read_checkpoint, write_model_folder)
from lowmem_train.trainer.state import TrainState

log = logging.getLogger(__name__)


class OutOfDisk(RuntimeError):
    """Too little free disk for a checkpoint, and --low_disk=stop: nothing was saved."""


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


def needs_universal(point: ResumePoint | None, world_size: int) -> bool:
    """A DeepSpeed checkpoint written by another number of processes: ZeRO shards are tied to the process count,
    so it is loaded in DeepSpeed's universal format (the backend must be told before the engine exists)."""
    return (point is not None and (point.path / "model" / DS_TAG).is_dir()
            and point.state.world_size != world_size)


def load_trained(net, file: Path) -> None:
    """The trained parameters of a checkpoint into `net`, which must train exactly these."""
    state = load_file(str(file))
    expected = set(trained_state(net))
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        raise ConfigError(f"{file} holds other trained parameters than this run trains (e.g. {odd[0]!r}); resume with "
                          f"the checkpoint's --freeze and --lora.* options")
    net.load_state_dict(state, strict=False)


class Checkpointer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.root = Path(cfg.output_dir) / CHECKPOINTS
        self.backend: Backend | None = None
        self.vocab: str | None = None  # fingerprint of the run's tokenizer, saved with every checkpoint
        self.saved: set[int] = set()  # steps this run saved (a second save at the same step is the same state)
        self.trained_only = False  # the last save held the trained parameters only

    def attach(self, backend: Backend) -> None:
        self.backend = backend

    # ---- saving ----------------------------------------------------------------------------------------------
    def save(self, state: TrainState, model, optimizer, last_eval) -> Path | None:
        backend = self.backend
        name = checkpoint_name(state.step)
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        if state.step in self.saved:
            return final  # saved at this step already (e.g. an epoch end right after a save_steps save)
        if not self.has_disk_space():
            return None
        if last_eval is None:
            state.eval_score = None
        else:
            name = self.cfg.eval.best_metric
            state.eval_score = last_eval.value(name) * (1 if LOWER_IS_BETTER[name] else -1)
        if backend.is_main:
            if final.exists():  # not ours: a checkpoint that did not read back when this run started
                log.warning("replacing %s: it is not a checkpoint of this run (it did not read back at start)", final)
                shutil.rmtree(final)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        distributed.barrier(backend)
        net = backend.accelerator.unwrap_model(model)
        self.trained_only = not trains_everything(net)  # frozen parts / a LoRA base come from where they came from
        if backend.engine is not None:  # every rank writes its optimizer shard
            backend.engine.save_checkpoint(str(tmp / "model"), tag=DS_TAG, client_state={}, save_latest=False,
                                           exclude_frozen_parameters=self.trained_only)
        elif backend.is_main:
            (tmp / "model").mkdir()
            if self.trained_only:  # the adapters or the unfrozen parts, and the optimizer: the checkpoint's news
                save_file({k: v.contiguous() for k, v in trained_state(net).items()},
                          str(tmp / "model" / TRAINED_FILE))
            else:
                save_model(net, str(tmp / "model" / "model.safetensors"))  # tied weights once
            torch.save(optimizer.state_dict(), tmp / "model" / "optimizer.pt")
        if backend.is_main and self.cfg.model.name_or_path:  # the architecture, should the user's folder move
            save_architecture(backend.accelerator.unwrap_model(model), tmp / ARCHITECTURE)
        torch.save(rng_state(), tmp / "rng" / f"rank_{backend.rank:05d}.pt")
        KILL_IN_SAVE.after_files_written()
        SLOW_SAVE.after_files_written()
        distributed.barrier(backend)
        if backend.is_main:
            self._commit(tmp, final, state)
        distributed.barrier(backend)
        self.saved.add(state.step)
        return final

    def _commit(self, tmp: Path, final: Path, state: TrainState) -> None:
        save_config(self.cfg, tmp / "config.yaml")
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
        meta = {"train_state": state.state_dict(), "config": config_to_dict(self.cfg), "files": files,
                "versions": library_versions(), "deepspeed": self.backend.uses_deepspeed, "tokenizer": self.vocab,
                "trained_only": self.trained_only}
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
        previous = complete_checkpoints(self.root)
        if not previous:
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        need = int(dir_size(previous[0]) * 1.1)
        free = shutil.disk_usage(self.root).free
        if distributed.agree_all(self.backend, free >= need):  # every rank must take the same branch
            return True
        message = f"free disk {free / 2**30:.2f} GB in {self.root} < {need / 2**30:.2f} GB needed for a checkpoint"
        if self.cfg.low_disk == "stop":
            raise OutOfDisk(f"{message}; stopping (--low_disk=stop). Free space and resume with --is_keep_training=True")
        log.warning("%s: NOT saved, training on (--low_disk=warn)", message)
        return False

    def prune(self) -> None:
        """Keep the newest keep_latest_n_ckp and the best by --eval.best_metric; remove debris of killed saves."""
        ckpts = complete_checkpoints(self.root)
        keep = set(ckpts[: self.cfg.keep_latest_n_ckp])
        scored = []
        for p in ckpts:
            try:
                scored.append((read_checkpoint(p).state.eval_score, p))
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
        engine = backend.engine
        saved_with_ds = (point.path / "model" / DS_TAG).is_dir()
        if saved_with_ds != (engine is not None):
            raise ConfigError(f"{point.path} was saved {'with' if saved_with_ds else 'without'} DeepSpeed; resume "
                              f"with the same --deepspeed_config, or export it and use --is_finetune")
        if engine is not None:
            tag = DS_UNIVERSAL_TAG if needs_universal(point, backend.world_size) else DS_TAG
            engine.load_checkpoint(str(point.path / "model"), tag=tag, load_optimizer_states=True,
                                   load_lr_scheduler_states=False, load_module_strict=not point.trained_only)
            replay_bias_correction(engine)
        elif point.trained_only:  # the trained parameters; the rest came from the pretrained folder or the seed
            load_trained(backend.accelerator.unwrap_model(model), point.path / "model" / TRAINED_FILE)
            optimizer.load_state_dict(torch.load(point.path / "model" / "optimizer.pt", weights_only=True,
                                                 map_location="cpu"))
        else:  # full (unsharded) states: any number of processes can load them
            load_model(backend.accelerator.unwrap_model(model), str(point.path / "model" / "model.safetensors"))
            optimizer.load_state_dict(torch.load(point.path / "model" / "optimizer.pt", weights_only=True,
                                                 map_location="cpu"))
        rng = point.path / "rng" / f"rank_{backend.rank:05d}.pt"
        if state.world_size == backend.world_size and rng.is_file():
            set_rng_state(torch.load(rng, weights_only=True))
        else:  # another world size: fresh but deterministic streams per rank
            torch.manual_seed(self.cfg.seed + 1000 * state.step + backend.rank)
        self.saved.add(state.step)  # that checkpoint holds this very state: saving it again would only risk it
        log.info("resumed from %s: epoch %d, step %d, %d samples into the epoch", point.path.name,
                 state.position.epoch + 1, state.step, state.position.samples_seen)
        return state

    def prepare_world_size_change(self, point: ResumePoint) -> None:
        """Before the engine exists: a DeepSpeed checkpoint from another number of processes is converted once
        to DeepSpeed's universal format (the backend was built to load it: needs_universal). Exact for weights and
        Adam moments (checked 2->1 and 1->2 on ZeRO-2 offload)."""
        backend = self.backend
        if not backend.uses_deepspeed or not needs_universal(point, backend.world_size):
            return
        if backend.zero_stage not in (1, 2, 3):
            raise ConfigError(f"{point.path}: resuming on {backend.world_size} processes needs ZeRO stage 1-3")
        target = point.path / "model" / DS_UNIVERSAL_TAG
        if backend.is_main and not target.is_dir():
            convert_to_universal(point.path / "model" / DS_TAG, target)
        distributed.barrier(backend)
        log.info("checkpoint %s was written by %d process(es); loading its universal form on %d",
                 point.path.name, point.state.world_size, backend.world_size)

    def check_compatible(self, point: ResumePoint) -> None:
        """Fields that would silently corrupt a resumed run must match the checkpoint's; the rest may change."""
        saved = config_from_dict(point.config, where=str(point.path / STATE_FILE))
        now = self.cfg
        # name_or_path may move: the shape fields it resolved to and the tokenizer's fingerprint are what must match
        shape = [f.name for f in fields(now.model) if f.name not in ("attn_implementation", "name_or_path")]
        frozen = {f"model.{k}": (getattr(saved.model, k), getattr(now.model, k)) for k in shape}
        fingerprinted = bool(point.tokenizer and self.vocab)  # older checkpoints carry none: the path must match
        if not fingerprinted:
            frozen["tokenizer_dir"] = (saved.tokenizer_dir, now.tokenizer_dir)
        frozen.update({"max_seq_len": (saved.max_seq_len, now.max_seq_len),
                       "seed": (saved.seed, now.seed),
                       "eval.best_metric": (saved.eval.best_metric, now.eval.best_metric),  # best_score's unit
                       "freeze": (saved.freeze, now.freeze), "optimizer": (saved.optimizer, now.optimizer),
                       **{f"lora.{k}": (getattr(saved.lora, k), getattr(now.lora, k)) for k in (f.name for f in fields(now.lora))}})
        changed = [f"--{k} ({a!r} -> {b!r})" for k, (a, b) in frozen.items() if a != b]
        if fingerprinted and point.tokenizer != self.vocab:  # e.g. the same folder, retrained
            changed.append(f"the tokenizer in {now.tokenizer_dir} (vocabulary {point.tokenizer} -> {self.vocab})")
        if changed:
            raise ConfigError(f"cannot resume {point.path}: {', '.join(changed)} differ from the checkpoint; "
                              f"use the checkpoint's values or start a new --output_dir")

    def load_pretrained(self, model) -> None:
        """The weights of cfg.model.name_or_path, strictly (model/pretrained.py); under ZeRO-3 the partitioned
        parameters are gathered, loaded on rank 0 and split again."""
        from lowmem_train.model.pretrained import PretrainedFolder, load_weights

        params = list(model.parameters())
        gather = None
        if zero3_local_shard(params[0]) is not None:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        folder = PretrainedFolder(self.cfg.model.name_or_path)
        load_weights(model, folder, gather)
        log.info("starting from the pretrained weights in %s (fresh optimizer and schedule)", folder.path)

    # ---- the final model ---------------------------------------------------------------------------------------
    def export_final(self, model, tokenizer, step: int) -> Path:
        """The trained model as a plain HF folder (safetensors) + tokenizer in output_dir/final, atomically."""
        backend = self.backend
        net = backend.accelerator.unwrap_model(model)
        adapters = self.cfg.lora.r > 0  # merged into a copy: a plain model, the run's own left as it is
        state_dict = None if adapters else distributed.full_state_dict(backend, model)
        final = Path(self.cfg.output_dir) / "final"
        if backend.is_main:
            import copy

            write_model_folder(plain(copy.deepcopy(net)) if adapters else net, tokenizer,
                               families.get(self.cfg.model.type), self.cfg.max_seq_len, final,
                               {"run": str(self.cfg.output_dir), "step": step, "weights": "end of training"},
                               state_dict=state_dict)
        distributed.barrier(backend)
        return final
