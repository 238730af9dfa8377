"""The comparisons of a run: per-prompt matrices `[n_seeds, n_prompts]` per arm, paired differences
with CIs, CAST against the random sets, matched safety, and the per-arm summary rows."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from .. import inference, stats
from ..registry import metrics as _metric_registry

# Per-prompt values of `EvalResult.per_prompt` that the report compares: {per-prompt key: (label,
# lower_is_better, role)}, in table order, read live from the metrics registry
# (`registry/metrics.py`), so a registered metric is reported with its CIs. Other per-prompt
# entries (token counts) are not metrics and are left out.
METRICS = _metric_registry.LiveTable()
PRIMARY = ("kl_to_original", "refusal_score")
MIN_SEEDS_MATCHED = 4  # fewer training seeds: the matched-safety table gives no CI (ours)
_ORDER = {"full": 0, "cast": 1, "random": 2}


def _info(metric: str) -> tuple[str, bool, str]:
    return METRICS[metric]


def _ordered_metrics(pieces: dict[str, dict]) -> list[str]:
    """The METRICS some piece has per-prompt values of, in table order."""
    names = set().union(*(set(p.get("per_prompt", {})) for p in pieces.values()))
    return [m for m in METRICS if m in names]


def _with_metric(arms: dict, metric: str, seeds: list[int]) -> tuple[dict, list[int]]:
    """The arms' pieces that have `metric`, and the training seeds on which every arm has one (a
    metric measured on some seeds only, e.g. generated refusals, is compared on those)."""
    have = {a: [p for p in ps if metric in p.get("per_prompt", {})] for a, ps in arms.items()}
    have = {a: ps for a, ps in have.items() if ps}
    common = [s for s in seeds
              if all(any(p["piece"]["train_seed"] == s for p in ps) for ps in have.values())]
    return have, common


# --------------------------------------------------------------------------------------------------
# Arrays of per-prompt values
# --------------------------------------------------------------------------------------------------


def _by_arm(pieces: dict[str, dict]) -> dict[tuple[str, int], list[dict]]:
    out: dict[tuple[str, int], list[dict]] = {}
    for p in pieces.values():
        out.setdefault((p["piece"]["method"], p["piece"]["k"]), []).append(p)
    return out


def seed_matrix(arm_pieces: list[dict], seeds: list[int], value) -> np.ndarray:
    """`[n_seeds, ...]` values of one arm, row s for training seed `seeds[s]`; pieces sharing a
    seed (random draws) are averaged. `value(piece)` gives one piece's array."""
    rows = []
    for s in seeds:
        mine = [np.asarray(value(p), dtype=float) for p in arm_pieces
                if p["piece"]["train_seed"] == s]
        if not mine:
            raise ValueError(f"Arm {arm_pieces[0]['piece']['method']} has no piece on training "
                             f"seed {s}: the paired design needs every arm on every seed.")
        rows.append(np.mean(mine, axis=0))
    return np.stack(rows)


def _paired(a: np.ndarray, b: np.ndarray, metric: str, names: tuple[str, str],
            cfg: dict) -> Optional[dict]:
    """`stats.paired_difference` on the prompts finite in both; None when fewer than 2 remain."""
    ok = np.isfinite(a).all(0) & np.isfinite(b).all(0)
    if ok.sum() < 2:
        return None
    res = stats.paired_difference(a[:, ok], b[:, ok], n_boot=cfg.get("n_boot", 2000),
                                  ci=cfg.get("ci", 0.95), seed=cfg.get("seed", 0),
                                  lower_is_better=_info(metric)[1], names=names)
    res["n_dropped"] = int((~ok).sum())
    return res


def _mean_ci(a: np.ndarray, cfg: dict) -> dict:
    """An arm's mean with its CI from the same seed x prompt bootstrap (a difference to 0)."""
    ok = np.isfinite(a).all(0)
    if ok.sum() < 2:
        return {"mean": float(np.nanmean(a)), "low": math.nan, "high": math.nan}
    r = stats.paired_difference(a[:, ok], np.zeros_like(a[:, ok]), n_boot=cfg.get("n_boot", 2000),
                                ci=cfg.get("ci", 0.95), seed=cfg.get("seed", 0))
    return {"mean": r["diff"], "low": r["low"], "high": r["high"]}


