"""What a run will need, per rank and per machine, counted before anything is allocated (see estimate.py).

    shape       the model is built on the `meta` device (exact parameter count, no memory); the vocabulary is
                the tokenizer's when tokenizer_dir holds one, else model.vocab_size
    states      bytes per parameter of weights, gradients, fp32 master and AdamW states for the backend that
                train will pick (plain Accelerate, or the DeepSpeed JSON chosen as backend.py chooses it),
                split by where they live (device or host) and divided by the ranks where ZeRO partitions;
                DeepSpeed's own estimator gives the GPU figure where it applies (ZeRO-2/3, 16-bit)
    activations activations.py, per sample at max_seq_len (a worst case: real batches are trimmed to their
                longest row), with or without gradient checkpointing; frozen layers that nothing trained feeds
                (T5's encoder under --freeze embeddings,encoder) keep none
    host        measured constants of this software stack + the states and activations held in host RAM,
                x local ranks, + DataLoader workers (and their fork server) + the launcher
    verdict     against the MemoryProbe's job_available (host, cgroup, Slurm or --memory.host_budget_gb) and
                the GPUs' totals; the recommended plan walks the policy's own shedding ladders until it fits

What a DataLoader worker costs: workers start from a small fork server (trainer/data/loader.py), not from the
trainer, so they hold no copy of the model states (a worker forked from the trainer would keep a private copy of
every page the trainer rewrites: ~0.55 GB per worker for t5_small). Measured for t5_small, tree PSS peaks over
12 steps: 1.251 GB with 0 workers, 1.461 with 1, 1.575 with 2: the server ~96 MB once, each worker ~114 MB (its
interpreter pages, a shuffle block, the batches it prefetches), whatever the model.

Constants were calibrated against the peak PSS of real CPU runs' process trees (CALIBRATED_ON); re-measure
when the stack changes. Everything heavy is imported inside functions: the estimate command's --help stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lowmem_train.config.schema import RunConfig
from lowmem_train.trainer.memory.activations import activation_bytes_per_sample
from lowmem_train.trainer.memory.units import GB, MB

CALIBRATED_ON = "2-core VM, torch 2.13.0+cpu, transformers 5.23, accelerate 1.15, deepspeed 0.19.8"
# PSS of one training rank without its model: interpreter, torch, transformers, accelerate, pyarrow, tokenizer,
# parquet index, TensorBoard writer, thread pools (280 MB measured before the model exists, + what the first
# steps add). DeepSpeed adds its runtime, the cpu_adam op and the gloo buffers.
RANK_BASELINE = 300 * MB
DEEPSPEED_RANK_EXTRA = 100 * MB  # measured: t5_small on 2 processes, ZeRO-2 offload, peaks at 3.66 GB (README)
LAUNCHER = 180 * MB  # `accelerate launch` (torchrun's agent): the ranks' parent, with torch imported
WORKER = 114 * MB  # one DataLoader worker (module docstring: measured with 0, 1 and 2 workers)
WORKER_SERVER = 96 * MB  # the fork server the workers start from, once per rank while it has workers
SLACK = 0.10  # freed by torch and glibc but not returned to the system, of a rank's states and activations
CUDA_HOST = 1.0 * GB  # a rank's host memory for the CUDA libraries (not measurable on this machine)
CUDA_CONTEXT = 0.5 * GB  # a GPU's memory taken by the CUDA context and kernels before any tensor
GPU_SLACK = 0.15  # caching-allocator fragmentation on a GPU


@dataclass(frozen=True)
class StatePart:
    """One kind of model state held by one rank."""

    name: str
    per_param: float  # bytes per parameter of the whole model, on this rank
    where: str  # "device" (the GPU, or host RAM on a CPU run) or "host" (offloaded)


@dataclass(frozen=True)
class ModelShape:
    params: int  # every parameter, adapters included
    largest_layer: int  # parameters of the largest module (ZeRO-3 gathers one at a time)
    vocab: int
    vocab_source: str
    trained: int = -1  # parameters that get gradients and optimizer state (-1: all of them)
    optimizer_state: int = -1  # bytes of the optimizer's state for them (-1: AdamW's 8 per trained parameter)
    optimizer: str = "adamw"
    frozen_front: int = 0  # leading layers that keep no activations: nothing before or in them is trained

    @property
    def trained_share(self) -> float:
        return 1.0 if self.trained < 0 else self.trained / max(self.params, 1)

    @property
    def optimizer_per_param(self) -> float:
        """The optimizer's state in bytes per parameter of the whole model (what StatePart counts in)."""
        return 8 * self.trained_share if self.optimizer_state < 0 else self.optimizer_state / max(self.params, 1)


