"""Diagnosis figures (stage 1): layer x head heatmaps, O / S / C side by side, O against S, and C
sorted with its cumulative share and the null's range."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .. import style
from ..stats import count_from_fraction
from ..style import DIVERGING_CMAP, HIGHLIGHT, NAN_COLOR, SEQUENTIAL_CMAP, panel_letters
from .common import PathLike, _new_axes, _numpy, _place_labels, save_figure

S_LABEL = "ΔL_util when ablated (nats/token)"


def _heatmap_size(L: int, H: int) -> tuple[float, float]:
    """One panel: a column wide at most, rows 0.09 in each (30 layers: 3.6 in)."""
    return (min(1.2 + 0.2 * H, style.ONE_COLUMN), min(1.0 + 0.09 * L, 6.0))


def _ticks(n: int, max_labels: int = 10) -> np.ndarray:
    step = max(1, int(np.ceil(n / max_labels)))
    return np.arange(0, n, step)


def plot_head_heatmap(
    values: Any,
    title: str = "",
    *,
    diverging: bool = False,
    center: Optional[float] = None,
    ax: Optional[Axes] = None,
    cbar_label: Optional[str] = None,
    cmap: Optional[str] = None,
    group_size: Optional[int] = None,
    xlabel: str = "head",
    marked: Optional[Sequence[tuple[int, int]]] = None,
    save: Optional[PathLike] = None,
) -> Figure:
    """Layer (rows, 0 at top) x head (columns) heatmap of a `[n_layers, n_heads]` array.

    diverging: a diverging colour map centred at `center` (default 0; for signed values such as S),
    symmetric about it; `center=1` alone also makes it diverging (O: 1 is orthogonal). Otherwise a
    sequential map. NaN entries are grey.
    group_size: query heads per key/value group under GQA: vertical lines mark group boundaries.
    marked: (layer, head) cells outlined in black (the flagged heads).
    """
    v = _numpy(values)
    if v.ndim != 2:
        raise ValueError(f"values must be [n_layers, n_heads], got shape {v.shape}.")
    L, H = v.shape
    diverging = diverging or center is not None
    with style.rc():
        fig, ax = _new_axes(ax, _heatmap_size(L, H))
        finite = v[np.isfinite(v)]
        norm = None
        if diverging:
            c = 0.0 if center is None else float(center)
            dev = float(np.abs(finite - c).max()) if finite.size else 0.0
            bound = dev if dev > 0 else 1.0
            norm = TwoSlopeNorm(vcenter=c, vmin=c - bound, vmax=c + bound)
        import matplotlib

        cm = matplotlib.colormaps[cmap or (DIVERGING_CMAP if diverging else SEQUENTIAL_CMAP)]
        cm = cm.with_extremes(bad=NAN_COLOR)
        im = ax.imshow(np.ma.masked_invalid(v), cmap=cm, norm=norm, aspect="auto",
                       interpolation="nearest")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer")
        if group_size and 1 < group_size < H:
            for x in np.arange(group_size, H, group_size) - 0.5:
                ax.axvline(x, color="white", linewidth=1.6)
        for l, h in marked or ():
            ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="black",
                                   linewidth=0.9))
        ax.set_xticks(_ticks(H))
        ax.set_yticks(_ticks(L))
        ax.spines[:].set_visible(False)
        if title:
            ax.set_title(title)
        cb = fig.colorbar(im, ax=ax, shrink=0.9, aspect=30)
        if cbar_label:
            cb.set_label(cbar_label)
    if save is not None:
        save_figure(fig, save)
    return fig


def _group_size(conflict_map: Any) -> Optional[int]:
    group = getattr(conflict_map, "group", None) or {}
    if "O" not in group:
        return None
    return int(conflict_map.O.shape[1] // group["O"].shape[1])


def _top(conflict_map: Any, k: Union[int, float], unit: str = "head") -> list[tuple[int, int]]:
    """The top-k units by C (k a count of heads or a fraction; for groups, the same fraction)."""
    if not k:
        return []
    if unit == "head":
        return [tuple(u) for u in conflict_map.top_heads(k, by="C")]
    n_heads = int(np.prod(tuple(conflict_map.O.shape)))
    frac = k if k < 1 else k / n_heads
    return [tuple(u) for u in conflict_map.top_units(frac, by="C", unit="group")]


def plot_conflict_maps(conflict_map: Any, *, k: Union[int, float] = 0.1,
                       save: Optional[PathLike] = None) -> Figure:
    """O, S and C heatmaps of the head units side by side, two columns wide; under GQA a second row
    shows the key/value groups' own O, S and C, and white lines mark group boundaries.

    O is on a diverging map centred at 1 (orthogonal gradients; red: opposed, O > 1), S on one
    centred at 0 (nats/token; blue: ablating the head helped utility), C sequential. The top-k
    units by C (k a count of heads or a fraction; the heads CAST skips) are outlined in black.
    """
    L, H = tuple(conflict_map.O.shape)
    how = (getattr(conflict_map, "config", {}) or {}).get("combine", {}).get("how", "")
    gs = _group_size(conflict_map)
    rows = [("head", conflict_map.head if hasattr(conflict_map, "head") else
             {"O": conflict_map.O, "S": conflict_map.S, "C": conflict_map.C})]
    if gs:
        rows.append(("K/V group", conflict_map.group))
    row_h = min(1.0 + 0.075 * L, 4.0)
    with style.rc():
        fig = Figure(figsize=(style.TWO_COLUMN, len(rows) * row_h + 0.3), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(rows), 3))
        n_marked = {}
        for r, (kind, d) in enumerate(rows):
            g = gs if kind == "head" else None
            what = "head" if kind == "head" else "group"
            top = _top(conflict_map, k, "head" if kind == "head" else "group")
            n_marked[what] = len(top)
            plot_head_heatmap(d["O"], f"O, conflict ({what})", center=1.0, ax=axes[r, 0],
                              cbar_label="1 − cos(g_safe, g_util)", group_size=g, xlabel=kind,
                              marked=top)
            plot_head_heatmap(d["S"], f"S, sensitivity ({what})", diverging=True,
                              ax=axes[r, 1], cbar_label=S_LABEL, group_size=g, xlabel=kind,
                              marked=top)
            plot_head_heatmap(d["C"], f"C, conflict score ({what})", ax=axes[r, 2],
                              cbar_label=f"C ({how.replace('_', ' ')})" if how else "C",
                              group_size=g, xlabel=kind, marked=top)
        panel_letters(axes.ravel())
        if n_marked.get("head"):
            boxes = f"the top {n_marked['head']} heads by C (skipped by CAST)"
            if n_marked.get("group"):
                boxes += f"; bottom row: the top {n_marked['group']} groups"
            fig.suptitle(f"Black boxes: {boxes}", fontsize=style.LEGEND_SIZE)
    if save is not None:
        save_figure(fig, save)
    return fig


def plot_o_vs_s(conflict_map: Any, k: Union[int, float] = 0.1, *, ax: Optional[Axes] = None,
                n_labels: int = 5, save: Optional[PathLike] = None) -> Figure:
    """Scatter of O (x) against S (y, nats/token), one point per head coloured by C; the top-k heads
    by C (the heads CAST skips; k a count or a fraction) ringed, with their 95% bootstrap intervals
    of O and S as error bars where the map has them; the `n_labels` highest labelled `L{l}H{h}`,
    placed so that labels do not overlap."""
    O, S, C = _numpy(conflict_map.O), _numpy(conflict_map.S), _numpy(conflict_map.C)
    d = getattr(conflict_map, "head", {}) or {}
    top = conflict_map.top_heads(k, by="C") if k else []
    with style.rc():
        own = ax is None
        fig, ax = _new_axes(ax, style.figsize("one", 1.05))
        ok = np.isfinite(O) & np.isfinite(S)
        cvals = np.where(np.isfinite(C), C, np.nan)
        sc = ax.scatter(O[ok], S[ok], c=cvals[ok], cmap=SEQUENTIAL_CMAP, s=9, linewidths=0)
        fig.colorbar(sc, ax=ax, label="C", aspect=30)
        ax.axhline(0.0, color="0.6", linewidth=0.7, zorder=0)
        if np.nanmax(O) > 0.9:  # the orthogonal line only where it is in view
            ax.axvline(1.0, color="0.6", linewidth=0.7, linestyle=":", zorder=0)
        if top:
            tl = np.array([O[l, h] for l, h in top])
            ts = np.array([S[l, h] for l, h in top])
            if all(n in d for n in ("O_low", "O_high", "S_low", "S_high")):
                err = {n: _numpy(d[n]) for n in ("O_low", "O_high", "S_low", "S_high")}
                xe = np.array([[tl[i] - err["O_low"][u], err["O_high"][u] - tl[i]]
                               for i, u in enumerate(top)]).T
                ye = np.array([[ts[i] - err["S_low"][u], err["S_high"][u] - ts[i]]
                               for i, u in enumerate(top)]).T
                ax.errorbar(tl, ts, xerr=np.clip(xe, 0, None), yerr=np.clip(ye, 0, None),
                            fmt="none", ecolor=HIGHLIGHT, elinewidth=0.5, alpha=0.5,
                            label="95% CI (bootstrap)")
            ax.scatter(tl, ts, s=36, facecolors="none", edgecolors=HIGHLIGHT, linewidths=1.0,
                       label=f"top {len(top)} by C (skipped)")
            (fig.legend if own else ax.legend)(
                *ax.get_legend_handles_labels(), loc="outside lower center" if own else "best",
                ncol=2, fontsize=style.LEGEND_SIZE, handletextpad=0.3, columnspacing=1.0)
        ax.set_xlabel("O (1 orthogonal, 2 opposed)")
        ax.set_ylabel(f"S ({style.UNITS['S']})")
        n_nan = int((~ok).sum())
        ax.set_title("Conflict O vs sensitivity S" + (f" ({n_nan} NaN not shown)" if n_nan else ""))
        if top and n_labels:
            lab = [(l, h) for l, h in top[:n_labels] if ok[l, h]]
            _place_labels(fig, ax, np.array([[O[u], S[u]] for u in lab]),
                          [f"L{l}H{h}" for l, h in lab], avoid=np.stack([tl, ts], 1))
    if save is not None:
        save_figure(fig, save)
    return fig


def plot_sorted_c(conflict_map: Any, *, ax: Optional[Axes] = None,
                  save: Optional[PathLike] = None) -> Figure:
    """Heads sorted by C (bars, left axis) and the cumulative share of total C (line, right axis),
    with the top-10% share marked beside the null's 95% range (yellow band: C recomputed with O and
    S permuted independently across heads): how far from "global" the conflict is, against noise."""
    C = _numpy(conflict_map.C).ravel()
    C = np.sort(np.clip(C[np.isfinite(C)], 0, None))[::-1]
    n, total = C.size, C.sum()
    conc = {}
    if hasattr(conflict_map, "summary") and getattr(conflict_map, "summary", None):
        conc = conflict_map.concentration(by="C")
    null = (conc.get("null") or {}).get("top10_share")
    with style.rc():
        fig, ax = _new_axes(ax, style.figsize("one", 0.8))
        x = np.arange(1, n + 1)
        ax.bar(x, C, width=1.0, color=style.NEUTRAL, linewidth=0)
        ax.set_xlabel("heads, sorted by C")
        ax.set_ylabel("C")
        ax.set_xlim(0.5, n + 0.5)
        ax2 = ax.twinx()
        ax2.spines["right"].set_visible(True)
        if total > 0:
            share = np.cumsum(C) / total
            ax2.plot(x, share, color=HIGHLIGHT, linewidth=1.5, label="cumulative share")
            k10 = count_from_fraction(0.1, n)
            ax2.axvline(k10, color="0.4", linestyle=":", linewidth=0.8)
            text = f"top 10% ({k10} heads):\n{share[k10 - 1]:.0%} of C"
            if null:
                half = max(0.5, 0.025 * n)  # wide enough to see on a 270-head axis
                ax2.fill_between([k10 - half, k10 + half], null["null_low"], null["null_high"],
                                 facecolor=NULL_BAND, edgecolor="black", linewidth=0.6, zorder=3,
                                 label="null 95% range of the\ntop-10% share (O, S permuted)")
                verdict = "concentrated" if conc.get("concentrated") else "not beyond the null"
                text += f"\nnull {null['null_low']:.0%}-{null['null_high']:.0%}:\n{verdict}"
            ax2.plot([k10], [share[k10 - 1]], "o", color=HIGHLIGHT, ms=4, zorder=4)
            ax2.text(0.97, 0.04, text, transform=ax2.transAxes, ha="right", va="bottom",
                     fontsize=style.LEGEND_SIZE, color="black",
                     bbox=dict(facecolor="white", alpha=0.85, edgecolor="none", pad=1.5))
            if ax is not None and ax.figure is fig and len(fig.axes) == 2:
                fig.legend(*ax2.get_legend_handles_labels(), loc="outside lower center")
            else:
                ax2.legend(loc="center right")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("cumulative share of C", color=HIGHLIGHT)
        ax.set_title("Concentration of the conflict score")
    if save is not None:
        save_figure(fig, save)
    return fig


NULL_BAND = style.NULL_COLOR


def diagnosis_figures(conflict_map: Any, fig_dir: PathLike, *,
                      k: Union[int, float] = 0.1) -> list[Path]:
    """The three map figures (heatmaps, O vs S, sorted C) as PNG and PDF in `fig_dir`; the top-k
    heads by C (a count or a fraction) are marked on the first two."""
    fig_dir = Path(fig_dir)
    paths = []
    for name, fig in (("conflict_maps", plot_conflict_maps(conflict_map, k=k)),
                      ("o_vs_s", plot_o_vs_s(conflict_map, k)),
                      ("sorted_c", plot_sorted_c(conflict_map))):
        for ext in ("png", "pdf"):
            paths.append(save_figure(fig, fig_dir / f"{name}.{ext}"))
    return paths
