"""The one text-table formatter: benchmarks, the seed's numbers next to ours, Table 1 all print through it."""
from __future__ import annotations

__all__ = ["text_table"]


def text_table(header: list[str], rows: list[list], align: str | None = None, sep: str = "  ",
               rule: bool = True) -> str:
    """Rows of cells (str(cell) each) under ``header``, each column as wide as its widest cell.

    align: one character per column, "<" (left) or ">" (right); default: every column left. A last left-aligned
    column is not padded (no trailing spaces). rule: a line of dashes under the header (as wide as each column,
    a last left-aligned one as wide as its header)."""
    align = align or "<" * len(header)
    if len(align) != len(header) or set(align) - {"<", ">"}:
        raise ValueError(f"align must give '<' or '>' for each of the {len(header)} columns, got {align!r}")
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    if any(len(r) != len(header) for r in cells):
        raise ValueError(f"every row must have {len(header)} cells (one per header column)")
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: list[str]) -> str:
        parts = [c.rjust(w) if a == ">" else c.ljust(w) for c, w, a in zip(r, width, align)]
        return sep.join(parts).rstrip()

    last = width[-1] if align[-1] == ">" else max(len(cells[0][-1]), 1)  # a long left column: its header's width
    dashes = ["-" * w for w in width[:-1]] + ["-" * last]
    return "\n".join([line(cells[0])] + ([line(dashes)] if rule else []) + [line(r) for r in cells[1:]])
