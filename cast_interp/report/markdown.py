"""The run's report.md (`report_markdown`): the verdict, the diagnosis, every metric's paired
differences, matched safety, the time, and stage 4."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from .. import inference
from .compare import MIN_SEEDS_MATCHED, PRIMARY, _info

QUICK_LOOK_SEEDS = 8  # fewer training seeds than this: the report calls its CIs wide


def _num(v: Any) -> str:
    """A signed number with 3 significant digits (+0 for 0)."""
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"
    return "+0" if v == 0 else f"{v:+.3g}"


def stage_time(s: Any) -> str:
    """A stage's recorded time for a report: seconds (under a minute) or minutes; "re-used" as
    recorded for a stage the run found done in its folder (a map with the same key); "—" when
    unrecorded."""
    if isinstance(s, str):
        return s
    if not isinstance(s, (int, float)) or not math.isfinite(s):
        return "—"
    return f"{s:.0f} s" if s < 60 else f"{s / 60:.1f} min"


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
    from ..conflict_map import CONC_HEADER, _fmt_conc

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
