"""What every figure shares: the style, fresh axes without pyplot's global state, label placement
without collisions, and `save_figure` (atomic, the format following the suffix)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .. import style
from ..style import HIGHLIGHT

PathLike = Union[str, Path]

STYLE: dict[str, Any] = style.RC  # the one style (`style.py`); kept under its old name
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


def save_figure(fig: Figure, path: PathLike, *, dpi: int = style.DPI) -> Path:
    """Write `fig` to `path` atomically (temporary file, then replace); the format follows the
    suffix: .pdf / .svg (vector) or .png (raster, `dpi`). No creation date is written into vector
    files, so re-running a script does not change them for that reason alone."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"Unsupported figure format {path.suffix!r} for {path}: use "
                         f"{', '.join(_FORMATS)}.")
    from ..io import atomic_path

    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)
    # The user's umask; recorded in a run directory's manifest.
    with atomic_path(path) as tmp, style.rc():
        fig.savefig(tmp, format=fmt, dpi=dpi, metadata=metadata)
    return path
