"""The README opens with exactly two commands, CI runs the second one verbatim, and the fault-matrix table is the one
its last full run wrote."""

from __future__ import annotations

import re

from tests.helpers import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in first_block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_exactly_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("python train_low_mem.py train")
    assert commands[1].endswith("python -m pytest -n 2 --dist worksteal")


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert readme_commands()[1] in ci.splitlines()


def test_the_fault_matrix_table_is_the_one_its_last_full_run_wrote():
    """The README's table is fault_matrix.md byte for byte (both written by the test run, never by hand), and its rows
    and columns are the faults and topologies the test defines now: a changed matrix needs a new full run."""
    from tests.integration import fault_matrix as fm

    readme = REPO / "README.md"
    assert fm.TABLE.is_file(), f"{fm.TABLE} is missing: run LOWMEM_FAULT_MATRIX=all python -m pytest {fm.__file__}"
    table = fm.TABLE.read_text(encoding="utf-8")
    assert fm.readme_table(readme) == table
    rows, columns = fm.table_cells(table)
    assert rows == [f.label for f in fm.FAULTS.values()]
    assert columns == [t.label for t in fm.TOPOLOGIES.values()]
