"""``check(student, reference, *args, ...)``: compare a student's exercise with the library's, like ``cmp``.

``check(student, reference, *args, rtol=1e-5, atol=1e-8, cases=None, hint=None, **kwargs)`` compares like
``cmp``.
Callables (functions, classes; an ``nn.Module`` only when given arguments) are called, each with its own
deep copy of the arguments (so pass small inputs, not the base model) and the same RNG state, once per case
in ``cases=[(args, kwargs), ...]`` (also the way to pass a keyword named like one of check's own);
anything else is compared as a value. Values may nest dicts, lists and tuples of numbers, strings, tensors,
numpy arrays, dataclasses and modules (compared by ``state_dict``). Floats match within
``|yours - library| <= atol + rtol * |library|``; integers, booleans and strings must match exactly; shapes,
dtypes and container types must match. Each case prints one line; a mismatch raises ``AssertionError``
saying where, by how much, and what each side returned. A stub that raises ``NotImplementedError`` fails
with "not implemented yet — write your solution in the cell above", so an nbgrader check cell errors.
``check`` returns ``CheckResult(exact, max_diff)`` (it displays nothing in a notebook).

``expect_stub_failure(source, where)`` runs a student copy's check cell in the notebook's namespace and
raises unless it fails on the stub (``lorabook.teach.nbval_student`` runs it inside the instructor's run).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import sys

import numpy as np
import torch

__all__ = ["CheckResult", "check", "NOT_IMPLEMENTED", "expect_stub_failure"]

NOT_IMPLEMENTED = "not implemented yet — write your solution in the cell above"


@dataclasses.dataclass
class CheckResult:
    """What ``check`` found: every case bit-exact, and the largest absolute difference (0.0 when exact)."""

    exact: bool
    max_diff: float

    def _ipython_display_(self):  # the ✓ lines already said it; a notebook shows no Out[] for the result
        pass


class _Mismatch(Exception):
    """Raised inside ``_compare``; ``check`` turns it into an AssertionError with the case's context."""


def check(student, reference, *args, rtol: float = 1e-5, atol: float = 1e-8, cases=None, hint: str | None = None,
          **kwargs) -> CheckResult:
    """Compare ``student`` with ``reference`` (the library's): call both per case, or compare two values.

    ``hint`` (words: what the answer depends on, the usual mistake) is added to a mismatch's message, not to
    "not implemented yet"."""
    if hint is not None and not isinstance(hint, str):
        raise TypeError(f"check(..., hint=...): hint must be a str (words for the student), got {type(hint).__name__}")
    try:
        return _check(student, reference, args, kwargs, rtol, atol, cases)
    except AssertionError as e:
        if hint is None or str(e) == NOT_IMPLEMENTED:
            raise
        raise AssertionError(f"{e}\n  hint: {hint}") from e.__cause__


def _check(student, reference, args, kwargs, rtol, atol, cases) -> CheckResult:
    has_args = bool(args or kwargs or cases)
    calls = [_is_call(student, has_args), _is_call(reference, has_args)]
    if calls[0] != calls[1]:
        raise TypeError(f"check(student, reference): both must be callables or both values, got "
                        f"student={type(student).__name__}, reference={type(reference).__name__}")
    if not calls[0]:
        if has_args:
            raise TypeError("check(student, reference, ...): arguments and cases= are only for callables")
        return _report([_compare_case(student, reference, rtol, atol, "")], 1)
    if cases is not None and (args or kwargs):
        raise TypeError("check(...): give either positional/keyword arguments or cases=[(args, kwargs), ...]")
    cases = [(args, kwargs)] if cases is None else [_as_case(c, i) for i, c in enumerate(cases)]
    if not cases:
        raise ValueError("check(..., cases=[]): cases must hold at least one (args, kwargs) pair")
    results = []
    for i, (a, kw) in enumerate(cases):
        label = f"case {i + 1} of {len(cases)} ({_brief_args(a, kw)})" if len(cases) > 1 else ""
        want, got = _call_both(reference, student, a, kw, label)
        results.append(_compare_case(got, want, rtol, atol, label))
    return _report(results, len(cases))


def _is_call(x, has_args: bool) -> bool:
    """Callables are called; a module (also callable) only when there are arguments to call it with."""
    return callable(x) and (has_args or not isinstance(x, torch.nn.Module))


def _as_case(case, i: int):
    if not (isinstance(case, (tuple, list)) and len(case) == 2 and isinstance(case[1], dict)):
        raise TypeError(f"check(..., cases=...): case {i} must be an (args, kwargs) pair, got {case!r}")
    return tuple(case[0]), case[1]


