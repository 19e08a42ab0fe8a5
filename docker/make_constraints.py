"""Write docker/constraints.txt: the exact versions of lowmem-train's runtime dependency tree, read from the
environment this runs in (the venv the tests pass in), so the image runs the stack the tests ran on.

    .venv/bin/python docker/make_constraints.py        # after changing dependencies; commit the result

Dev-only tools (pytest, hypothesis, linters) are left out: only what `lowmem-train` itself requires,
recursively, plus the tools that build DeepSpeed's ops (setuptools, ninja) and pip itself.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT_PROJECT = "lowmem-train"
BUILD_TOOLS = ("pip", "setuptools", "ninja")
OUT = Path(__file__).resolve().parent / "constraints.txt"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure() -> dict[str, md.Distribution]:
    dists = {norm(d.metadata["Name"]): d for d in md.distributions()}
    env = dict(default_environment(), extra="")
    found: dict[str, md.Distribution] = {}
    todo = [ROOT_PROJECT, *BUILD_TOOLS]
    while todo:
        name = norm(todo.pop())
        if name in found:
            continue
        if name not in dists:
            sys.exit(f"{name} is required but not installed here: run this in the venv the tests use")
        found[name] = dists[name]
        for line in dists[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    del found[ROOT_PROJECT]
    return found


def main() -> None:
    lines = []
    for name, dist in sorted(runtime_closure().items()):
        version = dist.version.split("+")[0]  # torch 2.13.0+cpu -> 2.13.0: the CPU and the CUDA build both match
        lines.append(f"{dist.metadata['Name']}=={version}")
    header = (
        "# lowmem-train's runtime stack, exact versions of the venv the tests pass in (written by\n"
        "# docker/make_constraints.py; dev-only tools left out). The image installs exactly these.\n"
    )
    OUT.write_text(header + "\n".join(lines) + "\n")
    print(f"{OUT}: {len(lines)} pins")


if __name__ == "__main__":
    main()
