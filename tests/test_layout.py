"""The package's layout keeps its rules: no import cycles, no private names across modules, command lines only in
``__main__.py``, every public surface listed in ``__all__``, and importing lorabook changes no other library."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lorabook

PACKAGE = Path(lorabook.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``from X import ...`` names (relative imports resolved against ``path``)."""
    if not node.level:
        return node.module or ""
    base = module_name(path).split(".")
    if not is_package(path):
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (imports for annotations only, never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) for every import in the file, at any depth (lazy imports in functions count too;
    imports under ``if TYPE_CHECKING:`` do not run, so they do not)."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((resolve(path, node), [a.name for a in node.names], node.lineno))
    return found


def lorabook_modules() -> set[str]:
    return {module_name(p) for p in MODULES}


def edges() -> dict[str, set[str]]:
    """module -> the lorabook modules it imports. ``from pkg import name`` where name is a submodule counts as
    importing the submodule (and the package, whose __init__ runs first)."""
    known = lorabook_modules()
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        me = module_name(path)
        out = graph.setdefault(me, set())
        for module, names, _ in imports(path):
            if module == "lorabook" or module.startswith("lorabook."):
                if module in known and module != me:
                    out.add(module)
                for name in names:
                    sub = f"{module}.{name}"
                    if sub in known and sub != me:
                        out.add(sub)
    return graph


def test_the_import_walk_sees_the_package():
    graph = edges()
    assert {"lorabook.lora.layer", "lorabook.quant.nf4", "lorabook.bench.__main__"} <= set(graph)
    assert "lorabook.lora.layer" in graph["lorabook.quant.linear"]  # a real edge is found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module imports, or None. A package importing its own submodules (its ``__init__`` re-exporting
    them) is not a cycle unless a submodule imports back a sibling that imports it."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if node.startswith(nxt + "."):  # a submodule importing its own package's __init__: the parent runs first
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_name_is_imported_across_modules():
    private = [f"{module_name(path)}:{line} imports {name} from {module}"
               for path in MODULES for module, names, line in imports(path)
               if module == "lorabook" or module.startswith("lorabook.")
               for name in names if name.startswith("_") and not name.startswith("__")]  # a private module too:
    # the shared private modules (_checks, _io, _table) are used by importing their public names
    assert private == []


def test_command_lines_live_in_main_modules():
    """argparse only in ``__main__.py``; ``models`` and ``data`` keep a one-call ``python -m`` entry (no options)."""
    offenders = [module_name(p) for p in MODULES if p.name != "__main__.py"
                 and any(m == "argparse" for m, _, _ in imports(p))]
    assert offenders == []
    guarded = sorted(module_name(p) for p in MODULES if p.name != "__main__.py"
                     and 'if __name__ == "__main__":' in p.read_text(encoding="utf-8"))
    assert guarded == ["lorabook.data", "lorabook.models"]


@pytest.mark.parametrize("path", [p for p in MODULES if is_package(p)], ids=module_name)
def test_every_package_lists_its_public_names(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    listed = next((node.value for node in tree.body if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "__all__" for t in node.targets)), None)
    assert listed is not None, f"{module_name(path)} has no __all__"
    names = ast.literal_eval(listed)
    module = __import__(module_name(path), fromlist=["__all__"])
    missing = [n for n in names if not hasattr(module, n)]
    assert missing == [], f"{module_name(path)}.__all__ lists names it does not have: {missing}"
    imported = {a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom) and node.level
                for a in node.names}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}  # names the package's own code uses
    unlisted = sorted(imported - set(names) - used)
    assert unlisted == [], f"{module_name(path)} imports names it neither uses nor lists in __all__: {unlisted}"


def test_importing_every_module_changes_nothing_in_transformers():
    """Importing all of lorabook registers nothing in transformers' attention registries (prefix tuning does that
    when it is applied, ``baselines.register_prefix_attention``)."""
    code = ("import importlib, pkgutil, lorabook\n"
            "from transformers.modeling_utils import AttentionInterface\n"
            "from transformers.masking_utils import AttentionMaskInterface\n"
            "before = (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping))\n"
            "for m in pkgutil.walk_packages(lorabook.__path__, 'lorabook.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "after = (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping))\n"
            "print(sorted(after[0] - before[0]), sorted(after[1] - before[1]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"


def test_one_device_picker():
    """Only ``lorabook.device`` picks the device (everything else asks it); a picker is code that chooses "cuda"
    when it is available and something else otherwise."""
    import re
    picks = re.compile(r"""["']cuda["']\)?\s+if\s+torch\.cuda\.is_available\(\)|if torch\.cuda\.is_available\(\):\s*\n\s*return torch\.device""")
    deciders = [module_name(p) for p in MODULES if picks.search(p.read_text(encoding="utf-8"))]
    assert deciders == ["lorabook"]


def test_the_design_maps_short_names_reach_the_quant_modules():
    import lorabook.quant.double_quant
    import lorabook.quant.nf4
    from lorabook import double_quant, nf4

    assert nf4 is lorabook.quant.nf4 and double_quant is lorabook.quant.double_quant
    with pytest.raises(AttributeError, match="no attribute 'nf5'"):
        lorabook.nf5
