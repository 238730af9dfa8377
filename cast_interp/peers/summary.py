"""Reading the peer comparison (`summarize_peers`, no model): the tax, safety levels common to the
methods' test curves, each arm's primary cost at matched safety with its CI, the best method, the
compositions against their baselines, budgets and times."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..checks import check_number
from ..harness import PRIMARY, costs_at_levels, full_tuning_tax, load_pieces
from ..io import atomic_write_json, read_json, to_jsonable
from .config import (REQUIRED, PeersConfig, _share_label, arm_family, arm_label,
                     estimate_peers_seconds, plan_peers)

# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


def piece_curve(piece: dict, original: dict, metric: str = PRIMARY, split: str = "test") -> dict:
    """A piece's curve on `split`: "x" (steps, or a for an interpolation), mean safety (refusal
    score), and per-prompt cost of `metric` (tuned - original) `[n_points, n_prompts]`."""
    rec = piece[split]
    xs = sorted(rec, key=float)
    base = np.asarray(original[split][metric], float)
    return {"steps": [float(x) for x in xs],
            "safety": [float(np.mean(rec[x]["refusal_score"])) for x in xs],
            "cost": np.stack([np.asarray(rec[x][metric], float) - base for x in xs])}


def common_levels(curves: dict, arm_of: dict, *, n_levels: int = 3,
                  protected: Sequence[str] = REQUIRED, min_range_share: float = 0.0) -> dict:
    """Safety levels common to the pieces' curves (`inference.matched_safety_levels`) of the
    largest set of arms that share a wide enough range, the others left out by name.

    curves: {piece name: {"steps", "safety"}}; arm_of: {piece name: arm}. An arm can be read on
    [its pieces' highest first-checkpoint safety, their lowest best safety]. Kept (ours): every
    arm of `protected` (full tuning and CAST) and as many others as possible whose ranges share a
    common range at least `min_range_share` of the one the protected arms share (so that one arm
    that barely reaches it does not shrink the comparison to a point); ties go to the widest
    common range. An arm that learns too little or too fast leaves itself out, not the others.
    With no range common to the protected arms there is no level.
    Returns matched_safety_levels' dict over the kept arms' pieces plus "arms" (kept),
    "excluded": [{"arm", "reason"}], "ranges": {arm: [low, high]} and "min_range_share".
    """
    from ..inference import matched_safety_levels

    check_number("min_range_share", min_range_share, lo=0, hi=1)
    by_arm: dict[str, dict] = {}
    for n, c in curves.items():
        by_arm.setdefault(arm_of[n], {})[n] = (c["steps"], c["safety"])
    ranges, excluded = {}, []
    for a, cs in by_arm.items():
        lv = matched_safety_levels(cs, n_levels=1)
        if lv["levels"]:
            ranges[a] = (float(lv["low"]), float(lv["high"]))
        else:
            excluded.append({"arm": a,
                             "reason": f"its seeds share no safety range ({lv['reason']})"})
    must = [a for a in protected if a in by_arm]
    none = {"levels": [], "low": math.nan, "high": math.nan, "low_set_by": None,
            "high_set_by": None, "arms": [], "excluded": excluded,
            "ranges": {a: list(r) for a, r in ranges.items()}, "min_range_share": min_range_share}
    if not ranges or any(a not in ranges for a in must):
        return {**none, "reason": "full tuning or CAST has no safety range of its own" if must
                else "no curve to read"}
    lo_m = max((ranges[a][0] for a in must), default=-math.inf)
    hi_m = min((ranges[a][1] for a in must), default=math.inf)
    if must and lo_m > hi_m:
        lo_a = max(must, key=lambda a: ranges[a][0])
        hi_a = min(must, key=lambda a: ranges[a][1])
        return {**none, "low": lo_m, "high": hi_m, "low_set_by": lo_a, "high_set_by": hi_a,
                "reason": f"{lo_a} starts at {lo_m:.4g}, past the best of {hi_a}, {hi_m:.4g}: "
                          "no level common to full tuning and CAST"}
    need = min_range_share * (hi_m - lo_m) if must else 0.0
    best = None
    for lo in sorted({r[0] for r in ranges.values()}):
        for hi in sorted({r[1] for r in ranges.values()}):
            if hi < lo:
                continue
            kept = [a for a, (l, h) in ranges.items() if l <= lo and h >= hi]
            if not kept or not all(a in kept for a in must):
                continue
            width = min(ranges[a][1] for a in kept) - max(ranges[a][0] for a in kept)
            if width < need:
                continue
            score = (len(kept), width)
            if best is None or score > best[0]:
                best = (score, kept)
    kept = [a for a in by_arm if a in best[1]]  # must alone always qualifies
    lv = matched_safety_levels({n: c for a in kept for n, c in by_arm[a].items()},
                               n_levels=n_levels)
    for a, (lo, hi) in ranges.items():
        if a in kept:
            continue
        if hi < lv["high"] and lo <= lv["low"]:
            why = f"its best safety {hi:.4g} is below the common range's top {lv['high']:.4g}"
        elif lo > lv["low"] and hi >= lv["high"]:
            why = (f"its first checkpoint's safety {lo:.4g} is above the common range's bottom "
                   f"{lv['low']:.4g}")
        else:
            why = f"it covers [{lo:.4g}, {hi:.4g}], not the whole common range"
        excluded.append({"arm": a, "reason": f"{why} ([{lv['low']:.4g}, {lv['high']:.4g}], "
                                             f"shared by {len(kept)} arms)"})
    return {**lv, "arms": kept, "excluded": excluded,
            "ranges": {a: list(r) for a, r in ranges.items()}, "min_range_share": min_range_share}


def pairwise_difference(a: str, b: str, curves: dict, seeds: Sequence[int], *, n_levels: int = 3,
                        n_boot: int = 2000, seed: int = 0) -> Optional[dict]:
    """Arm `a` minus arm `b` on the safety range just their pieces share: for an arm left out of
    the common range (it learns too little or too fast to reach it), its comparison with one
    other arm still at matched safety. curves: {piece name: `piece_curve`}; pieces "<arm>_t<seed>".
    Returns {"levels", "diff": `stats.paired_difference` (per seed and prompt, the mean over the
    levels)} or {"levels", "reason"} when there is no common range or a piece cannot be read at
    every level; None when a piece is missing."""
    from ..inference import matched_safety_levels
    from ..stats import paired_difference

    names = {x: [f"{x}_t{s}" for s in seeds] for x in (a, b)}
    if any(n not in curves for ns in names.values() for n in ns):
        return None
    lv = matched_safety_levels({n: (curves[n]["steps"], curves[n]["safety"])
                                for ns in names.values() for n in ns}, n_levels=n_levels)
    if not lv["levels"]:
        return {"levels": [], "reason": lv["reason"]}
    g = {x: np.stack([costs_at_levels(curves[n], lv["levels"])[0].mean(0) for n in ns])
         for x, ns in names.items()}
    if not all(np.isfinite(v).all() for v in g.values()):
        return {"levels": lv["levels"], "reason": "not readable at every level"}
    return {"levels": lv["levels"],
            "diff": paired_difference(g[a], g[b], n_boot=n_boot, seed=seed,
                                      names=(arm_label(a), arm_label(b)))}


def best_method(grids: dict, *, n_boot: int = 2000, seed: int = 0,
                label: Callable[[str], str] = arm_label) -> dict:
    """Which arm has the lowest cost, and by how much.

    grids: {arm: per-prompt cost at matched safety `[n_seeds, n_prompts]`} (paired: same seeds
    and prompts). Returns {"best", "runner_up", "ranking" (arms by mean cost), "vs_runner_up"
    (`paired_difference(best, runner_up)`), "tied" (arms whose difference from the best has a CI
    that includes 0), "statement"}.
    """
    from ..stats import paired_difference

    if len(grids) < 2:
        raise ValueError(f"best_method needs at least 2 arms with a matched cost, got "
                         f"{sorted(grids)}.")
    ranking = sorted(grids, key=lambda a: float(np.mean(grids[a])))
    best, second = ranking[0], ranking[1]
    diffs = {a: paired_difference(grids[best], grids[a], n_boot=n_boot, seed=seed,
                                  names=(label(best), label(a))) for a in ranking[1:]}
    d = diffs[second]
    tied = [a for a in ranking[1:] if not diffs[a]["significant"]]
    mean = float(np.mean(grids[best]))
    if d["significant"]:
        text = (f"{label(best)} has the lowest over-refusal cost at matched safety "
                f"({mean:+.3f} nats), lower than the runner-up, {label(second)}, by "
                f"{-d['diff']:.3f} nats [95% CI {-d['high']:.3f}, {-d['low']:.3f}]")
    else:
        from ..inference import no_difference_text

        text = (f"{label(best)} has the lowest mean over-refusal cost at matched safety "
                f"({mean:+.3f} nats), but against the runner-up, {label(second)} "
                f"({d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]): "
                f"{no_difference_text(d['low'], d['high'], unit='nats')}")
    if tied:
        text += f"; statistically tied with the best: {', '.join(label(a) for a in tied)}"
    return {"best": best, "runner_up": second, "ranking": ranking, "vs_runner_up": d,
            "vs_best": diffs, "tied": tied, "statement": text + "."}


def summarize_peers(out_dir: Union[str, Path], *, write: bool = True) -> dict:
    """The comparison's numbers from its files: the tax of full tuning, the common matched-safety
    levels (and the arms left out), per arm the primary cost at matched safety (CI over seeds and
    prompts), arm - full and CAST - arm, the best arm, the compositions against their baselines,
    the interpolation's a = 1 check, budgets, times and the curves for the Pareto figure.
    Written to `summary.json` when `write`."""
    from ..stats import paired_difference

    out = Path(out_dir)
    if not (out / "peers.json").exists():
        raise FileNotFoundError(f"{out} holds no peer comparison (no peers.json): run run_peers "
                                "first.")
    meta, original = read_json(out / "peers.json"), read_json(out / "original.json")
    cfg = PeersConfig.from_dict(meta["config"])
    plan = plan_peers(cfg)
    pieces = load_pieces(out)
    pieces = {p.name: pieces[p.name] for p in plan if p.name in pieces}
    seeds = cfg.train_seeds
    arms = list(dict.fromkeys(p.arm for p in plan))
    arm_of = {p.name: p.arm for p in plan}
    summary: dict[str, Any] = {"config": meta["config"], "model": meta["model"],
                               "versions": meta["versions"], "data": meta["data"],
                               "n_pieces": len(pieces), "n_planned": len(plan),
                               "primary": PRIMARY, "arms": arms,
                               "labels": {a: arm_label(a) for a in arms},
                               "families": {a: arm_family(a) for a in arms},
                               "estimate": estimate_peers_seconds(cfg)}
    boot = {"n_boot": cfg.n_boot, "seed": cfg.seed}

    # 1. The tax: full tuning at its last step against the original, per prompt, over seeds.
    full = [pieces[f"full_t{s}"] for s in seeds if f"full_t{s}" in pieces]
    last = str(cfg.steps)
    summary["tax"] = full_tuning_tax(full, original, cfg.steps, **boot) if full else {}

    # 2. Matched safety: levels common to the arms' test curves (interpolation: along a).
    curves = {n: piece_curve(p, original) for n, p in pieces.items()}
    levels = common_levels(curves, arm_of, n_levels=cfg.n_levels,
                           min_range_share=cfg.min_range_share) if curves else {
        "levels": [], "reason": "no finished piece", "excluded": [], "arms": []}
    summary["levels"] = levels
    L = levels["levels"]
    kept = set(levels.get("arms", []))
    matched = {n: costs_at_levels(c, L)[0].mean(0) for n, c in curves.items()
               if L and arm_of[n] in kept}
    kl_matched = {n: costs_at_levels(piece_curve(pieces[n], original, "kl"), L)[0].mean(0)
                  for n in matched}

    def grid(arm: str, values: dict) -> Optional[np.ndarray]:
        rows = [values.get(f"{arm}_t{s}") for s in seeds]
        if any(r is None for r in rows):
            return None
        g = np.stack(rows)
        return g if np.isfinite(g).all() else None

    grids = {a: g for a in arms if (g := grid(a, matched)) is not None}
    methods: dict[str, dict] = {}
    for a in arms:
        ps = [pieces[f"{a}_t{s}"] for s in seeds if f"{a}_t{s}" in pieces]
        row: dict[str, Any] = {"label": arm_label(a), "family": arm_family(a),
                               "n_pieces": len(ps), "complete": len(ps) == len(seeds)}
        if ps:
            row["budget"] = ps[0]["budget"]
            row["n_trainable"] = ps[0]["n_trainable"]
            row["lr"] = ps[0]["lr"]
            row["train_time_s"] = float(np.mean([p["train_time_s"] for p in ps]))
            row["wall_time_s"] = float(np.mean([p["wall_time_s"] for p in ps]))
            if "source_train_time_s" in ps[0]:
                row["source_train_time_s"] = float(np.mean([p["source_train_time_s"]
                                                            for p in ps]))
        ex = next((e for e in levels.get("excluded", []) if e["arm"] == a), None)
        if ex:
            row["excluded"] = ex["reason"]
            # Still compared at matched safety: with full tuning and with CAST, each on the range
            # the two arms share.
            row["pairwise_vs_full"] = pairwise_difference(a, "full", curves, seeds,
                                                          n_levels=cfg.n_levels, **boot)
            row["pairwise_cast_minus"] = pairwise_difference("cast", a, curves, seeds,
                                                             n_levels=cfg.n_levels, **boot)
        g = grids.get(a)
        if g is not None:
            zero = np.zeros_like(g)
            row["cost"] = paired_difference(g, zero, **boot, names=(arm_label(a), "original"))
            kg = grid(a, kl_matched)
            if kg is not None:
                row["kl_cost"] = paired_difference(kg, np.zeros_like(kg), **boot,
                                                   names=(arm_label(a), "original"))
            if a != "full" and "full" in grids:
                row["vs_full"] = paired_difference(g, grids["full"], **boot,
                                                   names=(arm_label(a), "full tuning"))
            if a != "cast" and "cast" in grids:
                row["cast_minus"] = paired_difference(grids["cast"], g, **boot,
                                                      names=("CAST", arm_label(a)))
        elif ps and L and not ex:
            row["note"] = ("not every seed finished" if len(ps) < len(seeds) else
                           "not readable at every level")
        methods[a] = row
    summary["methods"] = methods
    summary["best"] = best_method(grids, **boot) if len(grids) >= 2 else None

    # 3. Compositions: does head skipping add anything to a baseline?
    comps = {}
    pairs = [("interp_cast", "interp_full")] + [
        (f"cast_anchor_{_share_label(s)}", f"anchor_{_share_label(s)}") for s in cfg.compose_shares]
    for a, b in pairs:
        if a in grids and b in grids:
            comps[f"{a}_vs_{b}"] = paired_difference(grids[a], grids[b], **boot,
                                                     names=(arm_label(a), arm_label(b)))
    summary["compositions"] = comps

    # 4. The interpolation at a = 1 against its source's last test checkpoint (same weights).
    checks = {}
    for p in plan:
        if p.trains or p.name not in pieces or p.source.name not in pieces or "1" not in \
                pieces[p.name]["test"]:
            continue
        at1, src = pieces[p.name]["test"]["1"], pieces[p.source.name]["test"][last]
        checks[p.name] = max(float(np.max(np.abs(np.asarray(at1[m], float) -
                                                 np.asarray(src[m], float)))) for m in src)
    summary["interpolation_check"] = checks

    # 5. Curves per arm (means over seeds) for the Pareto figure: test and validation.
    base_safety = {sp: float(np.mean(original[sp]["refusal_score"])) for sp in ("val", "test")}
    pareto: dict[str, dict] = {}
    for a in arms:
        ps = [pieces[f"{a}_t{s}"] for s in seeds if f"{a}_t{s}" in pieces]
        if not ps:
            continue
        entry = {"along": "a" if ps[0]["piece"]["method"] == "interp" else "step",
                 "n_seeds": len(ps)}
        for sp in ("test", "val"):
            cs = [piece_curve(p, original, split=sp) for p in ps]
            n = min(len(c["steps"]) for c in cs)
            entry[sp] = {"x": cs[0]["steps"][:n],
                         "safety_gain": [float(np.mean([c["safety"][j] for c in cs])) -
                                         base_safety[sp] for j in range(n)],
                         "cost": [float(np.mean([c["cost"][j].mean() for c in cs]))
                                  for j in range(n)]}
        pareto[a] = entry
    summary["pareto"] = pareto
    summary["original_safety"] = base_safety
    summary["matched_cost"] = {n: float(np.nanmean(v)) for n, v in matched.items()}
    tm = read_json(out / "timings.json") if (out / "timings.json").exists() else {}
    summary["times"] = {**tm, "original_s": original.get("time_s"),
                        "pieces_s": float(sum(p["wall_time_s"] for p in pieces.values()))}
    summary = json.loads(json.dumps(to_jsonable(summary)))
    if write:
        atomic_write_json(summary, out / "summary.json")
    return summary
