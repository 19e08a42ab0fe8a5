"""The `report` command: a PNG and a summary from a real run's memory.jsonl; one-line errors without one."""

from __future__ import annotations

import json

import pytest

from tests.helpers import TINY_MODEL, run_cli, task_options

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample_line(step: int, available: float, pss: float, **extra) -> dict:
    return {"kind": "sample", "step": step, "host_available_gb": available, "job_available_gb": available,
            "swap_used_gb": 0.0, "tree_pss_gb": pss, "sample": None, **extra}


def test_report_fails_in_one_line_without_a_run(tmp_path):
    missing = run_cli(["report", f"--run_dir={tmp_path / 'nope'}"])
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "does not exist" in missing.stderr
    no_journal = run_cli(["report", f"--run_dir={tmp_path}"])
    assert no_journal.returncode == 2 and "memory.jsonl not found" in no_journal.stderr
    (tmp_path / "memory.jsonl").write_text("")
    empty = run_cli(["report", f"--run_dir={tmp_path}"])
    assert empty.returncode == 2 and "no memory samples" in empty.stderr, empty.stderr
    assert "Traceback" not in missing.stderr + no_journal.stderr + empty.stderr


def test_report_of_a_written_journal_lists_plans_and_the_last_snapshot(tmp_path):
    lines = [sample_line(s, 20 - s / 10, 1 + s / 100) for s in range(1, 30)]
    lines.insert(10, {"kind": "plan", "step": 10, "when": "now, mid-epoch",
                      "reason": "host available 0.5 GB < emergency 0.75 GB: workers 2 -> 0 now", "plan": {}})
    lines.append({"kind": "snapshot", "step": 29, "rank": 0, "tips": ["lower --data.num_workers"],
                  "host": {"current_gb": 1.2, "peak_gb": 1.4, "parts_gb": {"weights": 0.2, "activations/other": 1.0},
                           "peak_parts_gb": {}}})
    (tmp_path / "memory.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{\"kind\": \"sam")  # torn last line
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 20, "samples_per_s": 90.0,
                                                        "micro_batch": 32}) + "\n")
    out = tmp_path / "plots" / "m.png"
    result = run_cli(["report", f"--run_dir={tmp_path}", f"--output={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "peak tree PSS      1.29 GB at step 29" in result.stdout
    assert "step 10 (now, mid-epoch): host available 0.5 GB" in result.stdout
    assert "host: 1.20 GB now" in result.stdout and "tip: lower --data.num_workers" in result.stdout


@pytest.mark.slow
def test_report_draws_a_real_run_with_plan_changes(tiny_task, tmp_path):
    """Host pressure from step 4 on (the one-rank seam, here on the only rank): the guard drops the workers now,
    then on this CPU run halves the micro-batch; the report marks and lists every change."""
    out = tmp_path / "run"
    train = run_cli(["train", *task_options(tiny_task, out), *TINY_MODEL, "--validation_file=", "--max_steps=24",
                     "--memory.probe_every=1", "--data.num_workers=2", "--batch_size_per_gpu=32", "--logging_steps=4"],
                    env={"LOWMEM_FAULT_HOST_AVAILABLE": "gb=0.01,from_step=4"})
    assert train.returncode == 0, train.stderr[-3000:]
    records = [json.loads(line) for line in (out / "memory.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "sample" for r in records) == 24
    plans = [r for r in records if r["kind"] == "plan"]
    assert plans[0]["step"] == 4 and "workers 2 -> 0 now" in plans[0]["reason"]
    assert any("micro-batch 32 -> 16" in p["reason"] for p in plans[1:])
    result = run_cli(["report", f"--run_dir={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    png = out / "memory_report.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    assert "24 samples, steps 1..24" in result.stdout and "peak tree PSS" in result.stdout
    assert f"plan changes       {len(plans)}" in result.stdout
    for plan in plans:
        assert plan["reason"] in result.stdout


def test_many_plan_changes_are_labelled_in_groups_that_do_not_overlap(tmp_path):
    """A change every step (an emergency under a tight budget) gets one label per cluster, not one per change."""
    from lowmem_train.trainer.memory.report import label_groups

    changes = [{"step": s, "reason": f"job available 0.05 GB < 0.07 GB: workers {s} -> 0 now"} for s in
               [*range(3, 30), 60, 61, 95]]
    groups = label_groups(changes, span=100)
    assert [(first, last) for first, last, _ in groups] == [(3, 29), (60, 61), (95, 95)]
    assert groups[0][2].startswith("27 changes, steps 3-29: ... workers 29 -> 0")
    lines = [sample_line(s, 20 - s / 10, 1 + s / 100) for s in range(1, 101)]
    lines += [{"kind": "plan", "plan": {}, "when": "now", **c} for c in changes]
    (tmp_path / "memory.jsonl").write_text("\n".join(map(json.dumps, sorted(lines, key=lambda r: r["step"]))) + "\n")
    result = run_cli(["report", f"--run_dir={tmp_path}"])
    assert result.returncode == 0 and (tmp_path / "memory_report.png").read_bytes()[:8] == PNG_MAGIC
    assert "plan changes       30" in result.stdout
