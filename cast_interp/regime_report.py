"""The regime sweep's report and figure (`regime.py` runs and summarizes the sweep): the table of
the tax per setting and test checkpoint with CIs, the figure of utility cost against safety gained,
and `report.md` with the declared rule's choice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from .regime import PRIMARY, summarize_sweep

# --------------------------------------------------------------------------------------------------
# Report: the sweep table and figures
# --------------------------------------------------------------------------------------------------

_SHORT = {"refusal_score": "safety gain (refusal score)", "over_refusal_score":
          "over-refusal score", "over_refusal_judged": "over-refusal rate (judged)",
          "kl": "KL to original", "nll": "NLL own answers", "mc_correct": "MC accuracy"}


def _fmt(d: Optional[dict], digits: int = 2) -> str:
    if not d:
        return "–"
    star = "**" if d["low"] > 0 or d["high"] < 0 else ""
    return f"{star}{d['diff']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]{star}"


def sweep_table(summary: dict) -> str:
    """Markdown table: per setting and test checkpoint, each endpoint's change from the original
    (tuned - original, 95% paired bootstrap CI over prompts; bold where the CI excludes 0)."""
    cols = [k for k in ("refusal_score", "over_refusal_score", "over_refusal_judged", "kl", "nll",
                        "mc_correct") if any(k in r for r in summary["rows"])]
    digits = {"kl": 3, "nll": 3, "over_refusal_judged": 3, "mc_correct": 3}
    head = "| setting | step | " + " | ".join(_SHORT[c] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for r in sorted(summary["rows"], key=lambda r: (r["setting"], r["step"])):
        lines.append(f"| {r['setting']} | {r['step']} | " + " | ".join(
            _fmt(r.get(c), digits.get(c, 2)) for c in cols) + " |")
    return "\n".join(lines)


def plot_sweep(summary: dict, path: Union[str, Path]) -> None:
    """Two panels: (a) validation curves, primary utility cost against safety gained along training
    per setting (points at the checkpoints); (b) the test checkpoints with their 95% paired CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import style

    colours = ["#000000", "#D55E00", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"]
    names = sorted(summary["curves"])
    with style.rc():
        fig, axes = plt.subplots(1, 2, figsize=style.figsize("two", 0.42))
        for i, name in enumerate(names):
            c = colours[i % len(colours)]
            dash = "-" if name.startswith("all") else "--"
            cur = summary["curves"][name]["curve"]
            x = [0.0] + [p["safety_gain"] for p in cur]
            y = [0.0] + [p["tax"] for p in cur]
            axes[0].plot(x, y, dash, color=c, marker="o", ms=3, label=name)
            for p in cur[-1:]:
                axes[0].annotate(str(p["step"]), (p["safety_gain"], p["tax"]), fontsize=7,
                                 xytext=(2, 2), textcoords="offset points")
            for r in summary["rows"]:
                if r["setting"] != name or PRIMARY not in r:
                    continue
                sx, ty = r["refusal_score"], r[PRIMARY]
                axes[1].errorbar(sx["diff"], ty["diff"], xerr=[[sx["diff"] - sx["low"]],
                                 [sx["high"] - sx["diff"]]], yerr=[[ty["diff"] - ty["low"]],
                                 [ty["high"] - ty["diff"]]], fmt="o", color=c, ms=4, capsize=2,
                                 mfc="white" if r["step"] < max(summary["config"]
                                                                ["test_checkpoints"]) else c)
                axes[1].annotate(f"{r['step']}", (sx["diff"], ty["diff"]), fontsize=7,
                                 xytext=(3, -8), textcoords="offset points", color=c)
        axes[1].plot([0], [0], "x", color="#555555", label="original")
        axes[1].set_xlim(left=-0.3)
        axes[1].set_ylim(bottom=-0.3)
        axes[1].legend(loc="upper left", fontsize=7)
        axes[0].set_title("validation, along training (step at the end)")
        axes[1].set_title("test, 95% paired CI over prompts")
        for ax in axes:
            ax.axhline(0, color="#999999", lw=0.6)
            ax.set_xlabel("safety gained: refusal score − original (nats)")
        axes[0].set_ylabel("over-refusal cost: score − original\n(nats; higher is worse)")
        axes[0].legend(loc="upper left", fontsize=7)
        style.panel_letters(axes)
        fig.tight_layout()
        from .figures import save_figure

        save_figure(fig, path)
        plt.close(fig)


def _mc_note(s: dict) -> str:
    mc = s["original"]["test"].get("mc_correct")
    if mc is None:
        return ""
    n = s["data"]["mc_items"]
    used = any("mc_correct" in r for r in s["rows"])
    return (f" Multiple-choice accuracy {mc:.3f} on {n} MMLU items (chance 0.25): "
            + ("above chance, so capability is an endpoint." if used else
               "its 95% CI reaches chance, so capability is dropped as an endpoint (METHOD v3: "
               "an endpoint at its floor is dropped, with the reason).") )


def write_sweep_report(out_dir: Union[str, Path]) -> Path:
    """`report.md` and `regime_sweep.png` in the sweep directory, from its files."""
    out = Path(out_dir)
    s = summarize_sweep(out)
    plot_sweep(s, out / "regime_sweep.png")
    orig = s["original"]
    ch = s["chosen"]
    verdict = (f"**Tax found.** Regime chosen by the declared rule: `{ch['setting']}` at step "
               f"{ch['step']}: over-refusal score {ch['tax']:+.2f} [{ch['tax_low']:+.2f}, "
               f"{ch['tax_high']:+.2f}] nats (test, paired), safety gain {ch['safety_gain']:+.2f}."
               if ch else "**No alignment tax in this regime** by the declared rule: no setting's "
               "primary cost has a 95% CI above 0 and a mean of at least "
               f"{s['config']['min_tax']} nats.")
    times = "\n".join(
        f"| {n} | {'yes' if c['finished'] else 'no (stopped at step ' + str(c['curve'][-1]['step'] if c['curve'] else 0) + ')'} "
        f"| {c['train_time_s'] / 60:.1f} | {c['eval_time_s'] / 60:.1f} |"
        if c["finished"] else
        f"| {n} | no (last checkpoint: step {c['curve'][-1]['step'] if c['curve'] else 0}) | – | – |"
        for n, c in sorted(s["curves"].items()))
    text = f"""# Regime sweep: does full safety tuning cost utility? (METHOD v3)

Model `{s['model'].get('model_name', s['model']) if isinstance(s['model'], dict) else s['model']}`; data from
`{s['data']['source']}`; full tuning (no unit skipped), pure safety SFT (benign share 0), batch
{s['config']['batch_size']}, constant lr after {s['config']['warmup_steps']} warmup steps, training
seed {s['config']['seed']}. Safety training set: {s['data']['safety_train']['n']} pairs (answers cut
at {s['config']['max_safety_tokens']} tokens). Primary utility endpoint (declared before the sweep):
**over-refusal score** (log P of a refusal opening on {s['data']['over_test']['n']} held-out
benign-but-sensitive test prompts, XSTest safe + CoCoNot contrast; higher is worse).

{verdict}

Original model (test): refusal score {orig['test']['refusal_score']:+.2f}, over-refusal score
{orig['test']['over_refusal_score']:+.2f}, judged over-refusal rate
{orig['test'].get('over_refusal_judged', float('nan')):.3f}, NLL of own answers
{orig['test']['nll']:.3f} nats/token.{_mc_note(s)}

## Change from the original at the test checkpoints

Each cell: tuned − original, mean over test prompts, [95% paired bootstrap CI over prompts]; bold
where the CI excludes 0. One training seed: this sweep picks a regime, it does not compare arms.

{sweep_table(s)}

![regime sweep](regime_sweep.png)

## Settings and time (2 CPU cores, shared with other jobs)

| setting | finished | training (min) | evaluation (min) |
|---|---|---|---|
{times}

Versions: {json.dumps(s['versions'])}.
"""
    from .io import atomic_write_text

    atomic_write_text(text, out / "report.md")
    return out / "report.md"
