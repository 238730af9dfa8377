"""Known answers and calibration for `cast_interp.inference` (numpy only, seeded)."""

import math

import numpy as np
import pytest
from scipy.stats import binom

from cast_interp.inference import (MIN_DRAWS, compare_to_random_sets, excluded_effect,
                                   graded_slope, matched_safety_levels, no_difference_text,
                                   rank_range, share_or_difference, utility_at_safety)
from cast_interp.stats import paired_difference

NAN = float("nan")


def _binomial_band(n: int, rate: float = 0.05, tail: float = 0.001) -> tuple[float, float]:
    """The central 1 - 2*tail range of a false-positive count out of n, as rates."""
    return binom.ppf(tail, n, rate) / n, binom.isf(tail, n, rate) / n


# -- CAST against random sets: the hierarchical bootstrap --------------------------------------------


def _sets_world(rng, *, n_sets=20, n_seeds=2, n_prompts=30, set_sd=0.5, set_seed_sd=0.2,
                set_prompt_sd=0.2, noise_sd=1.0, cast_effect=None):
    """Per-prompt values of CAST and n_sets random sets on shared seeds and prompts.

    Seed, prompt and seed x prompt effects are common to every arm (they cancel in a paired
    difference); each set has its own effect u (sd set_sd), set x seed and set x prompt
    interactions and cell noise. CAST is set 0: u drawn like the others (exchangeable) when
    cast_effect is None, else fixed at cast_effect (the sets' population mean is 0). Returns
    (cast, sets, u_cast, u_new): u_new the effect of one more set, never shown to the code."""
    n = n_sets + 2
    shared = (rng.normal(size=(1, n_seeds, 1)) + rng.normal(size=(1, 1, n_prompts))
              + 0.5 * rng.normal(size=(1, n_seeds, n_prompts)))
    u = set_sd * rng.normal(size=(n, 1, 1))
    if cast_effect is not None:
        u[0] = cast_effect
    y = (u + shared + set_seed_sd * rng.normal(size=(n, n_seeds, 1))
         + set_prompt_sd * rng.normal(size=(n, 1, n_prompts))
         + noise_sd * rng.normal(size=(n, n_seeds, n_prompts)))
    return y[0], y[1:-1], float(u[0, 0, 0]), float(u[-1, 0, 0])


def test_random_sets_known_answer_without_noise():
    # additive grid, no noise: sets[k, s, p] = a_k + b_s + c_p, CAST = 5 + b_s + c_p
    a = np.arange(20.0) / 10  # set effects, mean 0.95, sd = sqrt(35/3) / 10
    b, c = np.array([0.3, -0.3]), np.linspace(-1, 1, 15)
    sets = a[:, None, None] + b[None, :, None] + c[None, None, :]
    cast = 5.0 + b[:, None] + c[None, :]
    r = compare_to_random_sets(cast, sets, n_boot=4000, seed=1)
    assert r["diff"] == pytest.approx(5.0 - 0.95)
    assert r["components"]["set"] == pytest.approx(np.var(a, ddof=1))
    for term, v in r["components"].items():  # seeds and prompts cancel in the paired difference
        assert term == "set" or v == pytest.approx(0.0, abs=1e-12)
    se = np.std(a, ddof=1) / math.sqrt(20)  # the mean's standard error over sets alone
    assert (r["high"] - r["low"]) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.2)
    # a new set: spread sd(a) * sqrt(1 + 1/20) about the estimate
    half = (r["pred_high"] - r["pred_low"]) / 2
    assert half / (1.96 * np.std(a, ddof=1) * math.sqrt(1.05)) == pytest.approx(1.0, abs=0.2)
    assert r["mean_cast"] == pytest.approx(5.0) and r["rank"]["rank"] == "21"  # above every set
    assert r["z"] == pytest.approx((5.0 - 0.95) / np.std(a, ddof=1))


def test_random_sets_finds_a_planted_effect():
    rng = np.random.default_rng(0)
    cast, sets, _, _ = _sets_world(rng, cast_effect=-1.6, set_sd=0.3)
    r = compare_to_random_sets(cast, sets, names=("cast", "random"))
    assert r["mean_significant"] and r["low"] <= -1.6 <= r["high"] < 0
    assert r["mean_verdict"] == "cast lower than the average of random"
    assert r["significant"] and r["pred_high"] < 0 and r["better"] == "cast"
    assert r["verdict"] == "cast lower than a new random set"
    assert r["rank"]["rank"] == "1" and r["rank"]["p"] == pytest.approx(1 / 21)
    assert (r["n_sets"], r["n_seeds"], r["n_prompts"]) == (20, 2, 30)
    assert math.isnan(r["excludes_beyond"])


