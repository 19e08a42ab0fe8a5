"""The memory snapshot by part: tensor bytes of a real model + AdamW, totals through the probe's /proc seam."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowmem_train.config.loader import build_config
from lowmem_train.model.build import build_model
from lowmem_train.trainer.memory.probe import PAGE_SIZE, MemoryProbe
from lowmem_train.trainer.memory.units import GB, GpuReading
from lowmem_train.trainer.memory.snapshot import WORKERS, memory_snapshot, tally_parts

PID = 4242


class VocabOnly:
    pad_token_id, eos_token_id, bos_token_id = 0, 1, 3

    def __len__(self) -> int:
        return 64


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_proc(root: Path, pss: dict[int, int]) -> MemoryProbe:
    """A /proc with a training process PID (and children) of the given PSS, on a 32 GB host."""
    write(root, "proc/meminfo", f"MemTotal: {32 * GB // 1024} kB\nMemAvailable: {24 * GB // 1024} kB\n")
    write(root, "proc/vmstat", "pswpin 0\npswpout 0\n")
    for pid, value in pss.items():
        write(root, f"proc/{pid}/statm", f"9999 {value // PAGE_SIZE} 0 0 0 0 0\n")
        write(root, f"proc/{pid}/smaps_rollup", f"Rss: {value // 1024} kB\nPss: {value // 1024} kB\n")
        children = [c for c in pss if c != PID] if pid == PID else []
        write(root, f"proc/{pid}/task/{pid}/children", " ".join(map(str, children)))
    return MemoryProbe(root=root, pid=PID, environ={}, read_gpu=GpuReading)


def trained_model_and_optimizer(zero_grad: bool, device: str = "cpu"):
    cfg = build_config("t5_tiny")
    model = build_model(cfg, VocabOnly()).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(5, 64, (4, 8), device=device)
    model(input_ids=ids, decoder_input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_parts_are_the_tensors_each_counted_once():
    model, optimizer = trained_model_and_optimizer(zero_grad=False)
    tally = tally_parts(model, optimizer)
    weights = param_bytes(model)
    assert tally.get("host", "weights") == weights  # the tied embedding / lm_head weight once
    assert tally.get("host", "gradients") == weights
    steps = sum(s["step"].untyped_storage().nbytes() for s in optimizer.state.values())
    assert tally.get("host", "optimizer state") == 2 * weights + steps  # exp_avg + exp_avg_sq (+ step counters)


CHILD = r"""
import json, sys, torch
from lowmem_train.trainer.memory.snapshot import memory_snapshot
print("baseline", flush=True); sys.stdin.readline()
model = torch.nn.Linear(4096, 4096, bias=False)  # 64 MiB of weights
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(torch.ones(2, 4096)).sum().backward()
optimizer.step()
optimizer.zero_grad(set_to_none=True)  # as between two training steps
print("allocated", flush=True); sys.stdin.readline()
snap = memory_snapshot(model, optimizer, step=1)
print(json.dumps(snap.to_record()), flush=True)
"""


def test_parts_match_allocations_of_known_size_measured_from_outside():
    """A process allocates 64 MiB of weights and, through AdamW, 128 MiB of moments. Its PSS measured from outside
    (psutil, from this process) grows by what the snapshot's parts say, and its total is the outside figure."""
    import subprocess
    import sys

    import psutil

    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pss = []
        for expected in ("baseline", "allocated"):
            assert child.stdout.readline().strip() == expected
            pss.append(psutil.Process(child.pid).memory_full_info().pss)
            child.stdin.write("\n")
            child.stdin.flush()
        record = json.loads(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
    host, mib = record["host"], 2**20 / 2**30
    assert abs(host["parts_gb"]["weights"] - 64 * mib) < 1e-3
    assert abs(host["parts_gb"]["optimizer state"] - 128 * mib) < 1e-3  # exp_avg + exp_avg_sq (+ a step counter)
    assert host["parts_gb"]["gradients"] == 0  # freed between steps
    grown = (pss[1] - pss[0]) / 2**30
    # The parts are real memory: all 192 MiB of them show in the growth seen from outside, which holds besides only
    # what the allocator may keep of the freed 64 MiB gradient (and 10% of noise).
    assert 192 * mib <= grown <= (192 + 64) * mib * 1.10, grown / mib
    assert abs(host["current_gb"] / (pss[1] / 2**30) - 1) < 0.05  # the total is what an observer sees


def test_peak_comes_from_the_guards_samples(tmp_path):
    model, optimizer = trained_model_and_optimizer(zero_grad=True)
    probe = fake_proc(tmp_path, {PID: 1 * GB})
    earlier = fake_proc(tmp_path / "b", {PID: 3 * GB}).sample(3)
    snap = memory_snapshot(model, optimizer, probe=probe, samples=[earlier])
    assert snap.pools[0].peak == 3 * GB and snap.pools[0].current == 1 * GB


def test_workers_are_a_part_and_earn_a_tip(tmp_path, monkeypatch):
    model, optimizer = trained_model_and_optimizer(zero_grad=True)
    probe = fake_proc(tmp_path, {PID: 1 * GB, PID + 1: GB // 2, PID + 2: GB // 2})
    # The snapshot subtracts this process's own PSS (read from the real /proc/self) from the tree's.
    monkeypatch.setattr("lowmem_train.trainer.memory.snapshot.process_pss", lambda: 1 * GB)
    snap = memory_snapshot(model, optimizer, probe=probe)
    host = snap.pools[0]
    assert host.parts[WORKERS] == 1 * GB
    assert sum(host.parts.values()) == host.current == 2 * GB
    assert any("--data.num_workers" in tip for tip in snap.tips), snap.tips


def test_large_optimizer_state_earns_a_tip(tmp_path):
    model, optimizer = trained_model_and_optimizer(zero_grad=True)
    # A total barely above the tensors: the optimizer's 2x weights are most of it.
    total = int(3.2 * param_bytes(model))
    snap = memory_snapshot(model, optimizer, probe=fake_proc(tmp_path, {PID: total}))
    assert snap.pools[0].share("optimizer state") > 0.4
    assert any(tip.startswith("optimizer state is") and "ZeRO-2" in tip for tip in snap.tips), snap.tips


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_pool_adds_up():
    model, optimizer = trained_model_and_optimizer(zero_grad=True, device="cuda")
    snap = memory_snapshot(model, optimizer)
    gpu = snap.pools[1]
    assert sum(gpu.parts.values()) == gpu.current
