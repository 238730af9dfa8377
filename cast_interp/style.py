"""One style for every figure of the toolkit: sizes a paper takes as they are, fonts, one colour per
arm, colour maps, panel letters, units.

Sizes follow the ACL two-column format (column 7.7 cm, text width 16 cm): a figure drawn at
`ONE_COLUMN` or `TWO_COLUMN` inches is placed at 100% and its fonts print at the sizes below
(8-9 pt; legends never under 8 pt). Every figure function in `figures/` (and the run figures that
`report.run_figures` draws with them) uses `rc()`, `arm_style()` and these constants, so changing a
font or a colour here changes it everywhere.

The arm palette is Okabe-Ito (colour-blind safe), one colour per method, read from `ARMS` (the arms
registry's styles).
"""

from __future__ import annotations

import string
from typing import Any, Iterable, Sequence

from matplotlib import rc_context

ONE_COLUMN = 3.03   # inches: ACL column width (7.7 cm)
TWO_COLUMN = 6.30   # inches: ACL text width (16 cm)
DPI = 200           # raster output

FONT_SIZE = 9
LEGEND_SIZE = 8     # the smallest text in any figure
RC: dict[str, Any] = {
    "font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE, "axes.labelsize": FONT_SIZE,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": LEGEND_SIZE,
    "figure.titlesize": 10, "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
    "axes.spines.top": False, "axes.spines.right": False, "axes.linewidth": 0.8,
    "lines.linewidth": 1.4, "lines.markersize": 5, "legend.frameon": False,
    "savefig.bbox": "tight", "savefig.pad_inches": 0.03, "figure.dpi": 100,
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none",  # editable text in vector output
}

# method: (label, colour, marker), one row per arm kind, and the drawing order (the arm a figure is
# about last, on top): both tables are the arms registry's (`registry/arms.py`), so an arm
# registered there is drawn in its own colour.
from .registry.arms import ARM_STYLES as ARMS, Z_ORDER  # noqa: E402

OTHER_ARM = ("#777777", "o")

HIGHLIGHT = "#D55E00"        # marked / flagged heads (CAST's colour)
NEUTRAL = "#8DA0CB"          # bars and points that are not an arm
NULL_COLOR = "#F0C419"       # a null distribution's range (visible on both bar colours)
SEQUENTIAL_CMAP = "viridis"  # C, shares: perceptually uniform, colour-blind safe
DIVERGING_CMAP = "RdBu_r"    # signed values (S) centred at 0; O centred at 1 (orthogonal)
NAN_COLOR = "#bdbdbd"

# Units of the quantities on the axes.
UNITS = {"S": "nats/token", "drop": "nats/token", "kl": "nats/token", "nll": "nats/token",
         "refusal_score": "log P, nats"}


def rc(**overrides: Any):
    """Context manager applying the toolkit's matplotlib settings (`RC`, updated by `overrides`)."""
    return rc_context({**RC, **overrides})


def arm_style(method: str) -> tuple[str, str, str]:
    """(label, colour, marker) of an arm's method; unknown methods get grey circles."""
    if method in ARMS:
        return ARMS[method]
    return (method, *OTHER_ARM)


def arm_label(method: str, k: int | None = None) -> str:
    """A readable arm name: "CAST (k=27)", "random k heads (k=27)", "full tuning"."""
    short = {"cast": "CAST", "random": "random", "full": "full tuning"}.get(method,
                                                                           arm_style(method)[0])
    return short if method == "full" or k is None else f"{short} (k={k})"


def figsize(width: str | float = "one", aspect: float = 0.75) -> tuple[float, float]:
    """(width, height) in inches: width "one" / "two" columns or inches, height = aspect x width."""
    w = {"one": ONE_COLUMN, "two": TWO_COLUMN}.get(width, width)  # type: ignore[arg-type]
    return (float(w), float(w) * aspect)


def panel_letters(axes: Iterable[Any], letters: Sequence[str] = string.ascii_lowercase) -> None:
    """Bold lower-case panel letters (a, b, ...): put before an axes' title (which moves to the
    left), or at its top left where it has none."""
    for ax, letter in zip(axes, letters):
        title = ax.get_title("center") or ax.get_title("left")
        if title:
            size = ax.title.get_fontsize() if ax.get_title("center") else ax._left_title.get_fontsize()
            ax.set_title("")
            ax.set_title(rf"$\mathbf{{{letter}}}$  {title}", loc="left", fontsize=size)
        else:
            ax.text(0.0, 1.02, letter, transform=ax.transAxes, fontsize=FONT_SIZE + 1,
                    fontweight="bold", ha="left", va="bottom")
