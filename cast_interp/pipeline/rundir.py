"""A run's directory: what produced it (`run_manifest`), claiming it (`claim_run_dir`: refuse
another run's files, lock it), and reading back what an earlier invocation finished (a piece is
re-used only when the run wrote it and its key matches). Also the run's log line (`_log`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from .. import distributed
from ..io import json_field, read_json, to_jsonable
from .config import ADDITIVE_FIELDS, PIPELINE_VERSION, RunConfig

_T0 = time.time()


def _log(msg: str) -> None:
    w = distributed.world()
    who = f" r{w.rank}/{w.world_size}" if w.world_size > 1 else ""
    print(f"[cast{who} {time.time() - _T0:7.1f}s] {msg}", flush=True)


class RunMismatchError(ValueError):
    """The run directory holds pieces of another run (other settings, data or model); `.reason`
    says what differs (the message adds the fix)."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}. Pass --overwrite (overwrite=True) to delete that run's files "
                         "and start over, or use another --out.")
        self.reason = reason


def run_manifest(cfg: RunConfig, model, data: dict) -> dict:
    """What produced a run's pieces: the settings they depend on, a fingerprint of each data split
    (before self-reference answers) and the model's identity with a weight fingerprint."""
    from ..data import SPLIT_FRACTIONS
    from ..model import model_id, weight_fingerprint

    d = cfg.to_dict()
    return {"version": PIPELINE_VERSION,
            "settings": {k: v for k, v in d.items() if k not in ADDITIVE_FIELDS},
            "data": {k: v.fingerprint() for k, v in data.items()},
            "split": {"seed": cfg.split_seed, "fractions": list(SPLIT_FRACTIONS)},
            "model": {**model_id(model), "weights": weight_fingerprint(model)}}


def _recorded_manifest(out: Path) -> Optional[dict]:
    """The manifest of the run in `out` (its run.json, checked against the run directory's
    manifest.json), or None for a directory without a run."""
    from ..io import RunDirectory

    if not (out / "run.json").exists():
        return None
    RunDirectory(out).verify(out / "run.json")
    doc = read_json(out / "run.json", expect=dict)
    json_field(doc, "settings", dict, out / "run.json")
    return doc
def _manifest_difference(old: dict, new: dict) -> list[str]:
    new = to_jsonable(new)
    diff = [f"{k} ({old['settings'].get(k)!r} -> {v!r})" for k, v in new["settings"].items()
            if k in old.get("settings", {}) and old["settings"][k] != v]
    diff += [f"{part} fingerprint" for part in ("data", "model")
             if part in old and old[part] != new[part]]
    return diff


def claim_run_dir(out: Path, manifest: dict, *, overwrite: bool = False) -> None:
    """Make `out` this run's directory, before anything is written. Refused (before any change):
    a file or unwritable path, a non-empty folder that is not a run directory, a symbolic link
    inside, another run in progress (`RunLock`), or a run of other settings, data or model
    (`RunMismatchError`) unless `overwrite`, which deletes only the files that run wrote (its
    manifest.json lists them) first. Leftover `.partial` files of our killed writes are removed.
    Takes the folder's lock (released by `run_experiment`)."""
    from ..io import RunDirectory, RunLock, check_out_dir, check_run_dir, remove_own_partials

    check_out_dir(out)
    check_run_dir(out, "run")
    lock = RunLock(out)
    lock.acquire()
    _LOCKS.append(lock)
    try:
        old = _recorded_manifest(out)
    except ValueError as exc:  # unreadable, edited or from another version
        if not overwrite:
            raise RunMismatchError(f"{out} holds a run this version cannot use ({exc})"
                                   ) from None
        old = None
    if overwrite:
        RunDirectory(out).remove_written()
    elif old is not None:
        diff = _manifest_difference(old, manifest)
        if diff:
            raise RunMismatchError(
                f"{out} holds a run made with other settings, data or model ({'; '.join(diff)}): "
                "its pieces cannot be mixed with this run's")
    remove_own_partials(out)
    RunDirectory(out).start()


_LOCKS: list = []  # the run locks this process holds (released when its run ends)


def _release_locks() -> None:
    while _LOCKS:
        _LOCKS.pop().release()


def _load_piece(path: Path, key: str) -> Optional[dict]:
    """A finished piece (or stage-4 summary) on disk with this key, else None. A file that is not
    what the run wrote (manifest.json) is recomputed, and the log says why; one that is but does
    not hold a valid piece is an error naming the file and field."""
    if not path.exists():
        return None
    if _changed(path):
        return None
    try:
        piece = read_json(path, expect=dict)
    except FileNotFoundError:
        return None
    if piece.get("key") != key:
        return None
    check_piece(piece, path)
    return piece


def _changed(path: Path) -> bool:
    """Whether a file about to be re-used differs from what the run wrote (logged: recomputed)."""
    from ..io import changed_since_written

    why = changed_since_written(path)
    if why is not None:
        _log(f"{why}: recomputed")
    return why is not None


def check_piece(piece: dict, path: Path) -> None:
    """ValueError naming `path` and the field, unless `piece` (an arm's or the original's result)
    has an `eval` object and per-prompt values that are lists of finite numbers or null (NaN is
    written as null: undefined, never a number)."""
    if "summary" in piece or "per_prompt" not in piece and "eval" not in piece:
        return  # a stage-4 summary: checked by its reader
    json_field(piece, "eval", dict, path)
    per_prompt = json_field(piece, "per_prompt", dict, path)
    for metric, values in per_prompt.items():
        json_field(per_prompt, metric, list, path, where="per_prompt.")
        for i, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v)):
                raise ValueError(f"{path}: field 'per_prompt.{metric}[{i}]' must be a finite "
                                 f"number or null, got {v!r:.40}; delete the file and re-run to "
                                 "recompute it.")
    if "piece" in piece:
        json_field(piece, "tuning", dict, path)
        json_field(piece, "skip", list, path)


def _state_key(path: Path) -> Optional[str]:
    """The key stored in a safetensors file's metadata (None if absent or unreadable)."""
    if not path.exists() or _changed(path):
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("key")
        return None if raw is None else json.loads(raw)  # io stores metadata values as JSON
    except Exception:  # truncated or not a safetensors file: treat as missing
        return None


def _invocations(out: Path, doc: dict, cfg: RunConfig) -> list[dict]:
    """The wall time of every invocation that worked on this directory, this one last: a resumed
    run or a later `attribute` re-uses finished stages, so its own `time_s` is not the run's cost.
    Stage times of re-used stages stay those of the invocation that computed them."""
    old: list[dict] = []
    if (out / "results.json").exists():
        try:
            if _changed(out / "results.json"):
                raise ValueError("changed")
            prev = read_json(out / "results.json", expect=dict)
            old = prev.get("invocations") or [{"time_s": prev["time_s"],
                                               "timings": prev.get("timings", {})}]
            for i, inv in enumerate(old):
                json_field(inv, "time_s", (int, float), out / "results.json",
                           where=f"invocations[{i}].")
            for name, v in (old[0].get("timings") or {}).items():
                json_field(old[0]["timings"], name, (int, float), out / "results.json",
                           where="invocations[0].timings.")
                doc["timings"][name] = max(v, doc["timings"].get(name, 0.0))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            # Unreadable or edited: count this invocation alone, and say so.
            _log(f"earlier invocations not counted in the time ({exc})")
            old = []
    return old + [{"time_s": doc["time_s"], "timings": dict(doc["timings"]),
                   "world_size": doc["distributed"]["world_size"],
                   "attribute": bool(cfg.attribute), "attribution_arms": list(cfg.attribution_arms)}]
