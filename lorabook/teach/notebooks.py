"""Notebook files for ``python -m lorabook.teach``: execution checks, headless runs, lint, student copies, Colab.

The exercise conventions (nbgrader's) and the student copies are in ``lorabook.teach.student``. ``check``
executes the instructor notebook and its student copy and verifies that the solutions run clean and that in the
student copy exactly the check cells fail. Cells are numbered from 0, as in ``nb.cells``. A cell may raise on
purpose when tagged ``raises-exception`` or when it starts with ``# NBVAL_RAISES_EXCEPTION``.
"""
from __future__ import annotations

import copy
import json
import os
import re
import time
from pathlib import Path

import nbformat

from .._io import write_text
from .colab import add_colab_cells, cell_tags, lint_colab, repo_and_branch
from .student import exercises, grader_meta, lint_exercises, lint_stub_uses, student_copy

DEFAULT_GLOB = "notebooks/[0-9][0-9]_*.ipynb"
KERNEL = "python3"
VOLATILE_CELL_METADATA = ("ExecuteTime", "execution", "outputId", "colab")
MAX_WIDGET_STATE = 20_000  # bytes of notebook-level widget state we keep
ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{8,}\b")
ABSPATH = re.compile(r"(?<![\w.~])/(?:root|tmp|work|home|Users)/|\b[A-Z]:\\Users\\")


class UsageError(Exception):
    """A bad command-line argument; the message names it."""


# ----------------------------------------------------------------------------------------------------------
# files


def notebook_paths(args: list[str]) -> list[Path]:
    """The notebooks named on the command line, or every ``notebooks/NN_*.ipynb`` under the current folder."""
    if not args:
        paths = sorted(Path().glob(DEFAULT_GLOB))
        if not paths:
            raise UsageError(f"NB: none given and none match {DEFAULT_GLOB} in the current folder")
        return paths
    for a in args:
        if not Path(a).is_file():
            raise UsageError(f"NB '{a}': no such file" if not Path(a).exists() else f"NB '{a}': not a file")
        if not a.endswith(".ipynb"):
            raise UsageError(f"NB '{a}': expected a .ipynb notebook")
    return [Path(a) for a in args]


def read(path: Path):
    try:
        return nbformat.read(path, as_version=4)
    except Exception as e:
        raise UsageError(f"NB '{path}': not a readable notebook ({type(e).__name__}: {e})") from None


def write(nb, path: Path) -> None:
    """Write atomically (``lorabook._io.write_text``: a temporary file in the same folder, then a rename)."""
    write_text(path, nbformat.writes(nb) + "\n")



def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


# ----------------------------------------------------------------------------------------------------------
# lint


