"""``show(obj)``: print the library's real source in a notebook, under a ``# lorabook/path.py — name`` header
(the path relative to the package's parent, so the text is the same on every machine). Notebooks show the
library's code instead of re-defining it."""
from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

__all__ = ["source", "show"]


def source(obj, docstring: bool = True) -> str:
    """The source of a function, class, method, property or module, under a ``# path — name`` header."""
    obj = inspect.unwrap(obj.fget if isinstance(obj, property) else obj)
    try:
        code = textwrap.dedent(inspect.getsource(obj))
        path = Path(inspect.getsourcefile(obj)).resolve()
    except (TypeError, OSError) as e:
        raise TypeError(f"show(obj): obj must be a Python function, class, method or module with a source "
                        f"file, got {obj!r} ({e})") from None
    if not docstring:
        code = _drop_docstrings(code)
    name = "" if inspect.ismodule(obj) else f" — {obj.__qualname__}"
    return f"# {_package_relative(obj, path)}{name}\n{code.rstrip()}\n"


def show(obj, docstring: bool = True) -> None:
    """Print ``source(obj, docstring)``: notebooks show the library's code instead of re-defining it."""
    print(source(obj, docstring), end="")


def _package_relative(obj, path: Path) -> str:
    """``lorabook/memory.py``: the path from the top-level package's parent (no machine-specific prefix)."""
    module = inspect.getmodule(obj)
    depth = len(module.__name__.split(".")) if module and module.__name__ != "__main__" else 1
    depth += path.name == "__init__.py"  # lorabook/__init__.py is the module ``lorabook``
    return Path(*path.parts[-depth:]).as_posix()


def _drop_docstrings(code: str) -> str:
    """Remove the docstrings of every def and class in ``code`` (and a blank line right after one)."""
    lines = code.splitlines(keepends=True)
    drop = set()
    for node in ast.walk(ast.parse(code)):
        body = getattr(node, "body", None)
        if not (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body):
            continue
        doc = body[0]
        is_doc = isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)
        if is_doc and len(body) > 1 and body[1].lineno > doc.end_lineno:  # keep a docstring-only body valid
            drop.update(range(doc.lineno - 1, doc.end_lineno))
            if doc.end_lineno < len(lines) and not lines[doc.end_lineno].strip():
                drop.add(doc.end_lineno)
    return "".join(line for i, line in enumerate(lines) if i not in drop)
