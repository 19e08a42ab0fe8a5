"""The pre-flight check `train` runs first, and what the `estimate` command prints (footprint.py does the counting).

    python train_low_mem.py estimate --config t5_small [--num_processes 2] [--key=value ...]

prints parameters, bytes per parameter, activations per sample, host RAM and GPU memory per rank and per
machine, what this machine has (the MemoryProbe's job_available: host, cgroup, Slurm or budget) and a
recommended starting plan: the configured one if it fits, else the first plan down the policy's own
shedding ladders (workers, prefetch, pin_memory, then micro-batch and checkpointing) that fits.
`check_fits` is the same comparison as one line, raised as a ConfigError unless --force.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_train.config.errors import ConfigError
from lowmem_train.config.schema import RunConfig
from lowmem_train.trainer.memory.footprint import LAUNCHER, Estimate, estimate, estimate_for_plan
from lowmem_train.trainer.memory.units import GB, size_text


@dataclass(frozen=True)
class Capacity:
    """What this machine gives the run: host bytes it may use (job_available + what the caller holds already)."""

    host: int
    host_note: str
    gpu: int | None  # the smallest visible GPU's total; None without a GPU
    limit: int | None = None  # the job's limit (the tightest of host total, cgroup, Slurm, budget): thresholds scale

    def spare(self, cfg: RunConfig) -> int:
        """What a starting plan should leave free: the guard's low threshold (less would make it shed at once)."""
        from lowmem_train.trainer.memory.policy import Thresholds

        return Thresholds.of(cfg.memory, self.limit).low


@dataclass(frozen=True)
class FitReport:
    estimate: Estimate
    capacity: Capacity
    fits: bool
    line: str  # the one line printed or raised


def machine_capacity(cfg: RunConfig, probe=None, on_device: bool = False) -> Capacity:
    """job_available (the least of host, cgroup, Slurm and budget headroom) plus what the calling process holds:
    its memory is part of what the run will use (a rank) or is given back (the estimate command).
    GPU: `on_device` (a training rank, its device chosen): what its own device has for it now, free + its own
    cache (another user's job may hold the rest); else (the estimate command) the smallest visible device's total,
    read from device properties without creating a CUDA context on any device."""
    from lowmem_train.trainer.memory.gpu import visible_gpu_totals
    from lowmem_train.trainer.memory.probe import MemoryProbe
    from lowmem_train.trainer.memory.units import GpuReading

    probe = probe or MemoryProbe.from_config(cfg.memory, **({} if on_device else {"read_gpu": GpuReading}))
    s = probe.sample(0)
    held = probe.ranks_on_node * s.tree_pss
    binding = min([("host available", s.host_available)]
                  + ([("cgroup limit", s.cgroup_limit - (s.cgroup_usage or 0))] if s.cgroup_limit else [])
                  + [(name, lim - held) for name, lim in (("Slurm allocation", s.slurm_limit),
                                                           ("--memory.host_budget_gb", s.budget)) if lim],
                  key=lambda kv: kv[1])[0]
    if s.gpu_total:
        gpu = (s.gpu_free + (s.torch_reserved or 0)) if s.gpu_free is not None else s.gpu_total
    else:
        gpus = [] if on_device else visible_gpu_totals()
        gpu = min(gpus) if gpus else None
    note = f"{binding}; host total {s.host_total / GB:.1f} GB"
    host = s.job_available + held
    for limit in (s.slurm_limit, s.budget):  # job_available is clamped at 0, so cap by the limit itself too
        if limit:
            host = min(host, limit)
    return Capacity(host, note, gpu, s.job_limit)


def fits(est: Estimate, cap: Capacity, headroom: int = 0) -> bool:
    return est.host_node + headroom <= cap.host and (not est.engine.gpu or cap.gpu is None or est.gpu_rank <= cap.gpu)


def recommend(cfg: RunConfig, est: Estimate, cap: Capacity):
    """The first plan down the policy's ladders (loader first, then compute; GPU pressure: compute first) that fits
    with the guard's low threshold to spare (less would make it shed at once), else with no spare. None: nothing fits."""
    return walk_down(cfg, est, cap, cap.spare(cfg)) or walk_down(cfg, est, cap, 0)


