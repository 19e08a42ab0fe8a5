"""A plan and the ways it can change: the memory guard's moves, pure functions, no I/O.

The global batch never changes: micro_batch x grad_accum x world_size stays what the user asked for, so the
micro-batch only takes divisors of the per-rank batch (micro_batch x grad_accum).

Two ladders, one step at a time (policy.py decides when):
  loader   workers halved down to 1 -> prefetch_factor halved down to 1 -> workers 1 -> 0 -> pin_memory off.
           The last worker goes after the prefetch queue: prefetch only exists while workers > 0, and one worker
           keeps loading off the training thread, the largest single step in speed.
  compute  micro-batch halved (grad_accum doubles) -> at micro-batch 1, gradient checkpointing on.
Growing back runs the same ladders upwards, never past the starting plan. `accum_rules` and `max_num_workers`
are caps that hold whatever the calm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lowmem_train.config.memory import MemoryConfig
from lowmem_train.config.schema import RunConfig
from lowmem_train.trainer.memory.units import GB


@dataclass(frozen=True)
class Plan:
    """How the data and compute of one rank are laid out; the guard applies it to the loader and the engine."""

    micro_batch: int
    grad_accum: int
    num_workers: int
    pin_memory: bool
    prefetch_factor: int  # kept even while num_workers == 0, for when workers come back (see loader_kwargs)
    gradient_checkpointing: bool

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.grad_accum < 1 or self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError(f"impossible plan: {self}")

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch * self.grad_accum * world_size

    def loader_kwargs(self) -> dict[str, Any]:
        """DataLoader arguments; torch refuses a prefetch_factor without workers."""
        return {"batch_size": self.micro_batch, "num_workers": self.num_workers, "pin_memory": self.pin_memory,
                "prefetch_factor": self.prefetch_factor if self.num_workers else None}

    def describe(self) -> str:
        loader = f"{self.num_workers} workers" + (f" x prefetch {self.prefetch_factor}" if self.num_workers else "")
        return (f"micro-batch {self.micro_batch} x accumulation {self.grad_accum}, {loader}, "
                f"pin_memory {'on' if self.pin_memory else 'off'}, "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}")

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Plan:
        kinds = {"pin_memory": bool, "gradient_checkpointing": bool}
        return cls(**{f.name: kinds.get(f.name, int)(state[f.name]) for f in fields(cls)})


def grows(old: Plan, new: Plan) -> bool:
    """Does `new` use more memory than `old` anywhere (a grow-back step, not a shrink)?"""
    return (new.micro_batch > old.micro_batch or new.num_workers > old.num_workers
            or new.prefetch_factor > old.prefetch_factor or (new.pin_memory and not old.pin_memory)
            or (old.gradient_checkpointing and not new.gradient_checkpointing))


def plan_from_config(cfg: RunConfig) -> Plan:
    """The plan the user asked for (the starting plan of a new run)."""
    d = cfg.data
    return Plan(cfg.batch_size_per_gpu, cfg.gradient_accumulation_steps, d.num_workers, d.pin_memory,
                d.prefetch_factor, cfg.gradient_checkpointing)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resplit(plan: Plan, micro: int) -> tuple[Plan, str]:
    """The same per-rank batch split into micro-batches of `micro` (a divisor of it), and what changed."""
    new = replace(plan, micro_batch=micro, grad_accum=plan.micro_batch * plan.grad_accum // micro)
    return new, f"micro-batch {plan.micro_batch} -> {micro}, grad_accum {plan.grad_accum} -> {new.grad_accum}"


def shrink_compute(plan: Plan) -> tuple[Plan, str] | None:
    """Halve the micro-batch (largest divisor <= half), or at 1 turn gradient checkpointing on."""
    if plan.micro_batch > 1:
        return resplit(plan, max(d for d in divisors(plan.micro_batch * plan.grad_accum) if d <= plan.micro_batch // 2))
    if not plan.gradient_checkpointing:
        return replace(plan, gradient_checkpointing=True), "gradient checkpointing on (micro-batch already 1)"
    return None


def shed_loader(plan: Plan) -> tuple[Plan, str] | None:
    """One step of the host ladder (module docstring), or None when the loader is already lean."""
    w, p = plan.num_workers, plan.prefetch_factor
    if w > 1:
        return replace(plan, num_workers=w // 2), f"workers {w} -> {w // 2}"
    if w == 1 and p > 1:
        return replace(plan, prefetch_factor=p // 2), f"prefetch_factor {p} -> {p // 2}"
    if w == 1:
        return replace(plan, num_workers=0), "workers 1 -> 0 (loading in the training process)"
    if plan.pin_memory:
        return replace(plan, pin_memory=False), "pin_memory off"
    return None


def grow_step(plan: Plan, start: Plan, micro_ceiling: int) -> tuple[Plan, str] | None:
    """One step back up the ladders, toward `start` and never past it; the micro-batch stays <= micro_ceiling."""
    if plan.gradient_checkpointing and not start.gradient_checkpointing:
        return replace(plan, gradient_checkpointing=False), "gradient checkpointing off"
    ceiling = min(micro_ceiling, start.micro_batch)
    bigger = [d for d in divisors(plan.micro_batch * plan.grad_accum) if plan.micro_batch < d <= ceiling]
    if bigger:
        return resplit(plan, bigger[0])
    if start.pin_memory and not plan.pin_memory:
        return replace(plan, pin_memory=True), "pin_memory on"
    w, p = plan.num_workers, plan.prefetch_factor
    if w == 0 and start.num_workers > 0:
        return replace(plan, num_workers=1), "workers 0 -> 1"
    if w > 0 and p < start.prefetch_factor:
        p2 = min(2 * p, start.prefetch_factor)
        return replace(plan, prefetch_factor=p2), f"prefetch_factor {p} -> {p2}"
    if w < start.num_workers:
        w2 = min(2 * w, start.num_workers)
        return replace(plan, num_workers=w2), f"workers {w} -> {w2}"
    return None


def accum_floor(available: int, cfg: MemoryConfig) -> tuple[int, str]:
    """The largest min_grad_accum of the accum_rules in force at `available` bytes, and why."""
    floor, why = 1, ""
    for rule in cfg.accum_rules:
        if available < rule["below_available_gb"] * GB and rule["min_grad_accum"] > floor:
            floor = rule["min_grad_accum"]
            why = f"available {available / GB:.1f} GB < {rule['below_available_gb']:.1f} GB needs grad_accum >= {floor}"
    return floor, why


def micro_ceiling(plan: Plan, min_accum: int) -> int:
    """The largest micro-batch that keeps grad_accum >= min_accum."""
    per_rank = plan.micro_batch * plan.grad_accum
    return max(d for d in divisors(per_rank) if d * min_accum <= per_rank) if min_accum <= per_rank else 1


def shm_worker_cap(plan: Plan, shm_free: int | None, batch_bytes: int) -> int:
    """The most workers whose batches in flight (workers x prefetch_factor, each passed through /dev/shm) fill at most
    half of its free space. A container's default /dev/shm is 64 MB; when it fills, workers die of a Bus error."""
    if shm_free is None or batch_bytes <= 0 or plan.num_workers == 0:
        return plan.num_workers
    return min(plan.num_workers, shm_free // 2 // (plan.prefetch_factor * batch_bytes))


def apply_caps(plan: Plan, available: int, cfg: MemoryConfig, shm_free: int | None = None,
               batch_bytes: int = 0) -> tuple[Plan, list[str]]:
    """Enforce max_num_workers, the /dev/shm room and the accum_rules in force; these hold whatever the calm."""
    notes = []
    if plan.num_workers > cfg.max_num_workers:
        notes.append(f"workers {plan.num_workers} -> {cfg.max_num_workers} (max_num_workers)")
        plan = replace(plan, num_workers=cfg.max_num_workers)
    room = shm_worker_cap(plan, shm_free, batch_bytes)
    if room < plan.num_workers:
        notes.append(f"/dev/shm has {shm_free / 2**20:.1f} MB free for batches of {batch_bytes / 2**20:.2f} MB x "
                     f"prefetch {plan.prefetch_factor}: workers {plan.num_workers} -> {room}")
        plan = replace(plan, num_workers=room)
    floor, why = accum_floor(available, cfg)
    ceiling = micro_ceiling(plan, floor)
    if plan.micro_batch > ceiling:
        plan, change = resplit(plan, ceiling)
        notes.append(f"accum rule, {why}: {change}")
    return plan, notes
