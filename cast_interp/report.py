"""The verdict of a CAST run: paired comparisons with CIs, ranks among random draws, matched safety.

A run (`pipeline.run_experiment`) leaves one piece per arm x training seed (x random draw), each
with per-prompt values of the final evaluation and a safety / utility-cost curve along training. This
module turns them into the comparisons METHOD v2 asks for (stage 3, "Inference"):

- Paired differences (`stats.paired_difference`): for every arm at budget k, its per-prompt values
  `[n_seeds, n_prompts]` minus those of CAST, of the random arm and of full tuning on the same
  training seeds and prompts, with a 95% bootstrap CI over seeds and prompts. The random arm's
  value on a seed is the mean over its draws on that seed. A difference is called real only when
  its CI excludes 0; otherwise the report says "no detectable difference".
- CAST against the random sets (`inference.compare_to_random_sets`, METHOD v3): a bootstrap over
  random sets, training seeds and prompts gives CAST minus the sets' mean with a CI and CAST minus
  a *new* set with a prediction interval (the verdict); CAST's rank among the sets is a range when
  draws tie (`inference.rank_range`), and none is given from fewer than 20 sets. Each set is
  compared with CAST on the set's own training seeds, so the rank reflects the unit sets, not the
  data order.
- Matched safety (`inference.utility_at_safety`): each piece's utility cost (validation KL) read
  off its training curve at 3 validation refusal scores that every piece reaches between trained
  checkpoints (`inference.matched_safety_levels`): never on the line from the untrained model,
  never extrapolated; compared between arms over training seeds.
- Wording: a "no detectable difference" states the effects its CI excludes
  (`inference.no_difference_text`); a share whose denominator's CI reaches 0 is shown as the
  difference in the metric's units (`inference.share_or_difference`). The primary endpoints are
  labelled; the rest are secondary.

`report_markdown` writes the tables; `run_figures` draws the figures from the saved files alone:
safety and utility cost along training per arm with seed bands, paired differences vs random with
CIs, the end-point trade-off with CIs, plus the diagnosis and training-loss figures of `figures.py`.
All statistics here are ours (the paper gives none).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import inference, stats
from .io import read_json
from .registry import metrics as _metric_registry

# Per-prompt values of `EvalResult.per_prompt` that the report compares: {per-prompt key: (label,
# lower_is_better, role)}, in table order, read live from the metrics registry
# (`registry/metrics.py`), so a registered metric is reported with its CIs. Other per-prompt
# entries (token counts) are not metrics and are left out.
METRICS = _metric_registry.LiveTable()
PRIMARY = ("kl_to_original", "refusal_score")
MIN_SEEDS_MATCHED = 4  # fewer training seeds: the matched-safety table gives no CI (ours)
_ORDER = {"full": 0, "cast": 1, "random": 2}
QUICK_LOOK_SEEDS = 8  # fewer training seeds than this: the report calls its CIs wide


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


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _num(v: Any) -> str:
    """A signed number with 3 significant digits (+0 for 0)."""
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"
    return "+0" if v == 0 else f"{v:+.3g}"


def _cell(r: Optional[dict]) -> str:
    """'+0.012 [-0.003, +0.027] no detectable difference (excludes effects beyond ±0.027)' from a
    paired_difference result."""
    if r is None:
        return "–"
    verdict = inference.no_difference_text(r["low"], r["high"]) if not r["significant"] else \
        ("**lower**" if r["diff"] < 0 else "**higher**")
    return f"{_num(r['diff'])} [{_num(r['low'])}, {_num(r['high'])}] {verdict}"


def _quick_look(cfg: dict) -> Optional[str]:
    n = len(cfg["train_seeds"])
    if n >= QUICK_LOOK_SEEDS and cfg.get("n_draws", 0) >= 20:
        return None
    return (f"**Quick look: wide CIs.** Preset `{cfg.get('preset')}` runs {n} training seed(s) and "
            f"{cfg.get('n_draws')} random draw(s). The intervals below are wide, and with fewer "
            f"than {QUICK_LOOK_SEEDS} seeds the seed-to-seed variance is estimated from {n} "
            "value(s), so even these intervals are too narrow where seeds matter. Read every "
            "difference here as indicative; `--preset cpu-full` (>= 8 seeds, >= 20 draws) is the "
            "run to cite.")


def report_markdown(doc: dict) -> str:
    """The run's report: the verdict, design, diagnosis, the paired tables per metric with CAST's
    rank among the random draws, matched safety, times, attribution."""
    cfg, comp = doc["config"], doc["comparisons"]
    lines = [f"# CAST run: {cfg['model']} (preset `{cfg.get('preset')}`)", "",
             f"Units skipped: {cfg['unit']}s. Training seeds {cfg['train_seeds']} shared by every "
             f"arm; {cfg['n_draws']} random draws (draw d: units drawn with seed d, trained on "
             f"seed train_seeds[d mod {len(cfg['train_seeds'])}]). Steps {cfg['steps']}, batch "
             f"{cfg['batch_size']}, scope {cfg['scope']}, benign mix {cfg['benign_mix']}. "
             f"{_total_time(doc)}", "",
             "Every comparison is a paired difference (row arm minus column arm) over the same "
             f"training seeds and test prompts, with a {cfg.get('ci', 0.95):.0%} bootstrap CI over "
             "seeds and prompts (`stats.paired_difference`); the random arm's value on a seed is "
             "the mean of its draws on that seed. A difference is called real only when its CI "
             "excludes 0, otherwise: no detectable difference, with the effect sizes its CI "
             "excludes.", ""]
    warn = _quick_look(cfg)
    if warn:
        lines += [warn, ""]
    lines += _verdict_lines(comp)
    lines += _diagnosis_lines(doc)
    primary = comp.get("primary", PRIMARY)
    for metric, per_k in comp["metrics"].items():
        lines += _metric_lines(metric, per_k, cfg["train_seeds"], primary=metric in primary)
    lines += _matched_lines(comp["matched_safety"])
    lines += _time_lines(doc)
    lines += _attribution_lines(doc)
    lines += ["## Figures", "", "![safety along training](figures/safety_curves.png)", "",
              "![paired differences vs random](figures/paired_differences.png)", "",
              "![end points](figures/endpoints.png)", ""]
    return "\n".join(lines) + "\n"


def _total_time(doc: dict) -> str:
    runs = doc.get("invocations") or [{"time_s": doc["time_s"]}]
    if len(runs) == 1:
        return f"Total time {doc['time_s'] / 60:.1f} min."
    each = " + ".join(f"{r['time_s'] / 60:.1f}" for r in runs)
    return (f"Total time {sum(r['time_s'] for r in runs) / 60:.1f} min over {len(runs)} "
            f"invocations ({each} min; later ones re-use finished stages).")


def _rank_text(block: dict) -> str:
    """'2–20 of 21 (p = 0.10–0.95)' from a block's `rank_range`, or why there is none."""
    rank = block.get("cast_rank")
    if not rank:
        note = block.get("cast_rank_note")
        return f"none ({note.split(':')[0]})" if note else "–"
    p = (f"p = {rank['p']:.2f}" if rank["p_low"] == rank["p_high"]
         else f"p = {rank['p_low']:.2f}–{rank['p_high']:.2f}")
    return f"{rank['rank']} of {rank['n_draws'] + 1} ({p})"


