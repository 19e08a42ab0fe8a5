"""CPU threads per rank (trainer/threads.py): the launchers' default of one thread is not the user's choice."""

from __future__ import annotations

from pathlib import Path

from lowmem_train.trainer.threads import cgroup_cpu_quota, threads_per_rank, usable_cores


def test_the_launchers_one_thread_becomes_this_ranks_share_of_the_cores():
    # accelerate launch (without --cpu) and torchrun write OMP_NUM_THREADS=1 into every rank when it was unset
    assert threads_per_rank(0, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "8"}, 64) == (
        8, "64 usable cores / 8 process(es) on this machine")
    assert threads_per_rank(0, {}, 6)[0] == 6  # one process, nothing set: every core
    assert threads_per_rank(0, {"LOCAL_WORLD_SIZE": "4"}, 2)[0] == 1  # never 0


def test_what_the_user_chose_wins():
    assert threads_per_rank(0, {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "8"}, 64) == (3, "OMP_NUM_THREADS")
    assert threads_per_rank(1, {"OMP_NUM_THREADS": "16", "LOCAL_WORLD_SIZE": "8"}, 64) == (1, "--cpu_threads")


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_quota_caps_the_usable_cores(tmp_path):
    v2 = tmp_path / "v2"
    write(v2, "proc/self/cgroup", "0::/job\n")
    write(v2, "sys/fs/cgroup/job/cpu.max", "250000 100000\n")  # docker run --cpus 2.5
    assert cgroup_cpu_quota(v2) == 2.5
    assert usable_cores(v2)[0] == min(2, usable_cores(tmp_path / "nothing")[0])
    write(v2, "sys/fs/cgroup/job/cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    write(v1, "proc/self/cgroup", "4:cpu,cpuacct:/slurm/job_7\n3:memory:/slurm/job_7\n")
    write(v1, "sys/fs/cgroup/cpu,cpuacct/slurm/job_7/cpu.cfs_quota_us", "400000\n")
    write(v1, "sys/fs/cgroup/cpu,cpuacct/slurm/job_7/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(v1) == 4.0
    write(v1, "sys/fs/cgroup/cpu,cpuacct/slurm/job_7/cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(v1) is None
