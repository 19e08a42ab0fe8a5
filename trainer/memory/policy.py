"""The memory policy: when to move along the plan's ladders (plan.py). Pure functions from (samples, plan,
thresholds, state) to a decision; no I/O, no torch, no globals, nothing that reads the machine.

Thresholds scale with the job: each host threshold is the smaller of its absolute setting and a fraction of the
job's limit (the tightest of host, cgroup, Slurm and budget), so a 1.4 GB budget gets margins of tens of MB, not
the 0.75 / 2 / 4 GB a large host wants. Memory is judged at its peak (MemorySample.available_at_peak): what a
limit sees at the worst moment of a step, not what is left between steps. On a GPU the signal is this rank's own
device only: its peak allocation against what it could have, free + its own cache (MemorySample.gpu_pressure);
other users' GPUs and our allocator's cache are not pressure.

  at an epoch end   decide(): host pressure sheds the loader one step; a CPU run (its activations live in host
                    RAM) shrinks compute once the loader is lean; GPU pressure shrinks compute; after
                    `calm_epochs_before_grow` calm decisions one step grows back (a growth undone by pressure
                    doubles the calm needed: no flapping).
  mid-epoch         emergency(): below the emergency threshold, drop all workers now (then pin_memory, then on a
                    CPU run compute), one change per sample taken under the plan in force.
  on out-of-memory  on_oom(): shrink compute and redo the same step.

Every change is judged by its effect (judge): the peak of the samples taken under the new plan against the peak
that led to it. A compute shrink that bought less than `min_saving` is undone at the next decision and not tried
again while the pressure lasts (until a calm decision): it would cost speed and buy nothing, so under a tight
limit the run is held at the cheapest plan that keeps it, not the smallest one. What each change saved is in the
decision's `effect` (the guard logs it and writes it to memory.jsonl).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from lowmem_train.config.memory import MemoryConfig
from lowmem_train.trainer.memory.plan import (Plan, accum_floor, apply_caps, divisors, grow_step,  # noqa: F401
                                              micro_ceiling, plan_from_config, resplit, shed_loader, shm_worker_cap,
                                              shrink_compute)
from lowmem_train.trainer.memory.units import GB, MB, MemorySample, gb_text, size_text

MAX_CALM_NEEDED = 64


class OutOfMemoryGiveUp(RuntimeError):
    """An out-of-memory error the policy cannot answer: retries used up, or nothing left to shrink."""


@dataclass(frozen=True)
class Thresholds:
    """The host thresholds in force for a job, in bytes."""

    emergency: int
    low: int
    headroom: int
    min_saving: int
    gpu_min_saving: int  # the same judgement of a change made for GPU pressure, scaled by the GPU's size

    @classmethod
    def of(cls, cfg: MemoryConfig, job_limit: int | None, gpu_total: int | None = None) -> "Thresholds":
        def scaled(gb: float, fraction: float, limit: int | None = job_limit) -> int:
            return int(gb * GB) if not limit else min(int(gb * GB), int(fraction * limit))

        return cls(scaled(cfg.host_emergency_gb, cfg.host_emergency_fraction),
                   scaled(cfg.host_low_gb, cfg.host_low_fraction),
                   scaled(cfg.host_headroom_gb, cfg.host_headroom_fraction),
                   scaled(cfg.min_saving_gb, cfg.min_saving_fraction),
                   scaled(cfg.min_saving_gb, cfg.min_saving_fraction, gpu_total))


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between decisions (checkpoint it with the plan)."""

    start: Plan  # the user's plan (workers capped by max_num_workers): growing back never goes past it
    calm_decisions: int = 0  # consecutive calm decisions
    calm_needed: int = 2  # calm decisions that earn one step back; doubles on a step that had to be undone
    decisions_since_growth: int | None = None  # None: never grew
    pressure_note: str = ""  # an emergency or OOM since the last decision: counts as pressure then
    plan_since_step: int = -1  # samples up to this step were taken under an older plan
    last_change: dict | None = None  # {kind, what, undo (plan before), before_peak, resource}: judged next
    futile_compute: bool = False  # a compute shrink bought too little under this pressure: none until calm

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

    def changed(self, kind: str, what: str, old: Plan, trigger: MemorySample | None,
                resource: str = "host") -> PolicyState:
        """Remember a change so that the next samples judge it (`kind`: compute or loader; `resource`: the memory
        whose pressure made it, host or gpu)."""
        before = None if trigger is None else peak_of(trigger, resource)
        return replace(self, last_change={"kind": kind, "what": what, "undo": old.state_dict(), "before_peak": before,
                                          "resource": resource})