def _sets_cells(block: dict, cast: dict) -> tuple[str, str]:
    """The verdict's CAST − random sets cells: the mean difference with its CI over sets, seeds
    and prompts, and CAST − a new set with its prediction interval (the old seed x prompt CI when
    the sets could not be resampled)."""
    v = block.get("cast_vs_sets")
    if not v:
        return _cell(cast.get("vs_random")) + " (sets not resampled)", "–"
    mean = (f"{_num(v['diff'])} [{_num(v['low'])}, {_num(v['high'])}] "
            + (("**lower**" if v["diff"] < 0 else "**higher**") if v["mean_significant"]
               else inference.no_difference_text(v["low"], v["high"])))
    new = (f"{_num(v['diff'])} [{_num(v['pred_low'])}, {_num(v['pred_high'])}] "
           + (("**lower**" if v["diff"] < 0 else "**higher**") if v["significant"]
              else "within the sets' spread"))
    return mean, new


def _verdict_lines(comp: dict) -> list[str]:
    """CAST against the random sets and against full tuning on the primary endpoints, per k."""
    lines = ["## Verdict", "", "Primary endpoints (declared): "
             + ", ".join(f"`{m}`" for m in comp.get("primary", PRIMARY)) + "; every other "
             "endpoint below is secondary. CAST against the random sets: a bootstrap over random "
             "sets, training seeds and prompts (`inference.compare_to_random_sets`); the "
             "prediction interval says where CAST minus a *new* random set falls, and a "
             "difference from random head choice is claimed only when it excludes 0.", "",
             "| k | endpoint | CAST − random sets' mean [95% CI] | CAST − a new random set "
             "[95% prediction interval] | CAST − full [95% CI] | CAST's rank among random sets |",
             "|---|---|---|---|---|---|"]
    for metric in comp.get("primary", PRIMARY):
        for k, block in comp["metrics"].get(metric, {}).items():
            cast = next((r for r in block["rows"] if r["method"] == "cast"), None)
            if cast is None:
                continue
            mean, new = _sets_cells(block, cast)
            lines.append(f"| {k} | {metric} | {mean} | {new} | {_cell(cast['vs_full'])} | "
                         f"{_rank_text(block)} |")
    return lines + ["", "Lower KL is less utility lost; a higher refusal score is safer. Ranks: "
                    "1 = best; tied draws give a range; none from fewer than 20 random sets.", ""]


