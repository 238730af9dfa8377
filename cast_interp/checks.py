"""Checks of settings at the boundary: a bad number or a wrongly typed value is a clear error when a
config is built (by hand, from the CLI or from a config.json), never a wrong result deep inside."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Optional


def check_int(name: str, v: Any, lo: int, *, none_ok: bool = False, what: str = "") -> None:
    """ValueError unless `v` is an int >= `lo` (bools are not ints here), or None if `none_ok`."""
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        allowed = f"an integer >= {lo}" + (" or None" if none_ok else "")
        raise ValueError(f"{name} must be {allowed}{what}, got {v!r}.")


def check_number(name: str, v: Any, *, lo: Optional[float] = None, hi: Optional[float] = None,
                 lo_open: bool = False, hi_open: bool = False, none_ok: bool = False) -> None:
    """ValueError unless `v` is a finite number in the given range (None allowed if `none_ok`)."""
    if v is None and none_ok:
        return
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        rng = (f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
               f"{'inf' if hi is None else hi}{')' if hi_open else ']'}")
        raise ValueError(f"{name} must be a finite number in {rng}"
                         f"{' or None' if none_ok else ''}, got {v!r}.")


def _matches(v: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin is typing.Union:
        return any(_matches(v, a) for a in args)
    if origin is typing.Literal:
        return v in args
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:  # an int is a valid float (JSON writes 1.0 as 1 sometimes)
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if origin in (list, tuple) or tp in (list, tuple):
        return isinstance(v, (list, tuple))
    if origin is dict or tp is dict:
        return isinstance(v, dict)
    return isinstance(v, tp) if isinstance(tp, type) else True


def check_types(obj: Any) -> None:
    """ValueError naming every field of the dataclass `obj` whose value has the wrong type (e.g. a
    string "8" for an int read from a hand-edited config.json)."""
    hints = typing.get_type_hints(type(obj))
    bad = [f"{f.name}={getattr(obj, f.name)!r} (expected {_describe(hints[f.name])})"
           for f in dataclasses.fields(obj) if not _matches(getattr(obj, f.name), hints[f.name])]
    if bad:
        raise ValueError(f"{type(obj).__name__} has wrongly typed field(s): {'; '.join(bad)}.")


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))
