"""``python -m lorabook.teach SUBCOMMAND``: the teaching tools' command line.

Notebooks default to ``notebooks/[0-9][0-9]_*.ipynb``::

    student --out DIR [NB ...]   write student copies: solutions -> stubs, hidden tests and outputs removed
    check [NB ...]               solutions run clean; in the student copy exactly the check cells fail
    run NB ...                   execute in place, keep execution counts, strip volatile metadata
    lint [NB ...]                nbgrader metadata, grade ids, outputs (paths, addresses, counts), Colab cells
    colab [NB ...]               (re)write the Colab badge and setup cells from REPO/BRANCH
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import notebooks as nt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorabook.teach", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("::\n\n")[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    help_nb = f"notebooks (default: {nt.DEFAULT_GLOB})"
    s = sub.add_parser("student", help="write student copies")
    s.add_argument("--out", required=True, metavar="DIR", help="folder for the student copies")
    s.add_argument("notebooks", nargs="*", metavar="NB", help=help_nb)
    c = sub.add_parser("check", help="solutions run clean; in student copies exactly the check cells fail")
    c.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    c.add_argument("notebooks", nargs="*", metavar="NB", help=help_nb)
    r = sub.add_parser("run", help="execute notebooks in place, keep execution counts, strip volatile metadata")
    r.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    r.add_argument("notebooks", nargs="+", metavar="NB")
    for name, text in [("lint", "check cell conventions and outputs"), ("colab", "(re)write Colab cells")]:
        sub.add_parser(name, help=text).add_argument("notebooks", nargs="*", metavar="NB", help=help_nb)
    a = p.parse_args(argv)
    try:
        paths = nt.notebook_paths(a.notebooks)
        if a.command == "student":
            return nt.student_command(paths, Path(a.out))
        if a.command in ("check", "run") and a.timeout <= 0:
            raise nt.UsageError(f"--timeout must be a positive number of seconds, got {a.timeout}")
        command = {"check": nt.check_command, "run": nt.run_command, "lint": nt.lint_command,
                   "colab": nt.colab_command}[a.command]
        return command(paths, a.timeout) if a.command in ("check", "run") else command(paths)
    except nt.UsageError as e:
        p.error(str(e))  # prints usage and the message, exits with status 2


if __name__ == "__main__":
    sys.exit(main())