def _diagnosis_lines(doc: dict) -> list[str]:
    """The map's Spearman numbers and its concentration beside the null (`conflict_map.map_report`
    says the same for a saved map)."""
    from .conflict_map import CONC_HEADER, _fmt_conc

    d = doc["diagnosis"]
    unit = doc["config"]["unit"]
    sm = d.get("summary") or {}
    tag = "H" if unit == "head" else "G"
    lines = ["## Diagnosis", ""]
    if sm:
        lines += [f"Spearman(C, O) = {sm['spearman_C_O']:.2f}, Spearman(C, S) = "
                  f"{sm['spearman_C_S']:.2f}; {sm['n_O_above_1']} of {sm['n_units']} {unit}s have "
                  "O > 1.", "", *CONC_HEADER]
        lines += [_fmt_conc(n, sm["concentration"][n]) for n in ("O", "S", "C")]
        lines.append("")
    return lines + [f"Top {unit}s by C: " + ", ".join(f"L{l}{tag}{i}" for l, i in d["top_units"]),
                    "", "![conflict maps](figures/conflict_maps.png)", ""]


def _metric_lines(metric: str, per_k: dict, all_seeds: list[int], *,
                  primary: bool = False) -> list[str]:
    label, lower, role = _info(metric)
    lines = [f"## {label} ({'primary' if primary else 'secondary'} endpoint; {role}; "
             f"{'lower' if lower else 'higher'} is better)", ""]
    for k, block in per_k.items():
        seeds = block.get("seeds", all_seeds)
        on = "" if list(seeds) == list(all_seeds) else f" Measured on training seeds {seeds} only."
        lines += [f"Budget k = {k}.{on}", "",
                  "| arm | pieces | frozen params | mean | − CAST [95% CI] | − random [95% CI] | "
                  "− full [95% CI] |", "|---|---|---|---|---|---|---|"]
        for r in block["rows"]:
            cells = " | ".join(_cell(r[f"vs_{x}"]) for x in ("cast", "random", "full"))
            lines.append(f"| {r['arm']} | {r['n_pieces']} | {r['n_frozen']} | {r['mean']:.4g} | "
                         f"{cells} |")
        rank = block.get("cast_rank")
        if rank:
            p = (f"{rank['p']:.3f}" if rank["p_low"] == rank["p_high"]
                 else f"{rank['p_low']:.3f} to {rank['p_high']:.3f} ({rank['n_ties']} ties)")
            lines += ["", f"CAST among the {rank['n_draws']} random draws (each against CAST on "
                      f"its own training seed): rank {rank['rank']} of {rank['n_draws'] + 1} "
                      f"({'lowest' if lower else 'highest'} first), empirical p = {p}."]
        elif block.get("cast_rank_note"):
            lines += ["", f"CAST's rank among the random draws: not given ("
                      f"{block['cast_rank_note'].rstrip('.')})."]
        sets = block.get("cast_vs_sets")
        if sets:
            how = ("every set on every training seed" if sets["layout"] == "crossed" else
                   "each set against CAST on its own training seed: a set's effect and its "
                   "seed's cannot be told apart")
            lines += ["", f"CAST against the {sets['n_sets']} random sets, resampling sets, "
                      f"seeds and prompts ({how}): CAST − their mean {_num(sets['diff'])} "
                      f"[{_num(sets['low'])}, {_num(sets['high'])}]; CAST − a new random set: "
                      f"95% prediction interval [{_num(sets['pred_low'])}, "
                      f"{_num(sets['pred_high'])}]; z = {sets['z']:.2f} (CAST against the sets' "
                      "spread)."]
        cast = next((r for r in block["rows"] if r["method"] == "cast"), None)
        rel = (cast or {}).get("vs_random")
        if sets and math.isfinite(sets.get("relative_low", math.nan)):
            rel = sets  # the relative CI with the sets resampled
        if metric == "kl_to_original" and rel and math.isfinite(rel.get("relative_low", math.nan)):
            half = (rel["relative_high"] - rel["relative_low"]) / 2
            lines += ["", f"CAST's KL relative to random's: {rel['relative']:+.1%} "
                      f"[{rel['relative_low']:+.1%}, {rel['relative_high']:+.1%}] (CI half-width "
                      f"{half:.1%}; `cpu-full` aims at under 8%)."]
        lines.append("")
    return lines


