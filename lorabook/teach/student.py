"""Student copies by nbgrader's conventions, and how one run of the instructor notebook also checks them.

The cell conventions are nbgrader's, so an instructor can also use nbgrader itself:

* A **solution cell** is a code cell defining a function whose body holds ``### BEGIN SOLUTION`` …
  ``### END SOLUTION``; its metadata is ``solution_metadata(grade_id)``. The student copy replaces the region
  with ``# YOUR CODE HERE`` / ``raise NotImplementedError()`` at the region's indentation, so the cell still
  runs and only calling the function raises. (A markdown solution cell's region becomes ``YOUR ANSWER HERE``.)
* The **next code cell** is its grade cell: it calls ``check(student_fn, library_fn, ...)`` and has
  ``grade_metadata(grade_id)``. ``### BEGIN HIDDEN TESTS`` … ``### END HIDDEN TESTS`` regions in it are
  removed from the student copy.
* Every other cell uses the library, so in the student copy exactly the grade cells fail ("the rest still runs").

The two copies differ only in the exercises, so one kernel can run both (``lorabook.teach.nbval_student``):
``stub_steps`` says what to run before each solution cell — its student version, then its check cell's student
version, which must fail — and ``lint_stub_uses`` proves statically what that run cannot see: no later cell
reads a stubbed function, or a name that the failing check cell never gets to bind.

Cells are numbered from 0, as in ``nb.cells``.
"""
from __future__ import annotations

import ast
import copy

import nbformat

SOLUTION, HIDDEN = "SOLUTION", "HIDDEN TESTS"  # ### BEGIN <kind> … ### END <kind>
CODE_STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
ANSWER_STUB = ["YOUR ANSWER HERE"]


def solution_metadata(grade_id: str) -> dict:
    """The metadata of a solution cell (nbgrader's 'autograded answer')."""
    return {"nbgrader": {"solution": True, "grade": False, "locked": False, "grade_id": grade_id,
                         "schema_version": 3}}


def grade_metadata(grade_id: str, points: int = 1) -> dict:
    """The metadata of the check cell after a solution cell (nbgrader's 'autograder tests')."""
    return {"nbgrader": {"solution": False, "grade": True, "locked": True, "points": points,
                         "grade_id": grade_id, "schema_version": 3}}


def grader_meta(cell) -> dict:
    """The cell's nbgrader metadata ({} when it has none)."""
    return cell.metadata.get("nbgrader", {})


# ----------------------------------------------------------------------------------------------------------
# solution and hidden-test regions, student copies


def regions(source: str, kind: str) -> list[tuple[int, int]]:
    """(begin, end) line numbers (from 0) of each ``### BEGIN kind`` … ``### END kind`` region."""
    begin, end = f"### BEGIN {kind}", f"### END {kind}"
    found, start = [], None
    for i, line in enumerate(source.splitlines()):
        if line.strip().startswith(begin):
            if start is not None:
                raise ValueError(f"'{begin}' on line {i + 1} is nested in the one on line {start + 1}")
            start = i
        elif line.strip().startswith(end):
            if start is None:
                raise ValueError(f"'{end}' on line {i + 1} has no '{begin}' before it")
            found.append((start, i))
            start = None
    if start is not None:
        raise ValueError(f"'{begin}' on line {start + 1} has no '{end}'")
    return found


def replace_regions(source: str, kind: str, stub: list[str]) -> str:
    """``source`` with each ``kind`` region (markers included) replaced by ``stub`` at the region's indent."""
    lines = source.splitlines()
    for start, stop in reversed(regions(source, kind)):
        indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
        lines[start: stop + 1] = [indent + s for s in stub]
    return "\n".join(lines) + ("\n" if source.endswith("\n") else "")


def student_source(cell) -> str:
    """The cell's source in the student copy: solutions stubbed, hidden tests removed; ValueError on bad markers."""
    stub = CODE_STUB if cell.cell_type == "code" else ANSWER_STUB
    if grader_meta(cell).get("solution") and not regions(cell.source, SOLUTION):
        return "\n".join(stub)  # nbgrader's rule: a solution cell without a region is all solution
    return replace_regions(replace_regions(cell.source, SOLUTION, stub), HIDDEN, [])


