"""The output directory contract (trainer/run_folder.py), decided from the folder alone: resume, start fresh, move
an earlier run aside, or refuse in one line. Real training runs of the same contract: test_output_dir.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowmem_train.config.errors import ConfigError
from lowmem_train.config.loader import build_config
from lowmem_train.trainer import run_folder


def checkpoint(out: Path, step: int) -> Path:
    """A complete checkpoint as files.read_checkpoint reads it (metadata only)."""
    path = out / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "train_state.json").write_text(json.dumps({"train_state": {"step": step}, "config": {}, "files": {}}))
    return path


def cfg(out: Path, **options):
    return build_config(None, {"output_dir": str(out), **options})


def snapshot(out: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(out)), p.stat().st_mtime_ns) for p in out.rglob("*"))


def test_a_fresh_run_into_a_used_folder_is_refused_in_one_line_and_nothing_changes(tmp_path):
    out = tmp_path / "run"
    checkpoint(out, 5)
    checkpoint(out, 10)
    (out / "metrics.jsonl").write_text("{}\n")
    before = snapshot(out)
    with pytest.raises(ConfigError) as refused:
        run_folder.plan_start(cfg(out))
    line = str(refused.value)
    assert "\n" not in line and "newest checkpoint step_00000010" in line
    for way_out in ("--is_keep_training=True (or auto)", "another --output_dir", "--overwrite_output_dir=True"):
        assert way_out in line
    assert snapshot(out) == before


@pytest.mark.parametrize("mode", ["true", "auto"])
def test_resume_takes_the_newest_complete_checkpoint(tmp_path, mode):
    out = tmp_path / "run"
    checkpoint(out, 5)
    checkpoint(out, 10)
    (out / "checkpoints" / ".step_00000015.tmp").mkdir()  # a save that never finished
    plan = run_folder.plan_start(cfg(out, is_keep_training=mode))
    assert plan.resume.state.step == 10 and not plan.move_aside


def test_auto_starts_fresh_in_an_empty_or_missing_folder(tmp_path):
    for out in (tmp_path / "missing", tmp_path):
        plan = run_folder.plan_start(cfg(out, is_keep_training="auto"))
        assert plan.resume is None and not plan.move_aside and not plan.note


def test_traces_without_a_checkpoint_are_moved_aside_not_mixed_in(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".step_00000005.tmp").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"kind": "train"}\n')
    (out / "notes.txt").write_text("the user's own")
    plan = run_folder.plan_start(cfg(out, is_keep_training="auto"))
    assert plan.resume is None and sorted(p.name for p in plan.move_aside) == ["checkpoints", "metrics.jsonl"]
    where = run_folder.move_aside(out, plan.move_aside)
    assert where.parent == out / "previous_runs"
    assert (where / "metrics.jsonl").read_text() == '{"kind": "train"}\n' and (where / "checkpoints").is_dir()
    assert (out / "notes.txt").is_file() and not (out / "metrics.jsonl").exists()


def test_overwrite_moves_the_old_run_aside_twice_without_clobbering(tmp_path):
    out = tmp_path / "run"
    for _ in range(2):
        checkpoint(out, 10)
        plan = run_folder.plan_start(cfg(out, overwrite_output_dir="true"))
        assert plan.resume is None and [p.name for p in plan.move_aside] == ["checkpoints"]
        run_folder.move_aside(out, plan.move_aside)
    moved = sorted((out / "previous_runs").iterdir())
    assert len(moved) == 2 and all((m / "checkpoints" / "step_00000010" / "train_state.json").is_file() for m in moved)


def architecture_only(folder):
    """A model folder as far as the config goes (config.json of a tiny T5): enough to resolve the shape."""
    from transformers import T5Config

    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64).save_pretrained(str(folder))
    return folder


def test_fine_tuning_into_the_folder_it_reads_is_refused(tmp_path):
    out = tmp_path / "run"
    architecture_only(out / "final")
    with pytest.raises(ConfigError, match="a fine-tuning run needs a folder of its own"):
        run_folder.plan_start(cfg(out, is_finetune="true", overwrite_output_dir="true"))


def test_resume_options_that_contradict_each_other_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--overwrite_output_dir starts a fresh run"):
        build_config(None, {"is_keep_training": "auto", "overwrite_output_dir": "true"})
    model = architecture_only(tmp_path / "model")
    assert build_config(None, {"is_keep_training": "auto", "is_finetune": "true",
                               "finetune_from": str(model)}).is_keep_training == "auto"