def test_random_sets_null_false_positive_rates_and_coverage():
    # 200 simulated nulls (fixed seed). Exchangeable CAST (its effect drawn like every set's):
    # its prediction interval excludes 0 about 5% of the time and covers CAST minus a new set
    # about 95%; its mean CI (CAST vs the *average* set) excludes 0 far more often, which is why
    # the verdict follows the prediction interval. CAST exactly at the sets' mean: the mean CI
    # excludes 0 about 5% of the time.
    rng = np.random.default_rng(2026)
    n = 200
    pred_fp = mean_fp_exch = pred_cover = mean_fp = 0
    for rep in range(n):
        cast, sets, u_cast, u_new = _sets_world(rng)
        r = compare_to_random_sets(cast, sets, n_boot=1000, seed=rep)
        pred_fp += r["significant"]
        mean_fp_exch += r["mean_significant"]
        pred_cover += r["pred_low"] <= u_cast - u_new <= r["pred_high"]
        cast, sets, _, _ = _sets_world(rng, cast_effect=0.0)
        mean_fp += compare_to_random_sets(cast, sets, n_boot=1000, seed=rep)["mean_significant"]
    lo, hi = _binomial_band(n)
    assert lo <= pred_fp / n <= hi, pred_fp / n  # measured 0.065 (band 0.01-0.105)
    assert lo <= mean_fp / n <= hi, mean_fp / n  # measured 0.065
    assert 1 - hi <= pred_cover / n <= 1 - lo, pred_cover / n  # measured 0.935
    assert mean_fp_exch / n > 0.25, mean_fp_exch / n  # measured 0.36


def test_random_sets_ci_widens_with_set_to_set_variance():
    widths, flat = {}, {}
    for set_sd in (0.0, 0.5, 1.0, 2.0):
        rng = np.random.default_rng(5)  # the same seed, prompt and cell noise for every set_sd
        cast, sets, _, _ = _sets_world(rng, set_sd=set_sd, set_seed_sd=0.0, set_prompt_sd=0.0,
                                       cast_effect=0.0)
        r = compare_to_random_sets(cast, sets, seed=3)
        widths[set_sd] = r["high"] - r["low"]
        # the bootstrap that does not resample sets: CAST against their per-cell mean
        flat[set_sd] = paired_difference(cast, sets.mean(0), seed=3)["high"] - \
            paired_difference(cast, sets.mean(0), seed=3)["low"]
    assert widths[0.0] < widths[0.5] < widths[1.0] < widths[2.0]  # measured 0.78 0.87 1.14 1.87
    assert max(flat.values()) - min(flat.values()) < 1e-9  # blind to the sets' spread (0.61)
    assert widths[0.0] / flat[0.0] == pytest.approx(1.0, abs=0.35)
    # the set term adds 2 * 1.96 * set_sd / sqrt(20) to the width, in quadrature
    assert widths[2.0] == pytest.approx(math.hypot(widths[0.0], 3.92 * 2.0 / math.sqrt(20)),
                                        rel=0.15)
    assert widths[2.0] / flat[2.0] > 2.5


def test_random_sets_rank_needs_20_sets_and_bad_input():
    rng = np.random.default_rng(1)
    cast, sets, _, _ = _sets_world(rng, n_sets=5)
    r = compare_to_random_sets(cast, sets, n_boot=200)
    assert r["rank"] is None and "fewer than 20" in r["rank_note"]
    assert math.isfinite(r["pred_low"])  # the prediction interval does not need 20 sets
    one_seed = compare_to_random_sets(cast[0], sets[:, 0], n_boot=200)  # [n_prompts], [n_sets, P]
    assert one_seed["n_seeds"] == 1 and "seed" not in one_seed["components"]
    # sets nested in seeds: CAST given per set (on the set's own seed), one seed axis
    nested = compare_to_random_sets(np.repeat(cast[None, :1], 5, 0), sets[:, :1], n_boot=200)
    assert nested["diff"] == pytest.approx((cast[0] - sets[:, 0]).mean())
    assert nested["set_means"] == pytest.approx(sets[:, 0].mean(1))
    with pytest.raises(ValueError, match="same seeds and prompts"):
        compare_to_random_sets(cast, sets[:, :, :-1])
    with pytest.raises(ValueError, match="at least 2 random sets"):
        compare_to_random_sets(cast, sets[:1])
    bad = sets.copy()
    bad[0, 0, 0] = NAN
    with pytest.raises(ValueError, match="non-finite"):
        compare_to_random_sets(cast, bad)


