"""The memory policy alone: pure functions fed with made-up samples, no probe, no torch."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_train.config.memory import MemoryConfig
from lowmem_train.config.errors import ConfigError
from lowmem_train.trainer.memory.policy import (
    OutOfMemoryGiveUp, Plan, PolicyState, decide, emergency, on_oom,
)
from lowmem_train.trainer.memory.units import GB, MB, MemorySample

_steps = itertools.count(1)


def sample(available_gb: float = 20.0, gpu: float | None = None, swapped_mb: float = 0.0,
           limit_gb: float = 64.0, peak_gb: float | None = None, rise_gb: float = 0.0) -> MemorySample:
    """A worst-of-ranks sample with the figures the policy reads; the rest plausible. `rise_gb`: how far the step
    peak went above the between-steps reading; `peak_gb`: the tree's step peak (default: 1 GB + the rise); `gpu`:
    the GPU pressure (peak allocated over free + reserved, on an 80 GB device)."""
    available = int(available_gb * GB)
    peak = int(peak_gb * GB) if peak_gb is not None else (int((1.0 + rise_gb) * GB) if rise_gb else None)
    return MemorySample(
        step=next(_steps), time=0.0, host_total=64 * GB, host_available=available, swap_used=0, swap_in_rate=0.0,
        swap_out_rate=0.0, swapped_out=int(swapped_mb * MB), tree_pss=GB, tree_rss=GB, tree_processes=1,
        cgroup_limit=None, cgroup_usage=None, slurm_limit=None, budget=None, job_available=available,
        job_limit=int(limit_gb * GB), step_peak=peak,
        **({} if gpu is None else {"gpu_total": 80 * GB, "gpu_free": 80 * GB - int(gpu * 80 * GB),
                                   "torch_reserved": int(gpu * 80 * GB), "torch_max_allocated": int(gpu * 80 * GB)}),
        job_available_at_peak=max(0, available - int(rise_gb * GB)),
    )


def start(cfg: MemoryConfig, plan: Plan) -> PolicyState:
    return PolicyState.initial(plan, cfg)


PLAN = Plan(micro_batch=16, grad_accum=1, num_workers=4, pin_memory=True, prefetch_factor=4,
            gradient_checkpointing=False)


def run(cfg: MemoryConfig, plan: Plan, samples_per_epoch: list, world_size: int = 1):
    """Decide once per epoch (one sample each, or a function of the plan in force giving it); the decisions."""
    state, decisions = start(cfg, plan), []
    for s in samples_per_epoch:
        d = decide([s(plan) if callable(s) else s], plan, cfg, world_size, state)
        plan, state = d.plan, d.state
        decisions.append(d)
    return decisions


def crowded_gpu(p: Plan) -> MemorySample:
    """A GPU sample under the plan in force: 76 of 80 GB held by states and other processes, 4 GB of activations
    at this plan's starting micro-batch (its per-rank batch), halved by checkpointing: pressured whatever the plan."""
    activations = 4 * p.micro_batch / (p.micro_batch * p.grad_accum) * (0.5 if p.gradient_checkpointing else 1.0)
    return sample(20, gpu=(76 + activations) / 80)


def test_host_pressure_sheds_workers_then_prefetch_then_last_worker_then_pin():
    cfg = MemoryConfig()
    decisions = run(cfg, PLAN, [sample(1.0, gpu=0.5) for _ in range(8)])
    loader = [(d.plan.num_workers, d.plan.prefetch_factor, d.plan.pin_memory) for d in decisions]
    assert loader == [(2, 4, True), (1, 4, True), (1, 2, True), (1, 1, True), (0, 1, True), (0, 1, False),
                      (0, 1, False), (0, 1, False)]
    assert decisions[0].reason == "job available 1.00 GB at peak < 2.00 GB: workers 4 -> 2"
    assert "nothing left to shed" in decisions[-1].reason and not decisions[-1].changed
    # On a GPU, host pressure never costs compute: the micro-batch is untouched.
    assert all(d.plan.micro_batch == 16 for d in decisions)
    assert decisions[4].plan.loader_kwargs()["prefetch_factor"] is None  # torch refuses it without workers


