"""A run's directory: where each of its files goes (`RunDir`, the one place that names them), what
produced it (`run_manifest`), claiming it (`claim_run_dir`: refuse another run's files, lock it),
and reading back what an earlier invocation finished (a piece is re-used only when the run wrote it
and its key matches). Also the run's log line (`_log`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .. import distributed
from ..io import json_field, read_json, to_jsonable
from .config import ADDITIVE_FIELDS, PIPELINE_VERSION, STAGES, RunConfig

_T0 = time.time()
RESULTS_FORMAT = "run-results-1"  # results.json
PIECE_FORMAT = "run-piece-1"      # arms/<piece>.json and arms/original.json


@dataclass(frozen=True, init=False)
class RunDir:
    """The layout of a run directory: every file a run writes or reads, named here once.

        config.json                  the run's settings (`RunConfig.to_dict`)
        run.json                     what produced it (`run_manifest`)
        results.json                 every piece, the comparisons (`report.compare_arms`)
        report.md, figures/          the report and its figures
        self_reference_{val,train}.jsonl   the original model's own benign answers (cached)
        diagnosis/                   stage 1's `ConflictMap`
        arms/<piece>.json            a tuned and evaluated piece; arms/original.json the original
        arms/<piece>_state.safetensors     the tuned weights stage 4 reads (full: full_state)
        attribution/<arm>/           stage 4 of an arm: its `AttributionResult` and summary
        attribution/self_reference_test.jsonl   stage 4's reference answers (cached)

    `io.RunDirectory` records which of these files the run wrote (manifest.json); this says where
    each one goes."""

    root: Path

    def __init__(self, root: Union[str, Path]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def self_reference(self, split: str) -> Path:
        """The cached self-reference answers of the benign "val" or "train" split."""
        return self.root / f"self_reference_{split}.jsonl"

    @property
    def diagnosis(self) -> Path:
        return self.root / "diagnosis"

    @property
    def arms(self) -> Path:
        return self.root / "arms"

    def piece(self, name: str) -> Path:
        """A piece's result (`Piece.name`; "original" for the original model's evaluation)."""
        return self.arms / f"{name}.json"

    @property
    def original(self) -> Path:
        return self.piece("original")

    def tuned_state(self, piece: Any) -> Path:
        """The kept tuned weights of `piece` (a `Piece`): full tuning's are `full_state`."""
        name = "full_state" if piece.method == "full" else f"{piece.name}_state"
        return self.arms / f"{name}.safetensors"

    @property
    def attribution(self) -> Path:
        return self.root / "attribution"

    def attribution_arm(self, arm: str) -> Path:
        """Stage 4's folder for `arm` (its `AttributionResult` files and `attribution_summary`)."""
        return self.attribution / arm

    def attribution_summary(self, arm: str) -> Path:
        return self.attribution_arm(arm) / "attribution.json"

    @property
    def attribution_reference(self) -> Path:
        return self.attribution / "self_reference_test.jsonl"


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
            "settings": {k: v for k, v in d.items() if k not in ADDITIVE_FIELDS and k != "format"},
            "data": {k: v.fingerprint() for k, v in data.items()},
            "split": {"seed": cfg.split_seed, "fractions": list(SPLIT_FRACTIONS)},
            "model": {**model_id(model), "weights": weight_fingerprint(model)}}


def _recorded_manifest(out: Path) -> Optional[dict]:
    """The manifest of the run in `out` (its run.json, checked against the run directory's
    manifest.json), or None for a directory without a run."""
    from ..io import RunDirectory

    path = RunDir(out).manifest
    if not path.exists():
        return None
    RunDirectory(out).verify(path)
    doc = read_json(path, expect=dict)
    json_field(doc, "settings", dict, path)
    return doc


def _flat_settings(settings: dict) -> dict:
    """Settings with each stage's section spread out as "stage.field" (so a difference names the
    field)."""
    out = {}
    for k, v in settings.items():
        if k in STAGES and isinstance(v, dict):
            out.update({f"{k}.{f}": x for f, x in v.items() if f != "format"})
        else:
            out[k] = v
    return out


def _manifest_difference(old: dict, new: dict) -> list[str]:
    new = to_jsonable(new)
    was, now = _flat_settings(old.get("settings", {})), _flat_settings(new["settings"])
    diff = [f"{k} ({was[k]!r} -> {v!r})" for k, v in now.items() if k in was and was[k] != v]
    diff += [f"{part} fingerprint" for part in ("data", "model")
             if part in old and old[part] != new[part]]
    return diff


def _other_run(old: dict, new: dict) -> Optional[str]:
    """What makes the recorded run `old` another run than `new` (None: the same run)."""
    if old.get("version") != new.get("version"):
        # Another version keys its pieces otherwise (pipeline-2: before the stage configs were
        # hashed), so none of them would be re-used.
        return (f"a run of {old.get('version')!r}, whose pieces this cast_interp "
                f"({new.get('version')!r}) keys otherwise and would all redo")
    diff = _manifest_difference(old, new)
    return f"a run made with other settings, data or model ({'; '.join(diff)})" if diff else None


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
        why = _other_run(old, manifest)
        if why:
            raise RunMismatchError(f"{out} holds {why}: its pieces cannot be mixed with this run's")
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
    path = RunDir(out).results
    if path.exists():
        try:
            if _changed(path):
                raise ValueError("changed")
            prev = read_json(path, expect=dict)
            old = prev.get("invocations") or [{"time_s": prev["time_s"],
                                               "timings": prev.get("timings", {})}]
            for i, inv in enumerate(old):
                json_field(inv, "time_s", (int, float), path, where=f"invocations[{i}].")
            for name, v in (old[0].get("timings") or {}).items():
                json_field(old[0]["timings"], name, (int, float), path,
                           where="invocations[0].timings.")
                doc["timings"][name] = max(v, doc["timings"].get(name, 0.0))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            # Unreadable or edited: count this invocation alone, and say so.
            _log(f"earlier invocations not counted in the time ({exc})")
            old = []
    return old + [{"time_s": doc["time_s"], "timings": dict(doc["timings"]),
                   "world_size": doc["distributed"]["world_size"],
                   "attribute": bool(cfg.attribute), "attribution_arms": list(cfg.attribution_arms)}]
