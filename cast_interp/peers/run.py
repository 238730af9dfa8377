"""Running the peer comparison (`run_peers`): one piece per method, setting and training seed, from
the original weights each time; several worker processes (one per core) may share a run folder.
The design is `config.py`'s; the reading, `summary.py`'s."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..backend import Model
from ..checks import check_int, check_number
from ..harness import (PRIMARY, CheckpointRecorder, claim_piece, config_key, conflict_maps,
                       evaluators, start_run)
from ..io import atomic_save_safetensors, atomic_write_json, read_json
from ..model import model_id
from .config import (PEERS_FORMAT, PeerPiece, PeersConfig, _lora_label, _share_label,
                     arm_family, plan_peers)
from .interpolation import interpolate_weights, parameter_state
from .lora import LoraConfig
from .summary import summarize_peers

# --------------------------------------------------------------------------------------------------
# Running one piece
# --------------------------------------------------------------------------------------------------


def _restore(model: Model, original: dict) -> None:
    """Every parameter back to its original value (buffers never change in training)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(original[n].to(p.device, p.dtype))


def _setting_value(cfg: PeersConfig, piece: PeerPiece) -> Any:
    if piece.method in ("anchor", "cast_anchor"):
        shares = cfg.anchor_shares if piece.method == "anchor" else cfg.compose_shares
        return next(s for s in shares if _share_label(s) == piece.setting)
    if piece.method == "lora":
        return next(d for d in cfg.lora if _lora_label(d) == piece.setting)
    return piece.setting


def piece_units(piece: PeerPiece, cast_units: list, k: int, model: Model,
                act_scores: Optional[torch.Tensor]) -> list[tuple[int, int]]:
    """The query heads a piece freezes (none for full tuning, interpolation, anchor, LoRA and
    projection; CAST's for CAST and CAST + anchor)."""
    from ..registry.arms import select_arm_units
    from .activation import activation_arm_units

    m = piece.method
    if m in ("cast", "cast_anchor"):
        return [tuple(u) for u in cast_units]
    if m in ("bottom_layers", "top_layers"):
        return select_arm_units(m, None, k, model=model)
    if m in ("act_tune", "act_skip"):
        if act_scores is None:
            raise ValueError(f"{piece.name} needs the activation scores (run_peers computes them).")
        return activation_arm_units(m, act_scores, k, model=model)
    return []


def run_peer_piece(model: Model, piece: PeerPiece, units: list, cfg: PeersConfig, data, curve,
                   test, anchor, *, progress: bool = False) -> dict:
    """Train one piece from the weights `model` holds (the original) and record its checkpoints as
    `verdict.run_piece` does: {"val": {step: {metric: [n]}}, "test": {step: ...}, "budget",
    "n_trainable", "losses", "train_time_s", "curve_time_s", "test_time_s", "wall_time_s", "peer"}.
    `anchor`: benign prompts with the model's own answers (anchor and projection)."""
    from ..sparse_tuning import parameter_budget, safety_finetune
    from .anchor import anchor_finetune
    from .lora import lora_finetune
    from .projection import projected_finetune

    if not piece.trains:
        raise ValueError(f"{piece.name} trains nothing: run it with run_interp_piece.")
    on_step = CheckpointRecorder(model, cfg, curve, test)
    tcfg = cfg.tuning(piece.seed)
    m, value = piece.method, _setting_value(cfg, piece)
    t0 = time.perf_counter()
    if m in ("anchor", "cast_anchor"):
        res = anchor_finetune(model, data.safety_train, anchor, share=value, skip_heads=units,
                              config=tcfg, on_step=on_step)
    elif m == "lora":
        res, _ = lora_finetune(model, data.safety_train, lora=LoraConfig.from_dict(dict(value)),
                               config=cfg.tuning(piece.seed, lr=cfg.lora_lr), on_step=on_step)
    elif m == "projection":
        res = projected_finetune(model, data.safety_train, anchor, mode=value, skip_heads=units,
                                 config=tcfg, on_step=on_step)
    else:
        res = safety_finetune(model, data.safety_train, skip_heads=units, config=tcfg,
                              on_step=on_step)
    total = time.perf_counter() - t0
    peer = res.config.get("peer")
    budget = dict(peer["budget"]) if peer else parameter_budget(model, units, scope=cfg.scope)
    budget["n_trainable"] = int(res.n_trainable)
    train_s = total - on_step.eval_time_s
    if progress:
        v = on_step.val[cfg.steps]
        print(f"[peers] {piece.name}: refusal {np.mean(v['refusal_score']):+.2f} over-refusal "
              f"{np.mean(v[PRIMARY]):+.2f} (train {train_s:.0f} s, curves "
              f"{on_step.curve_time_s:.0f} s, test {on_step.test_time_s:.0f} s)", flush=True)
    peer_rec = None
    if peer:
        peer_rec = {k: v for k, v in peer.items() if k not in ("budget",)}
    return {"piece": asdict(piece), "name": piece.name, "arm": piece.arm,
            "family": arm_family(piece.arm), "skip": [list(u) for u in units],
            "n_trainable": int(res.n_trainable), "budget": budget, "losses": res.losses,
            "lr": res.config["lr"], "peer": peer_rec, **on_step.records(),
            "train_time_s": train_s, "wall_time_s": total}


