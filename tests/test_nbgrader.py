"""nbgrader itself on the workbook's exercises: the metadata is real nbgrader metadata (issue 10 §5).

What is covered, and how (everything runs in temporary folders: nbgrader's course folders, ``gradebook.db``, the
Jupyter config and runtime folders; nothing is written in the repository):

1. **Every real notebook, metadata level, no execution** (``test_generate_assignment_on_each_notebook``): each
   ``notebooks/NN_*.ipynb`` becomes one assignment of a course folder and nbgrader's ``generate_assignment`` runs
   on it (its CheckCellMetadata, ClearSolutions, ClearHiddenTests, LockCells, ComputeChecksums, SaveCells into
   the gradebook). It must succeed; the release copy it writes must equal ``python -m lorabook.teach student``'s
   copy cell by cell (source and cell type); the gradebook must hold exactly the notebook's grade ids with their
   points, and its solution cells. Before that, no line may mention a delimiter (``### BEGIN SOLUTION`` ...)
   other than as a marker: nbgrader takes every line containing one as a delimiter, in markdown cells too.
   Whatever exercises the notebooks contain, nothing here names their cells.
2. **Execution, on a tiny purpose-built notebook** in the workbook's conventions (``solution_metadata`` /
   ``grade_metadata``, ``check(...)`` from ``lorabook.teach`` against ``lorabook.lora``, a hidden-test region, a
   predict-then-check): the command lines ``nbgrader validate`` pass on it and ``nbgrader validate --invert`` on
   its student copy written by ``python -m lorabook.teach student``.
3. **The grading pipeline** on the same tiny notebook: ``generate_assignment``, three submissions (solved, the
   stubs left as released, one that hard-codes the visible case), ``autograde``; the gradebook gives full points,
   zero, and one of two points (the hidden tests come back at grading); the autograded copies show the checks'
   words: "not implemented yet" for the stubs, the hint after the shortcut's mismatch.

Executing the real notebooks under ``nbgrader validate`` takes minutes (each loads SmolLM2 and trains), so it is
opt-in: ``LORABOOK_NBGRADER_FULL=1 pytest tests/test_nbgrader.py`` also runs ``nbgrader validate`` on each
instructor notebook and ``nbgrader validate --invert`` on each student copy (cells may take up to 600 s and their
output may lag by 120 s; nbgrader's defaults, 30 s and 4 s, are too short for the training cells on a busy CPU).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook  # nbgrader is in requirements.txt (make installs it)
from nbgrader.apps import NbGraderAPI
from nbgrader.coursedir import CourseDirectory
from traitlets.config import Config

from lorabook.teach.__main__ import main as teach_main
from lorabook.teach.student import (grade_metadata, grader_meta, lint_exercises, lint_stub_uses, solution_metadata,
                                    student_copy)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
BIN = Path(sys.executable).parent  # nbgrader runs `alembic` from PATH when it creates a gradebook
PASSED = "Success! Your notebook passes all the tests."
INVERT_PASSED = "Success! The notebook does not pass any tests."
IOPUB_TIMEOUT = 120  # nbgrader raises when a cell's output lags its reply by 4 s (nbclient's default): a busy CPU
DELIMITERS = ("### BEGIN SOLUTION", "### END SOLUTION", "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")


@pytest.fixture(scope="module")
def nbgrader_env(tmp_path_factory):
    """Jupyter config and runtime folders in a temporary folder (no user config read, no connection files left),
    the venv's bin first on PATH; the kernels are the venv's (its python3 kernelspec)."""
    tmp = tmp_path_factory.mktemp("jupyter")
    env = {"JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield {**os.environ, **env}


def nbgrader_api(root: Path) -> NbGraderAPI:
    """nbgrader's Python API on a course folder at ``root`` (source/, release/, submitted/, gradebook.db)."""
    c = Config()
    c.CourseDirectory.root = str(root)
    c.CourseDirectory.course_id = "lorabook"
    c.Exchange.root = str(root / "exchange")  # not /srv/nbgrader/exchange
    c.Execute.timeout = 120
    c.Execute.iopub_timeout = IOPUB_TIMEOUT
    return NbGraderAPI(coursedir=CourseDirectory(config=c), config=c)


