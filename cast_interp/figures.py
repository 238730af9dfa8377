"""Figures of CAST: what the diagnosis found, readable on paper and on screen.

Diagnosis figures (stage 1):
- `plot_head_heatmap`: one `[n_layers, n_heads]` array as a layer x head heatmap (sequential
  colour-blind-safe map; a diverging map centred at 0 for signed values such as S);
- `plot_conflict_maps`: O, S and C side by side;
- `plot_o_vs_s`: each head as a point (O, S), the top-k heads by C (those CAST skips) marked and
  labelled `L{l}H{h}`;
- `plot_sorted_c`: C sorted with its cumulative share, the "not global" claim as a curve.

Run figures (stages 2-4): `plot_tradeoff` (safety vs utility cost per arm, spread over seeds),
`plot_drop_vs_k`, `plot_training_curves`, `plot_attribution_vs_map` (post-hoc causal share vs C).

Every function returns a matplotlib `Figure` built without pyplot's global state (safe with the Agg
backend, in scripts and in threads) and takes `save=path` to write it; `save_figure` writes
atomically, the format following the suffix (.pdf/.svg vector, .png raster). NaN heads are grey.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .stats import count_from_fraction

PathLike = Union[str, Path]

# Readable at column width (ours): larger fonts than matplotlib's default, no top/right spines.
STYLE: dict[str, Any] = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
    "ytick.labelsize": 9, "legend.fontsize": 9, "figure.titlesize": 12,
    "axes.spines.top": False, "axes.spines.right": False, "savefig.bbox": "tight",
    "pdf.fonttype": 42, "svg.fonttype": "none",  # editable text in vector output
}
SEQUENTIAL_CMAP = "viridis"   # perceptually uniform, colour-blind safe
DIVERGING_CMAP = "RdBu_r"     # centred at 0: red positive, blue negative
NAN_COLOR = "#bdbdbd"
HIGHLIGHT = "#d62728"
_FORMATS = {".pdf": "pdf", ".svg": "svg", ".png": "png"}


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
    return (min(2.0 + 0.35 * H, 8.0), min(1.5 + 0.22 * L, 9.0))


def _ticks(n: int, max_labels: int = 16) -> np.ndarray:
    step = max(1, int(np.ceil(n / max_labels)))
    return np.arange(0, n, step)


def plot_head_heatmap(
    values: Any,
    title: str = "",
    *,
    diverging: bool = False,
    ax: Optional[Axes] = None,
    cbar_label: Optional[str] = None,
    cmap: Optional[str] = None,
    group_size: Optional[int] = None,
    xlabel: str = "head",
    save: Optional[PathLike] = None,
) -> Figure:
    """Layer (rows, 0 at top) x head (columns) heatmap of a `[n_layers, n_heads]` array.

    diverging: use a diverging colour map centred at 0 (for signed values such as S or the gradient
    dot product); otherwise a sequential one. NaN entries are drawn grey.
    group_size: query heads per key/value group under GQA: vertical lines mark group boundaries.
    """
    v = _numpy(values)
    if v.ndim != 2:
        raise ValueError(f"values must be [n_layers, n_heads], got shape {v.shape}.")
    L, H = v.shape
    with rc_context(STYLE):
        fig, ax = _new_axes(ax, _heatmap_size(L, H))
        finite = v[np.isfinite(v)]
        norm = None
        if diverging:
            bound = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
            norm = TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
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
        ax.set_xticks(_ticks(H))
        ax.set_yticks(_ticks(L))
        ax.spines[:].set_visible(False)
        if title:
            ax.set_title(title)
        cb = fig.colorbar(im, ax=ax, shrink=0.9)
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


def plot_conflict_maps(conflict_map: Any, *, save: Optional[PathLike] = None) -> Figure:
    """O, S and C heatmaps of the head units side by side, K/V group boundaries drawn under GQA
    (S on a diverging map: a negative S means the ablation helped utility); under GQA a second row
    shows the groups' own O, S and C."""
    L, H = tuple(conflict_map.O.shape)
    w, h = _heatmap_size(L, H)
    how = (getattr(conflict_map, "config", {}) or {}).get("combine", {}).get("how", "")
    gs = _group_size(conflict_map)
    rows = [("head", conflict_map.head if hasattr(conflict_map, "head") else
             {"O": conflict_map.O, "S": conflict_map.S, "C": conflict_map.C})]
    if gs:
        rows.append(("K/V group", conflict_map.group))
    with rc_context(STYLE):
        fig = Figure(figsize=(3 * w + 0.5, len(rows) * (h + 0.4)), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(rows), 3))
        for r, (kind, d) in enumerate(rows):
            g = gs if kind == "head" else None
            what = "head" if kind == "head" else "group"
            plot_head_heatmap(d["O"], f"Optimization Conflict O ({what})", ax=axes[r, 0],
                              cbar_label="1 - cos(g_safe, g_util)", group_size=g, xlabel=kind)
            plot_head_heatmap(d["S"], f"Functional Sensitivity S ({what})", diverging=True,
                              ax=axes[r, 1], cbar_label="ΔL_util when ablated", group_size=g,
                              xlabel=kind)
            plot_head_heatmap(d["C"], f"Conflict score C ({what})", ax=axes[r, 2],
                              cbar_label=f"C ({how})" if how else "C", group_size=g, xlabel=kind)
    if save is not None:
        save_figure(fig, save)
    return fig