def output_text(cell) -> str:
    """All text a code cell's outputs show (streams, text/* data, errors); images are skipped."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type == "error":
            parts += [out.ename, out.evalue, *out.traceback]
        else:
            parts += [v if isinstance(v, str) else "".join(v) for k, v in out.get("data", {}).items()
                      if k.startswith("text/")]
    return "\n".join(parts)


def lint_outputs(nb) -> list[str]:
    """No memory addresses or absolute paths in outputs; execution counts present and increasing."""
    problems, last = [], 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        text = output_text(cell)
        for pattern, what in ((ADDRESS, "a memory address"), (ABSPATH, "an absolute path")):
            if m := pattern.search(text):
                problems.append(f"cell {i}: output shows {what}: {text[m.start():].split()[0][:80]!r}")
        count = cell.execution_count
        if cell.outputs and count is None:
            problems.append(f"cell {i}: has outputs but no execution_count (nbval fails on that)")
        if count is not None:
            if count <= last:
                problems.append(f"cell {i}: execution_count {count} after {last}: run the notebook top to bottom")
            last = count
    return problems


# ----------------------------------------------------------------------------------------------------------
# the title's time line: measured by ``run``, not guessed

TIME_LINE = re.compile(r"(\*\*What you will (?:do|learn)\*\*) \(≈[^)\n]*\)")
READING_WORDS_PER_MINUTE = 200


def reading_words(nb) -> int:
    """Words of markdown (the time line itself not counted)."""
    return sum(len(TIME_LINE.sub(r"\1", c.source).split()) for c in nb.cells if c.cell_type == "markdown")


def time_line(nb) -> str | None:
    """The "(≈ N min ...)" the title should carry, from the run that ``run`` recorded; None before any run."""
    run = nb.metadata.get("lorabook", {}).get("run")
    if not run:
        return None
    words, seconds = reading_words(nb), 5 * round(run["seconds"] / 5)
    minutes = max(1, round(words / READING_WORDS_PER_MINUTE + seconds / 60))
    return (f"(≈ {minutes} min to read and run: {words:,} words at {READING_WORDS_PER_MINUTE} a minute and "
            f"≈ {seconds} s of compute on a {run['cpu_cores']}-core CPU, measured by `make notebooks`; "
            f"plus {_count(len(exercises(nb)), 'exercise')})")


def set_time_line(nb, seconds: float) -> None:
    """Record a top-to-bottom run in the notebook's metadata and rewrite the title's time line from it."""
    nb.metadata.setdefault("lorabook", {})["run"] = {"seconds": round(seconds, 1), "cpu_cores": os.cpu_count()}
    for cell in nb.cells:
        if cell.cell_type == "markdown" and TIME_LINE.search(cell.source):
            cell.source = TIME_LINE.sub(lambda m: f"{m.group(1)} {time_line(nb)}", cell.source, count=1)
            return


def lint_time_line(nb) -> list[str]:
    """The title's time line says what the recorded run and the markdown give (``run`` rewrites it)."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and (m := TIME_LINE.search(cell.source)):
            want = time_line(nb)
            if m.group(0)[len(m.group(1)) + 1:] != want:
                return [f"cell {i}: the time line is stale (the markdown or the run changed): run "
                        f"`python -m lorabook.teach run` on the notebook (make notebooks)"]
    return []


def lint(nb, name: str) -> list[str]:
    try:
        nbformat.validate(nb)
        problems = []
    except nbformat.ValidationError as e:
        problems = [f"invalid notebook: {str(e).splitlines()[0]}"]
    return (problems + lint_exercises(nb) + lint_stub_uses(nb) + lint_outputs(nb) + lint_time_line(nb)
            + lint_colab(nb, name))


# ----------------------------------------------------------------------------------------------------------
# execution


def raises_on_purpose(cell) -> bool:
    tagged = {"raises-exception", "nbval-raises-exception"} & set(cell_tags(cell))
    return bool(tagged) or cell.source.lstrip().startswith("# NBVAL_RAISES_EXCEPTION")