def _matched_lines(ms: dict) -> list[str]:
    if not ms.get("rows"):
        return ["## Utility cost at matched safety", "", f"Not read: {ms['note']}.", ""] \
            if ms.get("note") else []
    levels = ms.get("by_level") or [{"level": ms["target"], "rows": ms["rows"]}]
    lines = ["## Utility cost at matched safety", "",
             "Validation KL of each piece read off its training curve at validation refusal "
             "scores " + ", ".join(f"{lv['level']:.3f}" for lv in levels) + " (evenly spaced up "
             "to the highest score every piece reaches; read linearly between the two trained "
             "checkpoints around the first crossing, never on the line from the untrained model, "
             "never extrapolated), compared over training seeds only (no prompts)."]
    for lv in levels:
        lines += _matched_table({**ms, "target": lv["level"], "rows": lv["rows"]})
    return lines


def _matched_table(ms: dict) -> list[str]:
    lines = ["", f"At validation refusal score {ms['target']:.3f}:"]
    if ms["n_seeds"] < MIN_SEEDS_MATCHED:
        lines += [f" With {ms['n_seeds']} seed(s) there is no CI (needs {MIN_SEEDS_MATCHED}): mean "
                  "differences only, no verdict.", "",
                  "| arm | KL at matched safety | − CAST | − random | − full |",
                  "|---|---|---|---|---|"]
        for r in ms["rows"]:
            lines.append(f"| {r['arm']} | {r['kl_at_target']:.4g} | "
                         + " | ".join(_num(r.get(f"diff_{x}")) if f"diff_{x}" in r else "–"
                                      for x in ("cast", "random", "full")) + " |")
        return lines + [""]
    lines += ["", "| arm | KL at matched safety | − CAST [95% CI] | − random [95% CI] | "
              "− full [95% CI] |", "|---|---|---|---|---|"]
    for r in ms["rows"]:
        lines.append(f"| {r['arm']} | {r['kl_at_target']:.4g} | {_cell(r.get('vs_cast'))} | "
                     f"{_cell(r.get('vs_random'))} | {_cell(r.get('vs_full'))} |")
    return lines + [""]


