"""Result files: atomic writes (a reader never sees a half-written file) and JSON helpers."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

PathLike = Union[str, Path]


def check_fields(cls: type, d: dict) -> None:
    """Raise a ValueError naming any key of `d` that is not a field of the dataclass `cls`: a config
    read back from JSON with a typo or from a newer version fails loudly, not silently."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}.")


def atomic_write_text(text: str, path: PathLike) -> None:
    """Write `text` to `path` via a temporary file and `os.replace` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_jsonable(obj: Any) -> Any:
    """Tensors, arrays, numpy scalars, paths and dataclass-like objects -> plain JSON values.

    NaN and inf become None (JSON has no NaN), so an undefined value is explicit, never a number.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if (math.isnan(f) or math.isinf(f)) else f
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    return obj


def atomic_write_json(obj: Any, path: PathLike) -> None:
    atomic_write_text(json.dumps(to_jsonable(obj), indent=2) + "\n", path)


def read_json(path: PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it and re-run.") from exc


def atomic_save_safetensors(tensors: dict, path: PathLike, metadata: dict | None = None) -> None:
    """safetensors file written atomically; `metadata` values are JSON-encoded strings."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={k: json.dumps(to_jsonable(v)) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
