"""The verdict of a CAST run: paired comparisons with CIs, ranks among random draws, matched safety.

A run (`pipeline.run_experiment`) leaves one piece per arm x training seed (x random draw), each
with per-prompt values of the final evaluation and a safety / utility-cost curve along training. This
module turns them into the comparisons METHOD v2 asks for (stage 3, "Inference"):

- Paired differences (`stats.paired_difference`): for every arm at budget k, its per-prompt values
  `[n_seeds, n_prompts]` minus those of CAST, of the random arm and of full tuning on the same
  training seeds and prompts, with a 95% bootstrap CI over seeds and prompts. The random arm's
  value on a seed is the mean over its draws on that seed. A difference is called real only when
  its CI excludes 0; otherwise the report says "no detectable difference".
- CAST against the random sets (`inference.compare_to_random_sets`, METHOD v3): a bootstrap over
  random sets, training seeds and prompts gives CAST minus the sets' mean with a CI and CAST minus
  a *new* set with a prediction interval (the verdict); CAST's rank among the sets is a range when
  draws tie (`inference.rank_range`), and none is given from fewer than 20 sets. Each set is
  compared with CAST on the set's own training seeds, so the rank reflects the unit sets, not the
  data order.
- Matched safety (`inference.utility_at_safety`): each piece's utility cost (validation KL) read
  off its training curve at 3 validation refusal scores that every piece reaches between trained
  checkpoints (`inference.matched_safety_levels`): never on the line from the untrained model,
  never extrapolated; compared between arms over training seeds.
- Wording: a "no detectable difference" states the effects its CI excludes
  (`inference.no_difference_text`); a share whose denominator's CI reaches 0 is shown as the
  difference in the metric's units (`inference.share_or_difference`). The primary endpoints are
  labelled; the rest are secondary.

`report_markdown` writes the tables; `run_figures` draws the figures from the saved files alone:
safety and utility cost along training per arm with seed bands, paired differences vs random with
CIs, the end-point trade-off with CIs, plus the diagnosis and training-loss figures of `figures`.
All statistics here are ours (the paper gives none).

The package:

    compare.py   per-prompt matrices, paired differences, CAST vs the random sets, matched safety
    markdown.py  report.md
    plots.py     the run's figures from its saved files
"""

from __future__ import annotations

from .compare import (METRICS, MIN_SEEDS_MATCHED, PRIMARY, compare_arms, matched_safety,
                      seed_matrix, summarize)
from .markdown import (QUICK_LOOK_SEEDS, attribution_figure_name, attributions, report_markdown,
                       time_breakdown)
from .plots import (plot_endpoints, plot_paired_differences, plot_safety_curves, read_results,
                    run_figures)

# Internals that figures and tests reach through `report.`.
from .compare import _by_arm  # noqa: E402,F401
from .markdown import (_attribution_lines, _cell, _matched_lines, _rank_text,  # noqa: E402,F401
                       _verdict_lines)

__all__ = ["compare_arms", "matched_safety", "summarize", "seed_matrix", "report_markdown",
           "time_breakdown", "attributions", "attribution_figure_name", "run_figures",
           "read_results", "plot_safety_curves", "plot_paired_differences", "plot_endpoints",
           "METRICS", "PRIMARY", "MIN_SEEDS_MATCHED", "QUICK_LOOK_SEEDS"]