def execute(nb, folder: Path, timeout: int) -> tuple[dict[int, tuple[str, str]], str | None]:
    """Run ``nb`` in place in a fresh ``python3`` kernel with cwd ``folder``, going on after errors.

    Returns ({cell: (ename, evalue)} for cells that raised, and why the run stopped early or None)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, allow_errors=True, record_timing=False,
                            resources={"metadata": {"path": str(folder)}})
    stopped = None
    try:
        client.execute()
    except (CellTimeoutError, DeadKernelError) as e:
        stopped = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    errors = {}
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                errors[i] = (out.ename, out.evalue.splitlines()[0][:200] if out.evalue else "")
    return errors, stopped


def strip_volatile(nb) -> None:
    """Drop timing and Colab cell metadata and huge widget state; tags and nbgrader metadata stay."""
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
    widgets = nb.metadata.get("widgets")
    if widgets is not None and len(json.dumps(widgets)) > MAX_WIDGET_STATE:
        del nb.metadata["widgets"]


def check_notebook(path: Path, timeout: int) -> tuple[list[str], str]:
    """(problems, summary): the solutions run clean and, in the student copy, exactly the check cells fail."""
    nb = read(path)
    problems = lint_exercises(nb)
    if problems:
        return problems, "cell conventions broken; not executed"
    expected = {grade: sol for sol, grade in exercises(nb)}
    t0 = time.perf_counter()
    errors, stopped = execute(copy.deepcopy(nb), path.parent, timeout)
    problems += [f"instructor: execution stopped: {stopped}"] if stopped else []
    problems += [f"instructor: cell {i} raises {e}: {v}" for i, (e, v) in errors.items()
                 if not raises_on_purpose(nb.cells[i])]
    t1 = time.perf_counter()
    student = student_copy(nb)
    errors, stopped = execute(student, path.parent, timeout)
    t2 = time.perf_counter()
    problems += [f"student copy: execution stopped: {stopped}"] if stopped else []
    for grade in expected:
        gid = grader_meta(nb.cells[grade]).get("grade_id")
        if grade not in errors and not stopped:
            problems.append(f"student copy: check cell {grade} ({gid!r}) passes with the stub — it cannot fail")
        elif grade in errors and errors[grade][0] not in ("AssertionError", "NotImplementedError"):
            problems.append(f"student copy: check cell {grade} ({gid!r}) fails for another reason: "
                            f"{': '.join(errors[grade])}")
    for i, (e, v) in errors.items():
        if i not in expected and not raises_on_purpose(nb.cells[i]):
            problems.append(f"student copy: cell {i} raises {e}: {v} — only check cells may fail; later cells "
                            f"must use the library's version, not the student's")
    summary = (f"{_count(len(expected), 'exercise')}; solutions run clean ({t1 - t0:.1f} s); in the student copy "
               f"exactly the check cells fail ({t2 - t1:.1f} s)")
    return problems, summary


# ----------------------------------------------------------------------------------------------------------
# commands: each prints a short report per notebook and returns the exit status


def _report_each(paths: list[Path], fn) -> int:
    """Print ``path: ok — summary`` or ``path: FAILED`` and the problems that ``fn(path)`` found; 1 if any."""
    status = 0
    for path in paths:
        problems, summary = fn(path)
        if not problems:
            print(f"{path}: ok{' — ' + summary if summary else ''}")
            continue
        status = 1
        print(f"{path}: FAILED ({_count(len(problems), 'problem')})")
        print("".join(f"  {p}\n" for p in problems), end="")
    return status


def student_command(paths: list[Path], out: Path) -> int:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out DIR: '{out}' exists and is not a directory")
    names = [p.name for p in paths]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise UsageError(f"NB: several notebooks are named {dup[0]}; the student copies would overwrite each other")
    out.mkdir(parents=True, exist_ok=True)

    def one(path):
        try:
            nb = student_copy(read(path))
        except ValueError as e:
            return [f"{e} (no student copy written)"], ""
        write(nb, out / path.name)
        return [], f"{out / path.name}, {_count(len(exercises(nb)), 'exercise')}"
    return _report_each(paths, one)


def run_notebook(path: Path, timeout: int) -> tuple[list[str], str]:
    """Execute in place, strip volatile metadata and write back; (problems, summary). Not written on errors."""
    nb = read(path)
    t0 = time.perf_counter()
    errors, stopped = execute(nb, path.parent, timeout)
    seconds = time.perf_counter() - t0
    problems = [f"execution stopped: {stopped}"] if stopped else []
    problems += [f"cell {i} raises {e}: {v}" for i, (e, v) in errors.items() if not raises_on_purpose(nb.cells[i])]
    if problems:
        return problems + ["(notebook not written)"], ""
    strip_volatile(nb)
    set_time_line(nb, seconds)
    write(nb, path)
    leaks = [p for p in lint_outputs(nb) if "memory address" in p or "absolute path" in p]
    return leaks + [f"(written anyway, ran in {seconds:.1f} s: fix these cells and run again)"] * bool(leaks), \
        f"ran in {seconds:.1f} s"


def check_command(paths: list[Path], timeout: int) -> int:
    return _report_each(paths, lambda path: check_notebook(path, timeout))


def run_command(paths: list[Path], timeout: int) -> int:
    return _report_each(paths, lambda path: run_notebook(path, timeout))


def lint_command(paths: list[Path]) -> int:
    return _report_each(paths, lambda path: (lint(read(path), path.stem), ""))


def colab_command(paths: list[Path]) -> int:
    for path in paths:
        nb = read(path)
        changed = add_colab_cells(nb, path.stem)
        if changed:
            write(nb, path)
        print(f"{path}: {'Colab cells written' if changed else 'Colab cells up to date'} "
              f"({'@'.join(repo_and_branch())})")
    return 0