@dataclass(frozen=True)
class Engine:
    """What train will run: backend.py's choice of DeepSpeed config, precision, ranks, device."""

    ds_config: Path | None
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    precision: str  # fp32, bf16, fp16
    world_size: int
    local_ranks: int
    gpu: bool

    def describe(self) -> str:
        name = "plain Accelerate (no DeepSpeed)" if self.ds_config is None else (
            f"DeepSpeed ZeRO-{self.zero_stage}" + (", optimizer offloaded to CPU" if self.offload_optimizer else "")
            + (", parameters offloaded to CPU" if self.offload_params else "") + f" ({self.ds_config.name})")
        return (f"{name}, {self.precision}, {self.world_size} process(es) ({self.local_ranks} on this machine), "
                + ("GPU" if self.gpu else "CPU only"))


@dataclass
class Estimate:
    shape: ModelShape
    engine: Engine
    plan: object  # policy.Plan
    states: list[StatePart]
    activation_sample: int  # bytes per sample at max_seq_len, as configured (checkpointing on or off)
    activation_other: int  # the same with checkpointing flipped, for the advice
    host_parts: dict[str, int] = field(default_factory=dict)  # per rank
    workers: int = 0  # one rank's DataLoader workers and their fork server (module docstring)
    host_node: int = 0  # all ranks of this machine, their workers and the launcher: the figure checked
    gpu_rank: int = 0  # per GPU; 0 without a GPU
    deepspeed_says: str = ""
    deepspeed_gpu: int | None = None  # DeepSpeed's per-GPU model states, where its estimator applies

    @property
    def host_rank(self) -> int:
        return sum(self.host_parts.values())


def model_shape(cfg: RunConfig) -> ModelShape:
    """Exact counts from the real model class built on the `meta` device: no weight is allocated."""
    import torch

    from lowmem_train.model.build import build_model

    vocab, source = cfg.model.vocab_size, "model.vocab_size (no tokenizer yet)"
    if cfg.model.name_or_path:  # the embedding's rows, from its config.json (the tokenizer may have fewer)
        source = str(Path(cfg.model.name_or_path) / "config.json")
    elif (Path(cfg.tokenizer_dir) / "tokenizer.json").is_file():
        from lowmem_train.model.tokenizer import vocab_size

        vocab, source = vocab_size(Path(cfg.tokenizer_dir)), cfg.tokenizer_dir

    class VocabOnly:  # build_model needs a length and the special ids, nothing else of a tokenizer
        pad_token_id, eos_token_id, bos_token_id, sep_token_id = 0, 1, 3, 2

        def __len__(self) -> int:
            return vocab

    from lowmem_train.model import families
    from lowmem_train.model.adapt import prepare_trained
    from lowmem_train.trainer import optim

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # build_model seeds torch: leave the RNG as it was
        model = prepare_trained(build_model(cfg, VocabOnly()), cfg, families.get(cfg.model.type))  # --freeze, --lora
    # DeepSpeed's model_to_params dedupes shared weights by data_ptr(), which is 0 for every meta tensor;
    # parameters() already yields a tied weight once, by identity.
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    trained = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    return ModelShape(params, largest, vocab, source, sum(math.prod(s) for s in trained),
                      optim.state_bytes(cfg.optimizer, trained), cfg.optimizer,
                      frozen_front_layers(model, families.get(cfg.model.type)))


