"""The distributed backend: one Accelerator, with or without DeepSpeed, decided by our config alone.

Why we build the DeepSpeed plugin ourselves instead of letting `accelerate launch` flags decide: the prior
art's `--multi_gpu` silently replaced DeepSpeed with plain DDP. Here `deepspeed_config` in the run config
is the one switch, whatever the launcher was told, and every "auto" in the DeepSpeed JSON is filled from
the run config before DeepSpeed sees it (batch, accumulation, learning rate, clipping, precision).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedType, DummyOptim, InitProcessGroupKwargs

from lowmem_train.config.errors import ConfigError, first_line
from lowmem_train.config.schema import RunConfig
from lowmem_train.config.shipped import DS_CONFIG_DIR, ds_config_file

log = logging.getLogger(__name__)

WORKING_CPU_COMMAND = "accelerate launch --config_file accelerate_configs/cpu_2proc_deepspeed.yaml train_low_mem.py train"


@dataclass
class Backend:
    accelerator: Accelerator
    ds_config: dict | None  # the resolved DeepSpeed config, None on the plain Accelerate path
    precision: str  # "fp32", "bf16" or "fp16": what the forward pass really runs in
    engine: Any = None  # the DeepSpeedEngine, once prepare() made it

    @property
    def uses_deepspeed(self) -> bool:
        return self.ds_config is not None

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config["zero_optimization"].get("stage", 0)) if self.ds_config else 0

    @property
    def offloads_optimizer(self) -> bool:
        zero = (self.ds_config or {}).get("zero_optimization", {})
        return zero.get("offload_optimizer", {}).get("device") == "cpu"

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def model_init(self):
        """The context to build the model in. Under ZeRO-3 each parameter is partitioned as it is created
        (deepspeed.zero.Init): no rank ever holds the whole model, which is what ZeRO-3 is for (accelerate's
        zero3_init_flag does the same for models loaded with from_pretrained; ours are built from a config)."""
        import contextlib

        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.Init(config_dict_or_path=self.ds_config)

    def prepare(self, model: torch.nn.Module, optimizer):
        """accelerate's prepare; under DeepSpeed the model it returns is the DeepSpeedEngine, kept as `engine`."""
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.uses_deepspeed:
            self.engine = model
        return model, optimizer

    def describe(self) -> str:
        if not self.uses_deepspeed:
            return "plain Accelerate (no DeepSpeed)"
        return f"DeepSpeed ZeRO-{self.zero_stage}" + (" + optimizer offload to CPU" if self.offloads_optimizer else "")


def launched_world_size() -> int:
    """Processes the launcher started (torchrun/accelerate set WORLD_SIZE), whatever the backend made of it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device() -> int:
    """The CUDA device this rank will compute on: accelerate picks cuda:LOCAL_RANK."""
    local = os.environ.get("LOCAL_RANK", "0")
    return int(local) if local.isdigit() else 0


def choose_precision(requested: str, capability: tuple[int, int] | None = None, name: str = "") -> str:
    """What the forward pass runs in. bf16 needs compute capability 8.0 (Ampere) or newer: below that
    torch.cuda.is_bf16_supported() still answers True (it counts emulation, which is slow), so the capability
    itself decides, read from this rank's own device (`capability`, None without a GPU). auto on an older GPU
    stays fp32: fp16 is faster there but T5's activations overflow in it (ask for it with --mixed_precision fp16)."""
    if requested == "auto":
        if capability is not None and capability >= (8, 0):
            return "bf16"
        return "fp32"  # on CPU, bf16 autocast costs more in casts than it saves for small models
    if requested == "bf16" and capability is not None and capability < (8, 0):
        raise ConfigError(f"--mixed_precision=bf16: {name or 'this GPU'} has compute capability "
                          f"{capability[0]}.{capability[1]}, and bf16 needs 8.0 or newer (A100, H100, RTX 30xx+); "
                          "use fp16 or no")
    return {"no": "fp32"}.get(requested, requested)


def precision_for_this_rank(requested: str, on_gpu: bool) -> str:
    """choose_precision with this rank's own device (`on_gpu`: the run computes on CUDA), read from its properties:
    no CUDA context is made on GPU 0 by every rank (is_bf16_supported() would make one on the current device
    before accelerate sets it)."""
    if not on_gpu:
        return choose_precision(requested)
    from lowmem_train.trainer.memory.gpu import compute_capability, device_name

    device = rank_device()
    capability = compute_capability(device=device)
    precision = choose_precision(requested, capability, device_name(device=device))
    if requested == "auto" and precision == "fp32" and capability is not None:
        log.info("precision fp32: %s has compute capability %d.%d, bf16 needs 8.0 (--mixed_precision fp16 is faster "
                 "there, but T5's activations can overflow in it)", device_name(device=device), *capability)
    return precision


def choose_ds_config_path(cfg: RunConfig, world_size: int) -> Path | None:
    """The DeepSpeed JSON a run of `world_size` processes uses, or None for plain Accelerate."""
    choice = cfg.deepspeed_config
    if choice == "none":
        return None
    if choice == "auto":
        from_launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")  # accelerate launch --config_file X.yaml
        if from_launcher and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            choice = from_launcher
        elif world_size == 1 and not torch.cuda.is_available():
            return None  # one CPU process: ZeRO has nothing to partition, plain AdamW is faster
        else:
            return DS_CONFIG_DIR / "zero2_offload.json"
    return ds_config_file(choice)