def plot_o_vs_s(conflict_map: Any, k: Union[int, float] = 0.1, *, ax: Optional[Axes] = None,
                save: Optional[PathLike] = None) -> Figure:
    """Scatter of O (x) against S (y), one point per head coloured by C; the top-k heads by C
    (the heads CAST skips; k a count or a fraction) ringed, with their 95% bootstrap intervals of O
    and S as error bars where the map has them, the 10 highest labelled `L{l}H{h}`."""
    O, S, C = _numpy(conflict_map.O), _numpy(conflict_map.S), _numpy(conflict_map.C)
    d = getattr(conflict_map, "head", {}) or {}
    top = conflict_map.top_heads(k, by="C") if k else []
    with rc_context(STYLE):
        fig, ax = _new_axes(ax, (5.0, 4.0))
        ok = np.isfinite(O) & np.isfinite(S)
        cvals = np.where(np.isfinite(C), C, np.nan)
        sc = ax.scatter(O[ok], S[ok], c=cvals[ok], cmap=SEQUENTIAL_CMAP, s=18, linewidths=0)
        fig.colorbar(sc, ax=ax, label="C")
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
                            fmt="none", ecolor=HIGHLIGHT, elinewidth=0.7, alpha=0.6,
                            label="95% CI (bootstrap over examples)")
            ax.scatter(tl, ts, s=70, facecolors="none", edgecolors=HIGHLIGHT, linewidths=1.3,
                       label=f"top {len(top)} by C (skipped)")
            for (l, h), x, y in list(zip(top, tl, ts))[:10]:  # more labels overlap unreadably
                ax.annotate(f"L{l}H{h}", (x, y), xytext=(4, 3), textcoords="offset points",
                            fontsize=8, color=HIGHLIGHT)
            ax.legend(loc="best", frameon=False, fontsize=8)
        ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)
        if np.nanmax(O) > 0.9:  # the orthogonal line only where it is in view
            ax.axvline(1.0, color="0.6", linewidth=0.8, linestyle=":", zorder=0)
        ax.set_xlabel("Optimization Conflict O (0 aligned, 1 orthogonal, 2 opposed)")
        ax.set_ylabel("Functional Sensitivity S")
        n_nan = int((~ok).sum())
        ax.set_title("Conflict vs sensitivity" + (f" ({n_nan} NaN heads not shown)" if n_nan else ""))
    if save is not None:
        save_figure(fig, save)
    return fig