def student_copy(nb):
    """A copy without solutions, hidden tests, outputs or execution counts; raises ValueError on bad markers."""
    nb = copy.deepcopy(nb)
    nb.metadata = nbformat.NotebookNode({k: v for k, v in nb.metadata.items() if k in ("kernelspec", "language_info")})
    for i, cell in enumerate(nb.cells):
        try:
            cell.source = student_source(cell)
        except ValueError as e:
            raise ValueError(f"cell {i}: {e}") from None
        cell.metadata = nbformat.NotebookNode({k: v for k, v in cell.metadata.items() if k in ("tags", "nbgrader")})
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def exercises(nb) -> list[tuple[int, int | None]]:
    """(solution cell, its grade cell or None) for every code solution cell: the grade cell is the next code cell."""
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    pairs = []
    for k, i in enumerate(code):
        if grader_meta(nb.cells[i]).get("solution"):
            nxt = code[k + 1] if k + 1 < len(code) else None
            pairs.append((i, nxt if nxt is not None and grader_meta(nb.cells[nxt]).get("grade") else None))
    return pairs


def lint_exercises(nb) -> list[str]:
    """Markers, nbgrader metadata, unique grade ids, and a check cell right after every solution cell."""
    problems, ids = [], {}
    for i, cell in enumerate(nb.cells):
        meta = grader_meta(cell)
        try:
            sol, hidden = regions(cell.source, SOLUTION), regions(cell.source, HIDDEN)
        except ValueError as e:
            problems.append(f"cell {i}: {e}")
            continue
        stray = [n + 1 for n, line in enumerate(cell.source.splitlines()) if not line.strip().startswith("###")
                 and any(f"{edge} {kind}" in line for edge in ("BEGIN", "END") for kind in (SOLUTION, HIDDEN))]
        if stray:
            problems.append(f"cell {i}: line {stray[0]} names a BEGIN/END marker inside other text; nbgrader reads "
                            f"any line holding 'BEGIN SOLUTION' as a marker (reword it)")
        if sol and not meta.get("solution"):
            problems.append(f"cell {i}: has a '### BEGIN SOLUTION' region but no solution metadata "
                            f"(set cell.metadata to solution_metadata(grade_id))")
        if meta.get("solution") and not sol:
            problems.append(f"cell {i}: solution cell without a '### BEGIN SOLUTION' region")
        lines = cell.source.splitlines()
        if cell.cell_type == "code" and any(lines[a] == lines[a].lstrip() for a, _ in sol):
            problems.append(f"cell {i}: the solution region must sit inside a function body (indented), "
                            f"so the student's stub raises only when the function is called")
        if hidden and not meta.get("grade"):
            problems.append(f"cell {i}: hidden tests belong in a grade cell")
        for flag, want in (("solution", solution_metadata), ("grade", grade_metadata)):
            if meta.get(flag):
                expected = want(meta.get("grade_id", ""))["nbgrader"]
                wrong = sorted(k for k, v in expected.items() if k != "points" and meta.get(k) != v)
                if wrong or not meta.get("grade_id"):
                    problems.append(f"cell {i}: {flag} cell metadata must include {expected} "
                                    f"(wrong or missing: {', '.join(wrong) or 'grade_id'})")
        if meta.get("grade") and not (isinstance(meta.get("points"), (int, float)) and meta["points"] > 0):
            problems.append(f"cell {i}: grade cell needs points > 0, got {meta.get('points')!r}")
        gid = meta.get("grade_id")
        if gid is not None:
            if gid in ids:
                problems.append(f"cell {i}: duplicate grade_id {gid!r} (also cell {ids[gid]})")
            ids.setdefault(gid, i)
    for sol, grade in exercises(nb):
        if grade is None:
            problems.append(f"cell {sol}: solution cell is not followed by a grade cell (the next code cell)")
        elif "check(" not in nb.cells[grade].source:
            problems.append(f"cell {grade}: grade cell should call check(...) against the library")
    return problems


# ----------------------------------------------------------------------------------------------------------
# the student copy inside the instructor's run


