"""One run per output_dir, with real training runs: a second run into a used folder is refused or continues it, an
overwrite moves the old run aside intact, and a checkpoint name that exists already is never silently skipped."""

from __future__ import annotations

import json

import pytest

from tests.helpers import TINY_MODEL, run_cli, task_options

pytestmark = pytest.mark.slow
COMMON = [*TINY_MODEL, "--batch_size_per_gpu=64", "--save_steps=5", "--keep_latest_n_ckp=10",
          "--data.eval_max_samples=8", "--logging_steps=5"]


def train(tiny_task, out, *extra: str):
    return run_cli(["train", *task_options(tiny_task, out), *COMMON, *extra])


def steps_of(folder) -> list[str]:
    return sorted(p.name for p in (folder / "checkpoints").glob("step_*"))


def test_second_run_into_a_used_folder_refuses_overwrites_aside_or_resumes(tiny_task, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_task, out, "--seed=1", "--max_steps=10")
    assert first.returncode == 0, first.stderr[-3000:]
    assert steps_of(out) == ["step_00000005", "step_00000010"]
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))

    refused = train(tiny_task, out, "--seed=2", "--max_steps=20")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "newest checkpoint step_00000010" in errors[0], refused.stderr[-2000:]
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # untouched

    resumed = train(tiny_task, out, "--seed=1", "--max_steps=15", "--is_keep_training=auto")
    assert resumed.returncode == 0 and "resumed from step_00000010" in resumed.stderr, resumed.stderr[-2000:]
    assert steps_of(out) == ["step_00000005", "step_00000010", "step_00000015"]

    second = train(tiny_task, out, "--seed=2", "--max_steps=20", "--overwrite_output_dir=True")
    assert second.returncode == 0, second.stderr[-3000:]
    (old,) = (out / "previous_runs").iterdir()
    assert steps_of(old) == ["step_00000005", "step_00000010", "step_00000015"]  # the first run, intact
    assert steps_of(out) == ["step_00000005", "step_00000010", "step_00000015", "step_00000020"]  # none skipped
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    for ckpt in steps_of(out):  # every checkpoint in the folder is the second run's
        meta = json.loads((out / "checkpoints" / ckpt / "train_state.json").read_text())
        assert meta["config"]["seed"] == 2, ckpt


def test_a_checkpoint_that_did_not_read_back_is_replaced_not_skipped(tiny_task, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_task, out, "--max_steps=10").returncode == 0
    broken = out / "checkpoints" / "step_00000010" / "train_state.json"
    broken.write_text("{torn")
    again = train(tiny_task, out, "--max_steps=10", "--is_keep_training=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipping checkpoint step_00000010" in again.stderr and "resumed from step_00000005" in again.stderr
    assert "replacing" in again.stderr
    assert json.loads(broken.read_text())["train_state"]["step"] == 10  # written anew by the resumed run
