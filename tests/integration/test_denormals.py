"""Denormal floats are flushed to zero in every thread that computes a training step (trainer/denormals.py), and
the process's setting is left as found when training in-process ends. Each case runs in a fresh interpreter:
whether torch's thread pool already exists decides the outcome."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY_MODEL

PROBE = "from lowmem_train.trainer.denormals import flushes; PARALLEL = 1 << 22\n"


def run_python(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE + code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_probe_sees_flushing_in_every_thread_or_none():
    assert run_python("import json; print(json.dumps(flushes(PARALLEL)))") == 0.0  # the CPU's default
    got = run_python("from lowmem_train.trainer.denormals import flush_denormals\nwas_on, warning = flush_denormals()\n"
                     "import json; print(json.dumps([was_on, warning, flushes(PARALLEL)]))")
    assert got == [False, None, 1.0]


def test_a_thread_pool_started_before_is_reported():
    got = run_python("from lowmem_train.trainer.denormals import flush_denormals\n"
                     "import torch; torch.ones(PARALLEL).sum()\nwas_on, warning = flush_denormals()\n"
                     "import json; print(json.dumps([warning, flushes(PARALLEL)]))")
    assert got[1] < 1.0 and "thread pool started before" in got[0]


@pytest.mark.parametrize("flush", [True, False])
def test_training_steps_run_with_denormals_flushed(tiny_task, tmp_path, flush):
    """Set up as `train` does (every import first), then: does every intra-op thread flush? After fit, this
    thread's setting is back to what it was (off) for whoever called the trainer."""
    options = {"train_file": str(tiny_task["train"]), "validation_file": "", "tokenizer_dir": str(tiny_task["tokenizer"]),
               "output_dir": str(tmp_path / "run"), "max_steps": "2", "batch_size_per_gpu": "8",
               "flush_denormal": str(flush), **{o[2:].split("=")[0]: o.split("=")[1] for o in TINY_MODEL}}
    got = run_python(f"from lowmem_train.config.loader import build_config\n"
                     f"from lowmem_train.trainer.trainer import Trainer\n"
                     f"trainer = Trainer(build_config(None, {options!r}))\ntrainer.setup()\nin_steps = flushes(PARALLEL)\n"
                     f"trainer.setup = lambda: None  # done above\n"
                     f"trainer.fit()\nimport json; print(json.dumps([in_steps, flushes(1)]))")
    assert got == ([1.0, 0.0] if flush else [0.0, 0.0])