def plot_sorted_c(conflict_map: Any, *, ax: Optional[Axes] = None,
                  save: Optional[PathLike] = None) -> Figure:
    """Heads sorted by C (bars, left axis) and the cumulative share of total C (line, right axis),
    with the top-10% share marked beside the null's 95% range (grey band: C recomputed with O and S
    permuted independently across heads): how far from "global" the conflict is, against noise."""
    C = _numpy(conflict_map.C).ravel()
    C = np.sort(np.clip(C[np.isfinite(C)], 0, None))[::-1]
    n, total = C.size, C.sum()
    conc = {}
    if hasattr(conflict_map, "summary") and getattr(conflict_map, "summary", None):
        conc = conflict_map.concentration(by="C")
    null = (conc.get("null") or {}).get("top10_share")
    with rc_context(STYLE):
        fig, ax = _new_axes(ax, (6.0, 3.4))
        x = np.arange(1, n + 1)
        ax.bar(x, C, width=1.0, color="#3b528b", linewidth=0)
        ax.set_xlabel("heads, sorted by C")
        ax.set_ylabel("C")
        ax.set_xlim(0.5, n + 0.5)
        ax2 = ax.twinx()
        ax2.spines["right"].set_visible(True)
        if total > 0:
            share = np.cumsum(C) / total
            ax2.plot(x, share, color=HIGHLIGHT, linewidth=1.5, label="observed")
            k10 = count_from_fraction(0.1, n)
            ax2.axvline(k10, color="0.5", linestyle=":", linewidth=1)
            text = f"top 10% ({k10} heads): {share[k10 - 1]:.0%} of C"
            if null:
                half = max(0.5, 0.015 * n)  # wide enough to see on a 270-head axis
                ax2.fill_between([k10 - half, k10 + half], null["null_low"], null["null_high"],
                                 color="0.2", alpha=0.6, linewidth=0, zorder=3,
                                 label="null 95% range of the top-10% share (O, S permuted)")
                verdict = "concentrated" if conc.get("concentrated") else "not beyond the null"
                text += (f"\nnull {null['null_low']:.0%}-{null['null_high']:.0%}: {verdict}")
                ax2.legend(loc="lower right", frameon=False, fontsize=8)
            ax2.annotate(text, (k10, share[k10 - 1]), xytext=(6, -24), textcoords="offset points",
                         fontsize=8, color=HIGHLIGHT)
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("cumulative share of C", color=HIGHLIGHT)
        ax.set_title("Concentration of the conflict score")
    if save is not None:
        save_figure(fig, save)
    return fig


def diagnosis_figures(conflict_map: Any, fig_dir: PathLike, *, k: Union[int, float] = 0.1) -> list[Path]:
    """The three map figures (heatmaps, O vs S, sorted C) as PNG and PDF in `fig_dir`."""
    fig_dir = Path(fig_dir)
    paths = []
    for name, fig in (("conflict_maps", plot_conflict_maps(conflict_map)),
                      ("o_vs_s", plot_o_vs_s(conflict_map, k)),
                      ("sorted_c", plot_sorted_c(conflict_map))):
        for ext in ("png", "pdf"):
            paths.append(save_figure(fig, fig_dir / f"{name}.{ext}"))
    return paths


