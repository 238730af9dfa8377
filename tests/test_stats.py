"""Known answers and planted effects for `cast_interp.stats`."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from cast_interp.stats import (bootstrap_indices, bootstrap_statistic, compare_to_null,
                               concentration, empirical_p, gini, interpolate_at, null_range,
                               paired_difference, permute_within, rank_order, ratio_of_sums_ci,
                               spearman)

NAN = float("nan")


# -- bootstrap over examples -------------------------------------------------------------------------


def test_bootstrap_indices_shape_range_and_seed():
    idx = bootstrap_indices(7, 50, seed=3)
    assert idx.shape == (50, 7) and idx.min() >= 0 and idx.max() <= 6
    np.testing.assert_array_equal(idx, bootstrap_indices(7, 50, seed=3))
    assert not np.array_equal(idx, bootstrap_indices(7, 50, seed=4))
    with pytest.raises(ValueError, match="positive integer"):
        bootstrap_indices(0, 10, seed=0)


def test_ratio_of_sums_estimate_and_draws_known():
    num = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    den = np.array([1.0, 2.0, 3.0])
    r = ratio_of_sums_ci(num, den, n_boot=200, seed=5)
    np.testing.assert_allclose(r["estimate"], [9 / 6, 12 / 6])
    assert r["draws"].shape == (200, 2) and r["ci"] == 0.95 and r["n_boot"] == 200
    # each draw is the ratio of sums on the examples of one resample
    idx = bootstrap_indices(3, 200, seed=5)
    for b in (0, 17, 199):
        np.testing.assert_allclose(r["draws"][b], num[idx[b]].sum(0) / den[idx[b]].sum())
    assert np.all(r["low"] <= r["estimate"]) and np.all(r["estimate"] <= r["high"])


def test_ratio_of_sums_same_resample_for_all_units():
    rng = np.random.default_rng(0)
    col = rng.normal(size=40)
    num = np.stack([col, col, rng.normal(size=40)], axis=1)  # units 0 and 1 identical
    r = ratio_of_sums_ci(num, rng.integers(1, 9, size=40), n_boot=300, seed=1)
    np.testing.assert_array_equal(r["draws"][:, 0], r["draws"][:, 1])
    assert not np.array_equal(r["draws"][:, 0], r["draws"][:, 2])


def test_ratio_of_sums_ci_covers_planted_per_token_mean():
    # tokens carry NLL ~ N(2, 1); examples have 3..30 tokens; the per-token mean is planted at 2.0
    rng = np.random.default_rng(11)
    covered, reps = 0, 100
    for rep in range(reps):
        den = rng.integers(3, 31, size=60)
        num = np.array([rng.normal(2.0, 1.0, size=t).sum() for t in den])
        r = ratio_of_sums_ci(num, den, n_boot=400, seed=rep)
        covered += r["low"] <= 2.0 <= r["high"]
    assert 0.85 <= covered / reps <= 0.995


def test_ratio_of_sums_accepts_torch_and_checks_input():
    num, den = torch.tensor([[1.0], [3.0]]), torch.tensor([1, 1])
    r = ratio_of_sums_ci(num, den, n_boot=20)
    np.testing.assert_allclose(r["estimate"], [2.0])
    with pytest.raises(ValueError, match="one weight per example"):
        ratio_of_sums_ci(np.ones((3, 2)), np.ones(4))
    with pytest.raises(ValueError, match="non-finite"):
        ratio_of_sums_ci(np.array([1.0, NAN]), np.ones(2))
    with pytest.raises(ValueError, match="empty"):
        ratio_of_sums_ci(np.zeros((0, 2)), np.zeros(0))
    with pytest.raises(ValueError, match="positive total"):
        ratio_of_sums_ci(np.ones(2), np.zeros(2))


def test_bootstrap_statistic_mean_and_nan_draws():
    x = np.arange(10.0)
    r = bootstrap_statistic(lambda i: x[i].mean(), 10, n_boot=300, seed=2)
    assert r["estimate"] == 4.5
    idx = bootstrap_indices(10, 300, seed=2)
    np.testing.assert_allclose(r["draws"], x[idx].mean(1))
    # a statistic undefined on some resamples (NaN) is ignored by the interval
    r = bootstrap_statistic(lambda i: NAN if 0 in i else x[i].mean(), 10, n_boot=300, seed=2)
    assert np.isnan(r["draws"]).any() and math.isfinite(r["low"]) and math.isfinite(r["high"])


# -- paired differences ------------------------------------------------------------------------------


def _grid(rng, seeds=4, prompts=50, seed_sd=0.0, prompt_sd=0.0):
    return (seed_sd * rng.normal(size=(seeds, 1)) + prompt_sd * rng.normal(size=(1, prompts))
            + rng.normal(size=(seeds, prompts)))


def test_paired_difference_finds_planted_effect():
    rng = np.random.default_rng(0)
    b = 1.0 + 0.5 * _grid(rng, prompt_sd=1.0) ** 2  # skewed, positive, with prompt effects
    a = b - 0.3 + 0.05 * rng.normal(size=b.shape)
    r = paired_difference(a, b, names=("cast", "random"))
    assert r["significant"] and r["high"] < 0
    assert r["verdict"] == "cast lower than random" and r["better"] == "cast"
    assert r["low"] <= -0.3 <= r["high"] and abs(r["diff"] + 0.3) < 0.02
    assert r["relative"] == pytest.approx(r["diff"] / b.mean())
    assert r["relative_low"] <= r["relative"] <= r["relative_high"] < 0
    assert (r["n_seeds"], r["n_prompts"]) == (4, 50)
    up = paired_difference(b + 0.3, b, lower_is_better=False)
    assert up["verdict"] == "a higher than b" and up["better"] == "a"
    assert paired_difference(b + 0.3, b)["better"] == "b"


@pytest.mark.parametrize("seed_sd, prompt_sd, seeds", [(0.0, 0.0, 4), (0.2, 1.0, 8)])
def test_paired_difference_null_false_positive_rate(seed_sd, prompt_sd, seeds):
    # a and b from the same distribution: a 95% CI excludes 0 in about 5% of repetitions
    rng = np.random.default_rng(1)
    reps, hits = 300, 0
    for rep in range(reps):
        d = _grid(rng, seeds=seeds, seed_sd=seed_sd, prompt_sd=prompt_sd)
        b = _grid(rng, seeds=seeds)
        r = paired_difference(b + d, b, n_boot=1000, seed=rep)
        hits += r["significant"]
        assert (r["verdict"] == "no detectable difference") == (not r["significant"])
        if not r["significant"]:  # the statement gives the smallest effect the CI excludes
            assert r["excludes_beyond"] == max(-r["low"], r["high"])
            assert f"excludes effects beyond ±{r['excludes_beyond']:.3g}" in r["statement"]
    assert 0.01 <= hits / reps <= 0.12


def test_paired_difference_pigeonhole_is_wider_on_iid_cells():
    # seeds x prompts resampling of the raw grid counts the cell noise ~3 times (its variance)
    rng = np.random.default_rng(2)
    a, b = _grid(rng), _grid(rng)
    re = paired_difference(a, b)
    pig = paired_difference(a, b, method="pigeonhole")
    assert (pig["high"] - pig["low"]) / (re["high"] - re["low"]) > 1.3
    assert re["method"] == "random_effects" and pig["diff"] == re["diff"]


def test_paired_difference_one_seed_and_torch():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=30), rng.normal(size=30)
    r1 = paired_difference(a, b, seed=4)
    r2 = paired_difference(torch.tensor(a[None]), torch.tensor(b[None]), seed=4)
    assert r1["n_seeds"] == 1 and r1["low"] == r2["low"] and r1["high"] == r2["high"]
    assert r1["diff"] == pytest.approx(a.mean() - b.mean())


def test_paired_difference_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        paired_difference(np.ones((2, 5)), np.ones((2, 6)))
    with pytest.raises(ValueError, match="non-finite"):
        paired_difference(np.array([1.0, NAN, 2.0]), np.ones(3))
    with pytest.raises(ValueError, match="empty"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="at least 2 prompts"):
        paired_difference(np.ones((3, 1)), np.ones((3, 1)))


# -- ranks, correlations -----------------------------------------------------------------------------


def test_empirical_p_known_draws():
    draws = np.arange(1.0, 21.0)  # 1..20
    r = empirical_p(0.5, draws)
    assert (r["rank"], r["n_draws"], r["percentile"]) == (1, 20, 0.0)
    assert r["p"] == pytest.approx(1 / 21)
    assert empirical_p(0.5, draws, alternative="greater")["p"] == pytest.approx(21 / 21)
    assert empirical_p(25.0, draws, alternative="greater")["p"] == pytest.approx(1 / 21)
    mid = empirical_p(10.0, draws)  # draws 1..10 at least as low: 10, of which 9 strictly lower
    assert mid["p"] == pytest.approx(11 / 21) and mid["rank"] == 10
    assert mid["percentile"] == pytest.approx(100 * 9.5 / 20)
    with_nan = empirical_p(0.5, np.append(draws, NAN))
    assert with_nan["n_draws"] == 20 and with_nan["n_nan"] == 1
    with pytest.raises(ValueError, match="alternative"):
        empirical_p(0.5, draws, alternative="two-sided")


def test_spearman_known_answers():
    x = np.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    u, v = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 40).astype(float)  # ties
    assert spearman(u, v) == pytest.approx(spearmanr(u, v).statistic)
    u[3], v[7] = NAN, NAN  # pairs with a NaN are dropped
    keep = np.isfinite(u) & np.isfinite(v)
    assert spearman(torch.tensor(u), v) == pytest.approx(spearmanr(u[keep], v[keep]).statistic)
    assert math.isnan(spearman([1.0, 2.0], [2.0, 1.0]))
    assert math.isnan(spearman([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]))


def test_rank_order_known_and_nan_last():
    np.testing.assert_array_equal(rank_order([3.0, 1.0, 2.0], seed=0), [0, 2, 1])
    np.testing.assert_array_equal(rank_order([3.0, 1.0, 2.0], seed=0, largest=False), [1, 2, 0])
    order = rank_order(torch.tensor([[NAN, 1.0], [NAN, 2.0], [-math.inf, 0.5]]), seed=1)
    assert list(order[:3]) == [3, 1, 5] and set(order[3:]) == {0, 2, 4}
    order = rank_order([1.0, 5.0, 1.0, 5.0, 3.0], seed=2)
    assert set(order[:2]) == {1, 3} and order[2] == 4 and set(order[3:]) == {0, 2}


def test_rank_order_ties_seeded_not_index_order():
    tied = np.zeros(10)
    orders = [rank_order(tied, seed=s) for s in range(20)]
    assert sum(not np.array_equal(o, np.arange(10)) for o in orders) >= 18
    np.testing.assert_array_equal(rank_order(tied, seed=7), rank_order(tied, seed=7))
    # index 0 is first among 10 tied units about 1 time in 10, not always (layer order)
    first0 = np.mean([rank_order(tied, seed=s)[0] == 0 for s in range(300)])
    assert 0.04 <= first0 <= 0.18


def test_permute_within_keeps_nan_and_values():
    x = np.array([[1.0, NAN, 3.0], [4.0, 5.0, NAN], [7.0, 8.0, 9.0]])
    p = permute_within(x, seed=0)
    np.testing.assert_array_equal(np.isnan(p), np.isnan(x))
    np.testing.assert_array_equal(np.sort(p[~np.isnan(p)]), np.sort(x[~np.isnan(x)]))
    np.testing.assert_array_equal(p, permute_within(torch.tensor(x), seed=0))
    assert not np.array_equal(p, x, equal_nan=True)
    assert not np.array_equal(p, permute_within(x, seed=1), equal_nan=True)


# -- concentration and nulls -------------------------------------------------------------------------


def test_concentration_and_gini_known_answers():
    flat = concentration(np.ones(20))
    assert flat["gini"] == pytest.approx(0.0) and flat["top_share"] == pytest.approx(0.1)
    assert flat["top_k"] == 2 and flat["n"] == 20
    one_hot = concentration(np.eye(1, 10).ravel())
    assert one_hot["gini"] == pytest.approx(9 / 10) and one_hot["top_share"] == 1.0
    assert concentration(np.ones(25))["top_k"] == 3  # 2.5 rounds half up
    assert concentration(np.ones(3))["top_k"] == 1  # at least one unit
    mixed = concentration([-5.0, 1.0, 1.0, 2.0, NAN], top=0.25)  # negatives count as 0
    assert (mixed["n"], mixed["n_nan"], mixed["top_k"]) == (4, 1, 1)
    assert mixed["top_share"] == pytest.approx(0.5)
    assert math.isnan(concentration(np.zeros(5))["top_share"])
    assert gini([0.0, 0.0, 1.0, 1.0]) == pytest.approx(0.5)  # mean |xi - xj| / (2 mean)
    with pytest.raises(ValueError, match="non-negative"):
        gini([-1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        concentration([])


def test_null_range_and_compare_to_null():
    null = np.linspace(0.0, 1.0, 1001)
    r = null_range(np.append(null, NAN))
    assert r["mean"] == pytest.approx(0.5) and r["n"] == 1001
    assert (r["low"], r["high"]) == (pytest.approx(0.025), pytest.approx(0.975))
    above = compare_to_null(0.9905, null)
    assert above["beats_null"] and above["null_high"] == pytest.approx(0.975)
    # the effect size beside the null: observed - null mean, and in null sds (sd of 0..1 spaced
    # evenly: sqrt(1/12) with n / (n - 1) for the sample sd)
    assert above["effect"] == pytest.approx(0.4905)
    assert above["effect_z"] == pytest.approx(0.4905 / math.sqrt(1 / 12 * 1001 / 1000), rel=1e-3)
    assert above["p"] == pytest.approx((1 + 10) / 1002)  # 0.991 .. 1.0: 10 null values as high
    assert not compare_to_null(0.96, null)["beats_null"]  # inside the null's range
    assert not compare_to_null(0.5, null)["beats_null"]
    assert not compare_to_null(NAN, null)["beats_null"]


# -- curves ------------------------------------------------------------------------------------------


def test_interpolate_at_known_line():
    x, y = [3.0, 0.0, 1.0, 2.0], [7.0, 1.0, 3.0, 5.0]  # y = 2x + 1, unsorted
    assert interpolate_at(x, y, 1.5) == pytest.approx(4.0)
    assert interpolate_at(x, y, 0.0) == pytest.approx(1.0)
    assert interpolate_at(torch.tensor(x), y, 3.0) == pytest.approx(7.0)
    assert math.isnan(interpolate_at(x, y, -0.1)) and math.isnan(interpolate_at(x, y, 3.1))
    assert interpolate_at([0.0, 1.0, 1.0, 2.0], [0.0, 1.0, 3.0, 2.0], 1.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same number of points"):
        interpolate_at([0.0, 1.0], [0.0], 0.5)
