"""The fault matrix's definition and its table: which faults, on which topologies, what each cell must end in.

Light on purpose (no torch, no test fixtures): tests/integration/test_fault_matrix.py runs the cells and writes
the table; tests/unit/test_readme.py checks that the README holds exactly the table the last full run wrote, and
that its rows and columns are the ones defined here (so a changed matrix without a new run fails, as does a table
edited by hand).

    LOWMEM_FAULT_MATRIX=all python -m pytest tests/integration/test_fault_matrix.py    # every cell; rewrites the table
    python -m pytest tests/integration/test_fault_matrix.py                            # the CI cells only
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).with_name("fault_matrix.md")
README_BEGIN = "<!-- fault matrix: written by tests/integration/test_fault_matrix.py (LOWMEM_FAULT_MATRIX=all); do not edit -->"
README_END = "<!-- end of fault matrix -->"
RUN_ALL = os.environ.get("LOWMEM_FAULT_MATRIX", "") == "all"


@dataclass(frozen=True)
class Fault:
    label: str  # the row's name in the table
    how: str  # how the test makes it happen (the seam, the signal)
    outcome: str  # what exit_status.json must say afterwards ("started": nothing could write, the process was killed)


@dataclass(frozen=True)
class Topology:
    label: str
    processes: int
    machines: int
    options: tuple[str, ...] = ()


FAULTS = {
    "kill9": Fault("kill -9 of one rank", "SIGKILL to rank 1 (the only rank on 1 process) after step 6", "lost_peer"),
    "sigterm": Fault("SIGTERM", "SIGTERM to rank 1 only after step 6", "stopped"),
    "kill_in_save": Fault("kill inside a save", "LOWMEM_FAULT_KILL_IN_SAVE=2: every rank SIGKILLs itself in the "
                          "save of step 8, its files written, before the completion marker", "started"),
    "disk_full": Fault("disk full at save", "output_dir on a tmpfs with room for 1.5 checkpoints, --low_disk=stop",
                       "out_of_disk"),
    "corrupt": Fault("corrupt newest checkpoint", "a finished run, then its newest checkpoint's largest weights file "
                     "cut in half", "finished"),
    "oom_forward": Fault("OOM in forward", "LOWMEM_FAULT_OOM on rank 1 (all forwards after the 6th), retries "
                         "used up", "out_of_memory"),
    "oom_backward": Fault("OOM in backward", "LOWMEM_FAULT_OOM phase=backward on rank 1 from step 6",
                          "oom_in_backward"),
    "lost_node": Fault("a lost node", "machine 0 (its launcher and rank 0, which hosts the store) SIGKILLed after "
                       "step 6", "lost_peer"),
}
TOPOLOGIES = {
    "1proc": Topology("1 process", 1, 1),
    "zero2": Topology("2 processes, ZeRO-2 offload", 2, 1, ("--deepspeed_config=zero2_offload",)),
    "zero3": Topology("2 processes, ZeRO-3 offload", 2, 1, ("--deepspeed_config=zero3_offload",)),
    "2nodes": Topology("2 machines on loopback (ZeRO-2 offload)", 2, 2),
}
EXIT_CODES = {"finished": 0, "stopped": 0, "out_of_memory": 3, "out_of_disk": 4, "lost_peer": 5,
              "oom_in_backward": 6}  # as commands/train.py writes them (a cell checks both)

NOT_APPLICABLE = {
    ("lost_node", "1proc"): "one machine: losing it loses every process; nothing is left to notice, and the restart "
                            "is the kill -9 cell's",
    ("lost_node", "zero2"): "one machine (as for 1 process)",
    ("lost_node", "zero3"): "one machine (as for 1 process)",
}
# What a cell ends in where it differs from its fault's row: a single process has no other rank to report a loss,
# and under ZeRO-3 a forward pass gathers parameters from the other rank, so its OOM ends like one in backward.
OUTCOME = {("kill9", "1proc"): "started", ("oom_forward", "zero3"): "oom_in_backward"}

# In CI (python -m pytest), the cells whose code paths no other test takes: exit 3 and 4 through the real command
# (one process), and the loss of the node that hosts the launcher's store. The rest: LOWMEM_FAULT_MATRIX=all.
CI_CELLS = {("oom_forward", "1proc"), ("disk_full", "1proc"), ("lost_node", "2nodes")}


def cells() -> list[tuple[str, str]]:
    """Every applicable (fault, topology), in table order: topology by topology, so that each shares a baseline."""
    return [(f, t) for t in TOPOLOGIES for f in FAULTS if (f, t) not in NOT_APPLICABLE]


def expected_outcome(fault: str, topology: str) -> str:
    return OUTCOME.get((fault, topology), FAULTS[fault].outcome)


def describe_outcome(outcome: str) -> str:
    if outcome == "started":
        return "killed (status: started)"
    return f"{EXIT_CODES[outcome]} {outcome}"


def render(results: dict[tuple[str, str], dict], header: str) -> str:
    """The markdown table of a full run: one row per fault, one column per topology. `results[(f, t)]`: what the
    cell measured (outcome, seconds to the end of every rank and its bound, resumed-from step, weight difference)."""
    lines = [header, "", "| fault | " + " | ".join(t.label for t in TOPOLOGIES.values()) + " |",
             "|---|" + "---|" * len(TOPOLOGIES)]
    for f, fault in FAULTS.items():
        row = [fault.label]
        for t in TOPOLOGIES:
            if (f, t) in NOT_APPLICABLE:
                row.append(f"n/a: {NOT_APPLICABLE[(f, t)]}")
                continue
            r = results[(f, t)]
            weights = "bitwise" if r["weight_diff"] == 0 else f"within {r['weight_diff']:.1e}"
            ci = " (CI)" if (f, t) in CI_CELLS else ""
            row.append(f"{describe_outcome(r['outcome'])}, ended in {r['seconds']:.0f} s (bound {r['bound']:.0f}); "
                       f"resumed from step {r['resumed_from']}; weights {weights}{ci}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "How each fault is made: " + "; ".join(f"**{f.label}**: {f.how}" for f in FAULTS.values()) + "."]
    return "\n".join(lines) + "\n"


def table_cells(text: str) -> tuple[list[str], list[str]]:
    """(row labels, column labels) of a rendered table: what the README's copy must agree with."""
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    columns = [c.strip() for c in rows[0].strip("|").split("|")][1:]
    return [r.split("|")[1].strip() for r in rows[1:]], columns


def write_table(text: str, readme: Path) -> None:
    """The table into fault_matrix.md and between the README's markers (the only way either changes)."""
    TABLE.write_text(text)
    body = readme.read_text(encoding="utf-8")
    start, end = body.index(README_BEGIN) + len(README_BEGIN), body.index(README_END)
    readme.write_text(body[:start] + "\n" + text + body[end:], encoding="utf-8")


def readme_table(readme: Path) -> str:
    """What the README holds between its markers."""
    body = readme.read_text(encoding="utf-8")
    return body[body.index(README_BEGIN) + len(README_BEGIN): body.index(README_END)].strip("\n") + "\n"