def run_interp_piece(model: Model, piece: PeerPiece, cfg: PeersConfig, original: dict,
                     tuned: dict, source: dict, curve, test, *, progress: bool = False) -> dict:
    """Evaluate theta(a) of a tuned piece at every a of `cfg.alphas` (no training), both splits:
    {"val": {a: {metric: [n]}}, "test": {a: ...}, "alphas", "source", "budget" (the source's),
    "n_changed", "eval_time_s", "wall_time_s"}. `original`, `tuned`: `parameter_state`s (the
    tuned one may hold only the parameters that changed); `source`: the tuned piece's record."""
    if piece.trains:
        raise ValueError(f"{piece.name} is a trained piece: run it with run_peer_piece.")
    val, tst, changed = {}, {}, None
    t_val = t_test = 0.0
    t0 = time.perf_counter()
    for a in cfg.alphas:
        info = interpolate_weights(model, original, tuned, a)
        changed = info["n_changed"]
        t = time.perf_counter()
        val[f"{a:g}"] = curve(model)
        t_val += time.perf_counter() - t
        t = time.perf_counter()
        tst[f"{a:g}"] = test(model)
        t_test += time.perf_counter() - t
    total = time.perf_counter() - t0
    if progress:
        v = val[f"{cfg.alphas[-1]:g}"]
        print(f"[peers] {piece.name}: at a={cfg.alphas[-1]:g} refusal "
              f"{np.mean(v['refusal_score']):+.2f} over-refusal {np.mean(v[PRIMARY]):+.2f} "
              f"({len(cfg.alphas)} points, curves {t_val:.0f} s, test {t_test:.0f} s)", flush=True)
    return {"piece": asdict(piece), "name": piece.name, "arm": piece.arm,
            "family": arm_family(piece.arm), "source": source["name"], "alphas": list(cfg.alphas),
            "skip": source["skip"], "n_trainable": source["n_trainable"],
            "budget": {**source["budget"], "n_changed": changed}, "losses": [], "lr": source["lr"],
            "peer": {"method": "weight_interpolation", "formula": "(1 - a) theta_original + a "
                     "theta_tuned", "alphas": list(cfg.alphas)},
            "val": val, "test": tst, "train_time_s": 0.0, "curve_time_s": t_val,
            "test_time_s": t_test, "wall_time_s": total,
            "source_train_time_s": source["train_time_s"]}


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _activation_scores(model: Model, data, out: Path, progress: bool) -> torch.Tensor:
    """`head_activation_shift(model, data.safety_cal, data.benign_diag)`, computed once into
    `out/activation_shift.json` (re-used while the prompts and model match)."""
    from ..harness import config_key
    from .activation import head_activation_shift

    key = config_key({"harmful": data.safety_cal.fingerprint(),
                "harmless": data.benign_diag.fingerprint(), "model": model_id(model)})
    f = out / "activation_shift.json"
    if f.exists():
        rec = read_json(f)
        if rec.get("key") == key:
            return torch.tensor(rec["scores"], dtype=torch.float32)
    if progress:
        print(f"[peers] activation shift: {len(data.safety_cal)} harmful vs "
              f"{len(data.benign_diag)} harmless prompts", flush=True)
    s = head_activation_shift(model, data.safety_cal, data.benign_diag)
    atomic_write_json({"key": key, "scores": s.tolist(), "harmful": data.safety_cal.describe(),
                       "harmless": data.benign_diag.describe(), "normalize": "pooled_sd",
                       "space": "result"}, f)
    return s


def _state_key(path: Path) -> Optional[str]:
    """The key a saved tuned state was written with (None when there is no such file)."""
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("key", "null"))