def time_breakdown(doc: dict) -> dict:
    """Seconds by stage: diagnosis, per-piece training, monitoring, evaluation and its parts (means
    over pieces; a part measured on some pieces only, e.g. generation, averages over those)."""
    pieces = list(doc["arms"].values())
    tune = [p["tuning"]["config"]["time_s"] - p["tuning"]["config"].get("monitor_time_s", 0)
            for p in pieces]
    mon = [p["tuning"]["config"].get("monitor_time_s", 0.0) for p in pieces]
    ev = [p.get("eval_time_s", p["eval"].get("time_s", 0.0)) for p in pieces]
    parts: dict[str, list[float]] = {}
    for p in pieces:
        for name, v in (p["eval"].get("timings_s") or p["eval"].get("timings") or {}).items():
            if not name.endswith("_share"):
                parts.setdefault(name, []).append(v)
    t = doc.get("timings", {})
    mean = lambda x: float(np.mean(x)) if x else None  # noqa: E731
    runs = doc.get("invocations") or [{"time_s": doc["time_s"]}]
    # A map re-used from an invocation that wrote no results (killed, then resumed) took no time
    # in this one: its own record (`timings_s` of the map's config) is its cost.
    diag = t.get("diagnosis_s")
    own = (((doc.get("diagnosis") or {}).get("config") or {}).get("timings_s") or {}).get("total")
    if own is not None and (diag is None or diag < own):
        diag = own
    work = ((diag or 0.0) + (t.get("self_reference_s") or 0.0) + sum(tune) + sum(mon) + sum(ev)
            + ((doc.get("original") or {}).get("time_s") or 0.0))
    return {"total_s": sum(r["time_s"] for r in runs), "diagnosis_s": diag,
            "self_reference_s": t.get("self_reference_s"), "n_pieces": len(pieces),
            "train_per_piece_s": mean(tune), "monitor_per_piece_s": mean(mon),
            "eval_per_piece_s": mean(ev), "work_s": work,
            "eval_parts_per_piece_s": {k: float(np.mean(v)) for k, v in parts.items()}}


def _time_lines(doc: dict) -> list[str]:
    tb = time_breakdown(doc)
    f = lambda v: "n/a" if v is None else f"{v:.1f} s"  # noqa: E731
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in tb["eval_parts_per_piece_s"].items())
    lines = ["## Time", "", "| stage | seconds |", "|---|---|",
             f"| total | {f(tb['total_s'])} |", f"| diagnosis | {f(tb['diagnosis_s'])} |",
             f"| self-reference answers | {f(tb['self_reference_s'])} |",
             f"| training, per piece ({tb['n_pieces']} pieces) | {f(tb['train_per_piece_s'])} |",
             f"| safety/utility-cost curve, per piece | {f(tb['monitor_per_piece_s'])} |",
             f"| evaluation, per piece | {f(tb['eval_per_piece_s'])} |", "",
             f"Evaluation per piece by part: {parts or 'n/a'}."]
    if tb["work_s"] > 1.05 * tb["total_s"]:
        lines += ["", f"The stages' own recorded times add up to {tb['work_s']:.0f} s, more than the "
                  f"{tb['total_s']:.0f} s of the invocations on record: an interrupted invocation "
                  "that wrote no results is not on record, though its finished stages were re-used."]
    est = doc.get("estimate_s")
    if est:
        lines += ["", f"Estimated before the run (`pipeline.estimate_seconds`, 2 free CPU cores): "
                  f"{est['total'] / 60:.1f} min."]
    return lines + [""]