# --------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------


def compare_arms(doc: dict) -> dict:
    """Every comparison of the report, from `results.json`'s content (`config`, `arms`).

    Returns {"metrics": {metric: {k: {"rows": [...], "cast_rank": rank_range or None,
    "cast_rank_note" (why there is no rank), "cast_vs_sets": compare_to_random_sets or None}}},
    "matched_safety": {...}, "endpoints": {k: {arm: {metric: {"mean", "low", "high"}}}},
    "seeds", "n_draws", "primary" (the primary endpoints: config "primary_endpoints" or
    `PRIMARY`)}. A row: {"arm", "method", "k", "n_pieces", "n_frozen", "mean",
    "vs_cast", "vs_random", "vs_full"} (each a `paired_difference` result or None).
    """
    cfg, pieces = doc["config"], doc["arms"]
    seeds = list(cfg["train_seeds"])
    arms = _by_arm(pieces)
    ks = sorted({k for m, k in arms if m != "full"})
    out: dict[str, Any] = {"seeds": seeds, "n_draws": cfg.get("n_draws"), "metrics": {},
                           "endpoints": {}, "ks": ks,
                           "primary": list(cfg.get("primary_endpoints") or PRIMARY)}
    for metric in _ordered_metrics(pieces):
        have, seeds_m = _with_metric(arms, metric, seeds)
        if not seeds_m:
            continue
        per_k = {}
        for k in ks:
            mats = {m: seed_matrix(ps, seeds_m, lambda p: p["per_prompt"][metric])
                    for (m, kk), ps in have.items() if kk == k or m == "full"}
            rank, note = _cast_rank(have, k, seeds_m, metric)
            per_k[k] = {"rows": _rows(mats, have, k, metric, cfg), "seeds": seeds_m,
                        "cast_rank": rank, "cast_rank_note": note,
                        "cast_vs_sets": _cast_vs_sets(have, k, seeds_m, metric, cfg)}
            ends = out["endpoints"].setdefault(k, {})
            for m, a in mats.items():
                ends.setdefault(m, {})[metric] = _mean_ci(a, cfg)
        out["metrics"][metric] = per_k
    out["matched_safety"] = matched_safety(doc)
    return out


def _rows(mats: dict[str, np.ndarray], arms: dict, k: int, metric: str, cfg: dict) -> list[dict]:
    rows = []
    for m in sorted(mats, key=lambda m: (_ORDER.get(m, 9), m)):
        a = mats[m]
        kk = 0 if m == "full" else k
        first = arms[(m, kk)][0]["tuning"]
        row = {"arm": f"{m}_k{kk}", "method": m, "k": kk, "n_pieces": len(arms[(m, kk)]),
               "n_frozen": first.get("n_frozen_in_scope"), "mean": float(np.nanmean(a))}
        for ref in ("cast", "random", "full"):
            row[f"vs_{ref}"] = (_paired(a, mats[ref], metric, (m, ref), cfg)
                                if ref in mats and ref != m else None)
        rows.append(row)
    return rows


def _cast_rank(arms: dict, k: int, seeds: list[int],
               metric: str) -> tuple[Optional[dict], Optional[str]]:
    """CAST's rank among the random draws at k, each draw seed-matched (see module docstring; a
    draw on several seeds: its mean difference to CAST over them), as `inference.rank_range`
    (ties as a range); (None, reason) with fewer than 20 draws."""
    if ("cast", k) not in arms or ("random", k) not in arms:
        return None, None
    cast = {p["piece"]["train_seed"]: np.nanmean(p["per_prompt"][metric])
            for p in arms[("cast", k)]}
    value = float(np.mean([cast[s] for s in seeds]))
    per_draw: dict[Any, list[float]] = {}  # a set trained on several seeds is one draw
    for p in arms[("random", k)]:
        if p["piece"]["train_seed"] in seeds:
            per_draw.setdefault(p["piece"].get("draw"), []).append(
                np.nanmean(p["per_prompt"][metric]) - cast[p["piece"]["train_seed"]])
    draws = [float(np.mean(v)) + value for v in per_draw.values()]
    lower = _info(metric)[1]
    try:
        res = inference.rank_range(value, draws, alternative="less" if lower else "greater")
    except ValueError as e:
        return None, str(e)
    res["value"] = value
    return res, None


