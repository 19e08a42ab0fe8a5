"""bench/gpu_check.py on a machine without a GPU: the dry run, the no-GPU exit, and the verdicts on canned results.

The journal records below are as the product writes them into memory.jsonl (their reasons and effects copied from
runs on tests/gpu_node.py's simulated device); the first log line is trainer.describe's format."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import gpu_check
from bench.gpu_check_expect import (CHECKS, Row, exit_code, judge_estimate, judge_oom, judge_other_process,
                                    judge_speed, judge_zero2, oom_micro, render)
from tests.helpers import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"
GB = 2**30


def plan(step: int, when: str, reason: str, micro: int, accum: int) -> dict:
    return {"kind": "plan", "step": step, "time": 0.0, "when": when, "reason": reason,
            "plan": {"micro_batch": micro, "grad_accum": accum, "num_workers": 2, "pin_memory": False,
                     "prefetch_factor": 2, "gradient_checkpointing": False}}


def sample(step: int, pressure: float, peak: float = 2.4, used: float = 3.1) -> dict:
    return {"kind": "sample", "step": step, "gpu_total_gb": 80.0, "gpu_pressure": pressure, "gpu_free_gb": 0.1,
            "gpu_used_gb": used, "torch_reserved_gb": 2.5, "torch_peak_gb": peak}


def effect(step: int, text: str) -> dict:
    return {"kind": "effect", "step": step, "time": 0.0, "effect": text}


OOM = plan(0, "for the rest of this step", "out of memory (retry 1/3): micro-batch 40000 -> 20000, grad_accum 1 -> 2 "
                                           "(global batch 40000 kept)", 20000, 2)
SHRINK = plan(30, "for the next epoch", "GPU peak 95% of the memory this rank can have > 92%: micro-batch 512 -> 256, "
                                        "grad_accum 1 -> 2", 256, 2)
HELPER = {"held_gb": 74.2, "after_step": 2, "run_peak_gb": 2.4, "run_reserved_gb": 2.5, "free_before_gb": 76.0,
          "free_after_gb": 0.03}
FIRST_LINE = ("2027-01-01 10:00:00 t5 runs/zero2, 60.51M parameters; 2 process(es) on cuda:0 (DEEPSPEED); DeepSpeed "
              "ZeRO-2 + optimizer offload to CPU; precision bf16; {n} CPU threads per rank ({why})")


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, **env})


def test_dry_run_lists_every_check_with_its_commands_and_expectation():
    done = run_script("--dry-run")
    assert done.returncode == 0, done.stderr
    sections = done.stdout.split("\n[")[1:]
    assert [s.split("]", 1)[1].split()[0] for s in sections] == [c.name for c in CHECKS]
    wanted = {"speed": ["train_low_mem.py train", "gpu_check_children.py torch", "--deepspeed_config=none"],
              "zero2": ["accelerate launch --config_file $REPO/accelerate_configs/multi_gpu_zero2_offload.yaml "
                        "--num_processes 2", "train_low_mem.py train"],
              "oom": ["gpu_check_children.py probe", "train_low_mem.py train", "--force"],
              "estimate": ["train_low_mem.py estimate", "train_low_mem.py train"],
              "other_process": ["gpu_check_children.py hog", "train_low_mem.py train", "--train_file=data/small"]}
    for check, text in zip(CHECKS, sections):
        assert f"expect: {check.expect}" in text and "why: " in text
        for fragment in wanted[check.name]:
            assert fragment in text, (check.name, fragment)
    assert "LOWMEM_FAULT" not in done.stdout


def test_only_picks_checks_by_name_or_number_and_refuses_unknown_ones():
    done = run_script("--dry-run", "--only", "1,oom")
    headings = [s.split(":", 1)[0] for s in done.stdout.split("\n[")[1:]]
    assert done.returncode == 0 and headings == ["1] speed (1 GPU)", "2] oom (1 GPU)"], headings
    assert run_script("--dry-run", "--only", "speeed").returncode == 2


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path):
    done = run_script("--work_dir", str(tmp_path / "w"), CUDA_VISIBLE_DEVICES="")  # no device, even on a GPU machine
    assert done.returncode == 2, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1 and "no NVIDIA GPU" in done.stdout
    assert not (tmp_path / "w").exists()  # nothing was run, nothing written


def test_speed_bound():
    assert judge_speed(930.0, 1000.0).ok and not judge_speed(880.0, 1000.0).ok


def test_zero2_threads_per_rank_where_cores_allow():
    line = FIRST_LINE.format(n=8, why="16 usable cores / 2 process(es) on this machine")
    row = judge_zero2(line, 0, 16)
    assert row.ok and "8 CPU threads per rank (16 usable cores / 2 process(es) on this machine)" in row.measured
    assert "ZeRO-2 + optimizer offload to CPU" in row.measured
    one = FIRST_LINE.format(n=1, why="2 usable cores / 2 process(es) on this machine")
    assert not judge_zero2(one, 0, 16).ok  # one thread although 16 cores: issue 19 item 4 is back
    assert judge_zero2(one, 0, 3).ok  # 3 cores for 2 ranks: one each is all there is
    assert not judge_zero2(line, 1, 16).ok and not judge_zero2(None, 0, 16).ok
    assert not judge_zero2(line.replace("ZeRO-2 + optimizer offload to CPU", "plain Accelerate (no DeepSpeed)"), 0, 16).ok


def test_oom_recovered_in_place_passes_and_the_other_outcomes_fail():
    assert judge_oom([sample(1, 0.5), OOM, sample(2, 0.6)], 0, 40000).ok
    assert not judge_oom([sample(1, 0.5)], 0, 40000).ok  # the forward fit: nothing was provoked
    in_backward = plan(0, "at the next start", "out of memory in backward with a micro-batch of 40000 at step 0: "
                                               "out of memory (retry 1/3): micro-batch 40000 -> 20000", 20000, 2)
    row = judge_oom([in_backward], 6, 40000)
    assert not row.ok and "exit 6" in row.measured
    changed = dict(OOM, plan=dict(OOM["plan"], grad_accum=1))
    assert not judge_oom([changed], 0, 40000).ok  # global batch 20000: not kept
    assert not judge_oom([dict(OOM, step=3)], 0, 40000).ok  # not the first forward


def test_estimate_band():
    assert judge_estimate(3.8, [sample(5, 0.5, peak=2.4), sample(10, 0.5, peak=2.5)], 0).ok  # 0.66x
    assert not judge_estimate(2.0, [sample(5, 0.5, peak=2.4)], 0).ok  # the run needed more than the estimate
    assert not judge_estimate(8.0, [sample(5, 0.5, peak=2.4)], 0).ok  # 0.3x: it would refuse runs that fit
    assert not judge_estimate(None, [sample(5, 0.5)], 0).ok and not judge_estimate(3.8, [], 0).ok


def test_other_process_shrink_kept_passes_and_an_undone_one_fails():
    kept = [sample(2, 0.4), sample(4, 0.95), SHRINK, effect(32, "micro-batch 512 -> 256, grad_accum 1 -> 2 saved "
                                                                "0.61 GB of peak"), sample(32, 0.7)]
    row = judge_other_process(kept, 0, HELPER, 512)
    assert row.ok and "micro-batch 512 -> 256" in row.measured and "saved 0.61 GB" in row.measured
    undone = kept[:3] + [effect(32, "micro-batch 512 -> 256, grad_accum 1 -> 2 saved 10.0 MB of peak < 50.0 MB: "
                                    "undone"), plan(32, "now, mid-epoch", "undone", 512, 1)]
    assert not judge_other_process(undone, 0, HELPER, 512).ok
    assert not judge_other_process(kept, 1, HELPER, 512).ok
    assert not judge_other_process(kept, 0, None, 512).ok  # the helper never allocated
    slack = judge_other_process([sample(4, 0.85)], 0, dict(HELPER, run_reserved_gb=2.9), 512)
    assert not slack.ok and "nothing could make it short" in slack.measured


def test_oom_micro_batch_from_the_probe():
    probe = {"base": GB, "free": 70 * GB, "total": 80 * GB, "rows": 200000, "oom_at": 65536,
             "fits": [[1024, 1.5 * GB], [2048, 2.5 * GB], [32768, 32.5 * GB]]}
    micro = oom_micro(probe)
    assert micro % 8 == 0 and 1.4 * 70 * 1024 <= micro < 1.4 * 70 * 1024 + 8  # slope 1 GB per 1024 rows
    assert oom_micro(dict(probe, oom_at=None)) is None  # no forward ran out of memory
    assert oom_micro(dict(probe, free=200 * GB)) is None  # more rows than the task has


def test_table_and_exit_code():
    rows = [Row("speed", "0.95x", "ratio >= 0.9", True), Row("zero2", "1 GPU here", "...", None)]
    table = render(rows)
    assert table.splitlines()[0] == "| check | measured | expectation | result |"
    assert "| zero2 | 1 GPU here | ... | skipped |" in table and exit_code(rows) == 0
    assert exit_code(rows + [Row("oom", "no out-of-memory plan change", "...", False)]) == 1


def test_a_failing_expectation_makes_the_script_exit_non_zero(tmp_path, monkeypatch, capsys):
    """main() end to end with the device and the runs replaced: one failed check -> exit 1, the table printed,
    the work folder kept with its logs."""
    monkeypatch.setattr(gpu_check, "detect_gpus", lambda: ([{"name": "Fake", "total_gb": 80.0, "cc": [9, 0]}], ["0"], ""))
    monkeypatch.setattr(gpu_check, "run", lambda ctx, tag, cmd, *a, **k: gpu_check.Done(
        0, gpu_check.MARK + '{"longest": 10}\n', ""))
    monkeypatch.setattr(gpu_check, "RUNNERS", {
        "speed": lambda ctx: judge_speed(800.0, 1000.0),
        "oom": lambda ctx: judge_oom([OOM], 0, 40000)})
    code = gpu_check.main(["--only", "speed,oom,zero2", "--work_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "| speed | lowmem-train 800 samples/s, bare torch loop 1,000: 0.80x" in out and "| FAIL |" in out
    assert "| zero2 | 1 GPU here, 2 needed |" in out and "| oom |" in out and "| time |" in out


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
def test_every_check_has_a_runner(check):
    assert check.name in gpu_check.RUNNERS
