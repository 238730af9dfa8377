"""Figures of CAST: what the diagnosis found and what training did, at the sizes a paper takes.

Every figure uses the one style of `style.py` (ACL one- or two-column width, 8-9 pt text, one
colour per arm from `style.ARMS`, panel letters, units on the axes).

Diagnosis figures (stage 1):
- `plot_head_heatmap`: one `[n_layers, n_heads]` array as a layer x head heatmap (sequential
  colour-blind-safe map; a diverging one centred at 0 for signed values such as S, or at 1 for O);
- `plot_conflict_maps`: O, S and C side by side, the top-k heads by C outlined;
- `plot_o_vs_s`: each head as a point (O, S), the top-k heads by C (those CAST skips) ringed with
  their CIs, the highest few labelled `L{l}H{h}` without collisions;
- `plot_sorted_c`: C sorted with its cumulative share and the null's range, the "not global" claim
  as a curve.

Run figures (stages 2-4): `plot_safety_curves`, `plot_training_curves` (along training, mean and
min-max band per arm), `plot_paired_differences` (every endpoint, paired CIs, CAST's rank among the
random sets), `plot_endpoints` (unpaired CIs, said so), `plot_tradeoff`, `plot_drop_vs_k` (a sweep
of k only), `plot_attribution_vs_map` (post-hoc causal share vs C).

Every function returns a matplotlib `Figure` built without pyplot's global state (safe with the Agg
backend, in scripts and in threads) and most take `save=path`; `save_figure` writes atomically, the
format following the suffix (.pdf/.svg vector, .png raster). NaN heads are grey.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from . import style
from .stats import count_from_fraction
from .style import (DIVERGING_CMAP, HIGHLIGHT, NAN_COLOR, SEQUENTIAL_CMAP,  # noqa: F401
                    panel_letters)

PathLike = Union[str, Path]

STYLE: dict[str, Any] = style.RC  # the one style (`style.py`); kept under its old name
_FORMATS = {".pdf": "pdf", ".svg": "svg", ".png": "png"}
S_LABEL = "ΔL_util when ablated (nats/token)"


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _new_axes(ax: Optional[Axes], figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _heatmap_size(L: int, H: int) -> tuple[float, float]:
    """One panel: a column wide at most, rows 0.09 in each (30 layers: 3.6 in)."""
    return (min(1.2 + 0.2 * H, style.ONE_COLUMN), min(1.0 + 0.09 * L, 6.0))


def _ticks(n: int, max_labels: int = 10) -> np.ndarray:
    step = max(1, int(np.ceil(n / max_labels)))
    return np.arange(0, n, step)


def _sci(ax: Axes, axis: str, label: str = "") -> str:
    """An axis of small values (KL) in units of 10^e: few ticks, the tick labels divided by 10^e
    and the power written into the axis label (matplotlib's offset text would collide with it).
    Returns the label set ("" when no label is given: the power then stays unwritten)."""
    from matplotlib.ticker import FuncFormatter

    ax.locator_params(axis=axis, nbins=5)
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    big = max(abs(lo), abs(hi))
    e = int(math.floor(math.log10(big))) if big > 0 and math.isfinite(big) else 0
    e = e if e <= -2 else 0
    if e:
        (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(
            FuncFormatter(lambda v, _: f"{v / 10 ** e:g}"))
    if label:
        power = rf"$\times 10^{{{e}}}$ " if e else ""
        if "(" in label and label.rstrip().endswith(")") and e:
            i = label.rindex("(")
            label = f"{label[:i + 1]}{power}{label[i + 1:]}"
        elif e:
            label = f"{label} ({power.strip()})"
        (ax.set_xlabel if axis == "x" else ax.set_ylabel)(label)
    return label


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


def _place_labels(fig: Figure, ax: Axes, xy: np.ndarray, texts: list[str], *,
                  avoid: Optional[np.ndarray] = None, fontsize: float = style.LEGEND_SIZE,
                  color: str = HIGHLIGHT) -> None:
    """Annotate points `xy` ([n, 2], data coordinates) with `texts`, each at the first of a few
    offsets whose box overlaps no label placed before and no point of `avoid` ([m, 2]; greedy; a
    leader line when moved far)."""
    fig.draw_without_rendering()  # final limits and layout, so data -> pixels is known
    px_per_pt = fig.dpi / 72.0
    r = 4 * px_per_pt  # a marker's half width
    placed: list[tuple[float, float, float, float]] = [
        (x - r, y - r, x + r, y + r) for x, y in ax.transData.transform(
            np.asarray(avoid if avoid is not None else xy, dtype=float).reshape(-1, 2))]
    pts = ax.transData.transform(xy)
    offsets = [(5, 3), (5, -10), (-5, 3), (-5, -10), (8, 12), (8, -19), (-8, 12), (-8, -19),
               (14, 22), (-14, 22), (14, -28), (-14, -28), (24, 0), (-24, 0), (20, 34),
               (-20, 34), (20, -40), (-20, -40)]
    for (px, py), text in zip(pts, texts):
        w, h = 0.62 * fontsize * len(text) * px_per_pt, 1.1 * fontsize * px_per_pt
        choice = offsets[-1]
        for dx, dy in offsets:
            x0 = px + dx * px_per_pt - (w if dx < 0 else 0)
            y0 = py + dy * px_per_pt
            box = (x0, y0, x0 + w, y0 + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                       for b in placed):
                choice = (dx, dy)
                placed.append(box)
                break
        dx, dy = choice
        far = abs(dx) > 6 or abs(dy) > 11
        ax.annotate(text, pts_to_data(ax, px, py), xytext=(dx, dy), textcoords="offset points",
                    ha="right" if dx < 0 else "left", va="bottom", fontsize=fontsize,
                    color=color, arrowprops=dict(arrowstyle="-", color=color, lw=0.5)
                    if far else None)


def pts_to_data(ax: Axes, px: float, py: float) -> tuple[float, float]:
    return tuple(ax.transData.inverted().transform((px, py)))


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


def save_figure(fig: Figure, path: PathLike, *, dpi: int = style.DPI) -> Path:
    """Write `fig` to `path` atomically (temporary file, then replace); the format follows the
    suffix: .pdf / .svg (vector) or .png (raster, `dpi`). No creation date is written into vector
    files, so re-running a script does not change them for that reason alone."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"Unsupported figure format {path.suffix!r} for {path}: use "
                         f"{', '.join(_FORMATS)}.")
    from .io import atomic_path

    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)
    # The user's umask; recorded in a run directory's manifest.
    with atomic_path(path) as tmp, style.rc():
        fig.savefig(tmp, format=fmt, dpi=dpi, metadata=metadata)
    return path


# --------------------------------------------------------------------------------------------------
# Stage 2-3 figures: the arms of a run (inputs are `report.summarize` rows, `report.compare_arms`
# comparisons and arm pieces)
# --------------------------------------------------------------------------------------------------

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
    from .report import _by_arm

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
    from .registry.metrics import get_metric

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
    from .report import METRICS

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
    from .report import PRIMARY

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


# --------------------------------------------------------------------------------------------------
# Stage 4 figure: post-hoc attribution against the map
# --------------------------------------------------------------------------------------------------


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