# -- ranks with ties as ranges ----------------------------------------------------------------------


def test_rank_range_ties_span_the_tied_draws():
    # task accuracy (higher is better): 18 of 20 draws tie with CAST, one is lower, one higher
    draws = np.array([0.7] * 18 + [0.6, 0.8])
    r = rank_range(0.7, draws, alternative="greater")
    assert (r["rank_low"], r["rank_high"], r["rank"]) == (2, 20, "2–20")
    assert r["p_low"] == pytest.approx(2 / 21) and r["p_high"] == pytest.approx(20 / 21)
    assert r["p"] == r["p_high"] and r["n_ties"] == 18
    assert (r["percentile_low"], r["percentile_high"]) == (pytest.approx(5.0), pytest.approx(95.0))


def test_rank_range_without_ties_and_refusals():
    draws = np.arange(1.0, 21.0)
    r = rank_range(0.5, draws)
    assert (r["rank_low"], r["rank_high"], r["rank"]) == (1, 1, "1")
    assert r["p_low"] == r["p_high"] == pytest.approx(1 / 21)
    assert rank_range(10.0, draws)["rank"] == "10–11"  # one draw equals the value
    assert rank_range(25.0, draws, alternative="greater")["p"] == pytest.approx(1 / 21)
    with pytest.raises(ValueError, match="fewer than 20"):
        rank_range(0.5, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="fewer than 20"):  # NaN draws do not count
        rank_range(0.5, np.append(draws[:19], NAN))
    assert rank_range(0.5, np.append(draws, NAN))["n_nan"] == 1
    assert MIN_DRAWS == 20
    with pytest.raises(ValueError, match="alternative"):
        rank_range(0.5, draws, alternative="two-sided")


# -- matched safety -----------------------------------------------------------------------------------


# A curve whose utility is piecewise linear in safety between its checkpoints (known by hand).
STEPS = [0, 10, 20, 30, 40]
SAFETY = [0.0, 1.0, 2.0, 4.0, 5.0]
UTILITY = [0.0, 0.1, 0.3, 0.4, 1.0]


@pytest.mark.parametrize("target, value, steps", [
    (1.5, 0.2, (10, 20)), (3.0, 0.35, (20, 30)), (4.5, 0.7, (30, 40)), (4.0, 0.4, (30, 30)),
    (1.0, 0.1, (10, 10)), (5.0, 1.0, (40, 40))])
def test_utility_at_safety_exact_on_a_piecewise_linear_curve(target, value, steps):
    r = utility_at_safety(STEPS, SAFETY, UTILITY, target)
    assert r["readable"] and r["reason"] is None
    assert r["utility"] == pytest.approx(value) and (r["step_low"], r["step_high"]) == steps


def test_utility_at_safety_refuses_to_extrapolate_or_use_the_untrained_model():
    above = utility_at_safety(STEPS, SAFETY, UTILITY, 5.01)
    assert not above["readable"] and math.isnan(above["utility"])
    assert "no extrapolation" in above["reason"]
    # 0.5 lies between step 0 (untrained) and step 10: not read
    below = utility_at_safety(STEPS, SAFETY, UTILITY, 0.5)
    assert not below["readable"] and "untrained" in below["reason"]
    # the same without the step-0 point: still below the first trained checkpoint
    assert not utility_at_safety(STEPS[1:], SAFETY[1:], UTILITY[1:], 0.5)["readable"]
    assert not utility_at_safety([0], [0.0], [0.0], 0.0)["readable"]  # untrained only
    with pytest.raises(ValueError, match="distinct"):
        utility_at_safety([0, 10, 10], [0.0, 1.0, 2.0], [0.0, 0.1, 0.2], 1.5)
    with pytest.raises(ValueError, match="one entry per checkpoint"):
        utility_at_safety(STEPS, SAFETY, UTILITY[:-1], 1.5)


