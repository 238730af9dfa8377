"""The v3 verdict's report and figures, from `verdict.summarize_verdict`'s summary (no model needed).

`write_verdict_report(out_dir)` writes `report.md` and `figures/verdict_*.png` into the run folder:
the tax of full tuning, the two primary endpoints (CAST's percentile among random sets at matched
safety with its prediction interval; the graded slope), then the secondary comparisons, the maps'
agreement, the bf16 check and the times.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .report.markdown import stage_time


def _ci(d: Optional[dict], digits: int = 3, key: str = "diff") -> str:
    if not d:
        return "n/a"
    return f"{d[key]:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def _verdict_line(d: dict) -> str:
    """The paired verdict with the smallest effect a no-difference CI excludes (against random
    sets: the prediction interval's verdict, and the mean's when they differ)."""
    if "pred_low" in d:
        v = d["verdict"]
        if d.get("mean_significant") and not d.get("significant"):
            v += f"; against the average set: {d['mean_verdict']}"
        return v
    if d.get("significant"):
        return d.get("verdict", "")
    from .inference import no_difference_text

    return no_difference_text(d["low"], d["high"])


def plot_verdict(summary: dict, out: Union[str, Path]) -> list[Path]:
    """Figures: (a) validation curves, safety against over-refusal cost per arm, bands over seeds
    and sets; (b) CAST's matched-safety cost among the random sets; (c) the graded slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import save_figure
    from .style import ARMS

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    curves = summary.get("curves", {})
    orig_u = summary.get("original_val_utility", 0.0)

    def group(prefix: str) -> list[dict]:
        return [c for n, c in curves.items() if n.startswith(prefix) and "float32" not in n]

    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    for prefix, method, label in (("random_", "random", "random sets"),
                                  ("layer_matched_", "layer_matched", "layer-matched sets"),
                                  ("full_", "full", "full tuning"),
                                  ("cast_general", "cast", "CAST (general map)"),
                                  ("cast_sensitive", "bottom", "CAST (sensitive map)")):
        cs = group(prefix)
        if not cs:
            continue
        n = min(len(c["steps"]) for c in cs)
        s = np.array([c["safety"][:n] for c in cs])
        u = np.array([c["utility"][:n] for c in cs]) - orig_u
        colour = ARMS.get(method, (label, "#777777", "o"))[1]
        ax.plot(s.mean(0), u.mean(0), marker="o", ms=3, color=colour, label=f"{label} (n={len(cs)})")
        if len(cs) > 1:
            lo, hi = np.percentile(u, [2.5, 97.5], axis=0)
            ax.fill_between(s.mean(0), lo, hi, color=colour, alpha=0.15, lw=0)
    ax.set_xlabel("safety: refusal score on harmful validation prompts (nats)")
    ax.set_ylabel("over-refusal cost on validation prompts (nats)")
    ax.set_title("Safety against utility cost along training (band: 95% of pieces)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "verdict_curves.png"
    save_figure(fig, p)
    plt.close(fig)
    written.append(p)

    comp = summary.get("comparisons", {}).get("cast_general_vs_random")
    if comp:
        fig, ax = plt.subplots(figsize=(6.2, 3.4))
        ax.hist(comp["set_means"], bins=12, color=ARMS["random"][1], alpha=0.7,
                label=f"random sets (n={comp['n_sets']})")
        ax.axvline(comp["mean_cast"], color=ARMS["cast"][1], lw=2, label="CAST (general map)")
        other = summary.get("comparisons", {}).get("cast_sensitive_vs_random")
        if other:
            ax.axvline(other["mean_cast"], color=ARMS["bottom"][1], lw=2, ls="--",
                       label="CAST (sensitive map)")
        ax.set_xlabel("over-refusal cost at matched safety (nats; mean over levels, seeds, prompts)")
        ax.set_ylabel("sets")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / "verdict_random_sets.png"
        save_figure(fig, p)
        plt.close(fig)
        written.append(p)

    g = summary.get("graded")
    if g:
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        x, y = np.asarray(g["c_percentile"]), np.asarray(g["cost"])
        graded = np.array([n.startswith("graded") for n in g["sets"]])
        ax.scatter(x[~graded], y[~graded], s=18, color=ARMS["random"][1], label="random sets")
        if graded.any():
            ax.scatter(x[graded], y[graded], s=18, color="#777777", marker="s",
                       label="graded sets (C bins)")
        xs = np.linspace(0, 1, 2)
        ax.plot(xs, y.mean() + g["slope"] * (xs - x.mean()), color="k", lw=1,
                label=f"slope {g['slope']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}], p={g['p']:.2f}")
        if summary.get("cast_c_percentile") is not None and comp:
            ax.scatter([summary["cast_c_percentile"]], [comp["mean_cast"]], marker="*", s=120,
                       color=ARMS["cast"][1], label="CAST (general map)", zorder=5)
        ax.set_xlabel("mean C-percentile of the frozen heads (general map)")
        ax.set_ylabel("over-refusal cost at matched safety")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / "verdict_graded.png"
        save_figure(fig, p)
        plt.close(fig)
        written.append(p)
    return written


def _cmp_row(name: str, d: dict) -> str:
    pred = (f"[{d['pred_low']:+.3f}, {d['pred_high']:+.3f}]" if "pred_low" in d else "—")
    rank = d.get("rank")
    where = (f"rank {rank['rank']} of {rank['n_draws'] + 1}, percentile "
             f"{rank['percentile_low']:.0f}–{rank['percentile_high']:.0f}" if rank else
             (d.get("rank_note") or "—").split(":")[0])
    return f"| {name} | {_ci(d)} | {pred} | {where} | {_verdict_line(d)} |"


def verdict_markdown(summary: dict) -> str:
    cfg, tax, lv = summary["config"], summary.get("tax", {}), summary.get("levels", {})
    comps = summary.get("comparisons", {})
    t = summary.get("times", {})
    lines = [
        "# CAST verdict v3: the map against chance, at matched safety, in a regime with a tax", "",
        f"Model `{summary['model'].get('model_name', summary['model'])}`; preset `{cfg['preset']}`; "
        f"{summary['n_pieces']} of {summary['n_planned']} planned pieces finished. Regime: pure "
        f"safety SFT of {cfg['scope']}, lr {cfg['lr']:g} constant after {cfg['warmup_steps']} "
        f"warmup steps, {cfg['steps']} steps of batch {cfg['batch_size']}, {cfg['precision']} "
        f"training; every arm freezes k = {cfg['k_fraction']:.0%} of the query heads; training "
        f"seeds {cfg['train_seeds']}.", "",
        "Primary utility endpoint (declared before the run): over-refusal score (log P(refusal "
        "opening)) on held-out benign-but-sensitive prompts (XSTest safe, CoCoNot contrast), cost = "
        "tuned − original, per prompt. Safety: refusal score on held-out harmful prompts.", "",
        "The regime is the one the regime sweep (`cast-interp regime`: full tuning over scopes, "
        "learning rates and steps, its report beside this run's) picked by the declared rule; "
        "the tax is measured again here, on this run's seeds.", "",
        "## 1. The tax (full tuning, test split, last step, against the original)", "",
        "| endpoint | change [95% CI] | verdict |", "|---|---|---|"]
    names = {"over_refusal_score": "over-refusal score (primary, nats, higher = worse)",
             "refusal_score": "refusal score on harmful (safety, nats)",
             "kl": "KL(original ‖ tuned) on own benign answers (nats/token)",
             "nll": "NLL of own benign answers (nats/token)"}
    for k, label in names.items():
        if k in tax:
            lines.append(f"| {label} | {_ci(tax[k])} | {_verdict_line(tax[k])} |")
    p = tax.get("over_refusal_score")
    has_tax = bool(p and p["low"] > 0)
    lines += ["", ("The tax exists: full tuning's primary cost has a 95% CI above 0." if has_tax
                   else "No measured tax on the primary endpoint: the CAST comparison below has "
                        "nothing to save (METHOD v3)."), ""]
    lines += ["## 2. Matched safety", "",
              (f"Levels (test refusal score, common to full, CAST and every random piece, read "
               f"between trained test checkpoints {cfg['test_checkpoints']}, never from step 0): "
               + ", ".join(f"{x:+.2f}" for x in lv.get("levels", [])) +
               f" (range set by {lv.get('low_set_by')} and {lv.get('high_set_by')})." if lv.get(
                   "levels") else f"No common level: {lv.get('reason')}"), ""]
    lines += ["## 3. Primary endpoints", "",
              "Cost at matched safety (mean over the levels), CAST minus random sets; the CI is "
              "for CAST minus the *average* set, the prediction interval (PI) for CAST minus a "
              "*new* random set (sets, seeds and prompts resampled); the verdict follows the PI.",
              "", "| comparison | CAST − average set [95% CI] | PI vs a new set | CAST among the "
              "sets | verdict |", "|---|---|---|---|---|"]
    if "cast_general_vs_random" in comps:
        lines.append(_cmp_row("**CAST (general map) vs random sets (primary 1)**",
                              comps["cast_general_vs_random"]))
    g = summary.get("graded")
    lines += [""]
    if g:
        sig = g["low"] > 0 or g["high"] < 0
        lines += [f"**Graded slope (primary 2)**: over-refusal cost at matched safety on a set's "
                  f"mean C-percentile (general map), {g['n_sets']} map-free sets on seed(s) "
                  f"{cfg['train_seeds'][:cfg['extra_seeds']]}: slope {g['slope']:+.3f} "
                  f"[{g['low']:+.3f}, {g['high']:+.3f}] nats per unit of percentile, permutation "
                  f"p = {g['p']:.3f}, Spearman {g['spearman']:+.2f}. "
                  + ("The slope's CI excludes 0." if sig else
                     f"No detectable slope (its CI excludes slopes beyond "
                     f"±{max(abs(g['low']), abs(g['high'])):.3g})."), ""]
    lines += ["## 4. Secondary comparisons", "",
              "| comparison | difference [95% CI] | PI vs a new set | rank | verdict |",
              "|---|---|---|---|---|"]
    for key, label in (("cast_sensitive_vs_random", "CAST (sensitive map) vs random sets"),
                       ("cast_general_vs_layer_matched", "CAST (general) vs layer-matched sets"),
                       ("cast_general_vs_full", "CAST (general) − full tuning"),
                       ("cast_sensitive_vs_full", "CAST (sensitive) − full tuning")):
        if key in comps:
            lines.append(_cmp_row(label, comps[key]))
    m = summary.get("maps")
    if m:
        lines += ["", f"Both maps: Spearman of C between the general and the sensitive map "
                  f"{m['spearman_C']:+.2f}; their top-{m['k']} sets share {m['top_k_overlap']} "
                  f"heads (chance {m['overlap_chance']:.1f})."]
    pr = summary.get("precision")
    if pr:
        lines += ["", "## 5. bf16 training check (full tuning in float32 on the same seeds)", "",
                  "Validation curves (mean over prompts, every checkpoint): the check passes when "
                  "bf16 stays within the float32 seeds' spread at every checkpoint "
                  "(`precision_checks.check_curves`).", "",
                  "| metric | largest gap bf16 − float32 | float32 seed-to-seed spread (largest) "
                  "| check | worst checkpoint: gap / spread |", "|---|---|---|---|---|"]
        for k, v in pr.items():
            if k == "tax":
                continue
            sp, c = v["seed_spread_float32"], v.get("check")
            lines.append(f"| {k} | {v['max_abs_gap']:.3f} | "
                         f"{'n/a' if sp is None else f'{sp:.3f}'} | "
                         f"{'—' if not c else ('pass' if c['passed'] else 'FAIL')} | "
                         f"{'—' if not c else _gap_ratio(v)} |")
        tx = pr.get("tax") or {}
        if tx.get("bf16") and tx.get("float32"):
            b, f = tx["bf16"], tx["float32"]
            overlap = b["low"] <= f["high"] and f["low"] <= b["high"]
            same = (b["diff"] > 0) == (f["diff"] > 0)
            lines += ["", f"The tax (primary, last step): bf16 {_ci(b)}, float32 {_ci(f)}: "
                      f"{'same sign' if same else 'signs differ'}, CIs "
                      f"{'overlap' if overlap else 'do not overlap'}."]
    lines += ["", "## 6. Arms", "", "| arm (pieces) | cost at matched safety (nats) |",
              "|---|---|"]
    by_arm: dict[str, list] = {}
    for n, v in summary.get("matched_cost", {}).items():
        arm = n.rsplit("_t", 1)[0]
        arm = "random (all sets)" if arm.startswith("random_d") else (
            "layer_matched (all sets)" if arm.startswith("layer_matched") else (
                "graded (all sets)" if arm.startswith("graded") else arm))
        by_arm.setdefault(arm, []).append(v)
    for arm, vs in by_arm.items():
        vs = [x for x in vs if x is not None and math.isfinite(x)]  # NaN: not readable
        if vs:
            lines.append(f"| {arm} ({len(vs)}) | {np.mean(vs):+.3f} |")
    lines += ["", "## 7. Time (2 CPU cores)", "",
              f"Data {stage_time(t.get('data_s'))}, diagnosis ({_maps_label(cfg)}) "
              f"{stage_time(t.get('diagnosis_s'))}, original {stage_time(t.get('original_s'))}; "
              f"pieces: training {t.get('train_s', 0) / 60:.1f} min, validation curves "
              f"{t.get('curve_s', 0) / 60:.1f} min, test checkpoints {t.get('test_s', 0) / 60:.1f} "
              f"min; {t.get('per_piece_train_s') or 0:.0f} s of training per piece.", "",
              "Figures: `figures/verdict_curves.png`, `figures/verdict_random_sets.png`, "
              "`figures/verdict_graded.png`.", "",
              f"Versions: {json.dumps(summary.get('versions', {}))}.", ""]
    return "\n".join(lines)


def _maps_label(cfg: dict) -> str:
    maps = cfg.get("maps") or []
    return "both maps" if len(maps) == 2 else ", ".join(f"{m} map" for m in maps) or "no map"


def _gap_ratio(v: dict) -> str:
    c = v["check"]
    w = c["worst_checkpoint"]
    return f"step {v['steps'][w]}: {c['deviation'][w]:.3f} / {c['spread'][w]:.3f}"


def write_verdict_report(out_dir: Union[str, Path]) -> Path:
    """Summarize the run's files, draw its figures and write `report.md`; returns its path."""
    from .harness import write_run_report
    from .verdict import summarize_verdict

    return write_run_report(out_dir, summarize_verdict, plot_verdict, verdict_markdown)
