"""The layout holds: one home per concern, checked on the source itself (its syntax trees), so that a change
that puts a concern in a second place fails here instead of in a review.

    commands/            the only code that prints for the user or ends the process
    trainer/distributed  the only code that talks to other ranks
    model/families/      the only code that knows a family by name (besides the config, which lists them)
    trainer/compat       the only code that touches other libraries' private or internal APIs
and the package's imports form no cycle; the pure memory policy imports nothing that reads the machine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE_DIRS = {"commands": "commands", "config": "config", "model": "model", "trainer": "trainer"}


def modules() -> dict[str, Path]:
    """lowmem_train.* module name -> source file, for every module of the package."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join(["lowmem_train", package, *parts])
            found[name.removesuffix(".__init__")] = path
    return found


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def type_checking_blocks(module: ast.Module) -> set[int]:
    """ids of nodes under `if TYPE_CHECKING:` (imports for annotations only: never executed)."""
    skipped = set()
    for node in ast.walk(module):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    return skipped


def imports_of(name: str, path: Path) -> set[str]:
    """Modules this one imports (at module level or inside functions), type-checking imports aside."""
    module = tree(path)
    skipped = type_checking_blocks(module)
    found = set()
    for node in ast.walk(module):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def package_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports_of(name, path) if m in mods and m != name} for name, path in mods.items()}


def test_package_imports_have_no_cycle():
    graph = package_graph()
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return seen


def test_the_memory_policy_imports_nothing_that_reads_the_machine():
    mods, graph = modules(), package_graph()
    reach = closure(graph, "lowmem_train.trainer.memory.policy")
    assert "lowmem_train.trainer.memory.probe" not in reach
    outside = set().union(*(imports_of(m, mods[m]) for m in reach))
    readers = {"os", "psutil", "pynvml", "torch", "resource", "subprocess", "lowmem_train.trainer.memory.probe"}
    # The config's lazy look-up of family names walks the package folder (pkgutil), nothing of the machine.
    assert not {m.split(".")[0] if not m.startswith("lowmem_train") else m for m in outside} & readers, outside


def calls_in(path: Path):
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_only_commands_print_or_end_the_process():
    found = []
    for name, path in modules().items():
        if name.startswith("lowmem_train.commands"):
            continue
        for node, func in calls_in(path):
            if func in ("print", "sys.exit", "exit", "quit"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {func}()")
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.Name) and node.id == "SystemExit":
                found.append(f"{path.relative_to(REPO)}:{node.lineno} SystemExit")
    assert not found, found


COLLECTIVE_CALLS = ("all_reduce", "all_gather", "gather", "broadcast", "barrier", "wait_for_everyone",
                    "main_process_first", "get_state_dict", "reduce", "all_to_all")


def test_only_the_distributed_module_talks_to_other_ranks():
    found = []
    for name, path in modules().items():
        if name == "lowmem_train.trainer.distributed":
            continue
        for node in ast.walk(tree(path)):
            text = ast.unparse(node) if isinstance(node, ast.Attribute) else ""
            if text.startswith("torch.distributed"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {text}")
        for node, func in calls_in(path):
            if func.rsplit(".", 1)[-1] in COLLECTIVE_CALLS and not func.startswith("distributed."):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {func}()")
    assert not found, found


def test_only_family_modules_know_a_family_by_name():
    allowed = ("lowmem_train.model.families", "lowmem_train.config")
    found = []
    for name, path in modules().items():
        if name.startswith(allowed):
            continue
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.Constant) and node.value in ("t5", "gpt", "gpt2"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert not found, found


# Internal attributes of other libraries that carry no underscore; and underscored names that are public API.
INTERNAL_NAMES = {"ds_tensor", "ds_numel", "ds_opt_adam", "deepspeed_engine_wrapped", "gradient_state", "_forkserver"}
PUBLIC_UNDERSCORED = {"os._exit"}  # documented: leave at once, without cleanup (a second Ctrl-C)


def our_names() -> set[str]:
    """Every function, class and attribute name the package itself defines (its own privates are its business)."""
    names = set()
    for path in modules().values():
        for node in ast.walk(tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                    ast.unparse(node.value) in ("self", "cls"):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return names


def test_private_apis_of_other_libraries_are_fenced_in_compat():
    ours = our_names()
    found = []
    for name, path in modules().items():
        if name == "lowmem_train.trainer.compat":
            continue
        for node in ast.walk(tree(path)):
            if not isinstance(node, ast.Attribute):
                continue
            owner = ast.unparse(node.value)
            private = (node.attr.startswith("_") and not node.attr.startswith("__") and node.attr not in ours
                       and f"{owner}.{node.attr}" not in PUBLIC_UNDERSCORED)
            if private or node.attr in INTERNAL_NAMES:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {owner}.{node.attr}")
    assert not found, found


def test_product_code_does_not_mock():
    found = [str(path.relative_to(REPO)) for name, path in modules().items()
             if any(m.startswith("unittest") for m in imports_of(name, path))]
    assert not found, found


def test_modules_stay_small():
    long = {str(p.relative_to(REPO)): n for p in modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450}
    assert not long, f"split these by concern: {long}"
