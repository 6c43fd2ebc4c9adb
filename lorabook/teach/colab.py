"""Colab: every notebook's "Open in Colab" badge and its set-up cell, generated from one place, ``REPO`` /
``BRANCH`` (the environment's ``LORABOOK_REPO`` / ``LORABOOK_BRANCH`` override them). The set-up cell installs
lorabook only when ``"google.colab" in sys.modules`` (Colab ships torch; it is never reinstalled)."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat

__all__ = ["REPO", "BRANCH", "repo_and_branch", "colab_cells", "cell_tags", "add_colab_cells", "lint_colab"]

REPO = "lorabook/lorabook"  # GitHub owner/name: the one place the Colab badges and installs come from
BRANCH = "main"


def repo_and_branch() -> tuple[str, str]:
    """``REPO`` and ``BRANCH``, unless the environment overrides them (``LORABOOK_REPO``/``LORABOOK_BRANCH``)."""
    return os.environ.get("LORABOOK_REPO", REPO), os.environ.get("LORABOOK_BRANCH", BRANCH)


def colab_cells(name: str):
    """(badge markdown cell, setup code cell) for ``notebooks/{name}.ipynb``, tagged colab-badge/colab-setup."""
    import nbformat.v4 as v4
    repo, branch = repo_and_branch()
    name = Path(name).stem
    url = f"https://colab.research.google.com/github/{repo}/blob/{branch}/notebooks/{name}.ipynb"
    badge = v4.new_markdown_cell(
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})",
        id="colab-badge", metadata={"tags": ["colab-badge"]})
    setup = v4.new_code_cell(
        "# On Colab only: install lorabook (Colab ships torch; it is never reinstalled). Elsewhere: nothing.\n"
        "import sys\n"
        'if "google.colab" in sys.modules:\n'
        "    import subprocess\n"
        f'    subprocess.run([sys.executable, "-m", "pip", "install", "-q", '
        f'"lorabook @ git+https://github.com/{repo}@{branch}"], check=True)',
        id="colab-setup", metadata={"tags": ["colab-setup"]})
    return badge, setup


def cell_tags(cell) -> list:
    return cell.metadata.get("tags", [])


def add_colab_cells(nb, name: str) -> bool:
    """Put the badge first and the setup cell before the first code cell; True when ``nb`` changed."""
    before = nbformat.writes(nb)
    badge, setup = colab_cells(name)
    old_setup = [c for c in nb.cells if "colab-setup" in cell_tags(c)]
    if old_setup and old_setup[0].source == setup.source:
        setup = old_setup[0]  # unchanged: keep its execution count and (empty) outputs
    cells = [c for c in nb.cells if not {"colab-badge", "colab-setup"} & set(cell_tags(c))]
    first_code = next((i for i, c in enumerate(cells) if c.cell_type == "code"), len(cells))
    cells.insert(first_code, setup)
    cells.insert(0, badge)
    if nb.nbformat_minor < 5:  # cell ids arrived in nbformat 4.5
        for c in cells:
            c.pop("id", None)
    nb.cells = cells
    return nbformat.writes(nb) != before


def lint_colab(nb, name: str) -> list[str]:
    """The badge is the first cell and the setup cell the first code cell, exactly as ``colab`` writes them."""
    fix = f"run `python -m lorabook.teach colab` (REPO/BRANCH now {'@'.join(repo_and_branch())})"
    problems = []
    first_code = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), None)
    for cell, where, what in zip(colab_cells(name), (0, first_code), ("first cell", "first code cell")):
        tag = cell.metadata["tags"][0]
        found = [i for i, c in enumerate(nb.cells) if tag in cell_tags(c)]
        if found != [where]:
            problems.append(f"the {what} must be the only cell tagged {tag!r} (tagged: {found}); {fix}")
        elif nb.cells[where].source != cell.source:
            problems.append(f"cell {where}: the {tag!r} cell is stale; {fix}")
    return problems