def _load_state(path: Path, key: str) -> dict:
    """The tuned parameters saved for interpolation `{name: tensor}` (checked against `key`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if json.loads((f.metadata() or {}).get("key", "null")) != key:
            raise ValueError(f"{path} holds the tuned weights of another run of that piece; delete "
                             "it and its piece file to train the piece again.")
        return {k: f.get_tensor(k) for k in f.keys()}


def run_peers(model: Model, cfg: PeersConfig, out_dir: Union[str, Path], *,
              progress: bool = True, max_pieces: Optional[int] = None,
              poll_s: float = 5.0) -> dict:
    """Run (or resume) the peer comparison into `out_dir`; returns `summarize_peers`'s summary.

    Files: `peers.json` (config, data, model, versions), `diagnosis/general/` (CAST's map),
    `activation_shift.json`, `original.json` (the untrained model on both splits),
    `pieces/<name>.json` (one per finished piece, written atomically with its key), and
    `states/<name>.safetensors` (the tuned parameters of full tuning and CAST that an
    interpolation piece reads; float32, only those that changed). A finished piece with the same
    key is skipped on resume; a different config or data in `out_dir` is an error (nothing is
    changed). `max_pieces` stops after that many newly run pieces. Several processes may share
    the folder (one per core): each claims a piece (`harness.claim_piece`) and skips pieces another
    live process holds; an interpolation whose source another process is still training waits
    for it (polling every `poll_s` seconds) after the rest of the plan.
    """
    from ..io import check_out_dir
    from ..sparse_tuning import k_from_fraction

    if not isinstance(cfg, PeersConfig):
        raise TypeError(f"cfg must be a PeersConfig, got {type(cfg).__name__}.")
    check_int("max_pieces", max_pieces, 0, none_ok=True)
    check_number("poll_s", poll_s, lo=0)
    out = Path(out_dir)
    check_out_dir(out)
    if (out / "verdict.json").exists():
        raise ValueError(f"{out} holds a verdict run (verdict.json): give the peer comparison its "
                         "own directory (nothing was changed).")
    out.mkdir(parents=True, exist_ok=True)
    data, meta, timings = start_run(model, cfg, out, meta_file="peers.json", fmt=PEERS_FORMAT,
                                    what="peer comparison")

    maps = conflict_maps(model, cfg, data, out, cfg.maps, progress=progress, timings=timings)
    pieces = plan_peers(cfg)
    act = None
    if any(p.method in ("act_tune", "act_skip") for p in pieces):
        t = time.perf_counter()
        act = _activation_scores(model, data, out, progress)
        timings.setdefault("activation_s", time.perf_counter() - t)
    original = parameter_state(model)
    curve, test = evaluators(model, cfg, data, out)
    atomic_write_json(timings, out / "timings.json")

    from ..registry.arms import select_arm_units

    k = k_from_fraction(cfg.k_fraction, model.cfg.n_layers * model.cfg.n_heads)
    cast_units = select_arm_units("cast", maps["general"], k, model=model)
    anchor = data.benign_diag
    units = {p.name: piece_units(p, cast_units, k, model, act) for p in pieces}
    keys: dict[str, str] = {}
    for p in pieces:  # sources come first in the plan
        if p.trains:
            tcfg = cfg.tuning(p.seed, lr=cfg.lora_lr if p.method == "lora" else None)
            keys[p.name] = config_key({"method": p.method, "setting": _setting_value(cfg, p),
                                 "tuning": tcfg.to_dict(), "units": units[p.name],
                                 "data": meta["data"], "curve": [cfg.curve_every, cfg.val_dtype],
                                 "test": cfg.test_checkpoints, "model": meta["model"]})
        else:
            keys[p.name] = config_key({"method": "interp", "source": keys[p.source.name],
                                 "alphas": cfg.alphas, "curve": cfg.val_dtype})
    dependents = {s: [p.name for p in pieces if p.source is not None and p.source.name == s]
                  for s in keys}
    path_of = {p.name: out / "pieces" / f"{p.name}.json" for p in pieces}
    state_of = {s: out / "states" / f"{s}.safetensors" for s in keys}

    def finished(name: str) -> bool:
        path = path_of[name]
        return path.exists() and read_json(path).get("key") == keys[name]

    def done(name: str) -> bool:
        if not finished(name):
            return False
        waiting = [d for d in dependents[name] if not finished(d)]
        return not waiting or _state_key(state_of[name]) == keys[name]

    trained = 0
    while True:
        ran, blocked = False, False
        for i, piece in enumerate(pieces):
            if done(piece.name):
                continue
            src = piece.source
            if src is not None and not (finished(src.name) and
                                        _state_key(state_of[src.name]) == keys[src.name]):
                blocked = True  # its source is not trained yet (maybe by another process)
                continue
            if max_pieces is not None and trained >= max_pieces:
                _restore(model, original)
                return summarize_peers(out, write=True)
            claim = claim_piece(path_of[piece.name].with_suffix(".claim"))
            if claim is None:  # another worker on this folder is running it
                continue
            try:
                if progress:
                    print(f"[peers] piece {i + 1}/{len(pieces)} {piece.name}", flush=True)
                _restore(model, original)
                if src is None:
                    rec = run_peer_piece(model, piece, units[piece.name], cfg, data, curve, test,
                                         anchor, progress=progress)
                    if dependents[piece.name]:
                        changed = {n: p.detach().clone() for n, p in model.named_parameters()
                                   if not torch.equal(p, original[n])}
                        atomic_save_safetensors(changed, state_of[piece.name],
                                                metadata={"key": keys[piece.name],
                                                          "piece": piece.name})
                else:
                    tuned = _load_state(state_of[src.name], keys[src.name])
                    rec = run_interp_piece(model, piece, cfg, original, tuned,
                                           read_json(path_of[src.name]), curve, test,
                                           progress=progress)
                atomic_write_json({"key": keys[piece.name], **rec}, path_of[piece.name])
            finally:
                claim.unlink(missing_ok=True)
            trained += 1
            ran = True
        if not blocked:
            break
        if not ran:  # every piece left waits for a source another live worker is training
            time.sleep(poll_s)
    _restore(model, original)
    return summarize_peers(out, write=True)