def test_utility_at_safety_first_crossing_of_a_non_monotone_curve():
    steps, safety, util = [0, 1, 2, 3, 4], [0.0, 1.0, 3.0, 2.0, 4.0], [0.0, 1.0, 3.0, 10.0, 20.0]
    # 2.0 is first crossed between steps 1 and 2, not at the measured dip of step 3
    r = utility_at_safety(steps, safety, util, 2.0)
    assert r["utility"] == pytest.approx(2.0) and (r["step_low"], r["step_high"]) == (1, 2)
    # 3.5 is first reached after the dip: between steps 3 (2.0) and 4 (4.0)
    r = utility_at_safety(steps, safety, util, 3.5)
    assert r["utility"] == pytest.approx(17.5) and (r["step_low"], r["step_high"]) == (3, 4)
    # unsorted input, a falling safety measure, per-prompt utilities
    order = [3, 0, 4, 1, 2]
    r = utility_at_safety(np.array(steps)[order], -np.array(safety)[order],
                          np.array(util)[order], -2.0, rising=False)
    assert r["utility"] == pytest.approx(2.0)
    per_prompt = np.stack([util, np.array(util) * 2], axis=1)  # [checkpoints, prompts]
    r = utility_at_safety(steps, safety, per_prompt, 3.5)
    np.testing.assert_allclose(r["utility"], [17.5, 35.0])


def test_matched_safety_levels_reachable_by_every_piece():
    curves = {"a": ([0, 1, 2, 3], [0.0, 1.0, 3.0, 5.0]),
              "b": {"steps": [0, 1, 2], "safety": [0.0, 0.5, 3.0]},
              "c": ([0, 5, 10], [0.0, 1.5, 4.0])}
    lv = matched_safety_levels(curves)
    assert lv["levels"] == pytest.approx([1.5, 2.25, 3.0]) and lv["reason"] is None
    assert (lv["low_set_by"], lv["high_set_by"]) == ("c", "b")
    for name, cv in curves.items():
        st, sa = (cv["steps"], cv["safety"]) if isinstance(cv, dict) else cv
        for level in lv["levels"]:
            assert utility_at_safety(st, sa, np.arange(len(st)), level)["readable"], (name, level)
    none = matched_safety_levels([([0, 1], [0.0, 4.0]), ([0, 1, 2], [0.0, 1.0, 3.0])])
    assert none["levels"] == [] and "no level is reached by every piece" in none["reason"]
    assert len(matched_safety_levels(curves, n_levels=5)["levels"]) == 5


# -- the graded slope ---------------------------------------------------------------------------------


