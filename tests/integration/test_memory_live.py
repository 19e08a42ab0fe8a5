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
    # (That the high-water mark sees what comes and goes between two samples: test_memory_probe.py, with a real
    # allocation of known size; here the allocator keeps most freed pages, so samples between steps come close.)


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
