"""The argument validators every lorabook module uses: one message style, the argument named, nothing let through.

Numbers are numbers: a bool is not an int here (``True`` is not a rank), and NaN or ±Inf never pass a bound
(``nan <= 0`` is False, which is how a plain ``if value <= low`` lets NaN through). Each check returns the value
(as a plain int / float) so a caller can write ``r = check_positive_int("r", r)``.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_positive_int", "check_number", "check_choice", "bad_choice", "check_module",
           "check_adam_hyperparameters",
           "check_flag"]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool) with ``low <= value <= high`` where given."""
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = " ".join(b for b in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "")
                          if b)
        raise ValueError(f"{name} must be an int{' ' + bounds if bounds else ''}, got {value!r}")
    return int(value)


def check_positive_int(name: str, value) -> int:
    """An int > 0 (not a bool)."""
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool, not NaN, not ±Inf) in [low, high]; ``low_open`` / ``high_open`` exclude
    the bound itself."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        where = (f" in {lo}{hi}" if low is not None and high is not None else
                 f" {'>' if low_open else '>='} {low}" if low is not None else
                 f" {'<' if high_open else '<='} {high}" if high is not None else "")
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def bad_choice(name: str, value, allowed) -> ValueError:
    """The error for a value outside ``allowed`` (returned, so the caller raises it)."""
    return ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_choice(name: str, value, allowed):
    """``value`` if it is one of ``allowed`` (compared by equality, so 1 == True is refused by type too)."""
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
        raise bad_choice(name, value, allowed)
    try:
        ok = value in allowed
    except TypeError:  # an unhashable value and a dict / set of allowed values
        ok = False
    if not ok:
        raise bad_choice(name, value, allowed)
    return value


def check_flag(name: str, value) -> bool:
    """A real bool (an int 0/1 is refused: it is usually a misplaced positional argument)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_module(name: str, value):
    """A torch ``nn.Module`` (a str, a path or None where a model goes is a TypeError naming the argument)."""
    import torch.nn as nn

    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch nn.Module, got {type(value).__name__} {_short(value)}")
    return value


def _short(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def check_adam_hyperparameters(lr, betas, eps, weight_decay) -> tuple[float, float]:
    """Adam(W)'s arguments checked, each error naming its argument; returns (beta1, beta2)."""
    check_number("lr", lr, low=0)
    check_number("eps", eps, low=0)
    check_number("weight_decay", weight_decay, low=0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_number("betas[0]", betas[0], low=0, high=1, high_open=True)
    check_number("betas[1]", betas[1], low=0, high=1, high_open=True)
    return betas[0], betas[1]
