"""The checks every config's ``__post_init__`` uses: an invalid value raises ``ValueError("Class.field must ...,
got value")``. One dialect for `configs.py`, `model/config.py`, `parallel/ds_config.py` and `generation.py`."""
from __future__ import annotations

import math
from typing import Any

__all__ = ["check", "is_int", "is_num", "int_ge", "num_ge", "one_of", "prob", "token_ids"]


def check(cond: bool, name: str, value: Any, requirement: str) -> None:
    """Raise ``ValueError(f"{name} {requirement}, got {value!r}")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"{name} {requirement}, got {value!r}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _label(obj: Any, name: str) -> str:
    return f"{type(obj).__name__}.{name}"


def int_ge(obj: Any, name: str, lo: int, allow_none: bool = False) -> None:
    """``obj.name`` is an int >= ``lo`` (or None when allowed)."""
    v = getattr(obj, name)
    if v is None and allow_none:
        return
    check(is_int(v) and v >= lo, _label(obj, name), v, f"must be an int >= {lo}" + (" or None" if allow_none else ""))


def num_ge(obj: Any, name: str, lo: float, allow_none: bool = False, strict: bool = False) -> None:
    """``obj.name`` is a finite number >= ``lo`` (> with ``strict``; or None when allowed)."""
    v = getattr(obj, name)
    if v is None and allow_none:
        return
    ok = is_num(v) and (v > lo if strict else v >= lo)
    check(ok, _label(obj, name), v,
          f"must be a finite number {'>' if strict else '>='} {lo}" + (" or None" if allow_none else ""))


def one_of(obj: Any, name: str, choices: tuple) -> None:
    v = getattr(obj, name)
    check(v in choices, _label(obj, name), v, f"must be one of {choices}")


def prob(obj: Any, name: str, hi_inclusive: bool = False) -> None:
    """``obj.name`` is in [0, 1) (or [0, 1] with ``hi_inclusive``)."""
    v = getattr(obj, name)
    ok = is_num(v) and 0.0 <= v and (v <= 1.0 if hi_inclusive else v < 1.0)
    check(ok, _label(obj, name), v, f"must be in [0, 1{']' if hi_inclusive else ')'}")


def token_ids(obj: Any, name: str) -> None:
    """``obj.name`` is None or a list of token ids >= 0 (a single int becomes a one-element list)."""
    v = getattr(obj, name)
    if v is None:
        return
    ids = [v] if is_int(v) else list(v)
    check(all(is_int(t) and t >= 0 for t in ids), _label(obj, name), v, "must be a list of token ids >= 0")
    setattr(obj, name, ids)
