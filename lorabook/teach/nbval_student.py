"""pytest plugin: nbval's run of an instructor notebook also runs its student copy's exercises, in one kernel.

    pytest -p lorabook.teach.nbval_student --nbval-lax --nbval-current-env notebooks/

Before the item of each solution cell, two items join the same kernel (``student.stub_steps``): the student
copy of the solution cell (its stub), then the student copy of its check cell, which must fail on the stub
(``check.expect_stub_failure``). Then the instructor's solution and check run as usual. Every other cell is the
same in both copies, so each notebook runs once per test run, not twice; what this run cannot see — a later
cell that would read a stub, or a name the failing check never binds — ``teach lint`` finds statically
(``student.lint_stub_uses``). ``python -m lorabook.teach check`` still runs both copies in full.
"""
from __future__ import annotations

from collections import defaultdict

from nbformat.v4 import new_code_cell

from .student import stub_steps

__all__ = ["pytest_collection_modifyitems"]


def pytest_collection_modifyitems(session, config, items) -> None:
    """Insert the student copy's stub and check items before each solution cell's item (nbval's IPyNbCell)."""
    from nbval.plugin import IPyNbCell
    plans = {}  # notebook -> ({id(cell): index in nb.cells}, stub_steps)
    out = []
    for item in items:
        if isinstance(item, IPyNbCell) and not item.options["skip"]:
            nb = item.parent.nb
            if item.parent.nodeid not in plans:
                plans[item.parent.nodeid] = ({id(c): i for i, c in enumerate(nb.cells)}, stub_steps(nb))
            index, steps = plans[item.parent.nodeid]
            for label, source in steps.get(index.get(id(item.cell)), []):
                out.append(IPyNbCell.from_parent(item.parent, name=f"{item.name} ({label})", cell_num=item.cell_num,
                                                 cell=new_code_cell(source), options=defaultdict(bool, check=False)))
        out.append(item)
    items[:] = out
