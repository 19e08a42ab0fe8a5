"""The memory probe on fake /proc and cgroup trees (through its `root` seam), fake GPUs, and this real machine."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_train.config.memory import MemoryConfig
from lowmem_train.trainer.memory.policy import Plan, PolicyState, decide
from lowmem_train.trainer.memory.probe import PAGE_SIZE, MemoryProbe
from lowmem_train.trainer.memory.units import GB, MB, VECTOR_LENGTH, GpuReading, MemorySample

PID = 4242
V1_UNLIMITED = 9223372036854771712


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_host(root: Path, total_gb: float = 32, available_gb: float = 24, pswpout: int = 0) -> None:
    kb = lambda gb: int(gb * GB / 1024)  # noqa: E731
    write(root, "proc/meminfo", f"MemTotal: {kb(total_gb)} kB\nMemFree: 1000 kB\nMemAvailable: {kb(available_gb)} kB\n"
                                "SwapTotal: 2097152 kB\nSwapFree: 1048576 kB\n")
    write(root, "proc/vmstat", f"nr_free_pages 1\npswpin 0\npswpout {pswpout}\n")


def fake_process(root: Path, pid: int, rss: int, pss: int, children: tuple[int, ...] = ()) -> None:
    write(root, f"proc/{pid}/statm", f"9999 {rss // PAGE_SIZE} 0 0 0 0 0\n")
    write(root, f"proc/{pid}/smaps_rollup", f"00-ff ---p 0 00:00 0 [rollup]\nRss: {rss // 1024} kB\n"
                                            f"Pss: {pss // 1024} kB\n")
    write(root, f"proc/{pid}/task/{pid}/children", " ".join(map(str, children)))


def fake_cgroup_v1(root: Path, group: str, limit: int, usage: int, inactive: int = 0) -> None:
    write(root, "proc/self/cgroup", f"5:devices:/\n4:memory:{group}\n0::/\n")
    directory = f"sys/fs/cgroup/memory{group}"
    write(root, f"{directory}/memory.limit_in_bytes", f"{limit}\n")
    write(root, f"{directory}/memory.usage_in_bytes", f"{usage}\n")
    write(root, f"{directory}/memory.stat", f"cache 5\ntotal_cache 9\ntotal_inactive_file {inactive}\n")


def fake_cgroup_v2(root: Path, group: str, limit: str, current: int, inactive: int = 0, high: str = "max") -> None:
    write(root, "proc/self/cgroup", f"0::{group}\n")
    write(root, "sys/fs/cgroup/cgroup.controllers", "cpu memory pids\n")
    write(root, f"sys/fs/cgroup{group}/memory.max", f"{limit}\n")
    write(root, f"sys/fs/cgroup{group}/memory.high", f"{high}\n")
    write(root, f"sys/fs/cgroup{group}/memory.current", f"{current}\n")
    write(root, f"sys/fs/cgroup{group}/memory.stat", f"anon 1\nfile 2\nactive_file 3\ninactive_file {inactive}\n")


def no_gpu() -> GpuReading:
    return GpuReading()


def fake_probe(root: Path, environ: dict | None = None, **kwargs) -> MemoryProbe:
    if not (root / f"proc/{PID}").exists():
        fake_process(root, PID, rss=300 * MB, pss=200 * MB)
    return MemoryProbe(root=root, environ=environ or {}, read_gpu=kwargs.pop("read_gpu", no_gpu), pid=PID, **kwargs)


def test_cgroup_v1_limit_is_what_the_job_has_left_and_the_policy_sheds(tmp_path):
    fake_host(tmp_path, available_gb=24)
    fake_cgroup_v1(tmp_path, "/job/step_0", limit=4 * GB, usage=1 * GB)
    s = fake_probe(tmp_path).sample(step=10)
    assert (s.cgroup_limit, s.cgroup_usage, s.job_available, s.job_limit) == (4 * GB, GB, 3 * GB, 4 * GB)
    assert s.host_available == 24 * GB  # the machine has plenty: only the cgroup view tells the truth
    cfg = MemoryConfig(host_low_gb=3.5, host_headroom_gb=6, host_low_fraction=0.9, host_headroom_fraction=1.0)
    plan = Plan(8, 1, 4, False, 2, False)
    d = decide([s], plan, cfg, 1, PolicyState.initial(plan, cfg))
    assert d.plan.num_workers == 2 and d.reason == "job available 3.00 GB at peak < 3.50 GB: workers 4 -> 2"


def test_cgroup_v1_inactive_file_cache_is_not_counted_and_unlimited_is_none(tmp_path):
    fake_host(tmp_path)
    fake_cgroup_v1(tmp_path, "/job", limit=4 * GB, usage=3 * GB, inactive=2 * GB)  # 2 GB of reclaimable cache
    assert fake_probe(tmp_path).sample().job_available == 3 * GB
    fake_cgroup_v1(tmp_path, "/job", limit=V1_UNLIMITED, usage=GB)
    s = fake_probe(tmp_path).sample()
    assert (s.cgroup_limit, s.cgroup_usage, s.job_available) == (None, GB, 24 * GB)


def test_cgroup_v2_limit_memory_high_and_max_meaning_unlimited(tmp_path):
    fake_host(tmp_path)
    fake_cgroup_v2(tmp_path, "/slurm/job_7", limit=str(4 * GB), current=GB)
    assert fake_probe(tmp_path).sample().job_available == 3 * GB
    fake_cgroup_v2(tmp_path, "/slurm/job_7", limit=str(4 * GB), current=GB, high=str(2 * GB))  # throttled from 2 GB
    assert fake_probe(tmp_path).sample().cgroup_limit == 2 * GB
    fake_cgroup_v2(tmp_path, "/slurm/job_7", limit="max", current=GB, high="max")
    s = fake_probe(tmp_path).sample()
    assert (s.cgroup_limit, s.job_available) == (None, 24 * GB)


def test_cgroup_v2_limit_set_on_an_ancestor_group(tmp_path):
    fake_host(tmp_path)
    fake_cgroup_v2(tmp_path, "/job_7/step_0/task_0", limit="max", current=GB)
    write(tmp_path, "sys/fs/cgroup/job_7/memory.max", str(6 * GB))
    write(tmp_path, "sys/fs/cgroup/job_7/memory.current", str(2 * GB))
    s = fake_probe(tmp_path).sample()
    assert (s.cgroup_limit, s.cgroup_usage, s.job_available) == (6 * GB, 2 * GB, 4 * GB)


def test_container_whose_mount_root_is_its_own_group(tmp_path):
    fake_host(tmp_path)
    fake_cgroup_v1(tmp_path, "", limit=4 * GB, usage=GB)  # files at the mount root ...
    write(tmp_path, "proc/self/cgroup", "4:memory:/docker/0123abcd\n")  # ... while the name is the host's
    assert fake_probe(tmp_path).sample().job_available == 3 * GB


def test_no_cgroup_files_gives_host_figures_without_crashing(tmp_path):
    fake_host(tmp_path, total_gb=32, available_gb=24)
    probe = fake_probe(tmp_path)
    first = probe.sample()
    assert (first.host_total, first.host_available, first.job_available, first.job_limit) == (32 * GB, 24 * GB,
                                                                                            24 * GB, 32 * GB)
    assert (first.cgroup_limit, first.cgroup_usage, first.slurm_limit, first.budget) == (None,) * 4
    assert first.swap_used == GB and first.swap_out_rate is None  # no rate before a second sample
    fake_host(tmp_path, pswpout=1000)
    second = probe.sample()
    assert second.swapped_out == 1000 * PAGE_SIZE and second.swap_out_rate > 0 and second.swap_in_rate == 0
    assert MemoryProbe(root=tmp_path / "empty", environ={}, read_gpu=no_gpu).sample().tree_processes == 0


def test_budget_below_tree_pss_leaves_nothing_available(tmp_path):
    fake_host(tmp_path)
    fake_process(tmp_path, PID, rss=int(1.8 * GB), pss=int(1.5 * GB))
    assert fake_probe(tmp_path, budget_bytes=GB).sample().job_available == 0
    s = fake_probe(tmp_path, budget_bytes=2 * GB).sample()
    assert (s.budget, s.job_available, s.job_limit) == (2 * GB, GB // 2, 2 * GB)
    # Two ranks on the machine share the budget: each assumes the other is alike.
    assert fake_probe(tmp_path, {"LOCAL_WORLD_SIZE": "2"}, budget_bytes=4 * GB).sample().job_available == GB
    assert MemoryProbe.from_config(MemoryConfig(host_budget_gb=2), root=tmp_path, environ={}, read_gpu=no_gpu,
                                   pid=PID).budget == 2 * GB


def test_slurm_allocation_from_the_environment(tmp_path):
    fake_host(tmp_path)
    fake_process(tmp_path, PID, rss=GB, pss=GB)
    s = fake_probe(tmp_path, {"SLURM_MEM_PER_NODE": "4096"}).sample()
    assert (s.slurm_limit, s.job_available, s.job_limit) == (4 * GB, 3 * GB, 4 * GB)
    per_cpu = {"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_ON_NODE": "6"}
    assert fake_probe(tmp_path, per_cpu).sample().slurm_limit == 6 * GB
    assert fake_probe(tmp_path, {"SLURM_MEM_PER_NODE": "0"}).sample().slurm_limit is None  # --mem=0: whole node


def test_tree_sums_children_and_skips_vanished_ones(tmp_path):
    fake_host(tmp_path)
    fake_process(tmp_path, PID, rss=300 * MB, pss=200 * MB, children=(4243, 4244))
    fake_process(tmp_path, 4243, rss=100 * MB, pss=50 * MB)  # 4244 exited between the listing and the read
    s = fake_probe(tmp_path).sample()
    assert (s.tree_pss, s.tree_rss, s.tree_processes) == (250 * MB, 400 * MB, 2)


def test_pss_is_carried_forward_by_rss_and_reread_when_the_tree_changes(tmp_path):
    fake_host(tmp_path)
    fake_process(tmp_path, PID, rss=300 * MB, pss=200 * MB)
    probe = fake_probe(tmp_path, pss_refresh_seconds=3600)
    assert probe.sample().tree_pss == 200 * MB
    fake_process(tmp_path, PID, rss=400 * MB, pss=999 * MB)  # grew 100 MB; PSS not re-read yet
    assert probe.sample().tree_pss == 300 * MB
    fake_process(tmp_path, PID, rss=400 * MB, pss=290 * MB, children=(4243,))  # a worker forked: re-read all
    fake_process(tmp_path, 4243, rss=80 * MB, pss=30 * MB)
    assert probe.sample().tree_pss == 320 * MB


def test_fake_gpu_readings_reach_the_sample_and_the_policy(tmp_path):
    fake_host(tmp_path)

    def fake_gpu() -> GpuReading:  # our device: 40 GB, 2 GB free, 36 GB in our cache, a 37.5 GB peak
        return GpuReading(total=40 * GB, free=2 * GB, used=38 * GB, allocated=30 * GB, reserved=36 * GB,
                          peak=int(37.5 * GB))

    s = fake_probe(tmp_path, read_gpu=fake_gpu).sample()
    assert s.gpu_pressure == pytest.approx(37.5 / 38) and s.torch_max_allocated == int(37.5 * GB)
    cfg, plan = MemoryConfig(), Plan(16, 2, 2, True, 2, False)
    d = decide([s], plan, cfg, 4, PolicyState.initial(plan, cfg))
    assert (d.plan.micro_batch, d.plan.grad_accum) == (8, 4)
    assert d.reason.startswith("GPU peak 99% of the memory this rank can have > 92%")


def test_fake_gpu_worst_of_ranks_and_vector_round_trip(tmp_path):
    fake_host(tmp_path, available_gb=24)
    rank0 = fake_probe(tmp_path, read_gpu=lambda: GpuReading(40 * GB, 20 * GB, 20 * GB, 10 * GB, 19 * GB, 19 * GB))
    rank0 = rank0.sample(step=5)
    fake_host(tmp_path, available_gb=6)
    rank1 = fake_probe(tmp_path, read_gpu=lambda: GpuReading(40 * GB, 5 * GB, 35 * GB, 20 * GB, 25 * GB, 24 * GB))
    rank1 = rank1.sample(step=5)
    worst = MemorySample.worst([rank0, rank1])
    assert worst.job_available == 6 * GB and worst.host_available == 6 * GB
    assert (worst.gpu_free, worst.torch_reserved, worst.gpu_pressure) == (5 * GB, 25 * GB, 0.8)  # rank 1's device
    for s in (rank0, worst):
        vector = s.to_vector()
        assert len(vector) == VECTOR_LENGTH and all(isinstance(v, float) for v in vector)
        assert MemorySample.from_vector(vector) == s
    no_gpu = MemorySample.from_vector(fake_probe(tmp_path).sample().to_vector())
    assert no_gpu.gpu_total is None and no_gpu.gpu_pressure is None


def test_real_sample_on_this_machine_is_plausible():
    s = MemoryProbe().sample(step=3)
    assert 1 * GB < s.host_total < 64 * 1024 * GB and 0 < s.host_available <= s.host_total
    assert 10 * MB < s.tree_pss <= s.tree_rss < s.host_total and s.tree_processes >= 1
    assert 0 < s.job_available <= s.host_available and s.job_limit <= s.host_total
    assert s.tree_pss <= s.step_peak and s.job_available_at_peak <= s.job_available
    assert s.shm_free is None or s.shm_free > 0
    if Path("/sys/fs/cgroup/memory/memory.usage_in_bytes").exists() or Path("/sys/fs/cgroup/memory.current").exists():
        assert s.cgroup_usage is not None and s.cgroup_usage > 0  # the process's own group was found


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="expects a machine without a GPU")
def test_real_sample_on_a_machine_without_a_gpu_says_so():
    s = MemoryProbe().sample(step=3)
    assert s.gpu_total is None and s.gpu_pressure is None and s.torch_allocated is None
    assert "no GPU" in s.describe()


def test_tree_pss_includes_a_child_process_allocating_200_mb():
    probe = MemoryProbe(pss_refresh_seconds=0)
    before = probe.sample()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; b = b'x' * (200 << 20); print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        after = probe.sample()
    finally:
        child.communicate("")
    grown = (after.tree_pss - before.tree_pss) / MB
    assert after.tree_processes == before.tree_processes + 1
    assert 195 < grown < 240, f"tree PSS grew {grown:.0f} MB for a child holding 200 MB"
