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
import functools
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


# ---- what a name in a module stands for -----------------------------------------------------------------------
# The rules below read what a name stands for, not how it is spelled: `import torch.distributed as dist`,
# `from os import _exit as leave` and `getattr(x, "_private")` are the same call or access as their plain spellings.
def aliases(name: str, module: ast.Module) -> dict[str, str]:
    """Local name -> the dotted name it stands for, from every import of the module (at any depth)."""
    found = {}
    package = name.rsplit(".", 1)[0]
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: counted from the package this module is in
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                found[alias.asname or alias.name] = f"{base}.{alias.name}"
    return found


GETATTR_FAMILY = ("getattr", "hasattr", "setattr", "delattr")


def literal_attribute(node: ast.AST) -> tuple[ast.AST, str] | None:
    """`getattr(obj, "name"[, default])` (or has/set/delattr): (obj, "name"), an attribute access spelled as a call."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in GETATTR_FAMILY
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        return node.args[0], node.args[1].value
    return None


def resolve(node: ast.AST, names: dict[str, str]) -> str:
    """The dotted name an expression stands for (`?` where a part is computed: a call's result, an index)."""
    if isinstance(node, ast.Name):
        return names.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        return f"{resolve(node.value, names)}.{node.attr}"
    spelled = literal_attribute(node)
    if spelled is not None:
        return f"{resolve(spelled[0], names)}.{spelled[1]}"
    return "?"


class Source:
    """One module's syntax tree and import aliases, and what it calls and touches, names resolved."""

    def __init__(self, name: str, text: str):
        self.name, self.module = name, ast.parse(text)
        self.names = aliases(name, self.module)

    def calls(self):
        """(call node, dotted name of what it calls)."""
        for node in ast.walk(self.module):
            if isinstance(node, ast.Call):
                yield node, resolve(node.func, self.names)

    def accesses(self):
        """(node, dotted name) of every attribute read or written, directly or through getattr & co. with a literal
        name, and of every imported name."""
        for node in ast.walk(self.module):
            if isinstance(node, ast.Attribute) or literal_attribute(node) is not None:
                yield node, resolve(node, self.names)
            elif isinstance(node, ast.Import):
                yield from ((node, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield from ((node, f"{node.module}.{alias.name}") for alias in node.names)


def package_sources() -> dict[Path, Source]:
    return {path: Source(name, path.read_text(encoding="utf-8")) for name, path in modules().items()}


def findings(rule) -> list[str]:
    return sorted({f"{path.relative_to(REPO)}:{line} {what}" for path, src in package_sources().items()
                   for line, what in rule(src)})


# ---- only commands/ prints or ends the process -----------------------------------------------------------------
ENDS_THE_PROCESS = {"print", "exit", "quit", "sys.exit", "os._exit", "os.abort", "signal.raise_signal", "os.killpg",
                    "builtins.print", "builtins.exit", "builtins.quit"}
# Seams that end their own process on purpose: the fault is the point (trainer/faults.py: a kill inside a save).
MAY_KILL_ITSELF = {"lowmem_train.trainer.faults"}


def kills_itself(src: Source, call: ast.Call) -> bool:
    """os.kill(os.getpid(), ...): a signal to the process itself."""
    return (resolve(call.func, src.names) == "os.kill" and bool(call.args) and isinstance(call.args[0], ast.Call)
            and resolve(call.args[0].func, src.names) == "os.getpid")


def ends_the_process(src: Source):
    if src.name.startswith("lowmem_train.commands"):
        return
    called = set()
    for node, func in src.calls():
        called.add(id(node.func))
        if func in ENDS_THE_PROCESS or (kills_itself(src, node) and src.name not in MAY_KILL_ITSELF):
            yield node.lineno, f"{func}()"
    for node, dotted in src.accesses():  # handed on, to be called elsewhere: `leave = os._exit`
        if id(node) not in called and dotted in ENDS_THE_PROCESS - {"print", "exit", "quit"}:
            yield node.lineno, dotted
    for node in ast.walk(src.module):
        if isinstance(node, ast.Name) and resolve(node, src.names) in ("SystemExit", "builtins.SystemExit"):
            yield node.lineno, "SystemExit"


def test_only_commands_print_or_end_the_process():
    found = findings(ends_the_process)
    assert not found, found


# ---- only trainer/distributed.py talks to other ranks ----------------------------------------------------------
# Every call that exchanges data with or waits for other ranks, by its last name: torch.distributed's, Accelerate's
# (gather, reduce, wait_for_everyone, ...; get_state_dict gathers ZeRO-3 shards) and DeepSpeed's comm module's.
COLLECTIVE_CALLS = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_object", "all_gather_into_tensor",
    "all_gather_coalesced", "gather", "gather_object", "gather_for_metrics", "broadcast", "broadcast_object_list",
    "scatter", "scatter_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
    "all_to_all_single", "send", "recv", "isend", "irecv", "send_object_list", "recv_object_list",
    "batch_isend_irecv", "barrier", "monitored_barrier", "wait_for_everyone", "main_process_first",
    "get_state_dict", "pad_across_processes", "init_process_group", "destroy_process_group", "new_group",
}
DISTRIBUTED = "lowmem_train.trainer.distributed"
COMMUNICATION_MODULES = ("torch.distributed", "deepspeed.comm")
LOCAL_OPS = ("torch.", "functools.", "operator.")  # torch.gather, functools.reduce: nothing leaves the process


def talks_to_other_ranks(src: Source):
    if src.name == DISTRIBUTED:
        return
    for node, dotted in src.accesses():
        if dotted.startswith(COMMUNICATION_MODULES):
            yield node.lineno, dotted
    for node, func in src.calls():
        # `distributed.barrier(...)` passes only where `distributed` IS trainer/distributed.py, whatever its spelling
        if func.rsplit(".", 1)[-1] not in COLLECTIVE_CALLS or func.startswith(f"{DISTRIBUTED}."):
            continue
        if func.startswith(LOCAL_OPS) and not func.startswith(COMMUNICATION_MODULES):
            continue
        yield node.lineno, f"{func}()"


def test_only_the_distributed_module_talks_to_other_ranks():
    found = findings(talks_to_other_ranks)
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


# ---- only trainer/compat.py touches other libraries' private APIs ------------------------------------------------
# Internal attributes of other libraries that carry no underscore; and underscored names that are public API.
INTERNAL_NAMES = {"ds_tensor", "ds_numel", "ds_shape", "ds_opt_adam", "deepspeed_engine_wrapped", "gradient_state",
                  "_forkserver"}
PUBLIC_UNDERSCORED = {"os._exit"}  # documented: leave at once, without cleanup (commands/ only, see above)
# vars() and __dict__ show every attribute, private ones included. argparse documents vars(namespace) as the way to
# read its parsed options as a dict: on `args` (the argparse.Namespace wherever the package has one) it is public.
PUBLIC_VARS_OF = {"args"}
COMPAT = "lowmem_train.trainer.compat"


@functools.cache
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


def foreign_private(dotted: str, ours: set[str], external_roots: set[str]) -> str | None:
    """The first part of a dotted name that is another library's private or internal name, if any. An underscored
    name the package defines counts as ours, unless the dotted name starts at another library
    (`multiprocessing.forkserver._stop` is theirs, though PeerWatch has a `_stop` too)."""
    parts = dotted.split(".")
    theirs = parts[0] in external_roots
    for i, part in enumerate(parts[1:], 1):
        if ".".join(parts[: i + 1]) in PUBLIC_UNDERSCORED:
            continue
        if part in INTERNAL_NAMES or part == "__dict__":
            return part
        if part.startswith("_") and not part.startswith("__") and (theirs or part not in ours):
            return part
    return None


def touches_private_apis(src: Source, ours: set[str]):
    if src.name == COMPAT:
        return
    external = {target.split(".")[0] for target in src.names.values() if not target.startswith("lowmem_train")}
    for node, dotted in src.accesses():
        if not dotted.startswith(("self.", "cls.", "lowmem_train.")) and foreign_private(dotted, ours, external):
            yield node.lineno, dotted
    for node, func in src.calls():
        if func in ("vars", "builtins.vars") and node.args and ast.unparse(node.args[0]) not in PUBLIC_VARS_OF:
            yield node.lineno, f"vars({ast.unparse(node.args[0])})"


def test_private_apis_of_other_libraries_are_fenced_in_compat():
    ours = our_names()
    found = findings(lambda src: touches_private_apis(src, ours))
    assert not found, found


# ---- the rules catch what they are for ---------------------------------------------------------------------------
# Each spelling below breaks a rule; a rule that passes one of them has a loophole (each was one, once).
BREAKS = {
    "ends_the_process": [
        "import os\nos._exit(1)",
        "from os import _exit as leave\nleave(1)",
        "import os as o\no._exit(1)",
        "import sys\nraise SystemExit(2)",
        "import os\nquit_now = os._exit",
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
        "import sys\ngetattr(sys, 'exit')(1)",
    ],
    "talks_to_other_ranks": [
        "import torch.distributed as dist\ndist.all_reduce(t)",
        "from torch.distributed import send\nsend(t, 1)",
        "import torch\ntorch.distributed.recv(t, 0)",
        "from torch import distributed\ndistributed.scatter(t, [t])",
        "import torch\ntorch.distributed.all_gather_object(out, obj)",
        "def f(distributed):\n    distributed.barrier()",  # a local called distributed is not the module
        "accelerator.gather_for_metrics(x)",
        "import deepspeed.comm as comm\ncomm.broadcast(t, 0)",
    ],
    "touches_private_apis": [
        "import multiprocessing.forkserver as fs\nfs._forkserver._stop()",
        "state = vars(optimizer)",
        "x = getattr(engine, '_private_field', None)",
        "ok = hasattr(server, '_forkserver_pid')",
        "shape = getattr(param, 'ds_shape')",
        "d = optimizer.__dict__",
        "from torch._C import _get_tracing_state",
    ],
}


@pytest.mark.parametrize("rule, snippet", [(rule, s) for rule, snippets in BREAKS.items() for s in snippets])
def test_each_rule_catches_every_spelling_of_what_it_forbids(rule, snippet):
    ours = our_names()
    check = {"ends_the_process": ends_the_process, "talks_to_other_ranks": talks_to_other_ranks,
             "touches_private_apis": lambda src: touches_private_apis(src, ours)}[rule]
    assert list(check(Source("lowmem_train.trainer.example", snippet))), f"{rule} lets this through: {snippet!r}"


def test_the_rules_leave_their_own_modules_and_public_spellings_alone():
    ours = our_names()
    allowed = [(ends_the_process, "lowmem_train.commands.train", "import os\nos._exit(5)"),
               (talks_to_other_ranks, DISTRIBUTED, "import torch\ntorch.distributed.all_reduce(t)"),
               (talks_to_other_ranks, "lowmem_train.trainer.x",
                "from lowmem_train.trainer import distributed\ndistributed.barrier(backend)"),
               (talks_to_other_ranks, "lowmem_train.trainer.x", "import torch\ntorch.gather(t, 0, i)"),
               (lambda src: touches_private_apis(src, ours), COMPAT, "state = vars(optimizer)"),
               (lambda src: touches_private_apis(src, ours), "lowmem_train.commands.x", "options = vars(args)")]
    for rule, name, snippet in allowed:
        assert not list(rule(Source(name, snippet))), (name, snippet)


def test_product_code_does_not_mock():
    found = [str(path.relative_to(REPO)) for name, path in modules().items()
             if any(m.startswith("unittest") for m in imports_of(name, path))]
    assert not found, found


def test_modules_stay_small():
    long = {str(p.relative_to(REPO)): n for p in modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450}
    assert not long, f"split these by concern: {long}"
