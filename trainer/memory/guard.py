"""The actuator of the memory guard: samples, agrees across ranks, applies plans at safe points.

    every probe_every steps   probe.sample() on each rank -> all-gather -> worst case -> memory.jsonl
                              -> emergency(worst)? -> new loader plan now (host floor crossed)
    at each epoch end         decide(samples since last decision) -> new plan for the next epoch
    on out-of-memory          on_oom(plan) -> smaller micro-batch for the rest of this very step

Every rank feeds the same worst-case numbers to the same pure policy (policy.py), so every rank reaches
the same plan without any further negotiation. Loader changes (workers, prefetch, pin_memory) take
effect when the trainer rebuilds its DataLoader at the current data position; compute changes
(micro-batch, accumulation, gradient checkpointing) take effect at once, because the loader hands out
whole per-rank steps and step.py cuts micro-batches itself.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from lowmem_train.config.schema import RunConfig
from lowmem_train.model.build import set_gradient_checkpointing
from lowmem_train.trainer.backend import Backend, set_batch_plan
from lowmem_train.trainer.memory.policy import (Decision, OutOfMemoryGiveUp, Plan, PolicyState, decide, divisors,
                                                emergency, on_oom, shed_loader)
from lowmem_train.trainer.memory.probe import GB, MemoryProbe, MemorySample
from lowmem_train.trainer.faults import HOST_PRESSURE
from lowmem_train.trainer.run_log import open_jsonl

log = logging.getLogger(__name__)


def plan_from_config(cfg: RunConfig) -> Plan:
    d = cfg.data
    return Plan(cfg.batch_size_per_gpu, cfg.gradient_accumulation_steps, d.num_workers, d.pin_memory,
                d.prefetch_factor, cfg.gradient_checkpointing)


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

    @classmethod
    def from_config(cls, cfg: RunConfig, saved: dict | None, world_size: int) -> "MemoryGuard":
        """The starting plan: the checkpoint's (re-split if the world size changed) or the config's."""
        start = plan_from_config(cfg)
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
        self.backend, self.model = backend, model
        self.journal = open_jsonl(out_dir / "memory.jsonl") if backend.is_main else None
        self.apply_compute(self.plan)

    def state_dict(self) -> dict:
        return {"plan": self.plan.state_dict(), "policy": self.policy.state_dict(), "oom_retries": self.oom_retries,
                "world_size": self.backend.world_size}

    # ---- sampling ----------------------------------------------------------------------------------------
    def after_step(self, step: int, run_log) -> None:
        every = self.cfg.memory.probe_every
        if not every or step % every:
            return
        worst = self.gather_worst(self.sample(step))
        self.samples.append(worst)
        self.record(worst, run_log)
        urgent = emergency(worst, self.plan, self.cfg.memory, self.policy)
        if urgent is not None:
            self.adopt(urgent, "now, mid-epoch", step)

    def sample(self, step: int) -> MemorySample:
        return HOST_PRESSURE.apply(self.probe.sample(step), self.backend.rank)

    def gather_worst(self, mine: MemorySample) -> MemorySample:
        """Every rank's sample -> the worst of them, identical on all ranks (float64: byte counts stay exact)."""
        if self.backend.world_size == 1:
            return mine
        local = torch.tensor(mine.to_vector(), dtype=torch.float64, device=self.backend.accelerator.device)
        gathered = self.backend.accelerator.gather(local[None]).cpu()
        return MemorySample.worst([MemorySample.from_vector(row.tolist()) for row in gathered])

    def record(self, s: MemorySample, run_log) -> None:
        if self.journal is None:
            return
        numbers = {"host_available_gb": s.host_available / GB, "job_available_gb": s.job_available / GB,
                   "swap_used_gb": s.swap_used / GB, "tree_pss_gb": s.tree_pss / GB}
        if s.gpu_used:
            numbers.update({"gpu_used_gb": max(s.gpu_used) / GB, "gpu_used_fraction": s.gpu_used_fraction})
        if s.torch_max_allocated is not None:
            numbers["torch_peak_gb"] = s.torch_max_allocated / GB
        self.journal_line({"kind": "sample", "step": s.step, **{k: round(v, 4) for k, v in numbers.items()},
                           "sample": [None if v != v else v for v in s.to_vector()], "plan": self.plan.state_dict()})
        run_log.write("memory", s.step, **numbers)

    # ---- decisions -------------------------------------------------------------------------------------------
    def at_epoch_end(self, step: int) -> bool:
        """Re-plan for the next epoch; True when the DataLoader must be rebuilt."""
        samples = self.samples or [self.gather_worst(self.sample(step))]
        decision = decide(samples, self.plan, self.cfg.memory, self.backend.world_size, self.policy)
        self.samples = []
        changed_loader = decision.changed and _loader_part(decision.plan) != _loader_part(self.plan)
        if decision.changed:
            self.adopt(decision, "for the next epoch", step)
        else:
            self.policy = decision.state
            log.info("memory: %s", decision.reason)
        return changed_loader

    def under_pressure(self) -> bool:
        """Any sample of this epoch with less than host_headroom_gb available to the job (or a full GPU)."""
        m = self.cfg.memory
        return any(s.job_available < m.host_headroom_gb * GB or (s.gpu_used_fraction or 0) > m.gpu_low_fraction
                   for s in self.samples)

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

    def preflight(self, step: int) -> None:
        """One decision before training starts, so that caps (accum_rules, max workers) hold from step one."""
        decision = decide([self.gather_worst(self.sample(step))], self.plan, self.cfg.memory,
                          self.backend.world_size, self.policy)
        if decision.changed:
            self.adopt(decision, "before training", step)
        else:
            self.policy = decision.state

    def adopt(self, decision: Decision, when: str, step: int) -> None:
        old = self.plan
        self.plan, self.policy = decision.plan, decision.state or self.policy
        if _loader_part(old) != _loader_part(self.plan):
            self.loader_changed = True
        self.apply_compute(self.plan)
        log.warning("memory plan %s: %s -> %s", when, decision.reason, self.plan.describe())
        self.journal_line({"kind": "plan", "step": step, "time": time.time(), "when": when, "reason": decision.reason,
                           "plan": self.plan.state_dict()})

    def apply_compute(self, plan: Plan) -> None:
        set_batch_plan(self.backend, plan.micro_batch, plan.grad_accum)
        net = self.backend.accelerator.unwrap_model(self.model)
        # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
        active = getattr(net, "is_activation_checkpointing", None)
        active = getattr(net, "is_gradient_checkpointing", False) if active is None else active
        if bool(active) != plan.gradient_checkpointing:
            set_gradient_checkpointing(net, plan.gradient_checkpointing)

    def journal_line(self, record: dict) -> None:
        """One line of output_dir/memory.jsonl (rank 0 only), flushed: a killed run keeps what it measured."""
        if self.journal is not None:
            self.journal.write(json.dumps(record) + "\n")
            self.journal.flush()

    def take_loader_change(self) -> bool:
        changed, self.loader_changed = self.loader_changed, False
        return changed

    def release_cached_memory(self) -> None:
        if torch.cuda.is_available():  # pynvml counts torch's cache as used: without this, every later
            torch.cuda.empty_cache()  # decision would see the memory the shrink just freed as still taken
            torch.cuda.reset_peak_memory_stats()


def _loader_part(plan: Plan) -> tuple:
    return plan.num_workers, plan.pin_memory, plan.prefetch_factor
