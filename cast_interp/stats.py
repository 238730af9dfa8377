"""Statistics that the conflict map, the experiment verdict and the attribution share.

CAST's claims are comparisons under noise, so each number comes with its uncertainty or its null:

- Paired differences between training arms (`paired_difference`): mean(a) - mean(b) over the same
  prompts and training seeds, with a 95% bootstrap CI over seeds and prompts. A difference is called
  real only when its CI excludes 0; otherwise the verdict is "no detectable difference".
- Losses per token with a CI (`ratio_of_sums_ci`): sum of per-example NLLs / sum of token counts,
  bootstrapped over *examples* with one resample shared by all units (heads), so units stay
  comparable draw by draw. `bootstrap_statistic` does the same for any statistic.
- Ranks among random draws (`empirical_p`): CAST's place among random-head arms as an empirical
  p-value, (1 + #draws at least as extreme) / (n + 1).
- Concentration beside a null (`concentration`, `gini`, `null_range`, `compare_to_null`,
  `permute_within`): "concentrated" may be said only when the observed value is above the upper end
  of what noise gives (e.g. C recomputed with O and S permuted independently across units).
- Seeded tie-breaks (`rank_order`): tied scores are ordered by a seeded random order, never by layer
  order, so ties cannot favour early layers.
- Matched safety (`interpolate_at`): utility cost read off a training curve at a given safety level.

The v3 readers live in `inference.py` and are importable from here too: `compare_to_random_sets`
(hierarchical bootstrap over random sets, seeds and prompts, with a prediction interval for a new
set), `rank_range` (ties as ranges, none from fewer than 20 draws), `utility_at_safety` and
`matched_safety_levels` (never from step 0, never extrapolated), `graded_slope`,
`share_or_difference`, `excluded_effect` and `no_difference_text`.

Every choice here is ours (the paper gives no statistics): percentile intervals, the random-effects
bootstrap of `paired_difference` (see there), the p-value with the +1 correction, top count rounded
half up. Inputs may be numpy arrays, torch tensors (any device) or sequences; they are converted to
float64 numpy. All randomness comes from an explicit `seed` (numpy `default_rng(seed)`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Literal

import numpy as np

Alternative = Literal["less", "greater"]
PairedMethod = Literal["random_effects", "pigeonhole"]


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _array(x: Any, name: str) -> np.ndarray:
    """float64 numpy array of a numpy array, torch tensor (any device) or sequence; non-empty."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}): pass at least one value.")
    return a


def _check_finite(a: np.ndarray, name: str) -> None:
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf) of {a.size}: drop or "
                         f"fix those entries (e.g. failed runs) before computing the statistic.")


def _check_ci(ci: float) -> None:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci is a coverage in (0, 1) (e.g. 0.95), got {ci!r}.")


def _check_boot(n_boot: int, ci: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}.")
    _check_ci(ci)