def test_swap_growth_counts_as_host_pressure():
    cfg = MemoryConfig(swap_growth_mb=100)
    quiet, swapping = run(cfg, PLAN, [sample(20, swapped_mb=50)]), run(cfg, PLAN, [sample(20, swapped_mb=300)])
    assert not quiet[0].changed
    assert swapping[0].plan.num_workers == 2 and "swap grew 300 MB in one probe > 100 MB" in swapping[0].reason


def test_gpu_pressure_halves_micro_batch_then_turns_on_checkpointing():
    cfg, world = MemoryConfig(), 2
    plan = replace(PLAN, micro_batch=16, grad_accum=2)  # global batch 64 = 16 x 2 x 2

    def crowded(p: Plan) -> MemorySample:  # 76 of 80 GB are states and what others hold; activations follow the plan
        activations = 4 * p.micro_batch / 16 * (0.5 if p.gradient_checkpointing else 1.0)
        return sample(20, gpu=(76 + activations) / 80)

    decisions = run(cfg, plan, [crowded] * 7, world_size=world)
    assert [(d.plan.micro_batch, d.plan.grad_accum) for d in decisions] == [
        (8, 4), (4, 8), (2, 16), (1, 32), (1, 32), (1, 32), (1, 32)]
    assert [d.plan.gradient_checkpointing for d in decisions][3:5] == [False, True]
    assert all(d.plan.global_batch(world) == 64 for d in decisions)
    assert decisions[0].reason == ("GPU peak 100% of the memory this rank can have > 92%: micro-batch 16 -> 8, "
                                   "grad_accum 2 -> 4")
    assert decisions[1].effect == "micro-batch 16 -> 8, grad_accum 2 -> 4 saved 2.00 GB of peak"  # kept
    assert "nothing left to shrink" in decisions[-1].reason
    assert decisions[0].plan.num_workers == 4  # GPU pressure leaves the loader alone