def stub_steps(nb) -> dict[int, list[tuple[str, str]]]:
    """{solution cell: [(label, source), ...]}: the student copy's version of an exercise, to run just before it.

    First the solution cell with its stub; then its check cell (hidden tests removed) wrapped in
    ``expect_stub_failure``, which fails unless the check fails on the stub for the right reason."""
    steps = {}
    for sol, grade in exercises(nb):
        run = [("student stub", f"# the student copy of cell {sol}: the solution is a stub\n"
                                + student_source(nb.cells[sol]))]
        if grade is not None:
            where = f"check cell {grade} ({grader_meta(nb.cells[grade]).get('grade_id')!r})"
            run.append(("student check", f"# the student copy of {where} must fail on the stub\n"
                        f"__import__('lorabook.teach.check', fromlist=['']).expect_stub_failure(\n"
                        f"    {student_source(nb.cells[grade])!r},\n    {where!r})"))
        steps[sol] = run
    return steps


def lint_stub_uses(nb) -> list[str]:
    """Cells that would fail only in the student copy: they read a stubbed function, or a name bound in a check
    cell after the statement that calls the stub (in the student copy that statement raises first)."""
    pairs = exercises(nb)
    solution_of = {grade: sol for sol, grade in pairs if grade is not None}
    stubbed: dict[str, tuple[int, str]] = {}  # name -> (its solution cell, why it is a stub or unset)
    problems = []
    for i, cell in enumerate(nb.cells):
        tree = _parse(cell.source) if cell.cell_type == "code" else None
        if tree is None:
            continue
        if any(i == sol for sol, _ in pairs):  # the definitions around a solution region become stubs
            starts = [a + 1 for a, _ in regions(cell.source, SOLUTION)]
            for stmt in tree.body:
                if any(stmt.lineno <= line <= stmt.end_lineno for line in starts):
                    stubbed.update(dict.fromkeys(_bound(stmt), (i, f"a stub in the student copy (cell {i})")))
            continue
        own = solution_of.get(i)  # a check cell raises at its first statement that reads its own stub
        for k, stmt in enumerate(tree.body):
            used = sorted(_reads(stmt) & set(stubbed))
            problems += [f"cell {i}: line {stmt.lineno} reads {name!r}, {stubbed[name][1]} — later cells must use "
                         f"the library's version, so that a blank exercise breaks nothing after it"
                         for name in used if stubbed[name][0] != own]
            if any(stubbed[name][0] == own for name in used):
                for later in tree.body[k:]:
                    why = f"never set in the student copy (check cell {i} fails before its line {later.lineno})"
                    stubbed.update(dict.fromkeys(_bound(later), (own, why)))
                break
            for name in _bound(stmt):
                stubbed.pop(name, None)
    return problems


def _parse(source: str):
    """The cell as a Python AST (IPython's magics turned into calls first), or None if it does not parse."""
    from IPython.core.inputtransformer2 import TransformerManager
    try:
        return ast.parse(TransformerManager().transform_cell(source))
    except SyntaxError:
        return None


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.GeneratorExp, ast.ListComp,
           ast.SetComp, ast.DictComp)


def _bound(node) -> set[str]:
    """Names a statement binds in the namespace it runs in (not inside the functions or classes it defines)."""
    names, todo = set(), [node]
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in n.names if a.name != "*"}
        elif isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            names.add(n.id)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        if n is node or not isinstance(n, _SCOPES):
            todo.extend(ast.iter_child_nodes(n))
    return names


def _reads(node, local: frozenset = frozenset()) -> set[str]:
    """Global names ``node`` reads, also inside the functions it defines (minus their parameters and locals)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = node.args
        params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x is not None}
        body = node.body if isinstance(node.body, list) else [node.body]
        inner = local | params | set().union(*(_bound(s) for s in body))
        outer = [*a.defaults, *(d for d in a.kw_defaults if d is not None), *getattr(node, "decorator_list", [])]
        return set().union(*(_reads(n, local) for n in outer), *(_reads(s, frozenset(inner)) for s in body))
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
        inner = local | set().union(*(_bound(c.target) for c in node.generators))
        return set().union(*(_reads(n, frozenset(inner)) for n in ast.iter_child_nodes(node)))
    if isinstance(node, ast.Name):
        return {node.id} if isinstance(node.ctx, ast.Load) and node.id not in local else set()
    return set().union(*(_reads(n, local) for n in ast.iter_child_nodes(node)))
