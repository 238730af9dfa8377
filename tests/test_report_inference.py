"""The report's v3 inference on planted results documents: CAST against random sets that trained
on every seed, tied ranks, matched safety from trained checkpoints only, attribution shares over
denominators whose CI may reach 0 (numpy only, no model)."""

import numpy as np
import pytest

from cast_interp import report


def test_report_cast_vs_sets_on_crossed_sets_and_ranks_with_ties():
    # 20 random sets, each trained on both seeds (v3); task accuracy ties for most sets
    arms = {}
    for method, draws in (("cast", [None]), ("random", range(20))):
        for seed in (0, 1):
            for d in draws:
                acc = [1.0, 0.0, 1.0, 1.0] if d is None or d < 18 else [1.0, 0.0, 0.0, 1.0]
                arms[f"{method}_d{d}_t{seed}"] = {"piece": {"method": method, "k": 3, "train_seed": seed,
                                          "draw": d}, "per_prompt": {"task_correct": acc},
                                "tuning": {"n_frozen_in_scope": 30, "curve": []}}
    doc = {"config": {"train_seeds": [0, 1], "n_draws": 20, "n_boot": 500, "ci": 0.95,
                      "seed": 0}, "arms": arms}
    block = report.compare_arms(doc)["metrics"]["task_correct"][3]
    assert block["cast_vs_sets"]["layout"] == "crossed"
    assert block["cast_vs_sets"]["n_seeds"] == 2 and block["cast_vs_sets"]["n_sets"] == 20
    rank = block["cast_rank"]  # higher is better: 2 sets below CAST, 18 tied with it
    assert (rank["rank_low"], rank["rank_high"]) == (1, 19)
    assert report._rank_text(block) == "1–19 of 21 (p = 0.05–0.90)"


def _curve(safety, kl):
    return [{"step": i, "refusal_score": s, "kl": k} for i, (s, k) in enumerate(zip(safety, kl))]


def test_matched_safety_reads_three_levels_between_trained_checkpoints():
    # full reaches 1.0 at its first trained checkpoint; CAST only 0.5; both top out above 2:
    # the common range is [1.0, 2.0] (never the line from step 0 to step 1)
    curves = {"full": _curve([0.0, 1.0, 2.0, 3.0], [0.0, 0.2, 0.3, 0.5]),
              "cast": _curve([0.0, 0.5, 1.5, 2.0], [0.0, 0.1, 0.5, 0.6])}
    arms = {}
    for method, curve in curves.items():
        for seed in (0, 1):
            arms[f"{method}_t{seed}"] = {
                "piece": {"method": method, "k": 0 if method == "full" else 3, "train_seed": seed,
                          "draw": None}, "per_prompt": {}, "tuning": {"curve": curve}}
    doc = {"config": {"train_seeds": [0, 1], "n_boot": 200, "ci": 0.95, "seed": 0}, "arms": arms}
    ms = report.matched_safety(doc)
    assert ms["levels"] == pytest.approx([1.0, 1.5, 2.0]) and ms["target"] == 2.0
    at = {lv["level"]: {r["method"]: r["kl_at_target"] for r in lv["rows"]}
          for lv in ms["by_level"]}
    # by hand: full is linear in safety between its checkpoints; CAST's 1.0 lies between 0.5 and
    # 1.5 (0.1 + 0.5 * 0.4), its 2.0 is measured
    assert at[1.0] == pytest.approx({"full": 0.2, "cast": 0.3})
    assert at[1.5] == pytest.approx({"full": 0.25, "cast": 0.5})
    assert at[2.0] == pytest.approx({"full": 0.3, "cast": 0.6})
    text = "\n".join(report._matched_lines(ms))
    assert "never on the line from the untrained model" in text and text.count("At validation") == 3
    # a piece whose first trained checkpoint is past another's best: nothing is read, and why
    arms["cast_t0"]["tuning"]["curve"] = arms["cast_t1"]["tuning"]["curve"] = \
        _curve([0.0, 3.5, 4.0], [0.0, 0.1, 0.2])
    none = report.matched_safety(doc)
    assert none["target"] is None and "no level is reached by every piece" in none["note"]
    assert "Not read: no level" in "\n".join(report._matched_lines(none))


def _attribution_doc(drop_b_low: float) -> dict:
    att = {"label": "full", "total_drop": 0.026, "total_drop_low": 0.0098,
           "total_drop_high": 0.046, "total_drop_B": 0.02, "total_drop_B_low": drop_b_low,
           "total_drop_B_high": 0.05, "top_k_C_share_B": 0.26, "top_k_C_share_B_low": 0.15,
           "top_k_C_share_B_high": 2.2, "top_k_C_recovered_B": 0.0052,
           "top_k_C_recovered_B_low": 0.003, "top_k_C_recovered_B_high": 0.0071}
    return {"attribution": att, "config": {"train_seeds": [0]}}


def test_attribution_share_becomes_a_difference_when_its_denominator_ci_reaches_0():
    wide = "\n".join(report._attribution_lines(_attribution_doc(-0.001)))
    assert "0.0052 [0.003, 0.0071] nats/token recovered*" in wide
    assert "its denominator's CI [-0.001, 0.05] reaches 0" in wide
    assert "0.26 [0.15, 2.2]" not in wide
    narrow = "\n".join(report._attribution_lines(_attribution_doc(0.004)))
    assert "0.26 [0.15, 2.2]" in narrow and "nats/token recovered" not in narrow


def test_concentration_rows_give_effect_sizes_beside_the_null():
    from cast_interp.conflict_map import CONC_HEADER, _fmt_conc

    c = {"top10_share": 0.291, "gini": 0.481, "concentrated": False,
         "null": {"top10_share": {"null_low": 0.272, "null_high": 0.299, "null_mean": 0.285},
                  "gini": {"null_low": 0.453, "null_high": 0.482, "null_mean": 0.468,
                           "effect_z": 1.7}}}
    row = _fmt_conc("C", c)
    assert row == ("| C | 0.291 | 0.272–0.299 | +0.006 | 0.481 | 0.453–0.482 | +0.013 (z = 1.7) | "
                   "not beyond the null |")
    assert row.count("|") == CONC_HEADER[0].count("|") == CONC_HEADER[1].count("|")
    bare = _fmt_conc("S", {"top10_share": 0.5, "gini": 0.7})
    assert bare.count("|") == CONC_HEADER[0].count("|")