def attributions(doc: dict) -> dict[str, dict]:
    """{arm: stage-4 summary} of a results document (older runs stored one flat summary)."""
    att = doc.get("attribution") or {}
    return {att.get("label", "full"): att} if "total_drop" in att else att


def _attribution_lines(doc: dict) -> list[str]:
    """Stage 4's numbers (`attribution.AttributionResult.summary`), one column per attributed arm:
    drop, out-of-sample shares against random revert sets, Spearman with the map, first order vs
    exact."""
    atts = attributions(doc)
    if not atts:
        est = (doc.get("estimate_s") or {}).get("attribution")
        cost = (f"about {est['per_arm'] / 60:.0f} min per arm on SmolLM2 with 2 CPU cores at this "
                f"run's sizes, by `pipeline.attribution_seconds`" if est else "see "
                "`pipeline.attribution_seconds` for its cost")
        return ["## Which units caused the utility drop", "",
                "Stage 4 was not run: `cast-interp attribute --run <this directory> --arms full cast "
                f"random` adds it from the kept first-seed weights ({cost}).", ""]
    arms = list(atts)
    f = lambda v: "n/a" if not isinstance(v, (int, float)) else f"{v:.3g}"  # noqa: E731

    def ci(att, n):
        return f"{f(att.get(n))} [{f(att.get(n + '_low'))}, {f(att.get(n + '_high'))}]"

    notes: list[str] = []

    def share(att, n):
        """A share over the drop of its half, or the recovered amount (nats/token) when that
        drop's CI reaches 0 (`inference.share_or_difference`)."""
        half = n[-2:] if n.endswith(("_A", "_B")) else ""
        drop = "total_drop" + half
        if not isinstance(att.get(drop + "_low"), (int, float)):
            return ci(att, n) + (" (denominator CI not recorded)" if half else "")
        rec = n.replace("_share", "_recovered")
        r = inference.share_or_difference(
            {"estimate": att.get(rec, math.nan), "low": att.get(rec + "_low", math.nan),
             "high": att.get(rec + "_high", math.nan)},
            {"estimate": att[drop], "low": att[drop + "_low"], "high": att[drop + "_high"]},
            {"estimate": att.get(n), "low": att.get(n + "_low"), "high": att.get(n + "_high")},
            unit="nats/token")
        if r["kind"] == "share":
            return ci(att, n)
        notes.append(f"{n}: {r['note']}")
        return f"{f(r['estimate'])} [{f(r['low'])}, {f(r['high'])}] nats/token recovered*"

    names = [("total_drop", "utility drop (nats/token)", True),
             ("total_drop_B", "utility drop on half B (nats/token)", True),
             ("top_k_C_share_B", "share recovered by the map's top-k, half B", True),
             ("selected_share_B", "share recovered by the top-k chosen on half A, half B", True),
             ("all_units_share", "share recovered by reverting every unit", True),
             ("time_s", "time (s)", False)]
    keys = sorted({k for att in atts.values() for k in att})
    for k in keys:
        if k.startswith("spearman_") and not k.endswith(("_low", "_high", "_p")):
            names.append((k, k.replace("_", " "), True))
    for k in keys:
        if (k.startswith("random_") or k.startswith("additivity") or ("vs_random" in k and k.endswith(
                ("percentile", "_p"))) or (k.startswith("agreement_")
                                           and k.endswith(("spearman", "relative_error")))):
            names.append((k, k.replace("_", " "), False))
    lines = ["## Which units caused the utility drop", "",
             f"Post-hoc attribution on training seed {doc['config']['train_seeds'][0]} of: "
             + ", ".join(f"{a} ({atts[a].get('piece', a)})" for a in arms) + ". Each unit's own "
             "parameters reverted to their pre-training values; utility recovered = L_util(tuned) - "
             "L_util(unit reverted), on the original model's answers (content tokens). Units are "
             "chosen on half A of the examples and measured on half B; [95% CI] over examples.", "",
             "| quantity | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for name, label, with_ci in names:
        if any(isinstance(att.get(name), (int, float)) for att in atts.values()):
            cells = [(share(atts[a], name) if "_share" in name else ci(atts[a], name)) if with_ci
                     else f(atts[a].get(name)) for a in arms]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "\\* " + "; ".join(notes) + "."]
    figs = [f"![attribution, {a}](figures/{attribution_figure_name(a)}.png)" for a in arms]
    return lines + [""] + figs + [""]