def _cast_vs_sets(arms: dict, k: int, seeds: list[int], metric: str, cfg: dict) -> Optional[dict]:
    """CAST against the random sets at k, resampling sets, seeds and prompts
    (`inference.compare_to_random_sets`). Sets that trained on every seed give a crossed
    [sets, seeds, prompts] grid; otherwise (v2: one seed per set) each set is paired with CAST on
    its own seeds (means over them) and the seed axis has one level: a set's effect and its seed's
    cannot be told apart ("layout": "nested"). Prompts non-finite anywhere are dropped. None
    without both arms or with fewer than 2 sets."""
    if ("cast", k) not in arms or ("random", k) not in arms:
        return None
    cast = {p["piece"]["train_seed"]: np.asarray(p["per_prompt"][metric], float)
            for p in arms[("cast", k)]}
    sets: dict[Any, dict[int, np.ndarray]] = {}
    for p in arms[("random", k)]:
        if p["piece"]["train_seed"] in seeds and p["piece"]["train_seed"] in cast:
            sets.setdefault(p["piece"].get("draw"), {})[p["piece"]["train_seed"]] = \
                np.asarray(p["per_prompt"][metric], float)
    if len(sets) < 2:
        return None
    on = [s for s in seeds if s in cast]
    if all(sorted(v) == sorted(on) for v in sets.values()):
        layout, c = "crossed", np.stack([cast[s] for s in on])
        r = np.stack([np.stack([v[s] for s in on]) for v in sets.values()])
    else:
        layout = "nested"
        c = np.stack([np.mean([cast[s] for s in v], axis=0) for v in sets.values()])[:, None]
        r = np.stack([np.mean(list(v.values()), axis=0) for v in sets.values()])[:, None]
    ok = np.isfinite(c).all(tuple(range(c.ndim - 1))) & np.isfinite(r).all((0, 1))
    if ok.sum() < 1:
        return None
    res = inference.compare_to_random_sets(
        c[..., ok], r[..., ok], n_boot=cfg.get("n_boot", 2000), ci=cfg.get("ci", 0.95),
        seed=cfg.get("seed", 0), lower_is_better=_info(metric)[1], names=("CAST", "random sets"))
    res.update(layout=layout, n_dropped=int((~ok).sum()))
    return res


