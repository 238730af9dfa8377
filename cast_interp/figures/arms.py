"""Run figures (stages 2-3): the arms of a run along training and at the end (inputs are
`report.summarize` rows, `report.compare_arms` comparisons and arm pieces)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .. import style
from ..style import panel_letters
from .common import PathLike, _new_axes, _sci, save_figure

ARM_STYLE: dict[str, tuple[str, str, str]] = style.ARMS  # (label, colour, marker) per method


def _arm_label(method: str) -> tuple[str, str, str]:
    return style.arm_style(method)


def plot_tradeoff(summary: list[dict], *, utility: str = "kl_to_original",
                  safety: str = "refusal_rate", ax: Optional[Axes] = None,
                  save: Optional[PathLike] = None) -> Figure:
    """Safety (y) against utility cost (x) for every arm, with the spread (sd) over pieces as error
    bars. Up and to the left is better: more refusal, less utility drift."""
    with style.rc():
        fig, ax = _new_axes(ax, style.figsize("one", 0.9))
        seen = set()
        for r in summary:
            if safety not in r or utility not in r:
                continue
            label, color, marker = _arm_label(r["method"])
            x = r[utility] if utility == "kl_to_original" else r[f"d_{utility}"]
            ax.errorbar(x, r[safety], xerr=r.get(f"sd_{utility}", 0) or None,
                        yerr=r.get(f"sd_{safety}", 0) or None, fmt=marker, color=color,
                        ms=8 if r["method"] == "cast" else 5, capsize=2,
                        zorder=style.Z_ORDER.get(r["method"], 2),
                        label=None if label in seen else label)
            seen.add(label)
        ax.set_xlabel("KL(original ‖ tuned), benign (nats/token)" if utility == "kl_to_original"
                      else f"Δ {utility.replace('_', ' ')}")
        ax.set_ylabel(safety.replace("_", " ") + ", harmful")
        ax.legend(loc="best", title="bars: sd over pieces", title_fontsize=style.LEGEND_SIZE)
        ax.set_title("Safety vs utility cost (up-left is better)")
    if save is not None:
        save_figure(fig, save)
    return fig


def plot_drop_vs_k(summary: list[dict], *, utility: str = "kl_to_original",
                   ax: Optional[Axes] = None, save: Optional[PathLike] = None) -> Figure:
    """Utility cost against the number of skipped heads k, per method (full tuning as a line), the
    sd over pieces as error bars. Needs at least two budgets k (a sweep); one k is a `ValueError`."""
    ks = sorted({r["k"] for r in summary if r["method"] != "full" and utility in r})
    if len(ks) < 2:
        raise ValueError(f"drop_vs_k needs at least two budgets k, the run has {ks}: sweep k "
                         "(`k_fractions` or `k_sweep`) to draw it.")
    with style.rc():
        fig, ax = _new_axes(ax, style.figsize("one", 0.8))
        full = [r for r in summary if r["method"] == "full" and utility in r]
        if full:
            ax.axhline(full[0][utility], color="black", ls="--", lw=1, label="full tuning")
        by_method: dict[str, list[dict]] = {}
        for r in summary:
            if r["method"] != "full" and utility in r:
                by_method.setdefault(r["method"], []).append(r)
        for method, rows in by_method.items():
            rows = sorted(rows, key=lambda r: r["k"])
            label, color, marker = _arm_label(method)
            ax.errorbar([r["k"] for r in rows], [r[utility] for r in rows],
                        yerr=[r.get(f"sd_{utility}", 0) for r in rows], color=color,
                        marker=marker, capsize=2, label=label,
                        zorder=style.Z_ORDER.get(method, 2))
        ax.set_xticks(ks)
        ax.set_xlabel("k (heads skipped)")
        ax.set_ylabel("KL(original ‖ tuned) (nats/token)" if utility == "kl_to_original"
                      else f"Δ {utility.replace('_', ' ')}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="bars: sd over pieces",
                  title_fontsize=style.LEGEND_SIZE)
        ax.set_title("Utility cost vs budget k (lower is better)")
    if save is not None:
        save_figure(fig, save)
    return fig


def _groups(pieces: dict[str, dict]) -> list[tuple[str, int, list[dict]]]:
    """Pieces grouped by arm (method, k), CAST last so that it is drawn on top."""
    by: dict[tuple[str, int], list[dict]] = {}
    for p in pieces.values():
        a = p.get("piece") or p.get("arm") or {}
        by.setdefault((a.get("method", p.get("arm", {}).get("method")), a.get("k", 0)), []).append(p)
    return sorted(((m, k, ps) for (m, k), ps in by.items()),
                  key=lambda t: (style.Z_ORDER.get(t[0], 2), t[1], t[0]))


def _band_handle(text: str):
    from matplotlib.patches import Patch

    return Patch(facecolor="0.6", alpha=0.3, linewidth=0, label=text)


def plot_training_curves(results: dict[str, dict], *, ax: Optional[Axes] = None,
                         save: Optional[PathLike] = None) -> Figure:
    """Safety training loss per step for every arm (each piece's `tuning.losses`): the mean over
    the arm's pieces (training seeds and random draws) as a line, their min-max as a band; CAST on
    top. Log scale only when the losses span more than a factor of 10."""
    with style.rc():
        own = ax is None
        fig, ax = _new_axes(ax, style.figsize("one", 0.8))
        lo, hi, n_band = math.inf, -math.inf, 0
        for method, k, ps in _groups(results):
            curves = [p.get("tuning", {}).get("losses") or [] for p in ps]
            n = min((len(c) for c in curves), default=0)
            if not n:
                continue
            y = np.array([c[:n] for c in curves], dtype=float)
            label, color, marker = _arm_label(method)
            steps = np.arange(1, n + 1)
            z = style.Z_ORDER.get(method, 2)
            ax.plot(steps, np.nanmean(y, 0), color=color, marker=marker, ms=4,
                    lw=2.0 if method == "cast" else 1.3, zorder=z,
                    label=f"{style.arm_label(method, None if method == 'full' else k)}, "
                          f"n={len(ps)}")
            if len(ps) > 1:
                ax.fill_between(steps, np.nanmin(y, 0), np.nanmax(y, 0), color=color, alpha=0.15,
                                lw=0, zorder=z - 1)
                n_band += 1
            finite = y[np.isfinite(y)]
            if finite.size:
                lo, hi = min(lo, finite.min()), max(hi, finite.max())
        ax.set_xlabel("training step")
        ax.set_ylabel("L_safe, training batch (nats/token)")
        if lo > 0 and hi / lo > 10:
            ax.set_yscale("log")
        handles, _ = ax.get_legend_handles_labels()
        if n_band:
            handles.append(_band_handle("band: min-max over pieces"))
        if own:
            fig.legend(handles=handles, loc="outside lower center", ncol=2)
        else:
            ax.legend(handles=handles, loc="upper right")
        ax.set_title("Safety fine-tuning loss")
    if save is not None:
        save_figure(fig, save)
    return fig


def plot_safety_curves(pieces: dict[str, dict], *, k: Optional[int] = None) -> Figure:
    """Validation refusal score (a) and KL to the original (b) along training per arm, and the
    trade-off between them (c). Lines: mean over the arm's pieces; bands: min-max over its training
    seeds (random: over its draws), a range, not a CI. `k` keeps full tuning and the arms at that
    budget (default: all)."""
    from ..report import _by_arm

    with style.rc():
        fig = Figure(figsize=style.figsize("two", 0.36), layout="constrained")
        axes = fig.subplots(1, 3)
        arms = sorted(_by_arm(pieces).items(), key=lambda a: (style.Z_ORDER.get(a[0][0], 2),
                                                                a[0][1]))
        n_band = 0
        for (method, kk), ps in arms:
            if k is not None and kk not in (0, k):
                continue
            curves = [p["tuning"].get("curve") or [] for p in ps]
            if not curves or not all(curves) or len({len(c) for c in curves}) != 1:
                continue
            steps = [pt["step"] for pt in curves[0]]
            for ax in axes[:2]:
                ax.set_xticks(steps)
            score = np.array([[pt["refusal_score"] for pt in c] for c in curves])
            kl = np.array([[pt["kl"] for pt in c] for c in curves])
            _, color, marker = _arm_label(method)
            z, lw = style.Z_ORDER.get(method, 2), 2.0 if method == "cast" else 1.3
            label = f"{style.arm_label(method, None if method == 'full' else kk)}, n={len(ps)}"
            for ax, y in ((axes[0], score), (axes[1], kl)):
                ax.plot(steps, y.mean(0), color=color, marker=marker, ms=5, lw=lw, zorder=z,
                        label=label)
                if len(ps) > 1:
                    ax.fill_between(steps, y.min(0), y.max(0), color=color, alpha=0.15, lw=0,
                                    zorder=z - 1)
            n_band += len(ps) > 1
            axes[2].plot(kl.mean(0), score.mean(0), color=color, marker=marker, ms=5, lw=lw,
                         zorder=z)
        axes[0].set(xlabel="training step", ylabel="refusal score (log P, nats)",
                    title="Safety (higher: safer)")
        axes[1].set(xlabel="training step", title="Utility cost (lower: better)")
        axes[2].set(ylabel="refusal score (log P, nats)", title="Trade-off (up-left: better)")
        _sci(axes[1], "y", "KL(original ‖ tuned) (nats/token)")
        _sci(axes[2], "x", "KL(original ‖ tuned) (nats/token)")
        handles, _ = axes[0].get_legend_handles_labels()
        if n_band:
            handles.append(_band_handle("band: min-max over training seeds (random: over draws)"))
        fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)))
        panel_letters(axes)
    return fig


def _metric_short(key: str) -> tuple[str, str]:
    """(short name, unit) of a reported metric, from the metrics registry (`registry/metrics.py`)."""
    from ..registry.metrics import get_metric

    try:
        spec = get_metric(key)
    except ValueError:
        return (key.replace("_", " "), "")
    return (spec.short, spec.unit)


def plot_paired_differences(comparisons: dict, *, ref: str = "random") -> Figure:
    """Forest plot, one panel per endpoint: each arm minus `ref` (default random) on the same
    training seeds and test prompts, with its paired 95% bootstrap CI over seeds and prompts; the
    better side of 0 marked in each panel, and CAST's rank among the random head sets beside its
    row (1 = best). `comparisons` is `report.compare_arms`' output."""
    from ..report import METRICS

    panels = [(m, k, b) for m in METRICS if m in comparisons["metrics"]
              for k, b in comparisons["metrics"][m].items()]
    n = max(1, len(panels))
    ncols = 1 if n == 1 else 2
    nrows = int(math.ceil((n + (1 if n > 1 else 0)) / ncols))
    with style.rc():
        fig = Figure(figsize=(style.TWO_COLUMN, 0.3 + 1.25 * nrows), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
        for ax, (metric, k, block) in zip(axes, panels):
            lower = METRICS[metric][1]
            rows = [r for r in block["rows"] if r.get(f"vs_{ref}")]
            rows = sorted(rows, key=lambda r: style.Z_ORDER.get(r["method"], 2))  # CAST on top
            for i, r in enumerate(rows):
                d = r[f"vs_{ref}"]
                _, color, marker = _arm_label(r["method"])
                ax.errorbar(d["diff"], i, xerr=[[d["diff"] - d["low"]], [d["high"] - d["diff"]]],
                            fmt=marker, color=color, capsize=3, ms=6 if r["method"] == "cast" else 5)
            rank = block.get("cast_rank")
            names = []
            for r in rows:
                name = style.arm_label(r["method"], None if r["method"] == "full" else r["k"])
                if r["method"] == "cast" and rank:
                    name += f"\nrank {rank['rank']} of {rank['n_draws'] + 1}"
                names.append(name)
            ax.axvline(0, color="0.5", lw=0.8)
            ax.set_yticks(range(len(rows)), names)
            ax.set_ylim(-0.6, len(rows) - 0.4)
            short, unit = _metric_short(metric)
            better = "better: ← lower" if lower else "better: higher →"
            _sci(ax, "x", f"{better}\n− {ref} ({unit or 'difference'})")
            ax.set_title(short, loc="left")
        panel_letters(axes[:len(panels)])
        rest = axes[len(panels):]
        for ax in rest:
            ax.axis("off")
        if len(rest):
            seeds = len(comparisons.get("seeds") or [])
            rest[0].text(0.0, 0.95, (
                f"Each row: arm − {ref}, paired over the same\ntraining seeds ({seeds}) and test "
                "prompts;\nbars: 95% bootstrap CI over seeds × prompts.\nA CI that crosses 0: no "
                f"detectable difference.\nRank: CAST's mean among the {ref} head sets'\n"
                "(each draw against CAST on its own training\nseed; 1 = best)."),
                transform=rest[0].transAxes, va="top",
                fontsize=style.LEGEND_SIZE)
    return fig


def plot_endpoints(comparisons: dict) -> Figure:
    """End of training: refusal score (y) against KL to the original (x) per arm, each with its own
    95% CI over seeds and prompts. The CIs are unpaired: two arms' bars can overlap while their
    paired difference (`plot_paired_differences`) is significant; the title says so."""
    from ..report import PRIMARY

    with style.rc():
        fig, ax = _new_axes(None, style.figsize("one", 1.0))
        for k, arms in comparisons["endpoints"].items():
            for method, ms in sorted(arms.items(), key=lambda a: style.Z_ORDER.get(a[0], 2)):
                if not all(m in ms for m in PRIMARY):
                    continue
                x, y = ms["kl_to_original"], ms["refusal_score"]
                _, color, marker = _arm_label(method)
                ax.errorbar(x["mean"], y["mean"],
                            xerr=[[x["mean"] - x["low"]], [x["high"] - x["mean"]]],
                            yerr=[[y["mean"] - y["low"]], [y["high"] - y["mean"]]], fmt=marker,
                            color=color, capsize=2, ms=7 if method == "cast" else 5,
                            zorder=style.Z_ORDER.get(method, 2),
                            label=style.arm_label(method, None if method == "full" else k))
        _sci(ax, "x", "KL(original ‖ tuned), benign (nats/token)\n← less utility lost")
        ax.set_ylabel("refusal score, harmful (nats)\nsafer →")
        ax.set_title("End points, each arm's own 95% CI\n(unpaired: overlap ≠ no difference; "
                     "see paired differences)", fontsize=style.LEGEND_SIZE)
        ax.legend(loc="lower right")
    return fig
