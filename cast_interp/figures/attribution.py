"""The stage 4 figure: post-hoc attribution against the map."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .. import style
from ..stats import count_from_fraction
from ..style import HIGHLIGHT, panel_letters
from .common import PathLike, _numpy, _place_labels, save_figure


def plot_attribution_vs_map(result: Any, conflict_map: Any, *, k: Optional[int] = None,
                            unit: Optional[str] = None, n_labels: int = 5,
                            save: Optional[PathLike] = None) -> Figure:
    """Post-hoc attribution (an `attribution.AttributionResult`) against the pre-alignment map.

    a: each unit's share of the utility drop recovered by reverting it alone (filled: exact
    revert; hollow: first-order estimate) against its C, the map's top-k by C ringed and the
    `n_labels` largest exact contributors labelled; the title gives Spearman(C, recovered) over the
    exactly reverted units, with its CI and permutation p (first order when there are none).
    b: the shares of the drop recovered on held-out half B by `n_draws` random k-sets (histogram),
    with the map's top-k by C and the top-k by recovery chosen on half A marked with their
    percentile among the draws. Where the arm froze the map's top-k (CAST), reverting them changes
    nothing: they are marked "frozen" and have no percentile. Shares are recovered nats/token when
    the drop is not positive. `unit` defaults to the result's; `k` to its k.
    """
    a, cfg = result.analysis, result.config
    unit = unit or a["unit"]
    d, m = result.units(unit), conflict_map.units(unit)
    k_unit = cfg["k"] if unit == a["unit"] else a.get("map", {}).get(unit, {}).get("k")
    k = int(k or k_unit or count_from_fraction(0.1, m["C"].numel()))
    C = _numpy(m["C"]).ravel()
    share_ok = a["drop"]["total"] > 0
    y = _numpy(d["share"] if share_ok else d["recovered"]).ravel()
    exact = _numpy(d["measured"]).ravel() > 0
    ok = np.isfinite(C) & np.isfinite(y)
    maps = a.get("map", {}).get(unit, {})
    kind = "exact" if (maps.get("exact") or {}).get("C") else "first_order"
    rho = (maps.get(kind) or {}).get("C") or {}
    rho = {q: math.nan if rho.get(q) is None else rho[q]
           for q in ("spearman", "low", "high", "p_permutation", "n_units")}
    n = m["C"].shape[1]
    top = [l * n + i for l, i in conflict_map.top_units(min(k, int(np.isfinite(C).sum())),
                                                        by="C", unit=unit)]
    top = [i for i in top if ok[i]]
    # An arm that froze the map's top-k (CAST) left them at their original values: reverting
    # them recovers exactly 0, first order and exact alike.
    frozen = bool(top) and all(y[i] == 0 for i in top)
    tag = "H" if unit == "head" else "G"
    with style.rc():
        fig = Figure(figsize=style.figsize("two", 0.42), layout="constrained")
        ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
        ax.scatter(C[ok & exact], y[ok & exact], s=10, color=style.ARMS["random"][1],
                   label="exact revert")
        ax.scatter(C[ok & ~exact], y[ok & ~exact], s=10, facecolors="none",
                   edgecolors=style.ARMS["random"][1], alpha=0.5, lw=0.6, label="first order")
        ax.scatter(C[top], y[top], s=40, facecolors="none", edgecolors=HIGHLIGHT, linewidths=1.0,
                   label=f"top-{k} by C" + (" (frozen in this arm)" if frozen else ""))
        ax.axhline(0.0, color="0.5", lw=0.6)
        ax.set_xlabel("C, conflict score before alignment")
        ax.set_ylabel(f"share of the drop recovered\nby reverting one {unit}" if share_ok
                      else f"loss recovered by reverting\none {unit} (nats/token)")
        what = "exact reverts" if kind == "exact" else "first order, all units"
        n_u = "" if not np.isfinite(rho["n_units"]) else f", n = {int(rho['n_units'])}"
        ax.set_title(f"Spearman(C, recovered) = {rho['spearman']:.2f} [{rho['low']:.2f}, "
                     f"{rho['high']:.2f}]\n({what}{n_u}; permutation p = "
                     f"{rho['p_permutation']:.2g})", fontsize=style.LEGEND_SIZE)
        if n_labels:
            cand = [i for i in np.argsort(-np.where(ok & exact, y, -np.inf))[:n_labels]
                    if ok[i] and exact[i]]
            _place_labels(fig, ax, np.array([[C[i], y[i]] for i in cand]).reshape(-1, 2),
                          [f"L{i // n}{tag}{i % n}" for i in cand], color="black")
        _plot_random_draws(ax2, a, int(cfg["k"]), share_ok, frozen)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        fig.legend(h1 + h2, l1 + l2, loc="outside lower center", ncol=3)
        panel_letters((ax, ax2))
    if save is not None:
        save_figure(fig, save)
    return fig


def _plot_random_draws(ax: Axes, a: dict, k: int, share_ok: bool, frozen: bool = False) -> None:
    """Histogram of the random k-sets' shares on half B, the chosen sets marked with percentiles
    (the map's top-k only where this arm updated them)."""
    r, joint, unit = a["random"], a["joint"], a["unit"]
    shares = np.asarray([np.nan if s is None else s for s in r["shares_B"]], dtype=float)
    ax.hist(shares[np.isfinite(shares)], bins=min(20, max(5, len(shares) // 2)), color="0.75",
            label=f"{r['n_draws']} random sets of {k} {unit}s")
    marks = [("selected", f"top-{k} by recovered on half A", "#009E73", "--")]
    if not frozen:
        marks.insert(0, ("top_k_C", f"map's top-{k} by C", HIGHLIGHT, "-"))
    for name, text, color, ls in marks:
        v = joint.get(name, {}).get("share_B", {}).get("estimate")
        if v is None or not np.isfinite(v):
            continue
        pct = r.get(f"{name}_B_vs_random", {}).get("percentile")
        pct = math.nan if pct is None else pct
        ax.axvline(v, color=color, linestyle=ls, lw=1.6, label=f"{text}: {pct:.0f}th percentile")
    if frozen:
        ax.text(0.4, 0.6, f"map's top-{k} by C frozen\nin this arm: nothing to\nrevert (share 0)",
                transform=ax.transAxes, ha="left", fontsize=style.LEGEND_SIZE, color=HIGHLIGHT)
    ax.set_xlabel("share of the drop recovered, held-out half B" if share_ok
                  else "loss recovered on half B (nats/token)")
    ax.set_ylabel("random sets")
    ax.set_title(f"Reverting {k} {unit}s together, out of sample", fontsize=style.LEGEND_SIZE)