def frozen_front_layers(model, family) -> int:
    """How many leading layers (in activation_elements' order) autograd records nothing for: the embeddings and
    every layer up to there are frozen, so no tensor flowing through them requires a gradient (T5 with --freeze
    embeddings,encoder: all encoder layers). A trained parameter anywhere before (or a LoRA adapter) ends the run.
    0 (count every layer: the estimate errs high) when the family does not name its embeddings and layer stacks
    or the model does not have them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
    modules = dict(base.named_modules())
    embeddings = family.freeze_parts.get("embeddings", [])
    if not embeddings or not family.layer_stacks or any(m not in modules for m in [*embeddings, *family.layer_stacks]):
        return 0

    def trained(module) -> bool:
        return any(p.requires_grad for p in module.parameters())

    if any(trained(modules[e]) for e in embeddings):
        return 0
    layers = [layer for stack in family.layer_stacks for layer in modules[stack]]
    return next((i for i, layer in enumerate(layers) if trained(layer)), len(layers))


def resolve_engine(cfg: RunConfig, world_size: int | None = None) -> Engine:
    """The DeepSpeed config exactly as backend.choose_ds_config_path picks it (world size from the launcher
    or `world_size`), and the precision as backend.precision_for_this_rank picks it."""
    import json
    import os

    import torch

    from lowmem_train.trainer.backend import choose_ds_config_path, launched_world_size, precision_for_this_rank

    world = world_size or launched_world_size()
    path = choose_ds_config_path(cfg, world)
    zero = json.loads(path.read_text()).get("zero_optimization", {}) if path else {}
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    gpu = torch.cuda.is_available()
    precision = precision_for_this_rank(cfg.mixed_precision, gpu)
    return Engine(path, int(zero.get("stage", 0)) if path else 0,
                  zero.get("offload_optimizer", {}).get("device") == "cpu",
                  zero.get("offload_param", {}).get("device") == "cpu", precision, world,
                  int(local) if local.isdigit() else world, gpu)  # not launched: one machine assumed


def state_bytes(engine: Engine, grad_accum: int, shape: ModelShape | None = None) -> list[StatePart]:
    """What one rank holds per parameter of the model, by part (DeepSpeed 0.19 ZeRO-1/2/3, torch AdamW or
    transformers' Adafactor). Gradients and optimizer state exist for trained parameters only (--freeze, LoRA)."""
    w, e = engine.world_size, (4 if engine.precision == "fp32" else 2)
    t = 1.0 if shape is None else shape.trained_share
    opt_bytes, opt_name = (8.0, "AdamW m+v") if shape is None else (shape.optimizer_per_param, {
        "adamw": "AdamW m+v", "adafactor": "Adafactor rows+columns"}[shape.optimizer])
    if engine.ds_config is None:  # accelerate's mixed precision autocasts and keeps fp32 weights
        parts = [StatePart("weights", 4, "device"),
                 StatePart("gradients", 4 * t, "device"),  # zero_grad(set_to_none=True) frees them
                 StatePart(opt_name, opt_bytes, "device")]  # created by the first step
        if w > 1:
            parts.append(StatePart("DDP gradient buckets", 4 * t, "device"))
        return parts
    opt = "host" if engine.offload_optimizer else "device"
    parts = [StatePart("weights", e / w if engine.zero_stage == 3 else e, "host" if engine.offload_params else "device"),
             StatePart("fp32 master partition", 4 * t / w, opt),
             StatePart("gradient partition", 4 * t / w, opt),
             StatePart(f"{opt_name} partition", opt_bytes / w, opt)]
    if engine.zero_stage <= 1:
        parts.append(StatePart("gradients (unpartitioned)", e * t, "device"))
    if engine.offload_optimizer and grad_accum > 1:  # ZeRO sums the micro-batches' gradients in a CPU buffer
        parts.append(StatePart("accumulation buffer", 4 * t / w, "host"))
    return parts


def deepspeed_estimate(shape: ModelShape, engine: Engine) -> tuple[str, int | None]:
    """DeepSpeed's own figures (its estimate_*_mem_needs; the _all_live/_all_cold variants only print, and
    _all_live counts a real model by data_ptr(), 0 for every meta tensor). They assume 16-bit weights on GPUs:
    cpu = per node with a 1.5 buffer factor, gpu = per GPU. Returns (text, GPU bytes if they apply here)."""
    if engine.ds_config is None or engine.zero_stage not in (2, 3):
        return "", None
    if engine.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(shape.params, engine.local_ranks, 1, engine.offload_optimizer)
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer, engine.local_ranks, 1,
                                                            engine.offload_optimizer, engine.offload_params)
    text = (f"{cpu / GB:.2f} GB host per node, {gpu / GB:.2f} GB per GPU (ZeRO-{engine.zero_stage} model states, "
            "16-bit weights on GPUs, x1.5 buffer)")
    return text, (gpu if engine.gpu and engine.precision != "fp32" else None)


