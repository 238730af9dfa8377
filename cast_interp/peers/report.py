"""The peer comparison's report and figures, from `summary.summarize_peers`'s summary (no model).

`write_peers_report(out_dir)` writes `report.md`, `figures/peers_pareto.png` (safety gained against
utility cost, every arm's curve: along training, or along a for an interpolation) and
`figures/peers_matched_cost.png` (each arm's cost at matched safety with its 95% CI).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union

from ..report.markdown import stage_time

FIGURES = ("peers_pareto.png", "peers_matched_cost.png")


def _ci(d: Optional[dict], digits: int = 3) -> str:
    if not d:
        return "—"
    return f"{d['diff']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def _verdict(d: Optional[dict]) -> str:
    if not d:
        return "—"
    return d["statement"]


def _count(n: Optional[int]) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e3 else str(n))


def _colours(arms: list) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {a: cmap(i % 20) for i, a in enumerate(arms)}


def plot_peers(summary: dict, out: Union[str, Path]) -> list[Path]:
    """Figures: (a) the Pareto view, safety gained (refusal score − original) against the primary
    utility cost, each arm's mean curve over seeds, on the test split (where matched safety is
    read; the levels drawn) and along the validation curves; (b) each arm's cost at matched safety
    with its 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..figures.common import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arms = summary.get("arms", [])
    labels = summary.get("labels", {})
    colours = _colours(arms)
    pareto = summary.get("pareto", {})
    base = summary.get("original_safety", {}).get("test", 0.0)
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.8))
    for ax, split, title in ((axes[0], "test", "test split (matched safety read here)"),
                             (axes[1], "val", "validation curves along training")):
        for a in arms:
            e = pareto.get(a)
            if not e:
                continue
            c = e[split]
            interp = e["along"] == "a"
            ax.plot(c["cost"], c["safety_gain"], marker="s" if interp else "o", ms=3.5,
                    ls="--" if interp else "-", color=colours[a],
                    lw=2.2 if a in ("full", "cast") else 1.2,
                    label=f"{labels.get(a, a)}" + (" (along a)" if interp else ""))
        if split == "test":
            for lv in summary.get("levels", {}).get("levels", []):
                ax.axhline(lv - base, color="#999999", lw=0.7, ls=":")
        ax.axvline(0, color="#cccccc", lw=0.7)
        ax.set_xlabel("utility cost: over-refusal score − original (nats, lower is better)")
        ax.set_ylabel("safety gained: refusal score − original (nats)")
        ax.set_title(title, fontsize=9)
    axes[1].legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Peer methods: safety gained against utility cost (means over seeds; dotted: "
                 "matched-safety levels)", fontsize=9)
    fig.tight_layout()
    written.append(save_figure(fig, out / FIGURES[0], dpi=130))
    plt.close(fig)

    rows = [(a, m["cost"]) for a, m in summary.get("methods", {}).items() if m.get("cost")]
    if rows:
        fig, ax = plt.subplots(figsize=(6.4, 0.32 * len(rows) + 1.2))
        for i, (a, c) in enumerate(rows):
            ax.errorbar([c["diff"]], [i], xerr=[[c["diff"] - c["low"]], [c["high"] - c["diff"]]],
                        fmt="o", color=colours.get(a, "#777777"), capsize=3)
        full = summary["methods"].get("full", {}).get("cost")
        if full:
            ax.axvline(full["diff"], color="#777777", lw=0.8, ls="--", label="full tuning")
            ax.legend(fontsize=7)
        ax.set_yticks(range(len(rows)), [labels.get(a, a) for a, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("over-refusal cost at matched safety (nats; mean over levels, seeds, "
                      "prompts; 95% CI)")
        fig.tight_layout()
        written.append(save_figure(fig, out / FIGURES[1], dpi=130))
        plt.close(fig)
    return written


def peers_markdown(summary: dict) -> str:
    cfg, tax, lv = summary["config"], summary.get("tax", {}), summary.get("levels", {})
    methods, best = summary.get("methods", {}), summary.get("best")
    t = summary.get("times", {})
    model = summary["model"].get("model_name", summary["model"]) if isinstance(
        summary["model"], dict) else summary["model"]
    lines = [
        "# Peer methods at matched safety: which way of lowering the alignment tax wins", "",
        f"Model `{model}`; preset `{cfg['preset']}`; {summary['n_pieces']} of "
        f"{summary['n_planned']} planned pieces finished. Regime (the v3 verdict's): pure safety "
        f"SFT of {cfg['scope']}, lr {cfg['lr']:g} constant after {cfg['warmup_steps']} warmup "
        f"steps (LoRA: its published default {cfg['lora_lr']:g}), {cfg['steps']} steps of batch "
        f"{cfg['batch_size']}, {cfg['precision']} training, training seeds {cfg['train_seeds']} "
        f"(every arm on every seed); CAST, the layer freezes and the activation arms at k = "
        f"{cfg['k_fraction']:.0%} of the query heads. No per-arm learning-rate sweep.", "",
        "Primary utility endpoint (the v3 verdict's): over-refusal score (log P(refusal opening)) "
        "on held-out benign-but-sensitive prompts, cost = tuned − original, per prompt. Safety: "
        "refusal score on held-out harmful prompts. Interpolation theta(a) = (1 − a) "
        f"theta_original + a theta_tuned at a in {cfg['alphas']} (no extra training; its curve "
        "runs along a).",
        "", "## 1. The tax (full tuning, test split, last step, against the original)", "",
        "| endpoint | change [95% CI] | verdict |", "|---|---|---|"]
    names = {"over_refusal_score": "over-refusal score (primary, nats, higher = worse)",
             "refusal_score": "refusal score on harmful (safety, nats)",
             "kl": "KL(original ‖ tuned) on own benign answers (nats/token)",
             "nll": "NLL of own benign answers (nats/token)"}
    for k, label in names.items():
        if k in tax:
            lines.append(f"| {label} | {_ci(tax[k])} | {_verdict(tax[k])} |")
    p = tax.get("over_refusal_score")
    lines += ["", ("The tax exists: full tuning's primary cost has a 95% CI above 0." if p and
                   p["low"] > 0 else "No measured tax on the primary endpoint: no method below "
                   "has a cost to lower (METHOD v3)."), ""]
    lines += ["## 2. Matched safety", ""]
    if lv.get("levels"):
        lines.append(f"Levels (test refusal score, common to every arm compared, read between "
                     f"trained test checkpoints {cfg['test_checkpoints']} or between interpolation"
                     f" points, never from the untrained model): "
                     + ", ".join(f"{x:+.2f}" for x in lv["levels"])
                     + f" (range set by {lv.get('low_set_by')} and {lv.get('high_set_by')}).")
    else:
        lines.append(f"No common level: {lv.get('reason')}")
    for e in lv.get("excluded", []):
        lines.append(f"- Left out: {summary['labels'].get(e['arm'], e['arm'])}: {e['reason']}.")
        m = methods.get(e["arm"], {})
        for key, other, what in (("pairwise_vs_full", "full tuning", "it minus full tuning"),
                                 ("pairwise_cast_minus", "CAST", "CAST minus it")):
            pw = m.get(key)
            if pw and pw.get("diff"):
                lines.append(f"  Against {other}, on the safety range the two share (levels "
                             + ", ".join(f"{x:+.2f}" for x in pw["levels"]) + f"), {what}: "
                             f"{_ci(pw['diff'])} nats ({_verdict(pw['diff'])}).")
            elif pw:
                lines.append(f"  Against {other}: no reading ({pw.get('reason')}).")
    lines += ["", "## 3. The comparison", "",
              "Cost at matched safety: mean over the levels, seeds and prompts, with a 95% CI over "
              "seeds and prompts (`stats.paired_difference`, paired by seed and prompt). "
              "Trainable parameters: what the arm's optimizer updates (LoRA: the adapters).", "",
              "| method | family | trainable params | cost at matched safety [95% CI] | − full "
              "tuning [95% CI] | CAST − method [95% CI] | CAST vs method | train s / piece |",
              "|---|---|---|---|---|---|---|---|"]
    full_t = methods.get("full", {}).get("train_time_s")
    for a, m in methods.items():
        if "cost" not in m:
            why = "left out, §2" if m.get("excluded") else (m.get("note") or "not run")
            lines.append(f"| {m['label']} | {m['family']} | {_count(m.get('n_trainable'))} | "
                         f"— ({why}) | — | — | — | {m.get('train_time_s', math.nan):.0f} |")
            continue
        cm = m.get("cast_minus")
        if cm is None:
            vs = "—"
        elif cm["significant"]:
            vs = "CAST lower" if cm["diff"] < 0 else "CAST higher"
        else:
            vs = cm["statement"]
        tt = m.get("train_time_s", math.nan)
        if m["family"] in ("weight interpolation", "composition") and "source_train_time_s" in m:
            tt_s = f"0 (+ source's {m['source_train_time_s']:.0f})"
        else:
            tt_s = f"{tt:.0f}"
        lines.append(f"| {m['label']} | {m['family']} | {_count(m.get('n_trainable'))} | "
                     f"{_ci(m['cost'])} | {_ci(m.get('vs_full'))} | {_ci(cm)} | {vs} | {tt_s} |")
    lines += [""]
    if best:
        left = [summary["labels"].get(e["arm"], e["arm"]) for e in lv.get("excluded", [])]
        lines += [f"**Lowest cost at matched safety**: {best['statement']}"
                  + (" (Among the arms on the common range. Left out, and compared in §2 on "
                     "the range each shares with full tuning and with CAST: "
                     f"{', '.join(left)}.)" if left else ""), ""]
        if best["best"] != "cast" and "cast_minus" in methods.get(best["best"], {}):
            d = methods[best["best"]]["cast_minus"]
            lines += [f"CAST − {summary['labels'][best['best']]}: {_ci(d)} nats "
                      f"({_verdict(d)}).", ""]
    comps = summary.get("compositions", {})
    if comps:
        lines += ["## 4. Compositions: does head skipping add anything?", "",
                  "| composition − its baseline | difference [95% CI] | verdict |",
                  "|---|---|---|"]
        for d in comps.values():
            lines.append(f"| {d['names'][0]} − {d['names'][1]} | {_ci(d)} | {_verdict(d)} |")
        lines.append("")
    chk = summary.get("interpolation_check", {})
    if chk:
        lines += [f"Interpolation at a = 1 against its source's last test checkpoint (the same "
                  f"weights): largest per-prompt difference "
                  f"{max(chk.values()):.2g} over {len(chk)} pieces.", ""]
    kl = [(m["label"], m["kl_cost"]) for m in methods.values() if m.get("kl_cost")]
    if kl:
        lines += ["## 5. Secondary: KL on own benign answers at matched safety", "",
                  "| method | KL(original ‖ tuned) at matched safety [95% CI] |", "|---|---|"]
        lines += [f"| {lab} | {_ci(d, 4)} |" for lab, d in kl]
        lines.append("")
    est = summary.get("estimate", {})
    lines += ["## 6. Time", "",
              f"Data {stage_time(t.get('data_s'))}, diagnosis (general map) "
              f"{stage_time(t.get('diagnosis_s'))}, activation scores "
              f"{(t.get('activation_s') or 0):.0f} s, original {(t.get('original_s') or 0):.0f} s; "
              f"pieces {t.get('pieces_s', 0) / 60:.1f} min in all"
              + (f" (full tuning trains {full_t:.0f} s per piece)" if full_t is not None else "")
              + f". Planned: {est.get('n_pieces')} pieces ({est.get('n_trained')} trained, "
              f"{est.get('n_interp')} interpolations), estimated "
              f"{est.get('wall_s', 0) / 3600:.1f} h on {est.get('n_cores')} cores for SmolLM2.", "",
              "Figures: `figures/peers_pareto.png`, `figures/peers_matched_cost.png`.", "",
              f"Versions: {json.dumps(summary.get('versions', {}))}.", ""]
    return "\n".join(lines)


def write_peers_report(out_dir: Union[str, Path]) -> Path:
    """Summarize the run's files, draw its figures and write `report.md`; returns its path."""
    from ..harness import write_run_report
    from .summary import summarize_peers

    return write_run_report(out_dir, summarize_peers, plot_peers, peers_markdown)