def loader_steps_to_fit(cfg: RunConfig, est: Estimate, cap: Capacity) -> tuple[int, str]:
    """Steps down the loader ladder (workers, prefetch, pin_memory) until the estimate fits the capacity with the
    guard's low threshold to spare, and a line saying why; (0, "") when the plan fits as it is. Compute is left
    to the guard's samples: the estimate of activations is a worst case (every row at max_seq_len)."""
    from lowmem_train.trainer.memory.policy import shed_loader

    spare, plan, steps = cap.spare(cfg), est.plan, 0
    first = estimate_for_plan(cfg, est.shape, est.engine, plan)
    candidate = first
    # Host memory only: the loader lives there, and shedding it cannot help a GPU that is short (that is the
    # micro-batch's business, which the guard decides from real samples).
    while candidate.host_node + spare > cap.host and (step := shed_loader(plan)) is not None:
        plan, steps = step[0], steps + 1
        candidate = estimate_for_plan(cfg, est.shape, est.engine, plan)
    if not steps:
        return 0, ""
    return steps, (f"{size_text(first.host_node)} with {est.plan.num_workers} worker(s) > {size_text(cap.host)} "
                   f"available - {size_text(spare)} to spare ({cap.host_note})")


def walk_down(cfg: RunConfig, est: Estimate, cap: Capacity, spare: int):
    from lowmem_train.trainer.memory.policy import apply_caps, shed_loader, shrink_compute

    plan, _ = apply_caps(est.plan, cap.host, cfg.memory)
    for _ in range(64):
        candidate = estimate_for_plan(cfg, est.shape, est.engine, plan)
        if fits(candidate, cap, spare):
            return candidate
        gpu_short = est.engine.gpu and cap.gpu is not None and candidate.gpu_rank > cap.gpu
        step = (shrink_compute(plan) if gpu_short else None) or shed_loader(plan) or shrink_compute(plan)
        if step is None:
            return None
        plan = step[0]
    return None


def plan_options(plan, start=None) -> str:
    """The command-line options that turn `start` (default: nothing) into `plan`."""
    options = []
    if start is None or (plan.micro_batch, plan.grad_accum) != (start.micro_batch, start.grad_accum):
        options += [f"--batch_size_per_gpu={plan.micro_batch}", f"--gradient_accumulation_steps={plan.grad_accum}"]
    if start is None or plan.num_workers != start.num_workers:
        options.append(f"--data.num_workers={plan.num_workers}")
    if plan.num_workers and (start is None or plan.prefetch_factor != start.prefetch_factor):
        options.append(f"--data.prefetch_factor={plan.prefetch_factor}")
    if start is None or plan.pin_memory != start.pin_memory:
        options.append(f"--data.pin_memory={str(plan.pin_memory).lower()}")
    if start is None or plan.gradient_checkpointing != start.gradient_checkpointing:
        options.append(f"--gradient_checkpointing={str(plan.gradient_checkpointing).lower()}")
    return " ".join(options)


def check_fits(cfg: RunConfig, world_size: int | None = None, plan=None, probe=None, agree=None,
               on_device: bool = False) -> FitReport:
    """The check `train` runs first. Raises ConfigError (one line: needed vs available, what to change) when the
    run cannot fit, unless cfg.force. `agree(bad: float) -> float` (an all-reduce max) makes every rank decide
    alike, so that no rank starts while another refuses. `on_device`: see machine_capacity."""
    est = estimate(cfg, world_size, plan)
    cap = machine_capacity(cfg, probe, on_device)
    ok = fits(est, cap)
    if agree is not None:
        ok = not agree(0.0 if ok else 1.0)
    need = f"needs {est.host_node / GB:.2f} GB host RAM"
    if est.engine.gpu:
        need += f" and {est.gpu_rank / GB:.2f} GB per GPU"
    have = f"{cap.host / GB:.2f} GB available ({cap.host_note})" + (
        f" and {cap.gpu / GB:.1f} GB on the GPU" if cap.gpu is not None else "")
    if ok:
        return FitReport(est, cap, True, f"memory check: {need}; {have}")
    better = recommend(cfg, est, cap)
    change = (f"try {plan_options(better.plan, est.plan)} (needs {better.host_node / GB:.2f} GB)" if better else
              "no plan fits: lower --max_seq_len or the model size, or free memory")
    line = f"this run {need} but {have}: {change}, or --force to skip this check"
    if not cfg.force:
        raise ConfigError(line)
    return FitReport(est, cap, False, f"memory check skipped (--force): {line}")