def test_micro_batch_takes_only_divisors_of_the_per_rank_batch():
    cfg = MemoryConfig(calm_epochs_before_grow=2)
    plan = replace(PLAN, micro_batch=24, num_workers=0, pin_memory=False)
    down = run(cfg, plan, [crowded_gpu] * 4)
    assert [d.plan.micro_batch for d in down] == [12, 6, 3, 1]
    state, shrunk, micros = down[-1].state, down[-1].plan, []
    for _ in range(16):  # calm: grows back through the next divisor each time, every 2nd decision
        d = decide([sample(20, gpu=0.3)], shrunk, cfg, 1, state)
        shrunk, state = d.plan, d.state
        micros.append(shrunk.micro_batch)
    assert [m for m, prev in zip(micros, [1] + micros) if m != prev] == [2, 3, 4, 6, 8, 12, 24]
    assert micros[-1] == 24 and all(m * d == 24 for m, d in zip(micros, [24 // m for m in micros]))


def test_host_pressure_on_a_cpu_run_shrinks_compute_once_the_loader_is_lean():
    plan = replace(PLAN, num_workers=0, pin_memory=False)  # no GPU: activations live in host RAM
    d = run(MemoryConfig(), plan, [sample(1.0)])[0]
    assert (d.plan.micro_batch, d.plan.grad_accum) == (8, 2) and d.changed


def test_grow_back_one_step_after_calm_epochs_and_never_past_the_start():
    cfg = MemoryConfig(calm_epochs_before_grow=2)
    pressured = run(cfg, PLAN, [sample(1.0, gpu=0.5), sample(1.0, gpu=0.97)])
    plan, state = pressured[-1].plan, pressured[-1].state
    assert (plan.num_workers, plan.micro_batch) == (1, 8)  # workers 4 -> 2 -> 1 and micro 16 -> 8
    history = []
    for _ in range(14):
        d = decide([sample(30, gpu=0.3)], plan, cfg, 1, state)
        plan, state = d.plan, d.state
        history.append(d)
    grown = [d for d in history if d.changed]
    assert [d.changed for d in history[:4]] == [False, True, False, True]  # every 2nd calm decision
    assert [g.reason.split(": ", 1)[1] for g in grown] == [
        "micro-batch 8 -> 16, grad_accum 2 -> 1", "workers 1 -> 2", "workers 2 -> 4"]
    assert grown[0].reason.startswith("calm for 2 decisions (available 30.0 GB > 4.0 GB, GPU peak 30% < 75%)")
    assert plan == PLAN and not history[-1].changed


def test_between_thresholds_is_neither_pressure_nor_calm():
    cfg = MemoryConfig(host_low_gb=2, host_headroom_gb=8)
    shed = run(cfg, PLAN, [sample(1.0)])[0]
    d = decide([sample(5.0)], shed.plan, cfg, 1, replace(shed.state, calm_decisions=1))
    assert not d.changed and d.state.calm_decisions == 0 and "between thresholds" in d.reason


def test_alternating_pressure_and_calm_never_flaps():
    cfg = MemoryConfig()
    decisions = run(cfg, PLAN, [sample(1.0) if i % 2 == 0 else sample(30.0) for i in range(20)])
    plans = [PLAN] + [d.plan for d in decisions]
    assert not any(d.changed and "calm" in d.reason for d in decisions)  # one calm epoch never grows
    assert not has_flap(plans)


def test_a_growth_undone_by_pressure_doubles_the_calm_needed():
    cfg = MemoryConfig(calm_epochs_before_grow=2)
    pattern = [1.0, 30, 30, 1.0, 30, 30, 1.0, 30, 30, 30, 30, 1.0]  # pressure right after each growth
    decisions = run(cfg, PLAN, [sample(gb) for gb in pattern])
    grows = [i for i, d in enumerate(decisions) if d.changed and d.reason.startswith("calm")]
    assert grows == [2, 10]  # the second growth needed 4 calm decisions, not 2
    assert decisions[-1].state.calm_needed == 8


def test_prior_art_rule_as_config_batch_32_accumulates_4_below_10_gb():
    cfg = MemoryConfig(accum_rules=[{"below_available_gb": 10.0, "min_grad_accum": 4}])
    cfg.validate()
    plan = Plan(32, 1, 2, False, 2, False)
    low, high = run(cfg, plan, [sample(9.5)])[0], run(cfg, plan, [sample(10.5)])[0]
    assert (low.plan.micro_batch, low.plan.grad_accum, low.plan.global_batch(1)) == (8, 4, 32)
    assert "available 9.5 GB < 10.0 GB needs grad_accum >= 4" in low.reason
    assert not high.changed and high.plan == plan
    # Calm (8 GB > headroom 4 GB) but still under the rule: no growth past grad_accum 4, however long.
    later = run(cfg, plan, [sample(8.0) for _ in range(10)])
    assert all(d.plan.grad_accum >= 4 for d in later) and later[-1].state.calm_decisions == 2
    assert later[-1].reason.startswith("calm (available 8.0 GB > 4.0 GB, no GPU), nothing to grow back")


def test_accum_rule_with_a_batch_that_is_not_a_power_of_two():
    cfg = MemoryConfig(accum_rules=[{"below_available_gb": 10, "min_grad_accum": 4}])
    d = run(cfg, Plan(30, 1, 0, False, 2, False), [sample(5.0)])[0]
    assert (d.plan.micro_batch, d.plan.grad_accum) == (6, 5)  # the largest split with grad_accum >= 4


def test_max_num_workers_caps_the_plan_and_the_growth_ceiling():
    cfg = MemoryConfig(max_num_workers=3)
    d = run(cfg, replace(PLAN, num_workers=16), [sample(30)])[0]
    assert d.plan.num_workers == 3 and "max_num_workers" in d.reason and d.state.start.num_workers == 3


def test_adaptive_off_keeps_the_plan():
    d = run(MemoryConfig(adaptive=False), PLAN, [sample(0.1, gpu=0.99)])[0]
    assert d.plan == PLAN and not d.changed
    assert emergency(sample(0.1), PLAN, MemoryConfig(adaptive=False)) is None


def test_emergency_drops_workers_mid_epoch_and_the_next_decision_does_not_shed_twice():
    cfg = MemoryConfig()
    state = start(cfg, PLAN)
    assert emergency(sample(1.0), PLAN, cfg, state) is None  # below low, above emergency: wait for the epoch end
    hit = sample(0.5)
    d = emergency(hit, PLAN, cfg, state)
    assert d.plan.num_workers == 0 and d.reason == "job available 0.50 GB at peak < emergency 0.75 GB: workers 4 -> 0 now"
    assert d.plan.loader_kwargs()["prefetch_factor"] is None
    # The epoch's samples include the one that triggered the emergency; only those after it judge the new plan.
    later = decide([sample(3.0), hit, sample(30.0)], d.plan, cfg, 1, d.state)
    assert later.plan == d.plan and "emergency" in later.reason and later.state.calm_decisions == 0
    lean = replace(PLAN, num_workers=0, pin_memory=False)
    assert emergency(sample(0.5, gpu=0.5), lean, cfg) is None  # nothing the loader can give back on a GPU run
    assert emergency(sample(0.5), lean, cfg).plan.micro_batch == 8  # CPU run: the activations go


def test_thresholds_scale_with_the_jobs_limit():
    """A 1.4 GB budget gets margins of tens of MB; a large host keeps the absolute ones."""
    from lowmem_train.trainer.memory.policy import Thresholds

    cfg = MemoryConfig()
    small, large = Thresholds.of(cfg, int(1.4 * GB)), Thresholds.of(cfg, 64 * GB)
    assert (small.emergency, small.low, small.headroom) == (int(0.02 * 1.4 * GB), int(0.10 * 1.4 * GB),
                                                           int(0.20 * 1.4 * GB))
    assert (large.emergency, large.low, large.headroom) == (int(0.75 * GB), 2 * GB, 4 * GB)
    assert small.emergency <= small.low < small.headroom  # the hysteresis band survives the scaling
    # 0.2 GB left under a 1.4 GB budget: between thresholds (no shedding, no growth); under 64 GB: pressure.
    tight = run(cfg, PLAN, [sample(0.2, limit_gb=1.4)])[0]
    assert not tight.changed and "between thresholds" in tight.reason
    assert run(cfg, PLAN, [sample(0.2)])[0].plan.num_workers == 2


def test_decisions_see_the_step_peak_not_the_between_steps_reading():
    """2.5 GB free between steps but 0.5 GB at the peak of a step: that is pressure (a limit kills at the peak)."""
    d = run(MemoryConfig(), PLAN, [sample(2.5, rise_gb=2.0)])[0]
    assert d.plan.num_workers == 2 and "job available 0.50 GB at peak" in d.reason
    assert emergency(sample(2.5, rise_gb=2.0), PLAN, MemoryConfig()).plan.num_workers == 0


def test_a_compute_shrink_that_bought_too_little_is_undone_and_not_retried_until_calm():
    cfg = MemoryConfig()  # min saving: min(50 MB, 2% of the 1.4 GB limit = 28 MB)
    lean = replace(PLAN, num_workers=0, pin_memory=False)  # a CPU run with nothing left to shed
    state = start(cfg, lean)
    first = decide([sample(0.1, limit_gb=1.4, peak_gb=1.30)], lean, cfg, 1, state)
    assert first.plan.micro_batch == 8 and first.state.last_change["kind"] == "compute"
    # Under micro-batch 8 the peak fell by 10 MB only: undone, and held there while the pressure lasts.
    second = decide([sample(0.11, limit_gb=1.4, peak_gb=1.29)], first.plan, cfg, 1, first.state)
    assert second.plan.micro_batch == 16 and second.changed
    assert second.effect.startswith("micro-batch 16 -> 8, grad_accum 1 -> 2 saved 10.2 MB of peak < 28.7 MB: undone")
    third = decide([sample(0.1, limit_gb=1.4, peak_gb=1.30)], second.plan, cfg, 1, second.state)
    assert third.plan == lean and not third.changed and "held" in third.reason
    # Calm again: the pressure that made shrinking futile is over, a later pressure may try again.
    calm = decide([sample(1.0, limit_gb=1.4, peak_gb=0.3)], third.plan, cfg, 1, third.state)
    again = decide([sample(0.1, limit_gb=1.4, peak_gb=1.30)], calm.plan, cfg, 1, calm.state)
    assert not calm.state.futile_compute and again.plan.micro_batch == 8


def test_a_shrink_that_helps_is_kept_and_what_it_saved_is_reported():
    cfg = MemoryConfig()
    lean = replace(PLAN, num_workers=0, pin_memory=False)
    first = decide([sample(0.1, limit_gb=1.4, peak_gb=1.30)], lean, cfg, 1, start(cfg, lean))
    second = decide([sample(0.3, limit_gb=1.4, peak_gb=1.10)], first.plan, cfg, 1, first.state)
    assert second.plan.micro_batch == 8 and second.effect.endswith("saved 0.20 GB of peak")
    shed = run(cfg, PLAN, [sample(0.1, limit_gb=1.4, peak_gb=1.3), sample(0.25, limit_gb=1.4, peak_gb=1.15)])
    assert shed[1].effect == "workers 4 -> 2 saved 0.15 GB of peak"  # loader changes are reported, never undone


def test_an_emergency_waits_for_a_sample_under_the_plan_in_force():
    cfg, lean = MemoryConfig(), replace(PLAN, num_workers=0, pin_memory=False)
    hit = sample(0.01, limit_gb=1.4, peak_gb=1.39)
    d = emergency(hit, lean, cfg, start(cfg, lean))
    assert d.plan.micro_batch == 8
    assert emergency(hit, d.plan, cfg, d.state) is None  # the same evidence: no second shrink on it
    assert emergency(sample(0.01, limit_gb=1.4, peak_gb=1.39), d.plan, cfg, d.state).plan.micro_batch == 16  # undone


def test_oom_halves_the_micro_batch_until_max_retries_then_gives_up():
    cfg, world = MemoryConfig(max_oom_retries=3), 2
    plan, tried = Plan(64, 1, 2, False, 2, False), [64]
    for retry in range(3):
        d = on_oom(plan, world, cfg, retry)
        plan = d.plan
        tried.append(plan.micro_batch)
        assert plan.global_batch(world) == 128 and d.changed
    assert tried == [64, 32, 16, 8]
    with pytest.raises(OutOfMemoryGiveUp, match="after 3 retries"):
        on_oom(plan, world, cfg, 3)


def test_oom_at_micro_batch_one_turns_on_checkpointing_then_gives_up():
    cfg = MemoryConfig(max_oom_retries=10)
    d = on_oom(Plan(1, 8, 0, False, 2, False), 1, cfg, 0, start(cfg, Plan(1, 8, 0, False, 2, False)), step=7)
    assert d.plan.gradient_checkpointing and d.state.pressure_note.startswith("out of memory")
    assert d.state.plan_since_step == 7
    with pytest.raises(OutOfMemoryGiveUp, match="nothing left to shrink"):
        on_oom(d.plan, 1, cfg, 1)
    # The OOM counts as pressure at the next decision: no growth back, however calm the samples look.
    after = decide([sample(30)], d.plan, cfg, 1, replace(d.state, calm_decisions=5))
    assert not after.changed and after.state.calm_decisions == 0


def test_plan_and_state_survive_a_json_round_trip():
    cfg = MemoryConfig()
    d = run(cfg, PLAN, [sample(1.0, gpu=0.99)])[0]
    assert Plan.from_state_dict(json.loads(json.dumps(d.plan.state_dict()))) == d.plan
    assert PolicyState.from_state_dict(json.loads(json.dumps(d.state.state_dict()))) == d.state


def test_a_plan_from_another_world_size_is_refused():
    cfg = MemoryConfig()
    with pytest.raises(ValueError, match="world size"):
        decide([sample()], replace(PLAN, grad_accum=2), cfg, 1, start(cfg, PLAN))


def test_bounds_are_enforced_by_the_plan_itself():
    for bad in [dict(micro_batch=0), dict(grad_accum=0), dict(num_workers=-1), dict(prefetch_factor=0)]:
        with pytest.raises(ValueError):
            replace(PLAN, **bad)


@pytest.mark.parametrize("bad", [
    dict(accum_rules=[{"below_available_gb": 10}]),
    dict(accum_rules=[{"below_available_gb": -1, "min_grad_accum": 4}]),
    dict(accum_rules=[{"below_available_gb": 10, "min_grad_accum": 2.5}]),
    dict(calm_epochs_before_grow=1),
    dict(host_low_gb=5, host_headroom_gb=4),
    dict(host_emergency_gb=3, host_low_gb=2),
    dict(gpu_low_fraction=0.95, gpu_high_fraction=0.9),
])
def test_config_validation_names_the_option(bad):
    with pytest.raises(ConfigError, match="--memory."):
        MemoryConfig(**bad).validate()


def test_accum_rules_from_the_command_line():
    from lowmem_train.config.loader import build_config

    cfg = build_config(None, {"memory.accum_rules": "[{below_available_gb: 10, min_grad_accum: 4}]"})
    assert cfg.memory.accum_rules == [{"below_available_gb": 10, "min_grad_accum": 4}]


def has_flap(plans: list[Plan]) -> bool:
    """A, B, A, B on consecutive decisions."""
    return any(a == c and b == d and a != b for a, b, c, d in zip(plans, plans[1:], plans[2:], plans[3:]))


# ---- every transition, driven at random -------------------------------------------------------------------------

epoch_samples = st.lists(
    st.builds(sample, available_gb=st.floats(0.0, 40.0), gpu=st.none() | st.floats(0.0, 1.0),
              swapped_mb=st.sampled_from([0.0, 0.0, 500.0])),
    min_size=0, max_size=3,
)
events = st.lists(st.one_of(st.tuples(st.just("decide"), epoch_samples),
                            st.tuples(st.just("emergency"), epoch_samples),
                            st.tuples(st.just("oom"), st.none())), max_size=40)


@settings(max_examples=300, deadline=None)
@given(world=st.sampled_from([1, 2, 3, 8]), per_rank=st.sampled_from([1, 6, 12, 30, 32, 64]),
       workers=st.integers(0, 12), prefetch=st.integers(1, 6), pin=st.booleans(), ckpt=st.booleans(),
       rules=st.lists(st.fixed_dictionaries({"below_available_gb": st.floats(0.5, 40),
                                             "min_grad_accum": st.integers(1, 70)}), max_size=2),
       events=events)
def test_invariant_and_bounds_hold_after_every_transition(world, per_rank, workers, prefetch, pin, ckpt, rules,
                                                          events):
    cfg = MemoryConfig(accum_rules=rules, max_oom_retries=5)
    cfg.validate()
    state = start(cfg, Plan(per_rank, 1, workers, pin, prefetch, ckpt))
    plan = state.start  # the guard begins with the user's plan under the max_num_workers cap
    global_batch, retries, plans = plan.global_batch(world), 0, [plan]
    for kind, payload in events:
        if kind == "decide":
            d = decide(payload, plan, cfg, world, state)
        elif kind == "emergency":
            d = emergency(payload[0], plan, cfg, state) if payload else None
        else:
            try:
                d = on_oom(plan, world, cfg, retries, state)
                retries += 1
            except OutOfMemoryGiveUp:
                assert retries >= cfg.max_oom_retries or (plan.micro_batch == 1 and plan.gradient_checkpointing)
                continue
        if d is None:
            continue
        assert d.changed == (d.plan != plan) and d.reason and "\n" not in d.reason
        plan, state = d.plan, d.state
        plans.append(plan)
        assert plan.micro_batch * plan.grad_accum * world == global_batch
        assert plan.micro_batch >= 1 and plan.grad_accum >= 1 and plan.num_workers >= 0 and plan.prefetch_factor >= 1
        # Never past the user's starting plan (workers also never past max_num_workers).
        assert plan.micro_batch <= per_rank and plan.num_workers <= min(workers, cfg.max_num_workers)
        assert plan.prefetch_factor <= prefetch and plan.pin_memory <= pin and plan.gradient_checkpointing >= ckpt
        assert PolicyState.from_state_dict(json.loads(json.dumps(state.state_dict()))) == state
    assert not has_flap(plans)


def test_workers_are_capped_by_the_room_in_dev_shm():
    """Batches cross from workers through /dev/shm: workers x prefetch of them must fit in half its free space."""
    cfg, plan = MemoryConfig(), replace(PLAN, num_workers=4, prefetch_factor=2)
    batch = 1 * MB
    roomy = replace(sample(30), shm_free=64 * MB)
    tight = replace(sample(30), shm_free=9 * MB)  # room for 4 batches in flight: 2 workers x prefetch 2
    assert not decide([roomy], plan, cfg, 1, start(cfg, plan), batch_bytes=batch).changed
    capped = decide([tight], plan, cfg, 1, start(cfg, plan), batch_bytes=batch)
    assert capped.plan.num_workers == 2 and "/dev/shm has 9.0 MB free" in capped.reason
    now = emergency(replace(sample(30), shm_free=3 * MB), plan, cfg, start(cfg, plan), batch_bytes=batch)
    assert now.plan.num_workers == 0 and "/dev/shm" in now.reason  # filling up mid-epoch: before a Bus error