def gradebook(root: Path) -> Gradebook:
    return Gradebook(f"sqlite:///{root / 'gradebook.db'}", course_id="lorabook")


@pytest.fixture(scope="module")
def course(tmp_path_factory, nbgrader_env):
    """One course folder (one gradebook: nbgrader creates it once, which costs an `alembic` process): each real
    notebook as an assignment named by its stem, the tiny notebook as assignment ``ps1``; generate_assignment on
    each. Yields (root, api, {assignment: nbgrader's result})."""
    root = tmp_path_factory.mktemp("course")
    sources = {p.stem: (p.name, nbformat.read(p, as_version=4)) for p in NOTEBOOKS}
    sources["ps1"] = ("tiny.ipynb", tiny_notebook())
    api = nbgrader_api(root)
    results = {}
    for name, (filename, nb) in sources.items():
        (root / "source" / name).mkdir(parents=True)
        nbformat.write(nb, root / "source" / name / filename)
        results[name] = api.generate_assignment(name)
    yield root, api, results


def ok(result: dict, what: str) -> None:
    assert result["success"], f"nbgrader {what} failed:\n{result.get('log', '')}\n{result.get('error', '')}"


# ---------------------------------------------------------------------------------------------------------------
# 1. every real notebook through generate_assignment (no execution)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_generate_assignment_on_each_notebook(path, course):
    root, _, results = course
    name = path.stem
    nb = nbformat.read(root / "source" / name / path.name, as_version=4)  # the version nbgrader saw
    stray = [f"cell {i}: {line.strip()!r}" for i, c in enumerate(nb.cells) for line in c.source.splitlines()
             if any(mark in line for mark in DELIMITERS) and not line.strip().startswith("### ")]
    assert not stray, (f"{path.name}: nbgrader takes every line that contains a delimiter as one, in any cell "
                       f"(markdown too) — reword these: {stray}")
    ok(results[name], f"generate_assignment on {path.name}")

    released = nbformat.read(root / "release" / name / path.name, as_version=4)
    ours = student_copy(nb)
    assert len(released.cells) == len(ours.cells)
    for i, (theirs, mine) in enumerate(zip(released.cells, ours.cells)):
        assert (theirs.cell_type, theirs.source) == (mine.cell_type, mine.source), \
            f"{path.name} cell {i}: nbgrader's release copy differs from lorabook.teach's student copy"
        assert grader_meta(theirs).get("grade_id") == grader_meta(mine).get("grade_id"), f"{path.name} cell {i}"

    grades = {grader_meta(c)["grade_id"]: grader_meta(c)["points"] for c in nb.cells if grader_meta(c).get("grade")}
    solutions = {grader_meta(c)["grade_id"] for c in nb.cells if grader_meta(c).get("solution")}
    assert grades and solutions, f"{path.name} has no exercises"
    with gradebook(root) as gb:
        book = gb.find_notebook(name, name)
        assert {g.name: g.max_score for g in book.grade_cells} == grades
        assert {s.name for s in book.solution_cells} == solutions


# ---------------------------------------------------------------------------------------------------------------
# 2. nbgrader validate / validate --invert on a tiny notebook in the workbook's conventions

FORWARD = '''\
def my_lora_forward(x, base_out, A, B, scaling):
    """h = W0 x + scaling · B A x, with W0 x given as base_out. x (n, in), A (r, in), B (out, r)."""
    ### BEGIN SOLUTION
    return base_out + scaling * (x @ A.T @ B.T)
    ### END SOLUTION'''