def save_figure(fig: Figure, path: PathLike, *, dpi: int = 200) -> Path:
    """Write `fig` to `path` atomically (temporary file, then replace); the format follows the
    suffix: .pdf / .svg (vector) or .png (raster, `dpi`). No creation date is written into vector
    files, so re-running a script does not change them for that reason alone."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"Unsupported figure format {path.suffix!r} for {path}: use "
                         f"{', '.join(_FORMATS)}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)
    try:
        with rc_context(STYLE):
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=metadata)
        from .io import atomic_replace

        atomic_replace(tmp, path)  # the user's umask; recorded in a run directory's manifest
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return path


# --------------------------------------------------------------------------------------------------
# Stage 2-3 figures: the arms of a run (inputs are `pipeline.summarize` rows and arm pieces)
# --------------------------------------------------------------------------------------------------

ARM_STYLE: dict[str, tuple[str, str, str]] = {
    # method: (label, colour (Okabe-Ito, colour-blind safe), marker)
    "full": ("full tuning", "#000000", "s"),
    "cast": ("CAST (skip top-k by C)", "#D55E00", "*"),
    "random": ("random k", "#0072B2", "o"),
    "bottom": ("bottom-k by C", "#009E73", "v"),
    "top_o": ("top-k by O only", "#CC79A7", "^"),
    "top_s": ("top-k by S only", "#E69F00", "D"),
    "layer_band": ("layer band", "#56B4E9", "P"),
}


def _arm_label(method: str) -> tuple[str, str, str]:
    return ARM_STYLE.get(method, (method, "#777777", "o"))


def plot_tradeoff(summary: list[dict], *, utility: str = "kl_to_original",
                  safety: str = "refusal_rate", ax: Optional[Axes] = None,
                  save: Optional[PathLike] = None) -> Figure:
    """Safety (y) against utility cost (x) for every arm, with the spread over seeds as error bars.

    Up and to the left is better: more refusal, less utility drift.
    """
    with rc_context(STYLE):
        fig, ax = _new_axes(ax, (5.2, 3.8))
        seen = set()
        for r in summary:
            if safety not in r or utility not in r:
                continue
            label, color, marker = _arm_label(r["method"])
            x = r[utility] if utility == "kl_to_original" else r[f"d_{utility}"]
            ax.errorbar(x, r[safety], xerr=r.get(f"sd_{utility}", 0) or None,
                        yerr=r.get(f"sd_{safety}", 0) or None, fmt=marker, color=color,
                        ms=9 if r["method"] == "cast" else 6, capsize=2,
                        label=None if label in seen else label)
            seen.add(label)
            if r["method"] != "full":
                ax.annotate(f"k={r['k']}", (x, r[safety]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points", color=color)
        ax.set_xlabel("KL(original ‖ tuned) on benign prompts" if utility == "kl_to_original"
                      else f"Δ {utility.replace('_', ' ')}")
        ax.set_ylabel(safety.replace("_", " ") + " on held-out harmful prompts")
        ax.legend(frameon=False, fontsize=7, loc="best")
        ax.set_title("Safety vs utility cost of each arm")
    if save is not None:
        save_figure(fig, save)
    return fig


def plot_drop_vs_k(summary: list[dict], *, utility: str = "kl_to_original",
                   ax: Optional[Axes] = None, save: Optional[PathLike] = None) -> Figure:
    """Utility cost against the number of skipped heads k, per method (full tuning as a line)."""
    with rc_context(STYLE):
        fig, ax = _new_axes(ax, (5.0, 3.5))
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
                        marker=marker, capsize=2, label=label)
        ax.set_xlabel("k (heads skipped)")
        ax.set_ylabel("KL(original ‖ tuned) on benign prompts" if utility == "kl_to_original"
                      else f"Δ {utility.replace('_', ' ')}")
        # Outside the axes: the full-tuning line runs along the top, where "best" would sit.
        ax.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title("Utility cost vs budget k")
    if save is not None:
        save_figure(fig, save)
    return fig


def plot_training_curves(results: dict[str, dict], *, ax: Optional[Axes] = None,
                         save: Optional[PathLike] = None) -> Figure:
    """Safety training loss per step for every arm (from each arm's `tuning.losses`); log scale
    only when the losses span more than a factor of 10. Arms with another seed see other batches,
    so their curves differ from the seed-0 arms step by step."""
    with rc_context(STYLE):
        fig, ax = _new_axes(ax, (5.0, 3.5))
        seen, lo, hi = set(), math.inf, -math.inf
        for name, piece in sorted(results.items()):
            losses = piece.get("tuning", {}).get("losses") or []
            label, color, _ = _arm_label(piece["arm"]["method"])
            ax.plot(range(1, len(losses) + 1), losses, color=color, alpha=0.8, lw=1.2,
                    label=None if label in seen else label)
            seen.add(label)
            finite = [x for x in losses if math.isfinite(x)]
            if finite:
                lo, hi = min(lo, min(finite)), max(hi, max(finite))
        ax.set_xlabel("step")
        ax.set_ylabel("L_safe (training batch)")
        if lo > 0 and hi / lo > 10:
            ax.set_yscale("log")
        ax.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title("Safety fine-tuning curves")
    if save is not None:
        save_figure(fig, save)
    return fig


# --------------------------------------------------------------------------------------------------
# Stage 4 figure: post-hoc attribution against the map
# --------------------------------------------------------------------------------------------------


def plot_attribution_vs_map(result: Any, conflict_map: Any, *, k: Optional[int] = None,
                            unit: Optional[str] = None, save: Optional[PathLike] = None) -> Figure:
    """Post-hoc attribution (an `attribution.AttributionResult`) against the pre-alignment map.

    Left: each unit's share of the utility drop recovered by reverting it alone (filled: exact
    revert; hollow: first-order estimate) against its C, the map's top-k by C ringed, Spearman
    (first order, all units) with its CI in the title. Right: the shares of the drop recovered on
    the held-out half B by `n_draws` random k-sets (histogram), with the map's top-k by C and the
    top-k by recovery chosen on half A marked, each with its percentile among the draws (always the
    result's selected kind of unit). Shares are recovered nats when the drop is not positive.
    `unit` (left panel) defaults to the result's; `k` to its k (10% of units for another kind).
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
    rho = a.get("map", {}).get(unit, {}).get("first_order", {}).get("C") or {}
    rho = {q: math.nan if rho.get(q) is None else rho[q]
           for q in ("spearman", "low", "high", "p_permutation")}
    with rc_context(STYLE):
        fig = Figure(figsize=(10.0, 3.9), layout="constrained")
        ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
        ax.scatter(C[ok & exact], y[ok & exact], s=14, color="#4477AA", label="exact revert")
        ax.scatter(C[ok & ~exact], y[ok & ~exact], s=14, facecolors="none", edgecolors="#4477AA",
                   alpha=0.6, label="first order")
        n = m["C"].shape[1]
        top = [l * n + i for l, i in conflict_map.top_units(min(k, int(np.isfinite(C).sum())),
                                                            by="C", unit=unit)]
        top = [i for i in top if ok[i]]
        ax.scatter(C[top], y[top], s=70, facecolors="none", edgecolors=HIGHLIGHT, linewidths=1.3,
                   label=f"top-{k} by C")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xlabel("conflict score C (before alignment)")
        ax.set_ylabel(f"share of the drop recovered by one {unit}" if share_ok
                      else f"loss recovered by one {unit} (nats/token)")
        ax.set_title(f"Per-{unit} revert vs C: Spearman {rho['spearman']:.2f} "
                     f"[{rho['low']:.2f}, {rho['high']:.2f}], permutation p = "
                     f"{rho['p_permutation']:.2g}", fontsize=9)
        ax.legend(frameon=False, fontsize=7)
        _plot_random_draws(ax2, a, int(cfg["k"]), share_ok)
    if save is not None:
        save_figure(fig, save)
    return fig


def _plot_random_draws(ax: Axes, a: dict, k: int, share_ok: bool) -> None:
    """Histogram of the random k-sets' shares on half B, the chosen sets marked with percentiles."""
    r, joint, unit = a["random"], a["joint"], a["unit"]
    shares = np.asarray([np.nan if s is None else s for s in r["shares_B"]], dtype=float)
    ax.hist(shares[np.isfinite(shares)], bins=min(20, max(5, len(shares) // 2)), color="0.7",
            label=f"{r['n_draws']} random sets of {k} {unit}s")
    marks = (("top_k_C", f"top-{k} by C", HIGHLIGHT, "-"),
             ("selected", f"top-{k} by recovered (chosen on A)", "#228833", "--"))
    for name, text, color, style in marks:
        v = joint.get(name, {}).get("share_B", {}).get("estimate")
        if v is None or not np.isfinite(v):
            continue
        pct = r.get(f"{name}_B_vs_random", {}).get("percentile")
        pct = math.nan if pct is None else pct
        ax.axvline(v, color=color, linestyle=style, lw=1.6, label=f"{text}: {pct:.0f}th pct")
    ax.set_xlabel("share of the drop recovered on held-out half B" if share_ok
                  else "loss recovered on half B (nats/token)")
    ax.set_ylabel("random draws")
    ax.set_title(f"Joint reverts of {k} {unit}s vs random sets (out of sample)", fontsize=9)
    ax.legend(frameon=False, fontsize=7)
