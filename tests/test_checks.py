"""lorabook._checks: the one validator set. Numbers are numbers (no NaN, ±Inf or bools), the argument is named."""
import math

import pytest
import torch.nn as nn
from hypothesis import given, strategies as st

from lorabook._checks import (bad_choice, check_choice, check_flag, check_int, check_module, check_number,
                              check_positive_int)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None, 1j])
def test_check_number_refuses_what_is_not_a_finite_real(value):
    with pytest.raises(ValueError, match="lr must be a finite number"):
        check_number("lr", value)


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300))
def test_check_number_bounds_open_and_closed(x):
    assert check_number("x", x) == x
    if x > 0:
        assert check_number("x", x, low=0, low_open=True) == x
    if 0 <= x < 1:
        assert check_number("x", x, low=0, high=1, high_open=True) == x
    else:
        with pytest.raises(ValueError, match=r"x must be a finite number in \[0, 1\)"):
            check_number("x", x, low=0, high=1, high_open=True)


@pytest.mark.parametrize("value", [True, False, 1.0, "3", None, -1, 0])
def test_check_positive_int_refuses_bools_floats_and_non_positive(value):
    with pytest.raises(ValueError, match="r must be a positive int"):
        check_positive_int("r", value)


def test_check_int_bounds_and_messages():
    assert check_int("n", 3, low=0, high=3) == 3
    with pytest.raises(ValueError, match="n must be an int >= 4 <= 9, got 3"):
        check_int("n", 3, low=4, high=9)
    with pytest.raises(ValueError, match="n must be an int, got True"):
        check_int("n", True)


def test_check_choice_flag_and_module():
    assert check_choice("backend", "c", ("c", "torch")) == "c"
    with pytest.raises(ValueError, match=r"backend must be one of \['c', 'torch'\], got 'cuda'"):
        check_choice("backend", "cuda", ("c", "torch"))
    with pytest.raises(ValueError, match="must be one of"):
        check_choice("backend", True, (1, 2))  # True == 1, but a bool is not a choice here
    with pytest.raises(ValueError, match="must be one of"):
        check_choice("backend", ["c"], {"c": 1})  # unhashable: refused, not a TypeError from `in`
    assert check_flag("resume", False) is False
    with pytest.raises(ValueError, match="resume must be True or False, got 1"):
        check_flag("resume", 1)
    layer = nn.Linear(2, 2)
    assert check_module("model", layer) is layer
    with pytest.raises(TypeError, match="model must be a torch nn.Module, got str 'SmolLM2'"):
        check_module("model", "SmolLM2")
    assert "optimizer must be one of ['adamw']" in str(bad_choice("optimizer", "sgd", ["adamw"]))