@dataclass(frozen=True)
class Decision:
    plan: Plan
    state: PolicyState | None  # None when the caller passed no state
    reason: str  # one line naming the numbers
    changed: bool
    effect: str = ""  # what the previous change saved, once samples under it judged it


def peak_of(sample: MemorySample, resource: str) -> int | None:
    """The peak a change is judged by: host (the tree's step peak) or GPU (torch's peak allocation)."""
    if resource == "gpu":
        return sample.torch_max_allocated
    return sample.step_peak


def judge(fresh: Sequence[MemorySample], plan: Plan, state: PolicyState,
          t: Thresholds) -> tuple[PolicyState, str, Plan | None]:
    """The effect of the last change, from samples taken under it: (state, what it saved, plan to go back to)."""
    change = state.last_change
    if change is None or not fresh:
        return state, "", None
    after = [p for s in fresh if (p := peak_of(s, change["resource"])) is not None]
    state = replace(state, last_change=None)
    if change["before_peak"] is None or not after:
        return state, "", None
    saved = change["before_peak"] - max(after)
    effect = f"{change['what']} saved {size_text(saved) if saved >= 0 else '-' + size_text(-saved)} of peak"
    enough = t.gpu_min_saving if change["resource"] == "gpu" else t.min_saving
    if change["kind"] != "compute" or saved >= enough:
        return state, effect, None
    undo = Plan.from_state_dict(change["undo"])
    back = replace(plan, micro_batch=undo.micro_batch, grad_accum=undo.grad_accum,
                   gradient_checkpointing=undo.gradient_checkpointing)
    return replace(state, futile_compute=True), f"{effect} < {size_text(enough)}: undone", back


def pressure_reasons(worst: MemorySample, cfg: MemoryConfig, t: Thresholds) -> tuple[str, str]:
    """(host reason, GPU reason); an empty string means no pressure of that kind."""
    host = ""
    if worst.available_at_peak < t.low:
        host = f"job available {gb_text(worst.available_at_peak, 2)} at peak < {gb_text(t.low, 2)}"
    elif worst.swapped_out is not None and worst.swapped_out > cfg.swap_growth_mb * MB:
        host = f"swap grew {worst.swapped_out / MB:.0f} MB in one probe > {cfg.swap_growth_mb:.0f} MB"
    fraction = worst.gpu_pressure
    high = fraction is not None and fraction > cfg.gpu_high_fraction
    gpu = f"GPU peak {fraction:.0%} of the memory this rank can have > {cfg.gpu_high_fraction:.0%}" if high else ""
    return host, gpu


