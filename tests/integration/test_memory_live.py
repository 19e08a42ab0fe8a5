"""The memory guard's senses on real runs: the step peak it samples against a peak measured from outside, a
snapshot on demand (SIGUSR1), and a small /dev/shm, mounted for real in a mount namespace of the test's own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bench.outside import run_sampled
from tests.helpers import ENTRY, REPO, TINY_MODEL, task_options

pytestmark = pytest.mark.slow
GB = 2**30


def journal(out, kind: str) -> list[dict]:
    path = out / "memory.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind] if path.is_file() else []


def test_the_step_peak_matches_the_peak_measured_from_outside(tiny_task, tmp_path):
    """Activations of a big batch come and go within a step; the high-water mark the probe reads (and resets) holds
    them, and the peak it reports is the peak an observer outside sees (tree PSS every 20 ms)."""
    out = tmp_path / "run"
    wide = ["--model.d_model=256", "--model.d_ff=1024", "--model.num_heads=4", "--model.num_layers=3",
            "--model.num_decoder_layers=3", "--batch_size_per_gpu=256"]
    run = run_sampled([sys.executable, str(ENTRY), "train", *task_options(tiny_task, out), "--validation_file=", *wide,
                       "--max_steps=10", "--memory.probe_every=1", "--save_steps=100000", "--force"],
                      interval=0.02, timeout=900, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr[-3000:]
    samples = journal(out, "sample")
    step_peak = max(s["step_peak_gb"] for s in samples) * GB
    between = max(s["tree_pss_gb"] for s in samples) * GB
    print(f"outside {run.peak / GB:.3f} GB, step peak {step_peak / GB:.3f} GB, between steps {between / GB:.3f} GB")
    assert abs(step_peak / run.peak - 1) < 0.10, (step_peak / GB, run.peak / GB)
    # (Here the allocator keeps most freed pages, so samples between steps come close; what only a step peak sees:
    # the next test, with an allocation of known size.)


def sampled_run(tiny_task, out, extra: list[str], env: dict | None = None) -> list[dict]:
    """A tiny run without validation; the guard's samples (memory.jsonl), in step order."""
    run = subprocess.run([sys.executable, str(ENTRY), "train", *task_options(tiny_task, out), "--validation_file=",
                          *TINY_MODEL, "--batch_size_per_gpu=16", "--save_steps=100000", *extra], cwd=REPO,
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    assert run.returncode == 0, run.stderr[-3000:]
    return journal(out, "sample")


def test_the_step_peak_sees_what_a_step_allocates_and_frees_and_starts_over_at_the_next_sample(tiny_task, tmp_path):
    """Step 4 touches 256 MB and frees them before the step ends (the allocate seam): a reading between steps
    cannot see them, the step peak of the sample after step 4 does (the high-water mark), and the peaks after it
    start over (the mark is reset at every sample) instead of carrying step 4's for the rest of the run."""
    spike = 256 * 2**20
    samples = sampled_run(tiny_task, tmp_path / "run", ["--max_steps=8", "--memory.probe_every=1"],
                          env={"LOWMEM_FAULT_ALLOCATE": "mb=256,step=4"})
    by_step = {s["step"]: s for s in samples}
    assert sorted(by_step) == list(range(1, 9)), sorted(by_step)
    rise = {step: (s["step_peak_gb"] - s["tree_pss_gb"]) * GB for step, s in by_step.items()}
    print({step: f"{r / 2**20:.0f} MB" for step, r in rise.items()})
    assert rise[4] >= 0.9 * spike, rise  # seen by the step peak...
    assert abs(by_step[4]["tree_pss_gb"] - by_step[3]["tree_pss_gb"]) * GB < 0.2 * spike  # ...not between steps
    assert all(rise[step] < 0.2 * spike for step in (6, 7, 8)), rise  # and forgotten once sampled


def test_sampling_tightens_to_every_step_when_the_run_grows_near_its_budget(tiny_task, tmp_path):
    """A budget 0.6 GB above what the run needs: after the first sample shows headroom, the guard samples every 5th
    step. From step 7 the run holds 0.45 GB more (the allocate seam, keep=1): the sample at step 10 shows less than
    the headroom threshold (20% of the budget) left, above the emergency floor, and from there every step is
    sampled (a step away from seeing trouble, not probe_every)."""
    needs = max(s["step_peak_gb"] for s in sampled_run(tiny_task, tmp_path / "free", ["--max_steps=3",
                                                                                       "--memory.probe_every=1"]))
    budget = needs + 0.6
    samples = sampled_run(tiny_task, tmp_path / "run", ["--max_steps=20", "--memory.probe_every=5",
                                                         f"--memory.host_budget_gb={budget:.3f}"],
                          env={"LOWMEM_FAULT_ALLOCATE": "mb=460,step=7,keep=1"})
    steps = [s["step"] for s in samples]
    assert steps == [1, 5, *range(10, 21)], (steps, needs, budget)
    assert samples[-1]["tree_pss_gb"] > needs + 0.4  # it did grow, and stayed grown
    assert not journal(tmp_path / "run", "plan"), "near the limit, not past the emergency floor: nothing to shed"


def test_usr1_logs_a_memory_snapshot_at_the_next_step_and_training_goes_on(tiny_task, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ENTRY), "train", *task_options(tiny_task, out), *TINY_MODEL,
                             "--epochs=50", "--batch_size_per_gpu=16", "--logging_steps=1", "--save_steps=100000",
                             "--data.eval_max_samples=8"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    metrics = out / "metrics.jsonl"

    def steps() -> int:
        return metrics.read_text().count('"train"') if metrics.is_file() else 0

    deadline = time.time() + 600
    while steps() < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    asked_at = steps()
    os.kill(proc.pid, signal.SIGUSR1)
    while not journal(out, "snapshot") or steps() < asked_at + 5:
        assert time.time() < deadline and proc.poll() is None, "no snapshot, or training stopped"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    (snap,) = journal(out, "snapshot")  # one, and not an epoch end's: an epoch here is 256 steps
    assert asked_at <= snap["step"] <= asked_at + 5 and snap["host"]["parts_gb"]["weights"] > 0
    assert f"memory snapshot at step {snap['step']}" in err


def can_mount_a_private_dev_shm() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /dev/shm"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_a_private_dev_shm(), reason="needs root and unshare to mount a private /dev/shm")
def test_a_small_dev_shm_costs_workers_not_the_run(tiny_task, tmp_path):
    """A container's /dev/shm is small (64 MB by default). Here 100 KB, mounted in a mount namespace of this test:
    batches of 128 rows (~60 KB each as they come, up to 160 KB at max_seq_len) from 2 workers x prefetch 2 do not
    fit. The guard reads the free space and starts without workers; with the guard off the same run never finishes
    (measured: the workers and the trainer wait on each other; elsewhere they die of a Bus error)."""
    def train(out, *extra, timeout=600):
        inner = " ".join([sys.executable, str(ENTRY), "train", *task_options(tiny_task, out), *TINY_MODEL,
                          "--max_steps=6", "--batch_size_per_gpu=128", "--data.num_workers=2",
                          "--data.eval_max_samples=8", *extra])
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               f"mount -t tmpfs -o size=100k tmpfs /dev/shm && exec {inner}"], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})

    started = time.monotonic()
    guarded = train(tmp_path / "guarded")
    assert guarded.returncode == 0, guarded.stderr[-3000:]
    (plan,) = [p for p in journal(tmp_path / "guarded", "plan") if "/dev/shm" in p["reason"]]
    assert plan["when"] == "before training" and plan["plan"]["num_workers"] < 2
    guarded_seconds = time.monotonic() - started
    try:  # the same run without the guard: given twice as long, and at least 30 s
        unguarded = train(tmp_path / "unguarded", "--memory.adaptive=false", timeout=max(30.0, 2 * guarded_seconds))
        assert unguarded.returncode != 0, "a /dev/shm too small for the batches in flight did no harm?"
    except subprocess.TimeoutExpired:
        pass  # stuck: the workers' batches do not fit (what the guard avoided)
    assert not (tmp_path / "unguarded" / "final").exists()