def attribution_figure_name(arm: str) -> str:
    return "attribution_vs_map" if arm == "full" else f"attribution_vs_map_{arm}"


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def plot_safety_curves(pieces: dict[str, dict], *, k: Optional[int] = None):
    """Safety and utility cost along training per arm (`figures.plot_safety_curves`)."""
    from .figures import plot_safety_curves as _plot

    return _plot(pieces, k=k)


def plot_paired_differences(comparisons: dict, *, ref: str = "random"):
    """Every endpoint, each arm minus `ref`, paired 95% CIs (`figures.plot_paired_differences`)."""
    from .figures import plot_paired_differences as _plot

    return _plot(comparisons, ref=ref)


def plot_endpoints(comparisons: dict):
    """End points per arm with their own (unpaired) 95% CIs (`figures.plot_endpoints`)."""
    from .figures import plot_endpoints as _plot

    return _plot(comparisons)


def _save(fig, path: Path) -> None:
    from .figures import save_figure

    for ext in ("png", "pdf"):
        save_figure(fig, path.with_suffix(f".{ext}"))


def read_results(path) -> dict:
    """A run's results.json with the fields the report and figures read checked: a wrong schema
    (a hand edit, another version) is a one-line ValueError naming the file and field."""
    from .io import json_field

    doc = read_json(path, expect=dict)
    json_field(doc, "config", dict, path)
    json_field(doc["config"], "unit", str, path, where="config.")
    comp = json_field(doc, "comparisons", dict, path)
    json_field(comp, "ks", list, path, where="comparisons.")
    json_field(doc, "summary", list, path)
    for name, arm in json_field(doc, "arms", dict, path).items():
        json_field(arm, "eval", dict, path, where=f"arms.{name}.")
        json_field(arm, "per_prompt", dict, path, where=f"arms.{name}.")
    return doc


def run_figures(out_dir, fig_dir=None) -> list[Path]:
    """Every figure of a finished run, regenerated from its saved files alone (no model needed).

    Reads `out_dir/results.json`, `diagnosis/` and `attribution/`; writes PNG and PDF into
    `fig_dir` (default `out_dir/figures`). Returns the written paths."""
    from . import figures
    from .conflict_map import ConflictMap

    out = Path(out_dir)
    fig_dir = Path(fig_dir) if fig_dir is not None else out / "figures"
    doc = read_results(out / "results.json")
    cmap = ConflictMap.load(out / "diagnosis")
    k = doc["comparisons"]["ks"][0] if doc["comparisons"]["ks"] else 1
    figures.diagnosis_figures(cmap, fig_dir, k=k if doc["config"]["unit"] == "head" else 0.1)
    _save(plot_safety_curves(doc["arms"]), fig_dir / "safety_curves")
    _save(plot_paired_differences(doc["comparisons"]), fig_dir / "paired_differences")
    _save(plot_endpoints(doc["comparisons"]), fig_dir / "endpoints")
    _save(figures.plot_training_curves(doc["arms"]), fig_dir / "training_curves")
    if len(doc["comparisons"]["ks"]) > 1:  # one budget: nothing to draw against k
        _save(figures.plot_drop_vs_k(doc["summary"]), fig_dir / "drop_vs_k")
    from .attribution import META_FILE, AttributionResult

    for meta in sorted((out / "attribution").glob(f"*/{META_FILE}")):
        res = AttributionResult.load(meta.parent)
        name = attribution_figure_name(res.config.get("label") or meta.parent.name)
        _save(figures.plot_attribution_vs_map(res, cmap, k=k), fig_dir / name)
    return sorted(fig_dir.glob("*.p*"))
