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

The package, by stage:

    common.py       the style, axes, label placement, `save_figure`
    diagnosis.py    stage 1: heatmaps, O / S / C, O vs S, sorted C
    arms.py         stages 2-3: curves along training, paired differences, endpoints, trade-off
    attribution.py  stage 4: attribution against the map
"""

from __future__ import annotations

# The style's colours, under the names figures used to export them.
from ..style import DIVERGING_CMAP, HIGHLIGHT, NAN_COLOR, SEQUENTIAL_CMAP  # noqa: F401
from .arms import (ARM_STYLE, plot_drop_vs_k, plot_endpoints, plot_paired_differences,
                   plot_safety_curves, plot_tradeoff, plot_training_curves)
from .attribution import plot_attribution_vs_map
from .common import STYLE, PathLike, pts_to_data, save_figure
from .diagnosis import (NULL_BAND, S_LABEL, diagnosis_figures, plot_conflict_maps,
                        plot_head_heatmap, plot_o_vs_s, plot_sorted_c)

__all__ = ["plot_head_heatmap", "plot_conflict_maps", "plot_o_vs_s", "plot_sorted_c",
           "diagnosis_figures", "plot_tradeoff", "plot_drop_vs_k", "plot_training_curves",
           "plot_safety_curves", "plot_paired_differences", "plot_endpoints",
           "plot_attribution_vs_map", "save_figure", "pts_to_data", "STYLE", "ARM_STYLE",
           "NULL_BAND", "S_LABEL", "PathLike"]
