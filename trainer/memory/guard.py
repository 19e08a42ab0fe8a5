"""The actuator of the memory guard: samples, agrees across ranks, applies plans at safe points.

    before training           the starting plan, shed (loader first) until the pre-flight estimate fits the job's
                              limit with host_low to spare; then one decision on a first sample
    every probe_every steps   probe.sample() on each rank -> all-gather -> worst case -> memory.jsonl
    (every step while near    -> emergency(worst)? -> new loader plan now (host floor crossed)
     the limit)
    at each epoch end         decide(samples since last decision) -> new plan for the next epoch
    on out-of-memory          on_oom(plan) -> smaller micro-batch for the rest of this very step
    ... in backward           the step cannot be redone (other ranks wait in its collectives): the smaller plan is
      (or a ZeRO-3 forward)   written to OUTPUT_DIR/oom_plan.json and the next start takes it (from_config)

Every rank feeds the same worst-case numbers to the same pure policy (policy.py), so every rank reaches
the same plan without any further negotiation. Loader changes (workers, prefetch, pin_memory) take
effect when the trainer rebuilds its DataLoader at the current data position; compute changes
(micro-batch, accumulation, gradient checkpointing) take effect at once, because the loader hands out
whole per-rank steps and step.py cuts micro-batches itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from lowmem_train.config.schema import RunConfig
from lowmem_train.model.build import gradient_checkpointing_active, set_gradient_checkpointing
from lowmem_train.trainer import distributed
from lowmem_train.trainer.backend import Backend, set_batch_plan
from lowmem_train.trainer.faults import HOST_PRESSURE
from lowmem_train.trainer.memory.plan import Plan, divisors, grows, plan_from_config, shed_loader
from lowmem_train.trainer.memory.policy import (Decision, OutOfMemoryGiveUp, PolicyState, Thresholds, decide,
                                                emergency, on_oom)
from lowmem_train.trainer.memory.probe import MemoryProbe
from lowmem_train.trainer.memory.units import GB, MemorySample
from lowmem_train.trainer.run_log import open_jsonl

log = logging.getLogger(__name__)


def resplit_for_world(plan: Plan, global_batch: int, world_size: int) -> Plan:
    """The same global batch on another number of processes: keep the micro-batch if it still divides."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} cannot be split over {world_size} processes")
    per_rank = global_batch // world_size
    micro = max(d for d in divisors(per_rank) if d <= plan.micro_batch)
    return replace(plan, micro_batch=micro, grad_accum=per_rank // micro)


class MemoryGuard:
    def __init__(self, cfg: RunConfig, plan: Plan, policy: PolicyState, oom_retries: int = 0):
        self.cfg, self.plan, self.policy, self.oom_retries = cfg, plan, policy, oom_retries
        self.samples: list[MemorySample] = []
        self.loader_changed = False
        self.backend: Backend | None = None
        self.model = None
        self.probe = MemoryProbe.from_config(cfg.memory)
        self.journal = None  # output_dir/memory.jsonl, open on rank 0
        self.near_limit = True  # sample every step until a sample shows headroom (the same on every rank)
        self.batch_bytes = 0  # a per-rank batch in /dev/shm (set by the trainer once the batch shape is known)

    @classmethod
    def from_config(cls, cfg: RunConfig, saved: dict | None, world_size: int, saved_step: int = 0) -> "MemoryGuard":
        """The starting plan: the one an out-of-memory error in backward left behind (if newer than the checkpoint
        resumed from), else the checkpoint's (re-split if the world size changed), else the config's."""
        start = plan_from_config(cfg)
        pending = read_oom_plan(Path(cfg.output_dir))
        if pending and (not saved or pending["step"] >= saved_step) and not cfg.allow_batch_change:
            log.warning("memory: taking the plan recorded after %s", pending["reason"])
            saved = {k: pending[k] for k in ("plan", "policy", "oom_retries", "world_size")}
        if not saved or cfg.allow_batch_change:
            return cls(cfg, start, PolicyState.initial(start, cfg.memory))
        plan = Plan.from_state_dict(saved["plan"])
        policy = PolicyState.from_state_dict(saved["policy"])
        if saved.get("world_size", world_size) != world_size:
            global_batch = plan.global_batch(saved["world_size"])
            plan = resplit_for_world(plan, global_batch, world_size)
            policy = PolicyState.initial(resplit_for_world(policy.start, global_batch, world_size), cfg.memory)
            log.info("world size %d -> %d: global batch %d kept as %s", saved["world_size"], world_size,
                     global_batch, plan.describe())
        return cls(cfg, plan, policy, int(saved.get("oom_retries", 0)))

    def attach(self, backend: Backend, model, out_dir: Path) -> None:
        """The backend was made with this plan's batch split already; the model still needs its checkpointing."""
        self.backend, self.model = backend, model
        self.journal = open_jsonl(out_dir / "memory.jsonl") if backend.is_main else None
        self.apply_checkpointing(self.plan)

    def state_dict(self) -> dict:
        return {"plan": self.plan.state_dict(), "policy": self.policy.state_dict(), "oom_retries": self.oom_retries,
                "world_size": self.backend.world_size}

    def saved(self) -> None:
        """A checkpoint now holds the plan: a plan left by an out-of-memory error has done its job."""
        if self.backend.is_main:
            (Path(self.cfg.output_dir) / OOM_PLAN_FILE).unlink(missing_ok=True)

    # ---- sampling ----------------------------------------------------------------------------------------
    def after_step(self, step: int, run_log) -> None:
        """Sample every probe_every steps, and every step while the job is near its limit (below the headroom
        threshold at the last sample): the guard is then one step from seeing trouble, not probe_every."""
        every = self.cfg.memory.probe_every
        if not every or (step % every and not self.near_limit):
            return
        worst = self.gather_worst(self.sample(step))
        self.samples.append(worst)
        self.record(worst, run_log)
        self.near_limit = worst.available_at_peak < Thresholds.of(self.cfg.memory, worst.job_limit).headroom
        urgent = emergency(worst, self.plan, self.cfg.memory, self.policy, self.batch_bytes)
        if urgent is not None and urgent.changed:
            self.adopt(urgent, "now, mid-epoch", step)
        elif urgent is not None:  # no change, but the last change was judged: remember that, and say it
            self.policy = urgent.state
            self.note_effect(urgent.effect, step)

    def sample(self, step: int) -> MemorySample:
        return HOST_PRESSURE.apply(self.probe.sample(step), self.backend.rank)

    def gather_worst(self, mine: MemorySample) -> MemorySample:
        """Every rank's sample -> the worst of them, identical on all ranks (float64: byte counts stay exact)."""
        if self.backend.world_size == 1:
            return mine
        return MemorySample.worst([MemorySample.from_vector(row) for row in distributed.collect(self.backend,
                                                                                                mine.to_vector())])

    def record(self, s: MemorySample, run_log) -> None:
        if self.journal is None:
            return
        numbers = {"host_available_gb": s.host_available / GB, "job_available_gb": s.job_available / GB,
                   "swap_used_gb": s.swap_used / GB, "tree_pss_gb": s.tree_pss / GB}
        if s.gpu_total:
            numbers.update({"gpu_total_gb": s.gpu_total / GB, "gpu_pressure": s.gpu_pressure})
            for key, value in (("gpu_free_gb", s.gpu_free), ("gpu_used_gb", s.gpu_used),
                               ("torch_reserved_gb", s.torch_reserved), ("torch_peak_gb", s.torch_max_allocated)):
                if value is not None:
                    numbers[key] = value / GB
        if s.step_peak is not None:
            numbers["step_peak_gb"] = s.step_peak / GB
        if s.shm_free is not None:
            numbers["shm_free_gb"] = s.shm_free / GB
        self.journal_line({"kind": "sample", "step": s.step, **{k: round(v, 4) for k, v in numbers.items()},
                           "sample": [None if v != v else v for v in s.to_vector()], "plan": self.plan.state_dict()})
        run_log.write("memory", s.step, **numbers)

    # ---- decisions -------------------------------------------------------------------------------------------
    def at_epoch_end(self, step: int) -> bool:
        """Re-plan for the next epoch; True when the DataLoader must be rebuilt."""
        samples = self.samples or [self.gather_worst(self.sample(step))]
        decision = decide(samples, self.plan, self.cfg.memory, self.backend.world_size, self.policy, self.batch_bytes)
        self.samples = []
        changed_loader = decision.changed and _loader_part(decision.plan) != _loader_part(self.plan)
        if decision.changed:
            self.adopt(decision, "for the next epoch", step)
        else:
            self.policy = decision.state
            self.note_effect(decision.effect, step)
            log.info("memory: %s", decision.reason)
        return changed_loader

    def under_pressure(self) -> bool:
        """Any sample of this epoch with less than the headroom threshold available to the job (or a full GPU)."""
        m = self.cfg.memory
        return any(s.available_at_peak < Thresholds.of(m, s.job_limit).headroom
                   or (s.gpu_pressure or 0) > m.gpu_low_fraction for s in self.samples)

    def on_oom(self, step: int) -> Plan:
        """All ranks hit this together (step.py agrees first): shrink the compute plan or give up."""
        self.release_cached_memory()
        decision = on_oom(self.plan, self.backend.world_size, self.cfg.memory, self.oom_retries, self.policy, step)
        self.oom_retries += 1
        self.adopt(decision, "for the rest of this step", step)
        return self.plan

    def on_host_memory_error(self, step: int) -> None:
        """A MemoryError while a batch was prepared (collate, workers): shed loader memory before retrying."""
        if self.oom_retries >= self.cfg.memory.max_oom_retries:
            raise OutOfMemoryGiveUp(f"host MemoryError while preparing batches, {self.oom_retries} retries used "
                                    f"(--memory.max_oom_retries={self.cfg.memory.max_oom_retries})")
        shed = shed_loader(self.plan)
        if shed is None:
            raise OutOfMemoryGiveUp(f"host MemoryError while preparing batches with {self.plan.describe()}: "
                                    "nothing left to shed; set --memory.host_budget_gb or free host memory")
        self.oom_retries += 1
        why = "host MemoryError while preparing a batch"
        self.adopt(Decision(shed[0], self.policy.after_shrink(why, step), f"{why}: {shed[1]}", True), "now", step)

    def record_oom_in_collective(self, step: int, what: str) -> str:
        """An out-of-memory error on this rank where the step cannot be redone (step.OutOfMemoryInCollective: in
        backward, a ZeRO-3 forward, NCCL's buffers): write the smaller plan where the next start finds it
        (OOM_PLAN_FILE; every rank's start reads it, so the plans agree), and return why."""
        self.release_cached_memory()
        decision = on_oom(self.plan, self.backend.world_size, self.cfg.memory, self.oom_retries, self.policy, step)
        record = {"step": step, "reason": f"{what} at step {step}", "plan": decision.plan.state_dict(),
                  "policy": decision.state.state_dict(), "oom_retries": self.oom_retries + 1,
                  "world_size": self.backend.world_size}
        path = Path(self.cfg.output_dir) / OOM_PLAN_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, path)
        self.journal_line({"kind": "plan", "step": step, "time": time.time(), "when": "at the next start",
                           "reason": f"{record['reason']}: {decision.reason}", "plan": record["plan"]})
        return f"{record['reason']}; the next start takes {decision.plan.describe()} ({path})"

    def preflight(self, step: int, fit=None) -> None:
        """Before training: a starting plan that fits the job's limit by the pre-flight estimate (`fit`, from
        estimate.check_fits; DataLoader workers and their prefetch included), so that a budget holds from the first
        step rather than from the first sample that shows it broken; then one decision on a real sample, so that
        the caps (accum_rules, max workers) hold from step one too."""
        if fit is not None and self.cfg.memory.adaptive:
            from lowmem_train.trainer.memory.estimate import loader_steps_to_fit

            steps, line = loader_steps_to_fit(self.cfg, fit.estimate, fit.capacity)
            steps = int(distributed.agree_max(self.backend, [steps])[0])  # every rank the same plan: the leanest
            plan, changes = self.plan, []
            for _ in range(steps):
                plan, change = shed_loader(plan)
                changes.append(change)
            if changes:
                why = f"the estimate {line}"
                self.adopt(Decision(plan, self.policy.after_shrink("", step), f"{why}: {', '.join(changes)}", True),
                           "before training", step)
        decision = decide([self.gather_worst(self.sample(step))], self.plan, self.cfg.memory,
                          self.backend.world_size, self.policy, self.batch_bytes)
        # Before training only shrinks, and is not a decision of the run: growing back here would count a resume
        # as a calm epoch and change the plan an exact resume must continue with. Nor is it judged by its effect:
        # the peak it was taken at holds no step yet (nothing trained), so every later peak would read as a loss.
        if decision.changed and not grows(self.plan, decision.plan):
            self.adopt(replace(decision, state=replace(decision.state, last_change=None)), "before training", step)

    def adopt(self, decision: Decision, when: str, step: int) -> None:
        old = self.plan
        self.plan, self.policy = decision.plan, decision.state or self.policy
        if _loader_part(old) != _loader_part(self.plan):
            self.loader_changed = True
        self.apply_compute(self.plan)
        if self.plan.micro_batch < old.micro_batch or (self.plan.gradient_checkpointing and not old.gradient_checkpointing):
            self.release_cached_memory()  # the memory the shrink frees goes back, and its effect is measured afresh
        self.note_effect(decision.effect, step)
        log.warning("memory plan %s: %s -> %s", when, decision.reason, self.plan.describe())
        self.journal_line({"kind": "plan", "step": step, "time": time.time(), "when": when, "reason": decision.reason,
                           "plan": self.plan.state_dict()})

    def apply_compute(self, plan: Plan) -> None:
        set_batch_plan(self.backend, plan.micro_batch, plan.grad_accum)
        self.apply_checkpointing(plan)

    def apply_checkpointing(self, plan: Plan) -> None:
        net = self.backend.accelerator.unwrap_model(self.model)
        if gradient_checkpointing_active(net) != plan.gradient_checkpointing:
            set_gradient_checkpointing(net, plan.gradient_checkpointing)

    def note_effect(self, effect: str, step: int) -> None:
        """What the previous change saved (or that it was undone), in the log and in memory.jsonl."""
        if effect:
            log.info("memory: %s", effect)
            self.journal_line({"kind": "effect", "step": step, "time": time.time(), "effect": effect})

    def journal_line(self, record: dict) -> None:
        """One line of output_dir/memory.jsonl (rank 0 only), flushed: a killed run keeps what it measured."""
        if self.journal is not None:
            self.journal.write(json.dumps(record) + "\n")
            self.journal.flush()

    def take_loader_change(self) -> bool:
        changed, self.loader_changed = self.loader_changed, False
        return changed

    def release_cached_memory(self) -> None:
        """After an out-of-memory error or a compute shrink: what the allocator caches goes back to the driver (other
        processes on a shared GPU may need it; nvidia-smi stops showing the old peak), and the peak starts over."""
        self.probe.release_gpu_cache()


OOM_PLAN_FILE = "oom_plan.json"


def read_oom_plan(out_dir: Path) -> dict | None:
    """The plan an out-of-memory error in backward left for the next start, if any."""
    try:
        return json.loads((out_dir / OOM_PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _loader_part(plan: Plan) -> tuple:
    return plan.num_workers, plan.pin_memory, plan.prefetch_factor