def matched_safety(doc: dict) -> dict:
    """Utility cost (validation KL) at equal safety (validation refusal score), per arm and seed.

    levels (METHOD v3): `inference.matched_safety_levels`, 3 validation refusal scores evenly
    spaced over the range that every piece reaches between trained checkpoints; target: the top
    one (the weakest piece's best). Each piece's KL is read at each level by
    `inference.utility_at_safety`: linear in safety between the two trained checkpoints around the
    first crossing, never on the line from the untrained model (step 0), never extrapolated. Arms
    are compared over training seeds (random: mean over its draws per seed) with
    `paired_difference` on the `[n_seeds]` vectors (bootstrap over seeds only). With fewer than
    `MIN_SEEDS_MATCHED` seeds there is no CI (ours: a bootstrap over 2 or 3 values gives intervals
    that mean nothing). Returns {"target", "rows" (at target), "levels", "by_level" ([{"level",
    "rows"}]), "n_seeds", "final_val"}, or {"target": None, "note"}.
    """
    cfg, pieces = doc["config"], doc["arms"]
    seeds = list(cfg["train_seeds"])
    curves = {n: p["tuning"].get("curve") or [] for n, p in pieces.items()}
    if not all(len(c) >= 2 for c in curves.values()):
        return {"target": None, "note": "no training curves (eval curves need a monitor)"}
    safe = _metric_registry.curve_key("refusal_score")
    cost = _metric_registry.curve_key("kl_to_original")
    steps = {n: [pt.get("step", i) for i, pt in enumerate(c)] for n, c in curves.items()}
    lv = inference.matched_safety_levels(
        {n: (steps[n], [pt[safe] for pt in c]) for n, c in curves.items()},
        n_levels=cfg.get("matched_levels", 3))
    if not lv["levels"]:
        return {"target": None, "note": lv["reason"]}
    by_level = []
    for level in lv["levels"]:
        at = {id(pieces[n]): inference.utility_at_safety(steps[n], [pt[safe] for pt in c],
                                                         [pt[cost] for pt in c], level)["utility"]
              for n, c in curves.items()}
        by_level.append({"level": level, "rows": _matched_rows(at, pieces, seeds, cfg)})
    return {"target": lv["levels"][-1], "rows": by_level[-1]["rows"], "levels": lv["levels"],
            "by_level": by_level, "n_seeds": len(seeds),
            "final_val": {n: c[-1] for n, c in curves.items()}}


def _matched_rows(at: dict, pieces: dict, seeds: list[int], cfg: dict) -> list[dict]:
    """One matched-safety row per arm from each piece's value `at[id(piece)]`."""
    arms = _by_arm(pieces)
    vec = {arm: seed_matrix(ps, seeds, lambda p: at[id(p)]) for arm, ps in arms.items()}
    rows = []
    ks = sorted({k for m, k in arms if m != "full"})
    for (m, k) in sorted(vec, key=lambda a: (a[1], _ORDER.get(a[0], 9), a[0])):
        v = vec[(m, k)]
        row = {"arm": f"{m}_k{k}", "method": m, "k": k, "kl_at_target": float(np.mean(v)),
               "per_seed": v.tolist()}
        for ref in ("cast", "random", "full"):
            rk = 0 if ref == "full" else (k if k else (ks[0] if ks else None))
            if (ref, rk) not in vec or (ref, rk) == (m, k):
                continue
            if len(seeds) >= MIN_SEEDS_MATCHED:
                row[f"vs_{ref}"] = _paired(v[None, :], vec[(ref, rk)][None, :], "kl_to_original",
                                           (m, ref), cfg)
            else:
                row[f"diff_{ref}"] = float(np.mean(v - vec[(ref, rk)]))
        rows.append(row)
    return rows


def summarize(base: dict, results: dict[str, dict]) -> list[dict]:
    """One row per arm (method, k): mean of each evaluation metric over its pieces, its change from
    the original (`d_`), the sd of the change over pieces (`sd_`), and the frozen parameter count.
    (Rows for `figures.plot_drop_vs_k`; the report's inference is `compare_arms`.)"""
    rows = []
    base_m = base["eval"]["metrics"]
    for (method, k), pieces in sorted(_by_arm(results).items(), key=lambda x: (x[0][1], x[0][0])):
        row: dict[str, Any] = {"method": method, "k": k, "n_seeds": len(pieces),
                               "n_trainable": pieces[0]["tuning"].get("n_trainable"),
                               "n_frozen": pieces[0]["tuning"].get("n_frozen_in_scope")}
        for m in sorted({m for p in pieces for m in p["eval"]["metrics"]}):
            vals = [p["eval"]["metrics"].get(m) for p in pieces]
            vals = np.array([v for v in vals if isinstance(v, (int, float))], dtype=float)
            if not vals.size:
                continue
            ref = 0.0 if m == "kl_to_original" else (base_m.get(m) or 0.0)
            row[m] = float(vals.mean())
            row[f"d_{m}"] = float(vals.mean() - ref)
            row[f"sd_{m}"] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        rows.append(row)
    return rows
