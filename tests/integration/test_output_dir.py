"""One run per output_dir, with real training runs: a second run into a used folder is refused or continues it, an
overwrite moves the old run aside intact, and a checkpoint name that exists already is never silently skipped."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.helpers import TINY_MODEL, run_cli, task_options

pytestmark = pytest.mark.slow
COMMON = [*TINY_MODEL, "--batch_size_per_gpu=64", "--save_steps=5", "--keep_latest_n_ckp=10",
          "--data.eval_max_samples=8", "--logging_steps=5"]


def train(tiny_task, out, *extra: str, env: dict | None = None):
    return run_cli(["train", *task_options(tiny_task, out), *COMMON, *extra], env=env)


def steps_of(folder) -> list[str]:
    return sorted(p.name for p in (folder / "checkpoints").glob("step_*"))


def tree_hash(folder: Path) -> dict[str, str]:
    """Every path under `folder` -> the hash of its bytes ("dir" for a folder): equal before and after means the
    folder was left byte for byte as it was (nothing written, added, moved or removed)."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def refused(tiny_task, out: Path, *extra: str) -> str:
    """Run a start that must be refused (exit 2, one line, no traceback) and leave `out` untouched; its error line."""
    before = tree_hash(out)
    run = train(tiny_task, out, *extra)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-2000:]
    assert tree_hash(out) == before, "a refused start changed the folder"
    return errors[0]


def test_second_run_into_a_used_folder_refuses_overwrites_aside_or_resumes(tiny_task, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_task, out, "--seed=1", "--max_steps=10")
    assert first.returncode == 0, first.stderr[-3000:]
    assert steps_of(out) == ["step_00000005", "step_00000010"]
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))

    assert "newest checkpoint step_00000010" in refused(tiny_task, out, "--seed=2", "--max_steps=20")
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # not even touched
    # A resume that would change the model is refused as well, and leaves the folder as it was too.
    assert "--model.d_model (64 -> 128)" in refused(tiny_task, out, "--seed=1", "--max_steps=20",
                                                    "--is_keep_training=auto", "--model.d_model=128")

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


def test_traces_without_a_complete_checkpoint_are_refused_by_default_and_kept_intact(tiny_task, tmp_path):
    """A run killed inside its first save (the kill-in-save seam) leaves traces and no complete checkpoint. A start
    with the default --is_keep_training=False is refused there, naming them, and leaves them byte for byte; starting
    fresh instead would mix the old run's logs into the new one's."""
    out = tmp_path / "run"
    killed = train(tiny_task, out, "--max_steps=10", env={"LOWMEM_FAULT_KILL_IN_SAVE": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list((out / "checkpoints").glob(".step_00000005.tmp")) and not steps_of(out)
    line = refused(tiny_task, out, "--max_steps=10")
    assert "holds traces of a run (" in line and "metrics.jsonl" in line and "checkpoints" in line, line


def test_keep_training_true_on_an_empty_folder_starts_fresh_with_a_warning(tiny_task, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    run = train(tiny_task, out, "--max_steps=5", "--is_keep_training=True")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"--is_keep_training: no complete checkpoint in {out / 'checkpoints'}, starting fresh" in run.stderr
    assert steps_of(out) == ["step_00000005"] and not (out / "previous_runs").exists()
