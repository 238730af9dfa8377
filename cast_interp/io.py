"""Result files: atomic writes (a reader never sees a half-written file) and JSON helpers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

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


def check_out_dir(out: PathLike, marker: Optional[str] = None, overwrite: bool = False) -> None:
    """Fail before any work if directory `out` cannot take a result: it is a file, it already holds
    `marker` (a finished result) and not `overwrite`, or it is not writable. Creates it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pass a directory path.")
    if marker is not None and (out / marker).exists() and not overwrite:
        raise ValueError(f"--out {out} already holds a result ({marker}); pass --overwrite to "
                         "replace it, or another --out.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--out {out} is not writable ({exc.strerror}): pick another path."
                         ) from exc


def check_out_file(out: PathLike) -> None:
    """Fail before any work if a result file cannot be written at `out` (a directory, a parent
    that is a file, or not writable); an existing file is replaced."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: pass a file path (e.g. {out / 'eval.json'}).")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"--out {out}: {out.parent} is a file, not a folder; pick another path.")
    check_out_dir(out.parent)


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


def remove_partials(directory: PathLike, *, older_than_s: float = 0.0) -> list[Path]:
    """Delete the leftovers of interrupted atomic writes (`*.partial*` files and folders) under
    `directory`, those last modified more than `older_than_s` seconds ago (a writer in another
    process may still own a fresh one). Returns what was removed."""
    import shutil
    import time

    d = Path(directory)
    if not d.is_dir():
        return []
    now, removed = time.time(), []
    for p in sorted(d.rglob("*.partial*"), reverse=True):
        try:
            if now - p.lstat().st_mtime < older_than_s:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except FileNotFoundError:  # already gone (inside a removed folder)
            continue
    return removed


def sha256_file(path: PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