def decide(samples: Sequence[MemorySample], plan: Plan, cfg: MemoryConfig, world_size: int,
           state: PolicyState, batch_bytes: int = 0) -> Decision:
    """The epoch-boundary decision, from the (already worst-of-ranks) samples since the last decision.
    `batch_bytes`: one per-rank batch as it crosses from a worker through /dev/shm (0: unknown)."""
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
    t = Thresholds.of(cfg, worst.job_limit, worst.gpu_total)
    state, effect, undo = judge(fresh, plan, state, t)
    if undo is not None:
        return Decision(undo, state.after_shrink("", worst.step), effect, True, effect)
    host, gpu = pressure_reasons(worst, cfg, t)
    new, notes, kind, resource = plan, [], "loader", "host"
    if gpu:
        shrunk = shrink_compute(new)
        new, kind, resource = (shrunk[0], "compute", "gpu") if shrunk else (new, kind, resource)
        notes.append(f"{gpu}: {shrunk[1] if shrunk else 'nothing left to shrink'}")
    if host:
        shed = shed_loader(new)
        cpu_run = worst.gpu_pressure is None and not gpu  # activations in host RAM
        if shed is None and cpu_run and not state.futile_compute:
            shed, kind = shrink_compute(new), "compute"
        new = shed[0] if shed else new
        held = " (compute shrinks bought too little under this pressure: held)" if state.futile_compute else ""
        notes.append(f"{host}: {shed[1] if shed else 'nothing left to shed' + held}")
    new, cap_notes = apply_caps(new, worst.job_available, cfg, worst.shm_free, batch_bytes)
    notes += cap_notes
    since = None if state.decisions_since_growth is None else state.decisions_since_growth + 1
    state = replace(state, decisions_since_growth=since)
    if host or gpu or cap_notes or state.pressure_note:
        if state.pressure_note and not (host or gpu or cap_notes):
            notes.append(f"{state.pressure_note} since the last decision: no growth")
        state = replace(state.after_shrink("", worst.step if new != plan else None), pressure_note="")
        if new != plan:
            state = state.changed(kind, "; ".join(notes).rsplit(": ", 1)[-1], plan, worst, resource)
        return Decision(new, state, "; ".join(notes), new != plan, effect)
    fraction = worst.gpu_pressure
    calm = worst.available_at_peak > t.headroom and (fraction is None or fraction < cfg.gpu_low_fraction)
    gpu_text = "no GPU" if fraction is None else f"GPU peak {fraction:.0%}"
    if not calm:
        return Decision(plan, replace(state, calm_decisions=0),
                        f"available {gb_text(worst.available_at_peak)}, {gpu_text}: between thresholds, plan kept",
                        False, effect)
    state = replace(state, futile_compute=False)  # the pressure that made shrinks futile is over
    calm_count = state.calm_decisions + 1
    numbers = (f"available {gb_text(worst.available_at_peak)} > {gb_text(t.headroom)}, {gpu_text}"
               + ("" if fraction is None else f" < {cfg.gpu_low_fraction:.0%}"))
    grown = None
    if calm_count >= state.calm_needed:
        grown = grow_step(plan, state.start, micro_ceiling(plan, accum_floor(worst.job_available, cfg)[0]))
        if grown is not None and apply_caps(grown[0], worst.job_available, cfg, worst.shm_free, batch_bytes)[1]:
            grown = None  # that step would break a cap (/dev/shm): stay
    if grown is None:
        progress = "nothing to grow back" if calm_count >= state.calm_needed else f"{calm_count}/{state.calm_needed}"
        return Decision(plan, replace(state, calm_decisions=min(calm_count, state.calm_needed)),
                        f"calm ({numbers}), {progress}: plan kept", False, effect)
    state = replace(state, calm_decisions=0, decisions_since_growth=0, plan_since_step=worst.step)
    return Decision(grown[0], state, f"calm for {calm_count} decisions ({numbers}): {grown[1]}", True, effect)


def emergency(sample: MemorySample, plan: Plan, cfg: MemoryConfig,
              state: PolicyState | None = None, batch_bytes: int = 0) -> Decision | None:
    """Mid-epoch: below the emergency threshold drop all workers now (the guard rebuilds the loader), then
    pin_memory, then on a CPU run compute; /dev/shm filling up drops workers too. One change per sample taken under
    the plan in force; None = nothing."""
    if not cfg.adaptive or (state is not None and sample.step <= state.plan_since_step):
        return None
    room = shm_worker_cap(plan, sample.shm_free, batch_bytes)
    if room < plan.num_workers:
        why = f"/dev/shm has {size_text(sample.shm_free)} free: workers {plan.num_workers} -> {room} now"
        new_state = None if state is None else state.after_shrink(why, sample.step)
        return Decision(replace(plan, num_workers=room), new_state, why, True)
    t = Thresholds.of(cfg, sample.job_limit, sample.gpu_total)
    effect = ""
    if state is not None:
        state, effect, undo = judge([sample], plan, state, t)
        if undo is not None:
            return Decision(undo, state.after_shrink("", sample.step), effect, True, effect)
    if sample.available_at_peak >= t.emergency:
        return Decision(plan, state, effect, False, effect) if effect else None
    why = f"job available {gb_text(sample.available_at_peak, 2)} at peak < emergency {gb_text(t.emergency, 2)}"
    kind = "loader"
    if plan.num_workers > 0:
        step = (replace(plan, num_workers=0), f"workers {plan.num_workers} -> 0 now")
    elif plan.pin_memory:
        step = (replace(plan, pin_memory=False), "pin_memory off now")
    elif sample.gpu_pressure is None and not (state is not None and state.futile_compute):
        step, kind = shrink_compute(plan), "compute"  # CPU training: the micro-batch's activations are in host RAM
    else:
        step = None
    if step is None:
        return Decision(plan, state, effect, False, effect) if effect else None
    new_state = None if state is None else state.after_shrink(why, sample.step).changed(kind, step[1], plan, sample)
    return Decision(step[0], new_state, f"{why}: {step[1]}", True, effect)


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
    new_state = None if state is None else replace(state.after_shrink(why, step), last_change=None)
    global_batch = shrunk[0].global_batch(world_size)
    return Decision(shrunk[0], new_state, f"{why}: {shrunk[1]} (global batch {global_batch} kept)", True)
