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
    out = tmp_path / "run"
    # A budget a little above the run without workers: with 2 workers the job is short of memory, so the guard
    # drops them mid-epoch (an emergency) and the report has a plan change to mark.
    train = run_cli(["train", *task_options(tiny_task, out), *TINY_MODEL, "--validation_file=", "--max_steps=24",
                     "--memory.probe_every=1", "--data.num_workers=2", "--memory.host_budget_gb=1.3",
                     "--logging_steps=4", "--force=true"])
    assert train.returncode == 0, train.stderr[-3000:]
    records = [json.loads(line) for line in (out / "memory.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "sample" for r in records) == 24
    result = run_cli(["report", f"--run_dir={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    png = out / "memory_report.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    assert "24 samples, steps 1..24" in result.stdout and "peak tree PSS" in result.stdout
    plans = [r for r in records if r["kind"] == "plan"]
    assert f"plan changes       {len(plans) or 'none'}" in result.stdout
    for plan in plans:
        assert plan["reason"] in result.stdout