FORWARD_CHECK = '''\
torch.manual_seed(0)
x, base_out, A, B = torch.randn(4, 6), torch.randn(4, 5), torch.randn(2, 6), torch.randn(5, 2)
check(my_lora_forward, lora_forward, x, base_out, A, B, 0.5, hint="scaling multiplies the LoRA branch only")
### BEGIN HIDDEN TESTS
check(my_lora_forward, lora_forward, cases=[((x, base_out, A, B, 2.0), {}), ((x[:1], base_out[:1], A, B, 8.0), {})])
### END HIDDEN TESTS'''

PREDICT = '''\
def predicted_lora_params():
    """Predict: trainable parameters of LoRA with r = 8 on one 576 × 576 weight (A and B)."""
    ### BEGIN SOLUTION
    return 2 * 8 * 576
    ### END SOLUTION'''

PREDICT_CHECK = '''\
layer = LoRALinear(torch.nn.Linear(576, 576), r=8, alpha=16)
check(predicted_lora_params(), sum(p.numel() for p in layer.parameters() if p.requires_grad),
      hint="A is (r, in) and B is (out, r): r · (in + out)")'''


def tiny_notebook():
    cells = [nbformat.v4.new_markdown_cell("# A tiny exercise notebook in the workbook's conventions"),
             nbformat.v4.new_code_cell("import torch\nfrom lorabook.teach import check\n"
                                       "from lorabook.lora import LoRALinear, lora_forward"),
             nbformat.v4.new_code_cell(FORWARD, metadata=solution_metadata("tiny-forward")),
             nbformat.v4.new_code_cell(FORWARD_CHECK, metadata=grade_metadata("tiny-forward-check")),
             nbformat.v4.new_code_cell(PREDICT, metadata=solution_metadata("tiny-predict")),
             nbformat.v4.new_code_cell(PREDICT_CHECK, metadata=grade_metadata("tiny-predict-check")),
             nbformat.v4.new_code_cell("print(lora_forward(x, base_out, A, B, 1.0).shape)  # the library's")]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    assert lint_exercises(nb) == [] and lint_stub_uses(nb) == []  # it follows `teach lint`'s rules
    return nb


def with_solution(nb, grade_id: str, body: str):
    """``nb`` with the solution region of ``grade_id``'s cell replaced by ``body`` (a student's answer)."""
    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        if grader_meta(cell).get("grade_id") == grade_id:
            head = cell.source.split("    ### BEGIN SOLUTION")[0]
            cell.source = head + "    " + body
    return nb


def nbgrader_cli(*commands: list[str], cwd: Path, env: dict) -> list[str]:
    """Run ``nbgrader *args`` for each of ``commands`` at the same time (each starts a kernel); their stdouts.
    Each kernel computes on one thread (side by side, two kernels of two threads each on two cores ran many times
    slower); a run that overstays its timeout is killed, not left behind (its kernel, in a session of its own,
    exits when its parent does: jupyter_client's JPY_PARENT_PID)."""
    env = {**env, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "nbgrader", *args, f"--Execute.iopub_timeout={IOPUB_TIMEOUT}"],
                             cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
            for args in commands]
    outs = []
    try:
        for args, run in zip(commands, runs):
            out, err = run.communicate(timeout=900)
            assert run.returncode == 0, f"nbgrader {' '.join(args)}: exit {run.returncode}\n{out}\n{err}"
            outs.append(out)
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    return outs


def test_validate_instructor_and_invert_student_copy(tmp_path, nbgrader_env):
    nbformat.write(tiny_notebook(), tmp_path / "tiny.ipynb")
    assert teach_main(["student", "--out", str(tmp_path / "student"), str(tmp_path / "tiny.ipynb")]) == 0
    # the two command lines an instructor types (that the stubs fail for the right reason: the autograde test)
    instructor, student = nbgrader_cli(["validate", "tiny.ipynb"], ["validate", "--invert", "student/tiny.ipynb"],
                                       cwd=tmp_path, env=nbgrader_env)
    assert instructor.strip() == PASSED, instructor
    assert student.strip() == INVERT_PASSED, student


