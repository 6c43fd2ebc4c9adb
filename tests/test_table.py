"""lorabook._table.text_table: the one formatter the benchmarks, Table 1 and the seed's tables print through."""
import pytest

from lorabook._table import text_table


def test_columns_are_as_wide_as_their_widest_cell_and_aligned():
    out = text_table(["name", "n"], [["a", 1], ["bbb", 100]], align="<>")
    assert out.split("\n") == ["name    n", "----  ---", "a       1", "bbb   100"]


def test_no_rule_and_no_trailing_spaces():
    out = text_table(["x", "note"], [["1", "short"], ["22", "a longer note"]], rule=False)
    assert out.split("\n") == ["x   note", "1   short", "22  a longer note"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(align="<"), "align must give '<' or '>' for each of the 2 columns"),
    (dict(align="<^"), "align must give"),
])
def test_bad_align(kwargs, message):
    with pytest.raises(ValueError, match=message):
        text_table(["a", "b"], [], **kwargs)


def test_a_short_row_is_an_error():
    with pytest.raises(ValueError, match="every row must have 2 cells"):
        text_table(["a", "b"], [["only one"]])