def fill_ds_config(raw: dict, cfg: RunConfig, micro_batch: int, grad_accum: int, world_size: int, precision: str) -> dict:
    """Replace every "auto" that is ours to decide with the run config's value."""
    ds = json.loads(json.dumps(raw))  # deep copy
    kind = str(ds.get("optimizer", {}).get("type", "")).lower()
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "optimizer.params.lr": cfg.learn_rate,
        "optimizer.params.weight_decay": cfg.weight_decay,
        **({"optimizer.params.betas": [0.9, 0.999], "optimizer.params.eps": 1e-8}  # Adam's, for Adam only
           if kind in ("adam", "adamw") else {}),
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
    }
    for dotted, value in ours.items():
        *parents, leaf = dotted.split(".")
        node = ds
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node.get(leaf) == "auto":
            node[leaf] = value
        elif isinstance(node, dict) and leaf in node and dotted in ("train_micro_batch_size_per_gpu",
                                                                   "gradient_accumulation_steps", "train_batch_size"):
            # Batch numbers are the run config's alone: a fixed number in the JSON would fight the guard.
            node[leaf] = value
    return ds


def make_backend(cfg: RunConfig, micro_batch: int, grad_accum: int, load_universal: bool = False) -> Backend:
    """Create the Accelerator; refuse launches that would train ranks independently.

    `load_universal`: the checkpoint to resume was written by another number of processes and is loaded in
    DeepSpeed's universal format (checkpoint.py converts it); DeepSpeed reads the switch from its config."""
    precision = precision_for_this_rank(cfg.mixed_precision, torch.cuda.is_available())
    if precision != "fp32" and not torch.cuda.is_available():
        raise ConfigError(f"--mixed_precision={cfg.mixed_precision} needs a GPU; use auto or no on CPU")
    world = launched_world_size()
    ds_path = choose_ds_config_path(cfg, world)
    # On CPU the process group must be gloo, or accelerate quietly runs every rank alone (each rank would report
    # one process and the data would not be sharded).
    handlers = [InitProcessGroupKwargs(backend="gloo")] if world > 1 and not torch.cuda.is_available() else []
    plugin = None
    ds_config = None
    if ds_path is not None:
        if "RANK" not in os.environ:  # one process without a launcher: DeepSpeed would go looking for MPI
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        ds_config = fill_ds_config(json.loads(ds_path.read_text()), cfg, micro_batch, grad_accum, world, precision)
        if load_universal:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    not_connected = (f"{world} processes were launched but they are not connected: they would train {world} separate "
                     f"models. On a machine without GPUs run: {WORKING_CPU_COMMAND}")
    try:
        accelerator = Accelerator(
            deepspeed_plugin=plugin,
            mixed_precision="bf16" if precision == "bf16" else ("fp16" if precision == "fp16" else "no"),
            gradient_accumulation_steps=grad_accum if plugin is None else 1,
            kwargs_handlers=handlers,
            # Without CUDA the plain path must say cpu=True, or `--multi_gpu` yields DistributedType.NO: a process
            # group exists but the model is never wrapped in DDP and every rank trains alone. (DeepSpeed refuses
            # cpu=True and picks the CPU itself.)
            cpu=plugin is None and not torch.cuda.is_available(),
        )
    except (ValueError, RuntimeError) as exc:  # WORLD_SIZE > 1 but no launcher set up a rendezvous
        if world > 1:
            raise ConfigError(f"{not_connected} ({first_line(exc)})") from None
        raise
    if world > 1 and (accelerator.num_processes == 1 or accelerator.distributed_type == DistributedType.NO):
        raise ConfigError(f"{not_connected} (accelerate made DistributedType.{accelerator.distributed_type.name})")
    if ds_config is not None and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(f"DeepSpeed was asked for ({ds_path}) but accelerate set up {accelerator.distributed_type.name}")
    if ds_config is not None:
        accelerator.gradient_accumulation_steps = grad_accum
    return Backend(accelerator, ds_config, precision)


def make_optimizer(backend: Backend, model: torch.nn.Module, cfg: RunConfig):
    """trainer/optim.py's optimizer over the trained parameters. Under DeepSpeed the JSON's optimizer section builds
    it (DeepSpeedCPUAdam when the optimizer is offloaded), so accelerate gets a placeholder with the same groups."""
    from lowmem_train.trainer import optim

    optim.check_backend(cfg, backend.uses_deepspeed)
    if backend.uses_deepspeed and "optimizer" in backend.ds_config:
        return DummyOptim(optim.param_groups(model, cfg.weight_decay), lr=cfg.learn_rate, weight_decay=cfg.weight_decay)
    return optim.build_optimizer(cfg, model, backend.accelerator.device.type)


def accumulation_divisor(backend: Backend) -> int:
    """What the backend divides each micro-batch loss by: DeepSpeed's count under DeepSpeed, else accelerate's."""
    if backend.engine is not None:
        return backend.engine.gradient_accumulation_steps()
    return backend.accelerator.gradient_accumulation_steps


def set_batch_plan(backend: Backend, micro_batch: int, grad_accum: int) -> None:
    """Apply a new micro-batch / accumulation split of the same global batch to every layer that counts it.

    DeepSpeed 0.19: set_train_micro_batch_size keeps accumulation (changing the global batch), so the
    global batch is set right after it, which recomputes accumulation. Accelerate keeps its own count.
    """
    backend.accelerator.gradient_accumulation_steps = grad_accum
    engine = backend.engine
    if engine is not None:
        engine.set_train_micro_batch_size(micro_batch)
        engine.set_train_batch_size(micro_batch * grad_accum * backend.world_size)
        assert engine.gradient_accumulation_steps() == grad_accum, "DeepSpeed disagrees on accumulation"