def estimate(cfg: RunConfig, world_size: int | None = None, plan=None, shape: ModelShape | None = None,
             engine: Engine | None = None) -> Estimate:
    from lowmem_train.trainer.memory.policy import plan_from_config

    engine = engine or resolve_engine(cfg, world_size)
    shape = shape or model_shape(cfg)
    plan = plan or plan_from_config(cfg)
    return estimate_for_plan(cfg, shape, engine, plan)


def estimate_for_plan(cfg: RunConfig, shape: ModelShape, engine: Engine, plan) -> Estimate:
    """Pure arithmetic: the figures of one plan (the recommendation calls this for every candidate)."""
    elem = 4 if engine.precision == "fp32" else 2
    per_sample = activation_bytes_per_sample(cfg, shape.vocab, plan.gradient_checkpointing, elem, engine.gpu,
                                             shape.frozen_front)
    other = activation_bytes_per_sample(cfg, shape.vocab, not plan.gradient_checkpointing, elem, engine.gpu,
                                        shape.frozen_front)
    states = state_bytes(engine, plan.grad_accum, shape)
    on_host = [s for s in states if s.where == "host" or not engine.gpu]  # a CPU run's "device" is host RAM
    activations = plan.micro_batch * per_sample
    if engine.ds_config is None:  # AdamW's foreach step builds parameter-sized temporaries once activations are gone
        activations = max(activations, 4 * shape.params * shape.trained_share)
    host = {"python + torch + libraries": RANK_BASELINE + (DEEPSPEED_RANK_EXTRA if engine.ds_config else 0)}
    if engine.gpu:
        host["CUDA libraries"] = int(CUDA_HOST)
        host["model built on CPU before the move"] = 4 * shape.params
    else:
        host[f"activations (micro-batch {plan.micro_batch})"] = int(activations)
    host["model states"] = int(sum(s.per_param for s in on_host) * shape.params)
    host["allocator slack"] = int(SLACK * sum(v for k, v in host.items() if k != "python + torch + libraries"))
    workers = WORKER_SERVER + plan.num_workers * WORKER if plan.num_workers else 0
    ranks, launcher = engine.local_ranks, (LAUNCHER if engine.world_size > 1 else 0)
    rank = sum(host.values())
    text, ds_gpu = deepspeed_estimate(shape, engine)
    gpu = 0
    if engine.gpu:
        device = ds_gpu if ds_gpu is not None else sum(s.per_param for s in states if s.where == "device") * shape.params
        gpu = int(CUDA_CONTEXT + (1 + GPU_SLACK) * (device + activations))
    return Estimate(shape, engine, plan, states, per_sample, other, host, workers, ranks * (rank + workers) + launcher,
                    gpu, text, ds_gpu)


