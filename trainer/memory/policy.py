"""The memory policy: pure functions from (samples, plan, thresholds) to a new plan. No I/O, no torch, no globals.

The global batch never changes: micro_batch x grad_accum x world_size stays what the user asked for, so the
micro-batch only takes divisors of the per-rank batch (micro_batch x grad_accum).

Shedding, one step per decision, cheapest-for-speed memory first:
  host pressure  workers halved down to 1 -> prefetch_factor halved down to 1 -> workers 1 -> 0 -> pin_memory off
                 -> (CPU training only, where activations live in host RAM) the compute steps below.
                 The last worker goes after the prefetch queue: prefetch only exists while workers > 0, and one
                 worker keeps loading off the training thread, the largest single step in speed.
  GPU pressure   micro-batch halved (grad_accum doubles) -> at micro-batch 1, gradient checkpointing on.
Growing back runs the same ladder upwards, one step per decision, never past the starting plan, and only after
`calm_epochs_before_grow` calm decisions in a row; a grown step undone by pressure before it earned that much calm
doubles the calm needed (backoff), so a plan cannot flap. `accum_rules` and `max_num_workers` are caps that
hold whatever the calm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Sequence

from lowmem_train.config.memory import MemoryConfig
from lowmem_train.trainer.memory.probe import GB, MB, MemorySample

MAX_CALM_NEEDED = 64


class OutOfMemoryGiveUp(RuntimeError):
    """An out-of-memory error the policy cannot answer: retries used up, or nothing left to shrink."""


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


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between decisions (checkpoint it with the plan)."""

    start: Plan  # the user's plan (workers capped by max_num_workers): growing back never goes past it
    calm_decisions: int = 0  # consecutive calm decisions
    calm_needed: int = 2  # calm decisions that earn one step back; doubles on a step that had to be undone
    decisions_since_growth: int | None = None  # None: never grew
    pressure_note: str = ""  # an emergency or OOM since the last decision: counts as pressure then
    plan_since_step: int = -1  # samples up to this step were taken under an older plan

    @classmethod
    def initial(cls, start: Plan, cfg: MemoryConfig) -> PolicyState:
        """The state of a new run; its `start` (the user's plan, workers capped) is the plan to begin with."""
        return cls(start=replace(start, num_workers=min(start.num_workers, cfg.max_num_workers)),
                   calm_needed=cfg.calm_epochs_before_grow)

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self), "start": self.start.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PolicyState:
        return cls(**{**state, "start": Plan.from_state_dict(state["start"])})

    def after_shrink(self, note: str, step: int | None) -> PolicyState:
        """Pressure made the plan smaller: calm starts over; a recent growth was premature, so back off."""
        since = self.decisions_since_growth
        premature = since is not None and since <= self.calm_needed
        return replace(self, calm_decisions=0, pressure_note=note or self.pressure_note,
                       calm_needed=min(self.calm_needed * 2, MAX_CALM_NEEDED) if premature else self.calm_needed,
                       decisions_since_growth=None if premature else since,
                       plan_since_step=self.plan_since_step if step is None else max(step, self.plan_since_step))


@dataclass(frozen=True)
class Decision:
    plan: Plan
    state: PolicyState | None  # None when the caller passed no state
    reason: str  # one line naming the numbers
    changed: bool


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


def apply_caps(plan: Plan, available: int, cfg: MemoryConfig) -> tuple[Plan, list[str]]:
    """Enforce max_num_workers and the accum_rules in force; these hold whatever the calm."""
    notes = []
    if plan.num_workers > cfg.max_num_workers:
        notes.append(f"workers {plan.num_workers} -> {cfg.max_num_workers} (max_num_workers)")
        plan = replace(plan, num_workers=cfg.max_num_workers)
    floor, why = accum_floor(available, cfg)
    ceiling = micro_ceiling(plan, floor)
    if plan.micro_batch > ceiling:
        plan, change = resplit(plan, ceiling)
        notes.append(f"accum rule, {why}: {change}")
    return plan, notes


def gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def pressure_reasons(worst: MemorySample, cfg: MemoryConfig) -> tuple[str, str]:
    """(host reason, GPU reason); an empty string means no pressure of that kind."""
    host = ""
    if worst.job_available < cfg.host_low_gb * GB:
        host = f"job available {gb(worst.job_available)} < {cfg.host_low_gb:.1f} GB"
    elif worst.swapped_out is not None and worst.swapped_out > cfg.swap_growth_mb * MB:
        host = f"swap grew {worst.swapped_out / MB:.0f} MB in one probe > {cfg.swap_growth_mb:.0f} MB"
    fraction = worst.gpu_used_fraction
    high = fraction is not None and fraction > cfg.gpu_high_fraction
    gpu = f"GPU used {fraction:.0%} > {cfg.gpu_high_fraction:.0%}" if high else ""
    return host, gpu


