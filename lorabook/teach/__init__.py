"""Teaching tools: show the library's real code, check a student's exercise against it, make student copies.

In a notebook::

    from lorabook.teach import show, check
    show(lorabook.lora.LoRALinear.forward)          # prints the real source, with a path header
    check(my_forward, lorabook.lora.lora_forward, x)  # ✓ exact / ✓ close (max abs diff …) / AssertionError

    show.py       show(obj) / source(obj): the library's source under a ``# lorabook/path.py — name`` header
    check.py      check(student, reference, ...) -> CheckResult: compare like ``cmp``, explain a mismatch
    student.py    student copies (nbgrader conventions), exercises, what one run must add to check both copies
    notebooks.py  execution checks, headless runs, lint
    nbval_student.py  pytest plugin: nbval's run of a notebook also runs its student copy's exercises
    colab.py      the Colab badge and set-up cell from REPO / BRANCH
    __main__.py   python -m lorabook.teach student|check|run|lint|colab

Notebook conventions (nbgrader's, see ``lorabook.teach.student`` for the exact metadata): a solution cell
defines a function whose body holds ``### BEGIN SOLUTION`` … ``### END SOLUTION``; the next code cell is a
locked grade cell that calls ``check(...)`` against the library; later cells use the library, never the
student's function.
"""
from .check import NOT_IMPLEMENTED, CheckResult, check
from .colab import BRANCH, REPO, colab_cells, repo_and_branch
from .show import show, source

__all__ = ["show", "source", "check", "CheckResult", "NOT_IMPLEMENTED", "REPO", "BRANCH", "repo_and_branch",
           "colab_cells"]
