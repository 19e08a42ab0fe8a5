"""An installed package, not a checkout: `pip install` of the wheel gives the `lowmem-train` command, which finds its
presets, DeepSpeed configs and launcher configs inside the package and trains from any directory."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_MODEL, task_options

pytestmark = pytest.mark.slow


def run(cmd: list, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**env, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, (cmd, result.stdout[-2000:], result.stderr[-3000:])
    return result


def test_the_installed_wheel_trains_from_another_directory(tiny_task, tmp_path, deepspeed_ops):
    import shutil

    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    source = tmp_path / "source"
    top_level = {".git", ".venv", "data", "out", "build", "bench", "docker"}  # not trainer/data: only at the root
    everywhere = shutil.ignore_patterns("__pycache__", "*.egg-info")

    def ignore(folder, names):
        return set(everywhere(folder, names)) | (top_level & set(names) if Path(folder) == REPO else set())

    shutil.copytree(REPO, source, ignore=ignore)
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source], tmp_path)
    (wheel,) = dist.glob("lowmem_train-*.whl")

    # A fresh environment. Its dependencies (torch & co., gigabytes) are borrowed from this one through a path
    # entry, which adds the folder but does not run the .pth files in it: this checkout's editable install of
    # lowmem_train stays out, so the only lowmem_train there is the wheel's.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path)
    (deps,) = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    (next((venv / "lib").glob("python*")) / "site-packages" / "borrowed_deps.pth").write_text(deps + "\n")
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel], tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([venv / "bin" / "python", "-c", "import lowmem_train.trainer.backend as b; print(b.__file__)"],
                elsewhere).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's code, not this checkout's
    helped = run([venv / "bin" / "lowmem-train", "train", "--help"], elsewhere)
    assert "--memory.probe_every" in helped.stdout
    estimated = run([venv / "bin" / "lowmem-train", "estimate", "--config", "t5_small", "--num_processes", "2",
                     f"--tokenizer_dir={tmp_path / 'none'}"], elsewhere)  # a shipped preset, a shipped DeepSpeed file
    assert "zero2_offload.json" in estimated.stdout

    out = tmp_path / "run"
    trained = run([venv / "bin" / "lowmem-train", "train", *task_options(tiny_task, out), *TINY_MODEL,
                   "--max_steps=5", "--batch_size_per_gpu=32", "--data.eval_max_samples=8",
                   "--deepspeed_config=zero2_offload"], elsewhere)  # a packaged name, not a path
    assert "DeepSpeed ZeRO-2 + optimizer offload to CPU" in trained.stderr
    assert (out / "checkpoints" / "step_00000005" / "train_state.json").is_file()
    assert (out / "final" / "model.safetensors").is_file()