def _interval(draws: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0, NaN draws ignored (all-NaN -> NaN, silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(draws, [(1 - ci) / 2, (1 + ci) / 2], axis=0)
    return low, high


def _out(x: np.ndarray) -> Any:
    """A 0-d result as a Python float, anything else as an array."""
    x = np.asarray(x, dtype=np.float64)
    return float(x) if x.ndim == 0 else x


# --------------------------------------------------------------------------------------------------
# Bootstrap over examples
# --------------------------------------------------------------------------------------------------


def bootstrap_indices(n: int, n_boot: int, *, seed: int) -> np.ndarray:
    """`[n_boot, n]` indices in 0..n-1 drawn with replacement (one resample per row)."""
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer (the number of items resampled), got {n!r}.")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}.")
    return np.random.default_rng(seed).integers(0, int(n), size=(int(n_boot), int(n)))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """`[n_boot, n]` float counts: how often each item appears in each resample of `idx`."""
    b = idx.shape[0]
    flat = (idx + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def ratio_of_sums_ci(num, den, *, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Ratio of sums per unit, num.sum(0) / den.sum(0), with a percentile bootstrap over examples.

    num: `[n_examples, *units]` per-example sums (e.g. NLL increase summed over an example's tokens).
    den: `[n_examples]` per-example weights (e.g. token counts), >= 0 with a positive total.
    Every unit sees the same resample of examples, so differences between units are paired.
    Returns {"estimate", "low", "high": `[*units]`, "draws": `[n_boot, *units]`, "ci", "n_boot",
    "seed", "n_examples"}. A resample whose weights sum to 0 gives a NaN draw, ignored by the interval.
    """
    num, den = _array(num, "num"), _array(den, "den")
    if den.ndim != 1 or num.ndim < 1 or num.shape[0] != den.shape[0]:
        raise ValueError(f"num must be [n_examples, *units] and den [n_examples], got num "
                         f"{num.shape} and den {den.shape}: one weight per example (row of num).")
    _check_finite(num, "num")
    _check_finite(den, "den")
    _check_boot(n_boot, ci)
    if (den < 0).any() or den.sum() <= 0:
        raise ValueError("den (weights) must be >= 0 with a positive total, e.g. token counts.")
    n = den.shape[0]
    w = _counts(bootstrap_indices(n, n_boot, seed=seed), n)
    totals = w @ den
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = (w @ num.reshape(n, -1)) / totals[:, None]
    draws[totals <= 0] = np.nan
    draws = draws.reshape((int(n_boot),) + num.shape[1:])
    low, high = _interval(draws, ci)
    return {"estimate": _out(num.sum(0) / den.sum()), "low": _out(low), "high": _out(high),
            "draws": draws, "ci": ci, "n_boot": int(n_boot), "seed": seed, "n_examples": n}


def bootstrap_statistic(fn: Callable[[np.ndarray], Any], n: int, *, n_boot: int = 1000,
                        ci: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap of any statistic of n items.

    fn(idx) -> float or array: the statistic on the items `idx` (int array, repeats allowed).
    Returns {"estimate": fn(arange(n)), "low", "high", "draws": `[n_boot, *shape]`, "ci", "n_boot",
    "seed", "n"}; NaN draws (e.g. an undefined statistic on a resample) are ignored by the interval.
    """
    _check_boot(n_boot, ci)
    idx = bootstrap_indices(n, n_boot, seed=seed)
    estimate = np.asarray(fn(np.arange(n)), dtype=np.float64)
    draws = np.stack([np.asarray(fn(i), dtype=np.float64) for i in idx])
    if draws.shape[1:] != estimate.shape:
        raise ValueError(f"fn returned shape {draws.shape[1:]} on a resample but {estimate.shape} on "
                         f"all items: it must return the same shape for every index set.")
    low, high = _interval(draws, ci)
    return {"estimate": _out(estimate), "low": _out(low), "high": _out(high), "draws": draws,
            "ci": ci, "n_boot": int(n_boot), "seed": seed, "n": int(n)}


# --------------------------------------------------------------------------------------------------
# Paired differences between arms (seeds x prompts)
# --------------------------------------------------------------------------------------------------


def _paired_arrays(a, b, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """a, b as `[n_seeds, n_prompts]`, checked: same shape, finite, at least 2 prompts."""
    a, b = _array(a, names[0]), _array(b, names[1])
    if a.shape != b.shape or a.ndim not in (1, 2):
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, [n_seeds, n_prompts] "
                         f"or [n_prompts] (values on the same prompts and seeds), got {a.shape} and "
                         f"{b.shape}.")
    _check_finite(a, names[0])
    _check_finite(b, names[1])
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape[1] < 2:
        raise ValueError(f"Need at least 2 prompts to bootstrap over prompts, got {a.shape[1]}.")
    return a, b


def _random_effects(y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """y = m + r[seed] + c[prompt] + e: effects rescaled to their ANOVA variance components."""
    R, C = y.shape
    m = y.mean()
    r, c = y.mean(1) - m, y.mean(0) - m
    e = y - m - r[:, None] - c[None, :]
    ms_e = (e ** 2).sum() / ((R - 1) * (C - 1))
    ms_r, ms_c = C * (r ** 2).sum() / (R - 1), R * (c ** 2).sum() / (C - 1)
    # The seed means carry cell noise too: shrink them to the seed component, (MS_r - MS_e) / C
    # (0 when negative); likewise prompts; the cell residuals are inflated for their lost df.
    k_r = math.sqrt(R / (R - 1) * max(0.0, 1 - ms_e / ms_r)) if ms_r > 0 else 0.0
    k_c = math.sqrt(C / (C - 1) * max(0.0, 1 - ms_e / ms_c)) if ms_c > 0 else 0.0
    k_e = math.sqrt(R * C / ((R - 1) * (C - 1)))
    return m, k_r * r, k_c * c, k_e * e.ravel()


def _grid_draws(ys: list[np.ndarray], *, n_boot: int, seed: int, method: PairedMethod) -> list:
    """Bootstrap draws of the grand mean of each `[R, C]` array, all with the same resamples."""
    rng = np.random.default_rng(seed)
    R, C = ys[0].shape
    cols = rng.integers(0, C, size=(n_boot, C))
    if R == 1:  # one training seed: prompts only
        return [y[0][cols].mean(1) for y in ys]
    rows = rng.integers(0, R, size=(n_boot, R))
    if method == "pigeonhole":
        wr, wc = _counts(rows, R), _counts(cols, C)
        return [((wr @ y) * wc).sum(1) / (R * C) for y in ys]
    parts = [_random_effects(y) for y in ys]
    noise = [np.empty(n_boot) for _ in ys]
    step = max(1, 2_000_000 // (R * C))  # cell resamples in chunks: bounded memory
    for s in range(0, n_boot, step):
        cells = rng.integers(0, R * C, size=(min(step, n_boot - s), R * C))
        for out, (_, _, _, e) in zip(noise, parts):
            out[s:s + len(cells)] = e[cells].mean(1)
    return [m + r[rows].mean(1) + c[cols].mean(1) + z for (m, r, c, _), z in zip(parts, noise)]


def _verdict(low: float, high: float, diff: float, names: tuple[str, str],
             lower_is_better: bool) -> tuple[bool, str, Any]:
    significant = bool(low > 0 or high < 0)
    if not significant:
        return False, "no detectable difference", None
    a_lower = diff < 0
    verdict = f"{names[0]} {'lower' if a_lower else 'higher'} than {names[1]}"
    return True, verdict, names[0] if a_lower == lower_is_better else names[1]


def paired_difference(a, b, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0,
                      lower_is_better: bool = True, names: tuple[str, str] = ("a", "b"),
                      method: PairedMethod = "random_effects") -> dict:
    """Paired difference d = mean(a) - mean(b) of two arms, with a bootstrap CI over seeds and prompts.

    a, b: `[n_seeds, n_prompts]` (or `[n_prompts]`) per-prompt values of two arms on the SAME prompts
    and training seeds (e.g. per-prompt KL of CAST and of a random arm). Paired: cell (s, p) of a
    goes with cell (s, p) of b. Significant when the CI excludes 0.
    method (ours): "random_effects" (default) resamples seeds and prompts independently, each effect
    rescaled to its ANOVA variance component, plus the seed x prompt residuals (a residual bootstrap
    for crossed random effects); calibrated: ~5% false positives at ci=0.95 on nulls with iid cells
    (measured in tests). "pigeonhole" resamples seeds and prompts of the raw grid; it counts the
    cell noise up to three times (~1% false positives on iid cells): conservative. With one seed
    both resample prompts only. With few seeds (< 8) and large seed effects every bootstrap here
    is too narrow (seed variance from 4 values): use more seeds.
    lower_is_better: names the better arm ("better") when significant (lower is better for KL/NLL).
    Returns {"diff", "low", "high", "ci", "relative" (diff / mean(b)), "relative_low",
    "relative_high" (NaN unless mean(b) keeps one sign in every draw), "significant", "verdict"
    ("a lower than b" / "a higher than b" / "no detectable difference", with `names`),
    "excludes_beyond" (no difference: the CI excludes effects larger than this, max(|low|, |high|);
    NaN when significant), "statement" (the verdict; a no-difference one with that bound), "better",
    "mean_a", "mean_b", "n_seeds", "n_prompts", "names", "lower_is_better", "method", "n_boot",
    "seed"}.
    """
    if len(names) != 2:
        raise ValueError(f"names must be two arm names, got {names!r}.")
    a2, b2 = _paired_arrays(a, b, tuple(names))
    _check_boot(n_boot, ci)
    if method not in ("random_effects", "pigeonhole"):
        raise ValueError(f"method must be 'random_effects' or 'pigeonhole', got {method!r}.")
    d_draws, b_draws = _grid_draws([a2 - b2, b2], n_boot=int(n_boot), seed=seed, method=method)
    diff, mean_b = float((a2 - b2).mean()), float(b2.mean())
    low, high = (float(v) for v in _interval(d_draws, ci))
    rel, rel_low, rel_high = math.nan, math.nan, math.nan
    if mean_b != 0:
        rel = diff / mean_b
        if np.all(np.sign(b_draws) == np.sign(mean_b)):  # else the ratio's interval is unbounded
            rel_low, rel_high = (float(v) for v in _interval(d_draws / b_draws, ci))
    significant, verdict, better = _verdict(low, high, diff, tuple(names), lower_is_better)
    from .inference import excluded_effect, no_difference_text

    return {"diff": diff, "low": low, "high": high, "ci": ci, "relative": rel,
            "excludes_beyond": math.nan if significant else excluded_effect(low, high),
            "statement": verdict if significant else no_difference_text(low, high),
            "relative_low": rel_low, "relative_high": rel_high, "significant": significant,
            "verdict": verdict, "better": better, "mean_a": float(a2.mean()), "mean_b": mean_b,
            "n_seeds": a2.shape[0], "n_prompts": a2.shape[1], "names": tuple(names),
            "lower_is_better": lower_is_better, "method": method, "n_boot": int(n_boot),
            "seed": seed}


# --------------------------------------------------------------------------------------------------
# Ranks, correlations
# --------------------------------------------------------------------------------------------------


def value_and_draws(value, draws) -> tuple[float, np.ndarray, np.ndarray]:
    """(value as one finite float, the finite draws, the finite mask of the draws given)."""
    v = _array(value, "value").ravel()
    v = float(v[0]) if v.size == 1 else math.nan
    if not math.isfinite(v):
        raise ValueError(f"value must be one finite number, got {value!r}.")
    d = _array(draws, "draws").ravel()
    finite = np.isfinite(d)
    return v, d[finite], finite


def empirical_p(value: float, draws, *, alternative: Alternative = "less") -> dict:
    """Rank of `value` among random draws (e.g. CAST's utility cost among random-head arms).

    alternative: "less" when small values are the extreme ones (a lower cost), "greater" otherwise.
    Returns {"rank" (1 = most extreme; ties count in value's favour), "n_draws", "p" = (1 + #draws at
    least as extreme) / (n_draws + 1), "percentile" (share of draws below value, ties half, in %),
    "alternative", "n_nan"}. NaN draws are dropped and counted in "n_nan".
    For a report use `inference.rank_range`: the rank here counts ties in value's favour while p
    counts them against it, and it ranks among any number of draws (v3: ties as a range, no rank
    or p from fewer than 20 draws).
    """
    if alternative not in ("less", "greater"):
        raise ValueError(f"alternative must be 'less' or 'greater', got {alternative!r}.")
    v, d, finite = value_and_draws(value, draws)
    if d.size == 0:
        raise ValueError("draws has no finite value: there is nothing to rank against.")
    beyond, as_extreme = (d < v, d <= v) if alternative == "less" else (d > v, d >= v)
    below, ties = (d < v).sum(), (d == v).sum()
    return {"rank": int(beyond.sum()) + 1, "n_draws": int(d.size),
            "p": float((1 + as_extreme.sum()) / (d.size + 1)),
            "percentile": float(100 * (below + 0.5 * ties) / d.size), "alternative": alternative,
            "n_nan": int((~finite).sum())}


def spearman(x, y) -> float:
    """Spearman correlation over pairs finite in both; NaN if < 3 such pairs or either is constant."""
    from scipy.stats import rankdata

    x, y = _array(x, "x").ravel(), _array(y, "y").ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same number of values, got {x.size} and {y.size}.")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def rank_order(scores, *, seed: int, largest: bool = True) -> np.ndarray:
    """Flat indices of `scores` (any shape) ordered by score, best first.

    Ties are broken by a seeded random order, never by index (layer) order; non-finite scores come
    last, among themselves in the same seeded order. Deterministic for a seed. For a `[layer, head]`
    map, `np.unravel_index(order, shape)` gives (layer, head).
    """
    v = _array(scores, "scores").ravel()
    finite = np.isfinite(v)
    key = np.where(finite, -v if largest else v, 0.0)
    tie_break = np.random.default_rng(seed).permutation(v.size)
    return np.lexsort((tie_break, key, ~finite))  # the last key sorts first


def permute_within(x, *, seed: int) -> np.ndarray:
    """x (any shape) with its finite entries permuted among their positions; NaN/inf kept in place.

    The permutation null of a map: permuting O and S independently across units keeps each
    distribution and destroys their pairing.
    """
    out = _array(x, "x").copy()
    finite = np.isfinite(out)
    out[finite] = np.random.default_rng(seed).permutation(out[finite])
    return out


# --------------------------------------------------------------------------------------------------
# Concentration and nulls
# --------------------------------------------------------------------------------------------------


def gini(x) -> float:
    """Gini coefficient of non-negative values, NaN dropped: 0 all equal, (n-1)/n all in one.

    NaN when no value is left or all are 0. Negative values are an error (clip them at 0 first, as
    `concentration` does).
    """
    v = _array(x, "x").ravel()
    v = np.sort(v[~np.isnan(v)])
    if (v < 0).any():
        raise ValueError(f"gini needs non-negative values, got min {v.min():.4g}: clip at 0 first "
                         f"(concentration() takes the non-negative part).")
    n, total = v.size, v.sum()
    if n == 0 or total <= 0 or not math.isfinite(total):
        return math.nan
    i = np.arange(1, n + 1)
    return float(2.0 * np.sum(i * v) / (n * total) - (n + 1) / n)


def count_from_fraction(frac: float, n: int) -> int:
    """How many of n units a fraction names: round(frac * n) half up, at least 1 (a positive
    fraction always names a unit; ours). The one rule for every "top 10%" and budget k."""
    return max(1, int(math.floor(frac * n + 0.5)))


def concentration(x, *, top: float = 0.10) -> dict:
    """How much of the total the top units hold, over the non-negative part of x.

    Non-finite entries are dropped (counted in "n_nan"), negatives count as 0 (a benefit, not a risk).
    top: fraction of units; top_k = max(1, round-half-up(top * n)) (ours). Returns {"top_share",
    "gini", "n", "top", "top_k", "n_nan"}; shares are NaN when the total is 0.
    """
    if not 0.0 < top <= 1.0:
        raise ValueError(f"top is a fraction of units in (0, 1], got {top!r}.")
    v = _array(x, "x").ravel()
    finite = np.isfinite(v)
    v = np.sort(np.clip(v[finite], 0.0, None))[::-1]
    n, total = v.size, float(v.sum())
    k = count_from_fraction(top, n) if n else 0
    share = float(v[:k].sum() / total) if total > 0 else math.nan
    return {"top_share": share, "gini": gini(v) if n else math.nan, "n": int(n), "top": top,
            "top_k": int(k), "n_nan": int((~finite).sum())}


def null_range(samples, *, ci: float = 0.95) -> dict:
    """Mean and central `ci` range of null samples `[n_null]` (NaN dropped): what noise gives."""
    _check_ci(ci)
    s = _array(samples, "samples").ravel()
    s = s[np.isfinite(s)]
    if s.size == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0, "ci": ci}
    low, high = np.quantile(s, [(1 - ci) / 2, (1 + ci) / 2])
    return {"mean": float(s.mean()), "low": float(low), "high": float(high), "n": int(s.size),
            "ci": ci}


def compare_to_null(observed: float, null_samples, *, ci: float = 0.95) -> dict:
    """An observed statistic beside its null: "concentrated" may be said only when beats_null.

    Returns {"observed", "null_mean", "null_low", "null_high", "beats_null": observed > null_high,
    "p": (1 + #null >= observed) / (n_null + 1), "effect" (observed - null mean: the effect size in
    the statistic's units), "effect_z" (effect / the null's sd; NaN for a constant null), "n_null",
    "ci"}.
    """
    observed = float(observed)
    r = null_range(null_samples, ci=ci)
    beats = bool(math.isfinite(observed) and r["n"] > 0 and observed > r["high"])
    p = math.nan
    if r["n"] > 0 and math.isfinite(observed):
        p = empirical_p(observed, null_samples, alternative="greater")["p"]
    s = _array(null_samples, "null_samples").ravel()
    s = s[np.isfinite(s)]
    sd = float(s.std(ddof=1)) if s.size > 1 else math.nan
    effect = observed - r["mean"] if r["n"] > 0 else math.nan
    return {"observed": observed, "null_mean": r["mean"], "null_low": r["low"],
            "null_high": r["high"], "beats_null": beats, "p": p, "effect": effect,
            "effect_z": effect / sd if sd > 0 else math.nan, "n_null": r["n"], "ci": ci}


# --------------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------------


def interpolate_at(x, y, x0: float) -> float:
    """y at x = x0 on the curve through the points (x, y), linearly interpolated.

    Points are sorted by x (ours: the curve is read as a function of x, e.g. utility cost as a function
    of safety along training); points sharing an x are averaged; pairs with a non-finite value are
    dropped. NaN when x0 is outside [min x, max x] (no extrapolation).
    """
    xs, ys = _array(x, "x").ravel(), _array(y, "y").ravel()
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must have the same number of points, got {xs.size} and {ys.size}.")
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys, x0 = xs[ok], ys[ok], float(x0)
    if xs.size == 0 or not math.isfinite(x0) or x0 < xs.min() or x0 > xs.max():
        return math.nan
    ux, inv = np.unique(xs, return_inverse=True)
    uy = np.bincount(inv, weights=ys) / np.bincount(inv)
    return float(np.interp(x0, ux, uy))


# The v3 readers (inference.py), importable from here; loaded on first use (inference imports this
# module's helpers).
_INFERENCE = ("compare_to_random_sets", "rank_range", "utility_at_safety", "matched_safety_levels",
              "graded_slope", "share_or_difference", "excluded_effect", "no_difference_text",
              "MIN_DRAWS")


def __getattr__(name: str) -> Any:
    if name in _INFERENCE:
        from . import inference

        return getattr(inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