# ---------------------------------------------------------------------------------------------------------------
# 3. generate_assignment + autograde on a course folder


def test_generate_assignment_and_autograde(course):
    root, api, results = course
    ok(results["ps1"], "generate_assignment on the tiny notebook")
    nb = nbformat.read(root / "source" / "ps1" / "tiny.ipynb", as_version=4)
    released = nbformat.read(root / "release" / "ps1" / "tiny.ipynb", as_version=4)
    assert [c.source for c in released.cells] == [c.source for c in student_copy(nb).cells]
    assert "HIDDEN" not in "".join(c.source for c in released.cells)

    solved = nbformat.from_dict(released)
    for theirs, mine in zip(solved.cells, nb.cells):
        if grader_meta(mine).get("solution"):
            theirs.source = mine.source  # the student wrote the instructor's solution
    lazy = with_solution(solved, "tiny-forward", "return base_out + 0.5 * (x @ A.T @ B.T)  # only scaling 0.5")
    for student, copy in [("alice", solved), ("bob", released), ("carol", lazy)]:
        (root / "submitted" / student / "ps1").mkdir(parents=True)
        nbformat.write(copy, root / "submitted" / student / "ps1" / "tiny.ipynb")
        ok(api.autograde("ps1", student), f"autograde {student}")

    with gradebook(root) as gb:
        assert gb.find_assignment("ps1").max_score == 2
        scores = {s: gb.find_submission("ps1", s).score for s in ("alice", "bob", "carol")}
        carol = {g.name: g.score for g in gb.find_submission_notebook("tiny", "ps1", "carol").grades}
    assert scores == {"alice": 2, "bob": 0, "carol": 1}, scores
    assert carol == {"tiny-forward-check": 0, "tiny-predict-check": 1}  # the hidden cases caught the shortcut

    def errors(student):  # the error output of each grade cell in the autograded copy
        graded = nbformat.read(root / "autograded" / student / "ps1" / "tiny.ipynb", as_version=4)
        return {grader_meta(c)["grade_id"]: "\n".join("\n".join(o.traceback) for o in c.outputs
                                                      if o.output_type == "error")
                for c in graded.cells if grader_meta(c).get("grade")}
    bob = errors("bob")
    assert "not implemented yet" in bob["tiny-forward-check"]  # check() says what is wrong, in words
    assert "NotImplementedError" in bob["tiny-predict-check"]  # the predicted value is read before check()
    carol = errors("carol")
    assert "AssertionError" in carol["tiny-forward-check"], carol  # the hidden case's mismatch ...
    assert "scaling multiplies the LoRA branch only" in carol["tiny-forward-check"], carol  # ... with the hint
    assert carol["tiny-predict-check"] == ""


# ---------------------------------------------------------------------------------------------------------------
# opt-in: nbgrader validate on the real notebooks (minutes each)

FULL = os.environ.get("LORABOOK_NBGRADER_FULL") == "1"


@pytest.mark.skipif(not FULL, reason="executes every notebook twice (minutes): set LORABOOK_NBGRADER_FULL=1")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_validate_real_notebook(path, tmp_path, nbgrader_env):
    # a notebook may read ../data: the instructor copy in notebooks/, the student copy in student/, data/ beside them
    work = tmp_path / "notebooks"
    work.mkdir()
    (tmp_path / "data").symlink_to(ROOT / "data")
    nbformat.write(nbformat.read(path, as_version=4), work / path.name)
    assert teach_main(["student", "--out", str(tmp_path / "student"), str(work / path.name)]) == 0
    timeout = "--Execute.timeout=600"
    instructor, student = nbgrader_cli(["validate", timeout, path.name],
                                       ["validate", "--invert", timeout, f"../student/{path.name}"],
                                       cwd=work, env=nbgrader_env)
    assert instructor.strip() == PASSED, instructor
    assert student.strip() == INVERT_PASSED, student
