"""One save/load protocol for settings: `to_dict()` gives plain JSON values (with a `"format"`
version where the dict is not hashed elsewhere), `from_dict()` reads them back and refuses, with the
key and the fix, a key it does not know or a format it cannot read.

A dict written before formats existed has no `"format"` key: it is read as the current format
(the fields did not change), so the result and map files of earlier runs still load.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, TypeVar

T = TypeVar("T")


def check_format(owner: str, d: dict, current: str) -> dict:
    """`d` without its `"format"` key, after checking that the format is `current` (absent: a dict
    written before formats, read as `current`)."""
    if not isinstance(d, dict):
        raise ValueError(f"A {owner} is read from a dict (JSON object), got {type(d).__name__}.")
    d = dict(d)
    fmt = d.pop("format", current)
    if fmt != current:
        raise ValueError(f"{owner} dict has format {fmt!r}; this cast_interp reads {current!r}. It "
                         "was written by another version of cast_interp: read it with that "
                         "version, or make the settings again with this one.")
    return d


def check_known(owner: str, d: dict, known: Iterable[str], fix: str = "") -> None:
    """ValueError naming every key of `d` not in `known`, with the fix (a typo, or another
    version's field)."""
    known = sorted(known)
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"Unknown {owner} field(s) {unknown}; known: {known}. "
                         + (fix or "Remove the key or correct its spelling (a file written by "
                            "another version of cast_interp: read it with that version)."))


def config_from_dict(cls: type[T], d: dict, *,
                     convert: Optional[Callable[[dict], dict]] = None) -> T:
    """`cls(**d)` for a settings dataclass with a `FORMAT` class attribute: the format and the keys
    checked first (`check_format`, `check_known`); `convert` turns JSON values back into the
    fields' types (e.g. lists into tuples)."""
    d = check_format(cls.__name__, d, cls.FORMAT)
    check_known(cls.__name__, d, (f.name for f in dataclasses.fields(cls)))
    return cls(**(convert(d) if convert else d))


def config_to_dict(obj: Any, *, with_format: bool = True) -> dict:
    """The fields of the settings dataclass `obj` (nested dataclasses as dicts, tuples as lists),
    led by its `"format"` when `with_format`."""
    d = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return {"format": type(obj).FORMAT, **d} if with_format else d


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and hasattr(v, "to_dict"):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v
