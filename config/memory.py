"""Memory-guard settings (see trainer/memory/): the thresholds the policy reacts to, all in one place.

"Available" below always means the job's available host memory: the tightest of the machine's free memory,
the cgroup limit, the Slurm allocation and host_budget_gb (see trainer/memory/probe.py). 1 GB = 2**30 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowmem_train.config.errors import ConfigError

ACCUM_RULE_KEYS = {"below_available_gb", "min_grad_accum"}


@dataclass
class MemoryConfig:
    adaptive: bool = True
    """Let the memory guard re-tune the plan at epoch boundaries (false: keep the starting plan)."""
    probe_every: int = 10
    """Optimizer steps between memory samples (0 = never sample: no re-planning, no memory.jsonl samples)."""
    host_budget_gb: float = 0.0
    """Most host RAM this job may use on one machine, all local ranks and workers together, in GB (0 = no budget)."""
    max_oom_retries: int = 3
    """Out-of-memory errors survived (each halves the micro-batch and redoes the step) before stopping."""
    host_low_gb: float = 2.0
    """Shed DataLoader memory at an epoch boundary when available host memory (at the step peak) fell below this, in GB."""
    host_low_fraction: float = 0.10
    """... or below this fraction of the job's limit, when smaller (t5_small at a budget 8-16% under its peak: see README)."""
    host_emergency_gb: float = 0.75
    """Drop DataLoader workers mid-epoch (the loader is rebuilt) when available host memory falls below this, in GB."""
    host_emergency_fraction: float = 0.02
    """... or below this fraction of the job's limit, when smaller."""
    host_headroom_gb: float = 4.0
    """Grow back toward the starting plan only while available host memory stays above this, in GB."""
    host_headroom_fraction: float = 0.20
    """... or above this fraction of the job's limit, when smaller."""
    min_saving_gb: float = 0.05
    """A compute shrink (micro-batch, checkpointing) that lowered the peak by less than this, in GB, is undone."""
    min_saving_fraction: float = 0.02
    """... or by less than this fraction of the job's limit (of the GPU's memory, for a shrink made for GPU pressure), when smaller."""
    swap_growth_mb: float = 128.0
    """Swap written between two samples that counts as host pressure, in MB."""
    gpu_high_fraction: float = 0.92
    """Halve the micro-batch when this rank's peak allocation exceeds this fraction of what it can have on its own GPU (free + its own cache)."""
    gpu_low_fraction: float = 0.75
    """Grow back only while that GPU pressure stays below this fraction."""
    calm_epochs_before_grow: int = 2
    """Consecutive calm epochs needed before growing back one step (doubles after a step that had to be undone)."""
    max_num_workers: int = 8
    """Most DataLoader workers the guard ever runs (a larger data.num_workers is lowered to this)."""
    accum_rules: list[dict] = field(default_factory=list)
    """Rules like [{below_available_gb: 10, min_grad_accum: 4}]: below 10 GB available, accumulate >= 4 batches."""

    def validate(self) -> None:
        if self.probe_every < 0:
            raise ConfigError(f"--memory.probe_every must be 0 (off) or more (got {self.probe_every})")
        if self.host_budget_gb < 0:
            raise ConfigError(f"--memory.host_budget_gb must be 0 (off) or more (got {self.host_budget_gb})")
        if self.max_oom_retries < 0:
            raise ConfigError(f"--memory.max_oom_retries must be 0 or more (got {self.max_oom_retries})")
        if not 0 <= self.host_emergency_gb <= self.host_low_gb < self.host_headroom_gb:
            # A gap between low and headroom is the hysteresis band: without it a plan would flap.
            raise ConfigError(
                "--memory.host_emergency_gb <= --memory.host_low_gb < --memory.host_headroom_gb must hold "
                f"(got {self.host_emergency_gb}, {self.host_low_gb}, {self.host_headroom_gb})"
            )
        if not 0 <= self.host_emergency_fraction <= self.host_low_fraction < self.host_headroom_fraction <= 1:
            raise ConfigError(
                "--memory.host_emergency_fraction <= --memory.host_low_fraction < --memory.host_headroom_fraction <= 1 "
                f"must hold (got {self.host_emergency_fraction}, {self.host_low_fraction}, {self.host_headroom_fraction})"
            )
        if self.min_saving_gb < 0 or not 0 <= self.min_saving_fraction < 1:
            raise ConfigError("--memory.min_saving_gb must be 0 or more and --memory.min_saving_fraction in [0, 1) "
                              f"(got {self.min_saving_gb}, {self.min_saving_fraction})")
        if not self.swap_growth_mb > 0:
            raise ConfigError(f"--memory.swap_growth_mb must be positive (got {self.swap_growth_mb})")
        if not 0 < self.gpu_low_fraction < self.gpu_high_fraction <= 1:
            raise ConfigError(
                "--memory.gpu_low_fraction < --memory.gpu_high_fraction must both be in (0, 1] "
                f"(got {self.gpu_low_fraction}, {self.gpu_high_fraction})"
            )
        if self.calm_epochs_before_grow < 2:
            # One calm epoch between two pressured ones would otherwise grow the plan back and flap.
            raise ConfigError(
                f"--memory.calm_epochs_before_grow must be at least 2 (got {self.calm_epochs_before_grow})"
            )
        if self.max_num_workers < 0:
            raise ConfigError(f"--memory.max_num_workers must be 0 or more (got {self.max_num_workers})")
        if not isinstance(self.accum_rules, list):
            raise ConfigError(f"--memory.accum_rules must be a list of rules (got {self.accum_rules!r})")
        for rule in self.accum_rules:
            example = "{below_available_gb: 10, min_grad_accum: 4}"
            if not isinstance(rule, dict) or set(rule) != ACCUM_RULE_KEYS:
                raise ConfigError(f"--memory.accum_rules: each rule is {example} (got {rule!r})")
            below, accum = rule["below_available_gb"], rule["min_grad_accum"]
            if isinstance(below, bool) or not isinstance(below, (int, float)) or not below > 0:
                raise ConfigError(f"--memory.accum_rules: below_available_gb must be a positive number (got {rule!r})")
            if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
                raise ConfigError(f"--memory.accum_rules: min_grad_accum must be a whole number >= 1 (got {rule!r})")