def decide(samples: Sequence[MemorySample], plan: Plan, cfg: MemoryConfig, world_size: int,
           state: PolicyState) -> Decision:
    """The epoch-boundary decision, from the (already worst-of-ranks) samples since the last decision."""
    if plan.global_batch(world_size) != state.start.global_batch(world_size):
        raise ValueError(f"plan ({plan.describe()}) and starting plan ({state.start.describe()}) differ in "
                         f"global batch at world size {world_size}: rebuild the policy state for this world size")
    fresh = [s for s in samples if s.step > state.plan_since_step]  # older ones saw a plan no longer in force
    if not cfg.adaptive:
        return Decision(plan, state, f"adaptive memory guard off: {plan.describe()} kept", False)
    if not fresh:  # nothing to judge by; only the worker cap holds
        capped = replace(plan, num_workers=min(plan.num_workers, cfg.max_num_workers))
        return Decision(capped, state, f"no new memory samples: {capped.describe()}", capped != plan)
    worst = MemorySample.worst(fresh)
    host, gpu = pressure_reasons(worst, cfg)
    new, notes = plan, []
    if gpu:
        shrunk = shrink_compute(new)
        new = shrunk[0] if shrunk else new
        notes.append(f"{gpu}: {shrunk[1] if shrunk else 'nothing left to shrink'}")
    if host:
        shed = shed_loader(new)
        if shed is None and worst.gpu_used_fraction is None and not gpu:  # CPU training: activations in host RAM
            shed = shrink_compute(new)
        new = shed[0] if shed else new
        notes.append(f"{host}: {shed[1] if shed else 'nothing left to shed'}")
    new, cap_notes = apply_caps(new, worst.job_available, cfg)
    notes += cap_notes
    since = None if state.decisions_since_growth is None else state.decisions_since_growth + 1
    state = replace(state, decisions_since_growth=since)
    if host or gpu or cap_notes or state.pressure_note:
        if state.pressure_note and not (host or gpu or cap_notes):
            notes.append(f"{state.pressure_note} since the last decision: no growth")
        state = replace(state.after_shrink("", worst.step if new != plan else None), pressure_note="")
        return Decision(new, state, "; ".join(notes), new != plan)
    fraction = worst.gpu_used_fraction
    calm = worst.job_available > cfg.host_headroom_gb * GB and (fraction is None or fraction < cfg.gpu_low_fraction)
    gpu_text = "no GPU" if fraction is None else f"GPU {fraction:.0%}"
    if not calm:
        return Decision(plan, replace(state, calm_decisions=0),
                        f"available {gb(worst.job_available)}, {gpu_text}: between thresholds, plan kept", False)
    calm_count = state.calm_decisions + 1
    numbers = (f"available {gb(worst.job_available)} > {cfg.host_headroom_gb:.1f} GB, {gpu_text}"
               + ("" if fraction is None else f" < {cfg.gpu_low_fraction:.0%}"))
    grown = None
    if calm_count >= state.calm_needed:
        grown = grow_step(plan, state.start, micro_ceiling(plan, accum_floor(worst.job_available, cfg)[0]))
    if grown is None:
        progress = "nothing to grow back" if calm_count >= state.calm_needed else f"{calm_count}/{state.calm_needed}"
        return Decision(plan, replace(state, calm_decisions=min(calm_count, state.calm_needed)),
                        f"calm ({numbers}), {progress}: plan kept", False)
    state = replace(state, calm_decisions=0, decisions_since_growth=0, plan_since_step=worst.step)
    return Decision(grown[0], state, f"calm for {calm_count} decisions ({numbers}): {grown[1]}", True)


def emergency(sample: MemorySample, plan: Plan, cfg: MemoryConfig,
              state: PolicyState | None = None) -> Decision | None:
    """Mid-epoch: below host_emergency_gb drop all workers now (the guard rebuilds the loader); None = no change."""
    if not cfg.adaptive or sample.job_available >= cfg.host_emergency_gb * GB:
        return None
    why = f"job available {gb(sample.job_available)} < emergency {cfg.host_emergency_gb:.2f} GB"
    if plan.num_workers > 0:
        step = (replace(plan, num_workers=0), f"workers {plan.num_workers} -> 0 now")
    elif plan.pin_memory:
        step = (replace(plan, pin_memory=False), "pin_memory off now")
    elif sample.gpu_used_fraction is None:  # CPU training: the micro-batch's activations are in host RAM
        step = shrink_compute(plan)
    else:
        step = None
    if step is None:
        return None
    new_state = None if state is None else state.after_shrink(why, sample.step)
    return Decision(step[0], new_state, f"{why}: {step[1]}", True)


def on_oom(plan: Plan, world_size: int, cfg: MemoryConfig, retries_so_far: int,
           state: PolicyState | None = None, step: int | None = None) -> Decision:
    """After an out-of-memory error: the plan to redo the step with, or OutOfMemoryGiveUp.

    `retries_so_far` counts the OOMs already survived in this run; max_oom_retries of them are survived.
    """
    if retries_so_far >= cfg.max_oom_retries:
        raise OutOfMemoryGiveUp(f"out of memory again after {retries_so_far} retries (--memory.max_oom_retries="
                                f"{cfg.max_oom_retries}) with {plan.describe()}")
    shrunk = shrink_compute(plan)
    if shrunk is None:
        raise OutOfMemoryGiveUp(f"out of memory with {plan.describe()}: nothing left to shrink; lower max_seq_len, "
                                "the model size, or use more devices")
    why = f"out of memory (retry {retries_so_far + 1}/{cfg.max_oom_retries})"
    new_state = None if state is None else state.after_shrink(why, step)
    global_batch = shrunk[0].global_batch(world_size)
    return Decision(shrunk[0], new_state, f"{why}: {shrunk[1]} (global batch {global_batch} kept)", True)
