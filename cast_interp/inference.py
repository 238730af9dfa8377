"""Inference for the v3 verdict: the map against chance, ranks with ties, matched safety, shares.

METHOD v3 asks whether CAST's head set beats *chance*, not only the average random set: one fixed
set can sit anywhere in the random sets' spread. This module reads that, and the other v3 numbers:

- CAST against random sets (`compare_to_random_sets`): a hierarchical bootstrap over random sets,
  training seeds and prompts of CAST's per-prompt values minus each random set's (paired: same
  seeds and prompts). It gives CAST minus the *average* set with a CI, CAST minus a *new* set with a
  prediction interval (where a new draw would fall; the primary endpoint), and CAST's percentile
  among the sets as a rank range.
- Ranks with ties as ranges (`rank_range`): ties are not counted in CAST's favour, and no rank or
  empirical p comes from fewer than `MIN_DRAWS` (20) draws.
- Matched safety (`utility_at_safety`, `matched_safety_levels`): utility read where a training curve
  reaches a safety level, only between two measured trained checkpoints, never from the untrained
  model and never extrapolated; the levels every piece reaches.
- The graded slope (`graded_slope`): utility cost at matched safety against a set's mean
  C-percentile, with a bootstrap CI and a permutation p.
- Honest wording (`excluded_effect`, `no_difference_text`, `share_or_difference`): every "no
  detectable difference" says which effects its CI excludes; a share is shown only when its
  denominator's CI excludes 0, otherwise the difference in the metric's own units.

All choices here are ours (the paper gives no statistics). Inputs may be numpy arrays, torch tensors
or sequences (float64 numpy inside); all randomness comes from an explicit `seed`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .stats import Alternative, _array, _check_boot, _check_finite, _counts, _interval, value_and_draws

MIN_DRAWS = 20  # METHOD v3: no rank or empirical p from fewer draws (ours: below it p >= 1/20)
AXES = ("set", "seed", "prompt")


# --------------------------------------------------------------------------------------------------
# Wording: no detectable difference, shares
# --------------------------------------------------------------------------------------------------


def excluded_effect(low: float, high: float) -> float:
    """The size beyond which a CI [low, high] that contains 0 excludes every effect: max(|low|,
    |high|). "No detectable difference" with CI [-0.003, +0.027] excludes effects larger than 0.027
    in either direction (and smaller ones on the side the CI does not reach). NaN if not finite."""
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        return math.nan
    return max(abs(low), abs(high))


def no_difference_text(low: float, high: float, *, unit: str = "") -> str:
    """'no detectable difference (excludes effects beyond ±0.027 nats/token)': the verdict of a CI
    that contains 0, with the smallest effect size it excludes (`excluded_effect`). No '|' in the
    text: it goes into markdown table cells."""
    x = excluded_effect(low, high)
    if not math.isfinite(x):
        return "no detectable difference"
    return f"no detectable difference (excludes effects beyond ±{x:.3g}{' ' + unit if unit else ''})"


def _ci_reaches_zero(ci: Mapping[str, Any]) -> bool:
    low, high = float(ci.get("low", math.nan)), float(ci.get("high", math.nan))
    return not (math.isfinite(low) and math.isfinite(high)) or low <= 0 <= high


def share_or_difference(num: Mapping[str, Any], den: Mapping[str, Any],
                        share: Optional[Mapping[str, Any]] = None, *, unit: str = "") -> dict:
    """A share num/den only when the denominator's CI excludes 0; otherwise the numerator, in the
    metric's own units, with a note (METHOD v3: a share over a denominator that may be 0 has an
    unbounded CI, e.g. [15%, 220%]).

    num, den: {"estimate", "low", "high"} in the metric's units (e.g. utility recovered and the
    total drop, nats/token; or CAST − random and random's mean). share: the share's own estimate
    and CI, from a bootstrap that resampled num and den together (optional: without it a share
    has its estimate only). A denominator CI touching 0 counts as reaching it; a missing one too.
    Returns {"kind": "share" | "difference", "estimate", "low", "high", "note" (None for a share),
    "unit"}.
    """
    for name, d in (("num", num), ("den", den)):
        if "estimate" not in d:
            raise ValueError(f"{name} must be a dict with 'estimate' (and 'low', 'high'), got keys "
                             f"{sorted(d)}.")
    if not _ci_reaches_zero(den):
        s = share or {}
        est = s.get("estimate", float(num["estimate"]) / float(den["estimate"]))
        return {"kind": "share", "estimate": float(est), "low": float(s.get("low", math.nan)),
                "high": float(s.get("high", math.nan)), "note": None, "unit": "share"}
    lo, hi = den.get("low", math.nan), den.get("high", math.nan)
    note = (f"share not shown: its denominator's CI [{float(lo):.3g}, {float(hi):.3g}] reaches 0; "
            f"the difference in {unit or 'the metric’s units'} instead")
    return {"kind": "difference", "estimate": float(num["estimate"]),
            "low": float(num.get("low", math.nan)), "high": float(num.get("high", math.nan)),
            "note": note, "unit": unit}


# --------------------------------------------------------------------------------------------------
# Ranks with ties as ranges
# --------------------------------------------------------------------------------------------------


def rank_range(value: float, draws, *, alternative: Alternative = "less",
               min_draws: int = MIN_DRAWS) -> dict:
    """Where `value` (e.g. CAST's utility cost) falls among random draws, ties as a range.

    alternative: "less" when small values are the extreme (better) ones, "greater" otherwise.
    rank_low counts the draws tied with value in its favour, rank_high against it (1 = most
    extreme; of n_draws + 1 places); p_low = (1 + #draws beyond) / (n + 1) and p_high = (1 + #draws
    at least as extreme) / (n + 1) (the conservative p, the one to cite); percentile_low/high: share
    of draws below value, ties excluded/included, in %. NaN draws are dropped ("n_nan").
    Refuses (ValueError, reason in the message) fewer than `min_draws` finite draws: with 3 draws
    the smallest p is 0.25 and a rank says little (METHOD v3: none from fewer than 20).
    Returns {"rank_low", "rank_high", "p_low", "p_high", "percentile_low", "percentile_high",
    "n_draws", "n_ties", "n_nan", "alternative", "rank" (display: "2" or "2–20"), "p" (= p_high)}.
    """
    if alternative not in ("less", "greater"):
        raise ValueError(f"alternative must be 'less' or 'greater', got {alternative!r}.")
    if int(min_draws) != min_draws or min_draws < 1:
        raise ValueError(f"min_draws must be a positive integer, got {min_draws!r}.")
    v, d, finite = value_and_draws(value, draws)
    if d.size < min_draws:
        raise ValueError(f"{d.size} finite draw(s): no rank or empirical p from fewer than "
                         f"{min_draws} (the smallest p would be {1 / (d.size + 1):.2g}); run more "
                         "random draws.")
    beyond = int((d < v).sum() if alternative == "less" else (d > v).sum())
    ties, below = int((d == v).sum()), int((d < v).sum())
    n = int(d.size)
    lo, hi = beyond + 1, beyond + ties + 1
    return {"rank_low": lo, "rank_high": hi, "p_low": (1 + beyond) / (n + 1),
            "p_high": (1 + beyond + ties) / (n + 1), "percentile_low": 100 * below / n,
            "percentile_high": 100 * (below + ties) / n, "n_draws": n, "n_ties": ties,
            "n_nan": int((~finite).sum()), "alternative": alternative,
            "rank": str(lo) if lo == hi else f"{lo}–{hi}", "p": (1 + beyond + ties) / (n + 1)}


# --------------------------------------------------------------------------------------------------
# Hierarchical bootstrap: CAST against random sets (sets x seeds x prompts)
# --------------------------------------------------------------------------------------------------


def _crossed_effects(y: np.ndarray) -> tuple[float, dict, dict]:
    """y `[n_set, n_seed, n_prompt]` (one value per cell) = m + sum of effects over the non-empty
    subsets T of the factors with more than one level. Returns (m, {T: effect_T rescaled so its
    mean square is its ANOVA variance component, shaped to broadcast}, {T: component}).

    Effects by inclusion-exclusion of marginal means; E[MS_T] = sum over U >= T of c_U sigma2_U with
    c_U = N / prod_{i in U} n_i (balanced random model); the highest-order term is the cell noise.
    Components are solved top-down and clipped at 0 (a negative estimate means none)."""
    dims, n = y.shape, y.size
    axes = [i for i in range(y.ndim) if dims[i] > 1]
    m = float(y.mean())
    raw: dict[tuple, np.ndarray] = {}
    for r in range(1, len(axes) + 1):
        for T in itertools.combinations(axes, r):
            e = y.mean(axis=tuple(i for i in range(y.ndim) if i not in T), keepdims=True) - m
            for U, eu in raw.items():
                if set(U) < set(T):
                    e = e - eu
            raw[T] = e
    c = {T: n / math.prod(dims[i] for i in T) for T in raw}
    ms = {T: n * float((e ** 2).mean()) / math.prod(dims[i] - 1 for i in T) for T, e in raw.items()}
    sigma: dict[tuple, float] = {}
    for T in sorted(raw, key=len, reverse=True):
        above = sum(c[U] * sigma[U] for U in sigma if set(T) < set(U))
        sigma[T] = (ms[T] - above) / c[T]
    scaled = {}
    for T, e in raw.items():
        mean_sq = float((e ** 2).mean())
        scaled[T] = e * (math.sqrt(max(sigma[T], 0.0) / mean_sq) if mean_sq > 0 else 0.0)
    return m, scaled, {T: max(s, 0.0) for T, s in sigma.items()}


def _resampled_means(y: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """`[n_boot]` means of y `[n0, n1, n2]` under per-axis resampling weights `[n_boot, n_i]`."""
    r = np.einsum("ijk,bk->ijb", y, weights[2])
    r = np.einsum("ijb,bj->ib", r, weights[1])
    return np.einsum("ib,bi->b", r, weights[0])


def _satterthwaite(contrib: dict, dfs: dict) -> float:
    """Welch-Satterthwaite df of a sum of variance contributions, each with its own df."""
    total = sum(contrib.values())
    den = sum(v * v / dfs[T] for T, v in contrib.items() if v > 0)
    return total * total / den if den > 0 else math.inf


def _stretched(draws: np.ndarray, estimate: float, ci: float, df: float) -> tuple[float, float]:
    """The percentile interval of `draws`, each side's distance to `estimate` times t(df) / z."""
    from scipy.stats import norm, t

    q = (1 + ci) / 2
    f = float(t.ppf(q, df) / norm.ppf(q)) if math.isfinite(df) else 1.0
    low, high = (float(v) for v in _interval(draws, ci))
    return estimate - f * (estimate - low), estimate + f * (high - estimate)


def _label(T: tuple) -> str:
    return "×".join(AXES[i] for i in T)


def compare_to_random_sets(cast, sets, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0,
                           lower_is_better: bool = True, min_draws: int = MIN_DRAWS,
                           names: tuple[str, str] = ("cast", "random sets")) -> dict:
    """CAST minus random head sets, with a bootstrap over sets, training seeds and prompts.

    cast: `[n_seeds, n_prompts]` per-prompt values of CAST (e.g. utility cost at matched safety).
    sets: `[n_sets, n_seeds, n_prompts]` the same for each random set, on the SAME training seeds
    and prompts (paired: cell (s, p) of CAST goes with cell (k, s, p) of every set). A size-1 axis
    is allowed and not resampled (one seed: set and seed effects cannot be told apart; per-piece
    values: pass n_prompts = 1). cast may also be `[n_sets, n_seeds, n_prompts]`, CAST's values
    paired with each set: sets nested in seeds (each set trained on one seed) pass n_seeds = 1 and
    CAST on each set's own seed.

    Design (ours). d[k, s, p] = cast[s, p] - sets[k, s, p] is a crossed three-factor grid. It is
    split into a grand mean, main effects of set, seed and prompt, their two-way interactions and
    the cell noise (balanced random-effects ANOVA), each effect rescaled to its estimated variance
    component. A bootstrap draw resamples sets, seeds and prompts independently with replacement
    and takes the mean of the rescaled grid over the resampled (set, seed, prompt) cells. Without
    the rescaling the cell noise would be counted once per resampled factor (too wide); with it
    each component enters once (the three-factor form of `stats.paired_difference`'s default).
    - diff = mean(d): CAST minus the *average* random set, CI from the draws.
    - CAST minus a *new* random set: each draw adds one set effect drawn from the rescaled set
      effects (variance: the set-to-set component, over the seed and prompt populations). Its
      interval is a prediction interval; the verdict follows it (primary endpoint): exchangeable
      with the sets, CAST's interval excludes 0 about 1 - ci of the time.
    - CAST's percentile among the sets: `rank_range` of CAST's mean among the sets' paired means
      (mean(cast) - mean(d[k]): a set's mean when CAST is shared, else the set seed-matched to
      CAST; None with a reason under `min_draws` sets); z: (CAST - their mean) / their sd.
    Few seeds (2-3): the seed components come from that many values and are rough.
    Returns {"diff", "low", "high", "pred_low", "pred_high", "significant" (prediction interval
    excludes 0), "verdict", "better", "mean_significant", "mean_verdict", "excludes_beyond" (for a
    no-difference mean), "relative", "relative_low", "relative_high" (diff / mean of sets; NaN
    unless that mean keeps one sign in every draw), "rank" (rank_range or None), "rank_note",
    "z", "mean_cast", "mean_sets", "set_means", "components" (variance components of d by term),
    "n_sets", "n_seeds", "n_prompts", "ci", "n_boot", "seed", "lower_is_better", "names"}.
    """
    c, s = _array(cast, "cast"), _array(sets, "sets")
    if c.ndim == 1:
        c = c[None, :]
    if s.ndim == 2:
        s = s[:, None, :]
    if s.ndim != 3 or not (c.shape == s.shape[1:] or c.shape == s.shape):
        raise ValueError(f"cast must be [n_seeds, n_prompts] and sets [n_sets, n_seeds, n_prompts] "
                         f"on the same seeds and prompts, got cast {np.shape(cast)} and sets "
                         f"{np.shape(sets)}.")
    _check_finite(c, "cast")
    _check_finite(s, "sets")
    _check_boot(n_boot, ci)
    K, S, P = s.shape
    if K < 2:
        raise ValueError(f"Need at least 2 random sets to resample sets, got {K}.")
    B = int(n_boot)
    d = (c[None] if c.ndim == 2 else c) - s
    m, eff, comp = _crossed_effects(d)
    _, eff_b, _ = _crossed_effects(s)
    d_tilde = m + sum(eff.values())
    b_tilde = float(s.mean()) + sum(eff_b.values())
    rng = np.random.default_rng(seed)
    weights = [_counts(rng.integers(0, n, size=(B, n)), n) / n if n > 1 else np.ones((B, 1))
               for n in (K, S, P)]
    d_draws = _resampled_means(np.broadcast_to(d_tilde, d.shape), weights)
    b_draws = _resampled_means(np.broadcast_to(b_tilde, s.shape), weights)
    # a new set's effect: normal with the set-to-set variance (20 sets' own effects are too few
    # for the tails of a 95% interval)
    var_set = comp.get((0,), 0.0)
    pred = d_draws + math.sqrt(var_set) * rng.standard_normal(B)
    diff, mean_b = float(d.mean()), float(s.mean())
    # small-sample widening (ours): each component's variance comes from its ANOVA df (19 for 20
    # sets, 1 for 2 seeds); the percentile intervals are stretched about the estimate by
    # t(df) / z, df by Welch-Satterthwaite over the components' shares of the variance
    contrib = {T: v / math.prod(s.shape[i] for i in T) for T, v in comp.items()}
    dfs = {T: math.prod(s.shape[i] - 1 for i in T) for T in comp}
    df_mean = _satterthwaite(contrib, dfs)
    contrib_pred = {**contrib, (0,): var_set * (1 + 1 / K)}
    df_pred = _satterthwaite(contrib_pred, dfs)
    low, high = _stretched(d_draws, diff, ci, df_mean)
    pred_low, pred_high = _stretched(pred, diff, ci, df_pred)
    # A new set's difference varies at least as much as the average set's: with few seeds the
    # mean's df (seed terms) can be smaller than the prediction's (the set term adds df), and its
    # stretch wider; the prediction interval is then never narrower than the mean's CI.
    pred_low, pred_high = min(pred_low, low), max(pred_high, high)
    rel, rel_low, rel_high = math.nan, math.nan, math.nan
    if mean_b != 0:
        rel = diff / mean_b
        if np.all(np.sign(b_draws) == np.sign(mean_b)):
            rel_low, rel_high = _stretched(d_draws / b_draws, rel, ci, df_mean)
    mean_c = float(c.mean())
    set_means = mean_c - d.mean(axis=(1, 2))
    alt = "less" if lower_is_better else "greater"
    try:
        rank, rank_note = rank_range(mean_c, set_means, alternative=alt, min_draws=min_draws), None
    except ValueError as e:
        rank, rank_note = None, str(e)
    sd = float(set_means.std(ddof=1))
    a, b = names
    significant = bool(pred_low > 0 or pred_high < 0)
    mean_sig = bool(low > 0 or high < 0)
    better = None
    if significant:
        verdict = f"{a} {'lower' if diff < 0 else 'higher'} than a new random set"
        better = a if (diff < 0) == lower_is_better else "random set"
    else:
        verdict = "within the random sets' spread: " + no_difference_text(pred_low, pred_high)
    mean_verdict = (f"{a} {'lower' if diff < 0 else 'higher'} than the average of {b}"
                    if mean_sig else no_difference_text(low, high))
    return {"diff": diff, "low": low, "high": high, "pred_low": pred_low, "pred_high": pred_high,
            "significant": significant, "verdict": verdict, "better": better,
            "mean_significant": mean_sig, "mean_verdict": mean_verdict,
            "excludes_beyond": math.nan if mean_sig else excluded_effect(low, high),
            "relative": rel, "relative_low": rel_low, "relative_high": rel_high, "rank": rank,
            "rank_note": rank_note, "z": (mean_c - float(set_means.mean())) / sd if sd > 0 else
            math.nan, "mean_cast": mean_c, "mean_sets": mean_b, "set_means": set_means.tolist(),
            "components": {_label(T): v for T, v in comp.items()}, "n_sets": K, "n_seeds": S,
            "n_prompts": P, "df": df_mean, "df_pred": df_pred, "ci": ci, "n_boot": B,
            "seed": seed, "lower_is_better": lower_is_better, "names": tuple(names)}


# --------------------------------------------------------------------------------------------------
# Matched safety
# --------------------------------------------------------------------------------------------------


def _curve(steps, safety, name: str = "curve") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trained checkpoints (step > 0) of a curve in step order: (steps, safety, order indices)."""
    st, sa = _array(steps, f"{name} steps").ravel(), _array(safety, f"{name} safety").ravel()
    if st.shape != sa.shape:
        raise ValueError(f"{name}: steps and safety must have one value per checkpoint, got "
                         f"{st.size} and {sa.size}.")
    _check_finite(st, f"{name} steps")
    _check_finite(sa, f"{name} safety")
    if (st < 0).any() or len(np.unique(st)) != st.size:
        raise ValueError(f"{name}: steps must be distinct and >= 0 (0 = the untrained model), got "
                         f"{st.tolist()}.")
    order = np.argsort(st, kind="stable")
    order = order[st[order] > 0]  # never read from the untrained model
    return st[order], sa[order], order


def utility_at_safety(steps, safety, utility, target: float, *, rising: bool = True) -> dict:
    """Utility where one training curve first reaches a safety level, between measured checkpoints.

    steps `[n]` (0 = the untrained model), safety `[n]` (e.g. validation refusal score), utility
    `[n, *shape]` (a value or per-prompt test values at each checkpoint). rising: safety grows with
    training (False: it falls, e.g. a loss).
    Rules (ours, METHOD v3): step 0 is dropped, so nothing is read on the line from the untrained
    model; the reading is linear in safety between the two trained checkpoints around the FIRST
    crossing of `target` in step order (a non-monotone curve that dips and rises again is read where
    it first reached the level; later dips are ignored); a checkpoint exactly at `target` is read
    as measured. Never extrapolated: a target above the highest trained safety, or already passed at
    the first trained checkpoint (so reached before it), is not read.
    Returns {"utility": float or array (NaN where not read), "readable", "reason" (None when read),
    "step_low", "step_high", "weight" (share of the way from step_low to step_high), "target"}.
    Never raises for an unreadable target: loops over pieces and levels go on; bad input raises.
    """
    st, sa, order = _curve(steps, safety)
    u = _array(utility, "utility")
    if u.shape[0] != len(np.ravel(_array(steps, "steps"))):
        raise ValueError(f"utility must have one entry per checkpoint on its first axis, got shape "
                         f"{u.shape} for {np.size(steps)} checkpoints.")
    u = u[order]
    target = float(target)
    out = {"utility": np.full(u.shape[1:], math.nan) if u.ndim > 1 else math.nan,
           "readable": False, "step_low": None, "step_high": None, "weight": math.nan,
           "target": target}
    if not math.isfinite(target):
        raise ValueError(f"target must be a finite safety level, got {target!r}.")
    if st.size == 0:
        return {**out, "reason": "no trained checkpoint (step > 0) on the curve"}
    x, t = (sa, target) if rising else (-sa, -target)
    word = "above" if rising else "below"
    if x.max() < t:
        return {**out, "reason": f"target {target:.4g} is {word} the best measured safety "
                f"{sa[np.argmax(x)]:.4g}: no extrapolation"}
    if x[0] > t:
        return {**out, "reason": f"target {target:.4g} was passed before the first trained "
                f"checkpoint (step {st[0]:g}, safety {sa[0]:.4g}): reading it would need the line "
                "from the untrained model"}
    j = int(np.argmax(x >= t))  # the first checkpoint at or past the target
    if j == 0 or x[j] == t:
        val = u[j] if u.ndim > 1 else float(u[j])
        return {**out, "utility": val, "readable": True, "reason": None, "step_low": float(st[j]),
                "step_high": float(st[j]), "weight": 0.0}
    w = (t - x[j - 1]) / (x[j] - x[j - 1])
    val = u[j - 1] + w * (u[j] - u[j - 1])
    return {**out, "utility": val if u.ndim > 1 else float(val), "readable": True, "reason": None,
            "step_low": float(st[j - 1]), "step_high": float(st[j]), "weight": float(w)}


CurveLike = Union[Mapping[str, Any], Sequence[Any]]


def matched_safety_levels(curves: Union[Mapping[str, CurveLike], Sequence[CurveLike]], *,
                          n_levels: int = 3, rising: bool = True) -> dict:
    """Safety levels that every piece's curve reaches between trained checkpoints.

    curves: one curve per piece (a mapping name -> curve, or a sequence): each a (steps, safety)
    pair or a dict with "steps" and "safety". A piece can be read (`utility_at_safety`) at every
    level from its first trained checkpoint's safety to its best; the common range runs from the
    highest first-checkpoint safety to the lowest best. Levels (ours): `n_levels` evenly spaced
    over that range, both ends included (the top one is the weakest piece's best, as in v2).
    Returns {"levels", "low", "high", "low_set_by", "high_set_by" (piece names or indices),
    "reason" (None, or why fewer than n_levels levels: an empty or one-point range)}.
    """
    if int(n_levels) != n_levels or n_levels < 1:
        raise ValueError(f"n_levels must be a positive integer, got {n_levels!r}.")
    items = list(curves.items()) if isinstance(curves, Mapping) else list(enumerate(curves))
    if not items:
        raise ValueError("curves is empty: pass one (steps, safety) curve per piece.")
    firsts, bests = {}, {}
    for name, cv in items:
        st, sa = (cv["steps"], cv["safety"]) if isinstance(cv, Mapping) else cv
        _, x, _ = _curve(st, sa, name=f"curve {name!r}")
        if x.size == 0:
            return {"levels": [], "low": math.nan, "high": math.nan, "low_set_by": name,
                    "high_set_by": name, "reason": f"piece {name!r} has no trained checkpoint"}
        x = x if rising else -x
        firsts[name], bests[name] = float(x[0]), float(x.max())
    lo_by, hi_by = max(firsts, key=firsts.get), min(bests, key=bests.get)
    lo, hi = firsts[lo_by], bests[hi_by]
    sign = 1.0 if rising else -1.0
    base = {"low": sign * lo, "high": sign * hi, "low_set_by": lo_by, "high_set_by": hi_by}
    if lo > hi:
        return {**base, "levels": [], "reason": f"no level is reached by every piece: piece "
                f"{lo_by} starts at {sign * lo:.4g} (its first trained checkpoint), past the best "
                f"of piece {hi_by}, {sign * hi:.4g}"}
    if lo == hi:
        return {**base, "levels": [sign * lo], "reason": "the common range is one point"}
    return {**base, "levels": [float(sign * v) for v in np.linspace(lo, hi, int(n_levels))],
            "reason": None}


# --------------------------------------------------------------------------------------------------
# The graded slope
# --------------------------------------------------------------------------------------------------


def _centre(v: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """v `[..., n]` minus the mean of its group (one-hot `[n, n_groups]`), along the last axis."""
    means = (v @ onehot) / onehot.sum(0)
    return v - means @ onehot.T


def _slopes(x: np.ndarray, y: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """OLS slope of y on x within groups, row by row (`[..., n]`); NaN where x does not vary."""
    xc, yc = _centre(x, onehot), _centre(y, onehot)
    sxx = (xc * xc).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sxx > 1e-12 * max(1.0, float(np.max(np.abs(x))) ** 2),
                        (xc * yc).sum(-1) / sxx, np.nan)


def graded_slope(cost, c_percentile, *, groups=None, n_boot: int = 2000, n_perm: int = 2000,
                 ci: float = 0.95, seed: int = 0) -> dict:
    """Slope of utility cost on a head set's mean C-percentile, with a bootstrap CI and a
    permutation p (METHOD v3's second primary endpoint; graded sets from C-quantile bins).

    cost: `[n_sets]` or `[n_sets, n_seeds]` utility cost at matched safety per set (and training
    seed, every set on the same seeds). c_percentile: `[n_sets]` mean C-percentile of each set's
    units. groups: optional `[n_sets]` label per set (e.g. the one training seed of each set when
    sets are nested in seeds): the slope is then fitted within groups (each group's mean removed
    from x and y), and sets are permuted and resampled within groups.
    slope: OLS of the set's mean cost over seeds on its C-percentile (units of cost per unit of x).
    CI (ours): sets resampled with replacement (within groups), and each resampled set's seeds
    resampled with replacement (this counts seed noise in the set means and again in the seed
    resample, so it errs wide); the percentile interval stretched by t(df) / z, df = n_sets -
    n_groups - 1. p: two-sided, C-percentiles permuted across sets (within groups),
    (1 + #|slope_perm| >= |slope|) / (n_perm + 1).
    Returns {"slope", "low", "high", "p", "spearman" (of the within-group centred set means and
    C-percentiles), "n_sets", "n_seeds", "n_groups", "ci", "n_boot", "n_perm", "seed"}.
    """
    y = _array(cost, "cost")
    x = _array(c_percentile, "c_percentile").ravel()
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != x.size:
        raise ValueError(f"cost must be [n_sets] or [n_sets, n_seeds] and c_percentile [n_sets], "
                         f"got {np.shape(cost)} and {np.shape(c_percentile)}.")
    _check_finite(y, "cost")
    _check_finite(x, "c_percentile")
    _check_boot(n_boot, ci)
    if int(n_perm) != n_perm or n_perm < 1:
        raise ValueError(f"n_perm must be a positive integer, got {n_perm!r}.")
    K, S = y.shape
    g = np.zeros(K, dtype=int) if groups is None else np.unique(np.asarray(groups).ravel(),
                                                               return_inverse=True)[1].ravel()
    if g.size != K:
        raise ValueError(f"groups must give one label per set ({K}), got {g.size}.")
    onehot = np.eye(g.max() + 1)[g]
    if int(((onehot.sum(0) >= 2) * onehot.sum(0)).sum()) < 3:
        raise ValueError("Need at least 3 sets in groups of 2 or more to fit a slope within "
                         "groups.")
    ym = y.mean(1)
    slope = float(_slopes(x, ym, onehot))
    if not math.isfinite(slope):
        raise ValueError("c_percentile does not vary across sets (within groups): no slope.")
    rng = np.random.default_rng(seed)
    # permutations within groups: sort random keys inside each group's block of positions
    block = np.argsort(g, kind="stable")
    keys = rng.random((int(n_perm), K)) + g[None, :] * 2.0
    xp = np.empty((int(n_perm), K))
    xp[:, block] = x[np.argsort(keys, axis=1, kind="stable")]
    null = _slopes(xp, np.broadcast_to(ym, xp.shape), onehot)
    null = null[np.isfinite(null)]
    p = float((1 + (np.abs(null) >= abs(slope) - 1e-12 * abs(slope)).sum()) / (null.size + 1))
    # bootstrap: sets within groups, then seeds within each resampled set
    B = int(n_boot)
    idx = np.empty((B, K), dtype=int)
    for grp in range(onehot.shape[1]):
        members = np.flatnonzero(g == grp)
        idx[:, members] = members[rng.integers(0, members.size, size=(B, members.size))]
    seeds = rng.integers(0, S, size=(B, K, S))
    yb = y[idx[..., None], seeds].mean(-1)
    draws = _slopes(x[idx], yb, onehot)
    # stretched by t(df) / z as in compare_to_random_sets, df = sets - groups - 1 (the residual
    # df of the fit): percentile intervals of a slope over 20-odd sets run narrow
    low, high = _stretched(draws, slope, ci, max(K - onehot.shape[1] - 1, 1))
    from .stats import spearman

    rho = spearman(_centre(x, onehot), _centre(ym, onehot))
    return {"slope": slope, "low": low, "high": high, "p": p, "spearman": rho, "n_sets": K,
            "n_seeds": S, "n_groups": int(onehot.shape[1]), "ci": ci, "n_boot": B,
            "n_perm": int(n_perm), "seed": seed}