# ---- what the estimate command prints ---------------------------------------------------------------------
def optimizer_line(s, cfg: RunConfig) -> str:
    """'transformers Adafactor (...): 0.64 MB of state for 44.30M trained parameters (AdamW: 338.0 MB)'."""
    from lowmem_train.trainer.optim import describe

    trained = s.params if s.trained < 0 else s.trained
    state = 8 * trained if s.optimizer_state < 0 else s.optimizer_state
    frozen = s.params - trained
    parts = [f"{describe(cfg.optimizer)}: {size_text(state)} of state for {trained / 1e6:.2f}M trained parameters"]
    if frozen:
        parts.append(f"{frozen / 1e6:.2f}M frozen" + (f" (LoRA r={cfg.lora.r} on a frozen base)" if cfg.lora.r else
                                                     f" (--freeze {','.join(cfg.freeze)})"))
    if cfg.optimizer != "adamw":
        parts.append(f"AdamW would keep {size_text(8 * trained)}")
    return "; ".join(parts)



def render(est: Estimate, cap: Capacity, better, cfg: RunConfig) -> str:
    e, s, plan = est.engine, est.shape, est.plan
    per_param = " + ".join(f"{p.name} {p.per_param:.3g}" + (" (host)" if p.where == "host" and e.gpu else "")
                           for p in est.states)
    total = sum(p.per_param for p in est.states)
    ckpt = "on" if plan.gradient_checkpointing else "off"
    workers = e.local_ranks * plan.num_workers
    lines = [
        f"model        {cfg.model.type}, {s.params / 1e6:.2f}M parameters (largest layer {s.largest_layer / 1e6:.2f}M), "
        f"vocabulary {s.vocab} from {s.vocab_source}",
        f"engine       {e.describe()}",
        f"bytes/param  {per_param} = {total:.3g} B per parameter per rank = {size_text(total * s.params)}",
        f"optimizer    {optimizer_line(s, cfg)}",
    ]
    if est.deepspeed_says:
        lines.append(f"             DeepSpeed's estimator: {est.deepspeed_says}")
    lines += [
        f"activations  {size_text(est.activation_sample)} per sample at max_seq_len {cfg.max_seq_len} (checkpointing {ckpt}; "
        f"{'off' if ckpt == 'on' else 'on'}: {size_text(est.activation_other)}); x micro-batch {plan.micro_batch} "
        f"= {size_text(est.activation_sample * plan.micro_batch)}"
        + (f" (the first {est.shape.frozen_front} layers are frozen and fed by frozen ones: they keep none)"
           if est.shape.frozen_front else ""),
        "host RAM     per rank: " + ", ".join(f"{k} {size_text(v)}" for k, v in est.host_parts.items()) + f" = {size_text(est.host_rank)}",
        f"             + {workers} DataLoader worker(s) and their fork server: {size_text(est.workers)} per rank"
        + (f" + launcher {size_text(LAUNCHER)}" if e.world_size > 1 else ""),
        f"             this machine: {size_text(est.host_node)}",
        f"GPU memory   {size_text(est.gpu_rank) + ' per GPU' if e.gpu else 'none: CPU training, the model lives in host RAM'}",
        f"available    host {size_text(cap.host)} ({cap.host_note}); "
        + (f"smallest GPU {size_text(cap.gpu)}" if cap.gpu is not None else "no GPU"),
        f"plan now     {plan.describe()}: " + ("fits" if fits(est, cap) else "does NOT fit"),
    ]
    spare = cap.spare(cfg)
    if better is None:
        lines.append("recommended  nothing fits: lower --max_seq_len or the model size, or use more memory")
    else:
        left = cap.host - better.host_node
        note = "" if left >= spare else f"; under the guard's low threshold ({size_text(spare)}), it will shed more"
        head = "keep it" if better.plan == plan else f"{better.plan.describe()}: {plan_options(better.plan, plan)}"
        lines.append(f"recommended  {head} ({size_text(left)} host RAM to spare{note})")
    return "\n".join(lines)