def _graded(rng, slope, n_sets=25, n_seeds=2, set_sd=0.05, seed_sd=0.05):
    x = np.repeat(np.linspace(10, 90, 5), n_sets // 5) + rng.normal(0, 3, n_sets)  # C-percentile
    y = 0.5 + slope * x[:, None] + set_sd * rng.normal(size=(n_sets, 1)) \
        + seed_sd * rng.normal(size=(n_sets, n_seeds))
    return x, y


def test_graded_slope_known_line_and_groups():
    x = np.linspace(0, 100, 21)
    r = graded_slope(np.stack([0.5 - 0.002 * x] * 2, axis=1), x, n_boot=500, n_perm=500)
    assert r["slope"] == pytest.approx(-0.002)
    assert r["low"] == pytest.approx(-0.002) and r["high"] == pytest.approx(-0.002)
    assert r["p"] == pytest.approx(1 / 501) and r["spearman"] == pytest.approx(-1.0)
    # sets nested in seeds: seed offsets (0 vs 1) confound the plain slope, not the within-seed one
    g = (x > 50).astype(int)
    y = 1.0 * g + 0.001 * x
    assert graded_slope(y, x, groups=g, n_boot=200, n_perm=200)["slope"] == pytest.approx(0.001)
    assert graded_slope(y, x, n_boot=200, n_perm=200)["slope"] > 0.005
    with pytest.raises(ValueError, match="does not vary"):
        graded_slope(y, np.ones(21))
    with pytest.raises(ValueError, match="one label per set"):
        graded_slope(y, x, groups=[0, 1])


def test_graded_slope_planted_is_found():
    rng = np.random.default_rng(7)
    x, y = _graded(rng, -0.002)
    r = graded_slope(y, x, seed=1)
    assert r["low"] <= -0.002 <= r["high"] < 0 and r["p"] < 0.05
    assert (r["n_sets"], r["n_seeds"]) == (25, 2)


def test_graded_slope_null_p_is_roughly_uniform():
    rng = np.random.default_rng(8)
    ps = np.array([graded_slope(*_graded(rng, 0.0)[::-1], n_boot=100, n_perm=500, seed=i)["p"]
                   for i in range(100)])
    lo, hi = _binomial_band(100)
    assert lo <= (ps < 0.05).mean() <= hi, (ps < 0.05).mean()  # measured 0.04
    assert 0.4 <= ps.mean() <= 0.6, ps.mean()  # measured 0.57
    assert 0.1 <= (ps < 0.25).mean() <= 0.4  # measured 0.17


# -- wording: excluded effects, shares ----------------------------------------------------------------


def test_excluded_effect_and_no_difference_text():
    assert excluded_effect(-0.003, 0.027) == pytest.approx(0.027)
    assert excluded_effect(-0.05, 0.01) == pytest.approx(0.05)
    assert math.isnan(excluded_effect(NAN, 0.1))
    assert no_difference_text(-0.003, 0.027) == \
        "no detectable difference (excludes effects beyond ±0.027)"
    assert no_difference_text(-0.003, 0.027, unit="nats/token").endswith("0.027 nats/token)")
    rng = np.random.default_rng(0)
    b = rng.normal(size=(4, 30))
    r = paired_difference(b + 0.05 * rng.normal(size=b.shape), b)
    assert not r["significant"] and r["verdict"] == "no detectable difference"
    assert r["excludes_beyond"] == pytest.approx(max(-r["low"], r["high"]))
    assert r["statement"] == no_difference_text(r["low"], r["high"])
    sig = paired_difference(b - 1.0, b)
    assert math.isnan(sig["excludes_beyond"]) and sig["statement"] == sig["verdict"]


def test_share_or_difference_known_inputs():
    num = {"estimate": 0.02, "low": 0.01, "high": 0.03}  # e.g. utility recovered, nats/token
    share = {"estimate": 0.4, "low": 0.2, "high": 0.6}
    s = share_or_difference(num, {"estimate": 0.05, "low": 0.03, "high": 0.07}, share)
    assert (s["kind"], s["estimate"], s["low"], s["high"], s["note"]) == ("share", 0.4, 0.2, 0.6,
                                                                          None)
    d = share_or_difference(num, {"estimate": 0.05, "low": -0.01, "high": 0.11}, share,
                            unit="nats/token")
    assert (d["kind"], d["estimate"], d["low"], d["high"]) == ("difference", 0.02, 0.01, 0.03)
    assert "[-0.01, 0.11] reaches 0" in d["note"] and "nats/token" in d["note"]
    assert share_or_difference(num, {"estimate": 0.05, "low": 0.0, "high": 0.1})["kind"] == \
        "difference"  # a CI touching 0 reaches it
    bare = share_or_difference(num, {"estimate": 0.05, "low": 0.03, "high": 0.07})
    assert bare["estimate"] == pytest.approx(0.4) and math.isnan(bare["low"])
    assert share_or_difference(num, {"estimate": 0.05})["kind"] == "difference"  # no CI: unknown
    with pytest.raises(ValueError, match="estimate"):
        share_or_difference({"low": 0.0}, {"estimate": 1.0})


def test_prediction_interval_never_narrower_than_the_mean_ci():
    """CAST reacts to the two seeds and the sets do not (a seed term in the difference, df 1) while
    sets differ a little: the mean's CI is stretched by t(df ~ 1); the prediction interval for a
    new set must still contain it."""
    from cast_interp.inference import compare_to_random_sets

    rng = np.random.default_rng(3)
    n_sets, n_seeds, n_prompts = 20, 2, 64
    seed_eff = np.array([-0.05, 0.05])[None, :, None]
    sets = 3.5 + 0.03 * rng.standard_normal((n_sets, 1, 1)) \
        + 0.01 * rng.standard_normal((n_sets, n_seeds, n_prompts))
    cast = 3.5 + seed_eff[0] + 0.01 * rng.standard_normal((n_seeds, n_prompts))
    r = compare_to_random_sets(cast, sets, n_boot=1000, seed=0)
    assert r["df"] < r["df_pred"]  # the case where the stretch used to invert them
    assert r["pred_low"] <= r["low"] <= r["diff"] <= r["high"] <= r["pred_high"]