def _call_both(reference, student, args, kwargs, label):
    """Run the library's function, then the student's, each on fresh copies and from the same RNG state."""
    rng = _rng_state()
    want = reference(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    _set_rng_state(rng)
    try:
        got = student(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    except NotImplementedError:
        raise AssertionError(NOT_IMPLEMENTED) from None
    except Exception as e:
        where = f" in {label}" if label else ""
        raise AssertionError(f"your function raised {type(e).__name__}: {e}{where}") from e
    return want, got


def expect_stub_failure(source: str, where: str) -> None:
    """Run ``source`` (a student copy's check cell) in the caller's namespace; it must fail on the stub.

    Passes when the cell raises AssertionError or NotImplementedError, and raises RuntimeError when it passes
    (a check that cannot fail) or fails for another reason. In IPython the namespace is the notebook's and
    magics work. Random states — the global ones and every generator the namespace holds — are restored, so
    the instructor's cells that follow draw the same numbers as in a run without this one."""
    from IPython import get_ipython
    shell = get_ipython()
    namespace = shell.user_ns if shell is not None else sys._getframe(1).f_globals
    code = shell.transform_cell(source) if shell is not None else source
    rng, generators = _rng_state(), _generator_states(namespace)
    try:
        exec(compile(code, f"<student copy of {where}>", "exec"), namespace)
    except (AssertionError, NotImplementedError) as e:
        print(f"student copy: {where} fails on the stub, as it should ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''})")
        return
    except Exception as e:
        raise RuntimeError(f"student copy: {where} fails for another reason: {type(e).__name__}: {e}") from e
    finally:
        _set_rng_state(rng)
        for restore in generators:
            restore()
    raise RuntimeError(f"student copy: {where} passes with the stub — it cannot fail")


def _generator_states(namespace: dict) -> list:
    """A restore() per random generator in ``namespace`` (torch, numpy, random.Random), at its current state."""
    restores = []
    for value in list(namespace.values()):
        if isinstance(value, torch.Generator):
            restores.append(lambda g=value, s=value.get_state(): g.set_state(s))
        elif isinstance(value, np.random.Generator):
            restores.append(lambda g=value, s=copy.deepcopy(value.bit_generator.state):
                            setattr(g.bit_generator, "state", s))
        elif isinstance(value, np.random.RandomState):
            restores.append(lambda g=value, s=value.get_state(): g.set_state(s))
        elif isinstance(value, random.Random):
            restores.append(lambda g=value, s=value.getstate(): g.setstate(s))
    return restores


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state):
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


def _compare_case(got, want, rtol, atol, label):
    try:
        return _compare(got, want, rtol, atol, "result")
    except _Mismatch as e:
        head = f"check failed ({label})" if label else "check failed"
        raise AssertionError(f"{head}: {e}") from None


def _report(results, n_cases) -> CheckResult:
    for i, (exact, diff) in enumerate(results):
        prefix = f"case {i + 1}: " if n_cases > 1 else ""
        print(f"{prefix}✓ exact" if exact else f"{prefix}✓ close (max abs diff {diff:.2g})")
    return CheckResult(exact=all(e for e, _ in results), max_diff=max(d for _, d in results))


def _compare(got, want, rtol, atol, where) -> tuple[bool, float]:
    """(exact, max abs diff) of ``got`` (student) against ``want`` (library); raises _Mismatch."""
    if isinstance(want, torch.nn.Module) and isinstance(got, torch.nn.Module):
        return _compare(dict(got.state_dict()), dict(want.state_dict()), rtol, atol, f"{where}.state_dict()")
    if isinstance(want, (torch.Tensor, np.ndarray)):
        return _compare_arrays(got, want, rtol, atol, where)
    if _is_number(want) and _is_number(got):
        return _compare_numbers(got, want, rtol, atol, where)
    if type(got) is not type(want):
        raise _Mismatch(f"at {where}: the library returned {_type(want)}, yours is {_type(got)}"
                        f"\n  library: {_short(want)}\n  yours:   {_short(got)}")
    if isinstance(want, dict):
        if set(got) != set(want):
            missing, extra = [k for k in want if k not in got], [k for k in got if k not in want]
            raise _Mismatch(f"at {where}: dict keys differ — missing {missing}, unexpected {extra}")
        return _merge([_compare(got[k], want[k], rtol, atol, f"{where}[{k!r}]") for k in want])
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            raise _Mismatch(f"at {where}: length differs — yours {len(got)}, library {len(want)}")
        return _merge([_compare(g, w, rtol, atol, f"{where}[{i}]") for i, (g, w) in enumerate(zip(got, want))])
    if dataclasses.is_dataclass(want):
        return _merge([_compare(getattr(got, f.name), getattr(want, f.name), rtol, atol, f"{where}.{f.name}")
                       for f in dataclasses.fields(want)])
    if isinstance(want, str) and got != want:
        i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise _Mismatch(f"at {where}: strings differ at character {i}\n  library: {_short(want)}\n"
                        f"  yours:   {_short(got)}")
    if not bool(got == want):
        raise _Mismatch(f"at {where}: values differ\n  library: {_short(want)}\n  yours:   {_short(got)}")
    return True, 0.0


def _compare_numbers(got, want, rtol, atol, where):
    if isinstance(got, (bool, np.bool_)) != isinstance(want, (bool, np.bool_)):
        raise _Mismatch(f"at {where}: the library returned {_type(want)}, yours is {_type(got)}")
    got, want = got.item() if hasattr(got, "item") else got, want.item() if hasattr(want, "item") else want
    if got == want or (_isnan(got) and _isnan(want)):
        return True, 0.0
    diff = abs(got - want)
    both_int = isinstance(got, int) and isinstance(want, int)
    if both_int or not diff <= atol + rtol * abs(want):
        rule = "integers must match exactly" if both_int else f"rtol={rtol:g}, atol={atol:g}"
        raise _Mismatch(f"at {where}: yours {got!r}, library {want!r} (abs diff {diff:.3g}; {rule})")
    return False, float(diff)


def _compare_arrays(got, want, rtol, atol, where):
    kind = "torch.Tensor" if isinstance(want, torch.Tensor) else "numpy.ndarray"
    if not isinstance(got, type(want)):
        hint = " (use .item() / torch.tensor(...) / .numpy() to convert)"
        raise _Mismatch(f"at {where}: the library returned a {kind}, yours is {_type(got)}{hint}")
    if tuple(got.shape) != tuple(want.shape):
        raise _Mismatch(f"at {where}: shape mismatch — yours {tuple(got.shape)}, library {tuple(want.shape)}")
    if got.dtype != want.dtype:
        raise _Mismatch(f"at {where}: dtype mismatch — yours {got.dtype}, library {want.dtype}")
    g, w = _to_numpy(got), _to_numpy(want)
    floating = w.dtype.kind in "fc"
    same = g == w
    if floating:
        same |= np.isnan(g) & np.isnan(w)
    if same.all():
        return True, 0.0
    if floating:
        ok, rule = np.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True), f"rtol={rtol:g}, atol={atol:g}"
    else:
        ok, rule = same, "integer, boolean and text values must match exactly"
    diff = _max_abs_diff(g, w, same)
    if ok.all():
        return False, diff
    first = tuple(int(i) for i in np.argwhere(~ok)[0])
    raise _Mismatch(f"at {where}: {int((~ok).sum())} of {ok.size} elements differ ({rule})\n"
                    f"  max abs diff {diff:.3g}; first difference at index {first}: "
                    f"yours {_item(g[first])!r}, library {_item(w[first])!r}"
                    + (f"\n  library: {_short(w.tolist())}\n  yours:   {_short(g.tolist())}" if ok.size <= 16 else ""))


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    x = x.detach().cpu()
    if x.is_floating_point() and x.dtype not in (torch.float16, torch.float32, torch.float64):
        x = x.float()  # bfloat16 and float8 have no numpy dtype; float32 holds them exactly
    return x.resolve_conj().numpy()


def _max_abs_diff(g, w, same) -> float:
    if g.dtype.kind not in "biufc":
        return math.inf
    d = np.abs(g.astype(np.complex128 if "c" in g.dtype.kind + w.dtype.kind else np.float64) - w)
    d = np.where(same, 0.0, np.nan_to_num(d, nan=math.inf))
    return float(d.max()) if d.size else 0.0


def _merge(results):
    return all(e for e, _ in results), max((d for _, d in results), default=0.0)


def _item(x):
    return x.item() if isinstance(x, np.generic) else x  # 2.0, not np.float32(2.0)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, complex, np.number, np.bool_))


def _isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _type(x) -> str:
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _short(x, n: int = 200) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def _brief_args(args, kwargs) -> str:
    def brief(x):
        if isinstance(x, (torch.Tensor, np.ndarray)):
            return f"{type(x).__name__}({x.dtype}, shape {tuple(x.shape)})"
        return _short(x, 40)
    return ", ".join([brief(a) for a in args] + [f"{k}={brief(v)}" for k, v in kwargs.items()])
