"""Which units caused the utility drop (stage 4, post hoc, ours; METHOD.md v2).

After safety tuning, we ask unit by unit how much of the utility tax the unit's *update* caused:
put the unit's parameters back to their values before training, keep every other parameter tuned,
and measure the utility loss recovered,

    recovered(u) = L_util(tuned) - L_util(tuned, u reverted)       (> 0: u's update hurt utility)

with L_util the same objective as the diagnosis (METHOD v2, stage 4): the token-mean NLL of the
ORIGINAL model's own answers (self-reference, natural end), on response *content* tokens only
(`make_batches(..., end_of_turn_in_loss=False)`). Comparing recovered(u) with the map's C, made
before training, tests whether the diagnosis predicted the damage.

Units are the map's (`units.py`): reverting query head (l, h) swaps only the slices it owns (Q and O
under GQA; all four without GQA), reverting key/value group (l, g) swaps its K and V. No parameter
belongs to two units, so the first-order shares add up exactly: the sum over all units is the first-
order estimate of reverting them all. The exact single-unit recoveries need not add up (units
interact); the result reports their sum beside the exact joint revert of every unit and the drop
left after it (parameters no unit owns: `b_O`, biases the architecture lacks, anything outside
attention).

How it is measured (all our choices):
- First order for every unit: recovered(u) ~ -(theta_orig - theta_tuned)_u . grad L(tuned), one
  backward per example, kept per example `[n_examples, L, n]`.
- Exact reverts (`revert_units`, a weight swap restored bit-exactly) for the top `n_candidates`
  units of the selected kind by the first-order estimate on half A, and for `n_spread` units of
  each kind at evenly spaced ranks of the first-order range (the agreement check of first order vs
  exact, with a bootstrap CI).
  A revert in layer l reuses the tuned model's cached `resid_pre` of layer l and runs layers
  l..L-1 only; each example's summed NLL is kept, so every bootstrap below is free.
- Out of sample: the examples are split in two halves by a seeded permutation, each tokenized and
  batched apart. The top-k units by exact recovery on half A (among half A's first-order
  candidates) are reverted jointly and their recovery is measured on half B.
- Random revert sets: `n_draws` (>= 20) seeded draws of k units, each reverted jointly; the share
  recovered by the map's top-k by C is placed in that distribution (`stats.empirical_p`).
- Spearman(recovered, C / O / S) with bootstrap CIs over examples (how stable the number is) and
  a permutation p-value over units (whether the map is related at all: a CI over examples holds
  the units fixed and can exclude 0 for a random map).

`attribute(tuned, original, ...)` works for any tuned model (full tuning, the CAST arm, a random arm):
it reports what drop is left and in which units. It needs `original`, the model before training.

The package, by step:

    exact.py        reverting units (a weight swap, restored bit-exactly); losses from a cached layer
    first_order.py  the first-order estimate for every unit
    config.py       `AttributionConfig`: how it is measured (examples, candidates, spread, draws)
    selection.py    what is measured exactly: halves A/B, candidates, spread sample, joint sets
    result.py       `AttributionResult` (save / load) and its summary
    analysis.py     shares, first order vs exact, random revert sets, Spearman with the map
    measure.py      `attribute`: all of it, end to end
"""

from __future__ import annotations

from .config import MIN_DRAWS, AttributionConfig, ExactScope
from .exact import (FromLayer, changed_outside_units, changed_units, check_pair, per_example_nll,
                    revert_units)
from .first_order import first_order
from .measure import attribute
from .result import (ATTRIBUTION_VERSION, FORMAT, FORMAT_VERSION, META_FILE, TENSORS_FILE,
                     AttributionResult)
from .selection import split_halves, spread_sample

__all__ = ["attribute", "AttributionConfig", "AttributionResult", "first_order", "revert_units",
           "changed_units", "changed_outside_units", "check_pair", "per_example_nll", "FromLayer",
           "split_halves", "spread_sample", "ExactScope", "MIN_DRAWS", "ATTRIBUTION_VERSION",
           "FORMAT", "FORMAT_VERSION", "TENSORS_FILE", "META_FILE"]
